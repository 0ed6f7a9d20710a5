"""Concurrent fills of one local FeatureCache: claimed batches are computed once.

Two trials of one cache group that run at the same time (several trials per GPU, or per node
with the node-local store) used to both miss and both compute every batch. `cached_batches` now
claims what it computes and waits for what another live process claimed. These tests run real
processes on a real directory; the control run without claims shows that the two fills overlap
(each computes everything), so the claimed run's "each batch once" can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from perl_core.cache import FeatureCache, cached_batches

N = 6

FILLER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from perl_core.cache import FeatureCache, cached_batches

    root, log, go, claims = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    cache = FeatureCache(root, dtype=torch.float32)
    cache.claims_enabled = claims
    keys = [f"{i:02d}" + "0" * 62 for i in range(N_BATCHES)]

    def compute(i):
        with open(log, "a") as f:
            f.write(f"{i}\\n")
        time.sleep(0.15)
        return {"prefix": torch.full((1, 2, 3), float(i)), "h0": torch.full((1, 3), float(i))}

    open(log + ".ready", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    out = [float(f["prefix"][0, 0, 0]) for f in cached_batches(
        cache, keys, lambda which: list(which), lambda i: i, compute)]
    print(json.dumps({"values": out, "stats": cache.stats()}))
""").replace("N_BATCHES", str(N))


def _fill_twice(tmp_path, claims: bool):
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    root, go = tmp_path / f"store-{claims}", tmp_path / f"go-{claims}"
    logs = [tmp_path / f"computed-{claims}-{j}.txt" for j in range(2)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(log), str(go),
                               "1" if claims else "0"], stdout=subprocess.PIPE, text=True,
                              env=env) for log in logs]
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{log}.ready") for log in logs):  # both at the start line
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    go.write_text("")
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    computed = [log.read_text().split() if log.exists() else [] for log in logs]
    return outs, computed, root


def test_two_processes_compute_each_batch_once(tmp_path):
    outs, computed, root = _fill_twice(tmp_path, claims=True)
    expected = [float(i) for i in range(N)]
    assert [o["values"] for o in outs] == [expected, expected]
    assert sorted(computed[0] + computed[1]) == [str(i) for i in range(N)]  # each once
    for out, mine in zip(outs, computed):  # what a process did not compute it waited for
        assert len(mine) + out["stats"].get("image/waited", 0) == N
    assert not list(root.rglob("*.claim"))  # every claim released


def test_without_claims_both_compute_everything(tmp_path):
    """The control: the same two processes with claims off both compute every batch."""
    outs, computed, _ = _fill_twice(tmp_path, claims=False)
    assert len(computed[0]) == len(computed[1]) == N
    assert all(o["stats"].get("image/waited", 0) == 0 for o in outs)


def _keys(n=3):
    return [f"{i:02d}" + "f" * 62 for i in range(n)]


def _feats(i):
    return {"prefix": torch.full((1, 2, 3), float(i)), "h0": torch.full((1, 3), float(i))}


def _fill(cache, keys, computed):
    def compute(i):
        computed.append(i)
        return _feats(i)

    return [float(f["prefix"][0, 0, 0]) for f in cached_batches(
        cache, keys, lambda which: list(which), lambda i: i, compute)]


def _write_claim(cache, key, holder, age_s=0.0):
    path = cache._claim_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(holder)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def test_claims_of_a_dead_process_are_taken_over(tmp_path):
    cache = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keys = _keys()
    _write_claim(cache, keys[1], f"{cache.holder.rsplit('-', 2)[0]}-{dead.pid}-abcd1234")
    computed: list[int] = []
    t0 = time.monotonic()
    assert _fill(cache, keys, computed) == [0.0, 1.0, 2.0]
    assert computed == [0, 1, 2] and time.monotonic() - t0 < 5  # not CLAIM_WAIT_S


def test_stale_and_live_foreign_holders(tmp_path):
    cache = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    cache.CLAIM_WAIT_S = 0.5
    keys = _keys()
    _write_claim(cache, keys[0], "another-host-1-aaaa0000", age_s=10 * cache.CLAIM_STALE_S)
    _write_claim(cache, keys[2], "another-host-2-bbbb1111")  # fresh: waited for, then computed
    computed: list[int] = []
    t0 = time.monotonic()
    assert _fill(cache, keys, computed) == [0.0, 1.0, 2.0]
    assert computed == [0, 1, 2]
    assert time.monotonic() - t0 >= 0.5  # it did wait for the live holder's batch
    assert os.path.exists(cache._claim_path(keys[2]))  # not ours: left alone
    assert not os.path.exists(cache._claim_path(keys[0]))  # the stale one was taken and released


def test_a_waiter_reads_what_the_holder_writes(tmp_path):
    holder = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    waiter = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    keys = _keys(2)
    assert holder.claim(keys[0]) and not waiter.claim(keys[0])
    holder.put(keys[0], _feats(7))
    holder.release(keys[0])
    computed: list[int] = []
    assert _fill(waiter, keys, computed) == [7.0, 1.0] and computed == [1]


def test_stopping_early_releases_claims(tmp_path):
    cache = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    keys = _keys()
    gen = cached_batches(cache, keys, lambda which: list(which), lambda i: i, _feats)
    next(gen)
    assert os.path.exists(cache._claim_path(keys[2]))
    gen.close()
    assert not list((tmp_path / "store").rglob("*.claim"))


def test_object_stores_do_not_claim():
    pytest.importorskip("fsspec.implementations.memory")
    cache = FeatureCache("memory://claims-test", dtype=torch.float32)
    assert not cache.claims_enabled and cache.claim("x" * 64)


def test_heartbeats_of_long_gone_holders_are_forgotten(tmp_path):
    cache = FeatureCache(str(tmp_path / "store"), dtype=torch.float32)
    cache.heartbeat()
    old = cache._heartbeat_path("gone-host-1-cafe0000")
    with open(old, "w") as f:
        f.write("0")
    t = time.time() - 2 * 86400
    os.utime(old, (t, t))
    cache.evict()
    assert not os.path.exists(old) and os.path.exists(cache._heartbeat_path(cache.holder))
