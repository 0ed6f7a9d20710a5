"""FeatureCache: cached evaluation == uncached (fp32, exactly), keys, hits, size cap, corruption."""

from __future__ import annotations

import os
import time

import pytest
import torch

from perl_core.cache import FeatureCache, model_fingerprint
from perl_core.config import TrainConfig
from perl_core.train import build_model, evaluate_task, resolve_task


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, datasets=["ToyShapes"], sizes={"train": 2, "val": 1, "test": 2})
    return root


@pytest.fixture
def cfg(world, tiny_arch):
    return TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                       inject_layer=2, num_steps=2, shots=1, epochs=0, batch_size=4,
                       device="cpu", eval_batch_size=16)


def test_cached_eval_equals_uncached_fp32_and_hits(cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg)
    task = resolve_task(cfg)
    ref, ref_pc = evaluate_task(model, task, cfg)
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    got, got_pc = evaluate_task(model, task, cfg, cache=cache)
    assert got == ref and got_pc == ref_pc
    assert cache.misses > 0  # (val and base share their class prompts: a hit or two already)
    misses, hits = cache.misses, cache.hits
    again, _ = evaluate_task(model, task, cfg, cache=cache)
    assert again == ref
    assert cache.misses == misses and cache.hits == hits + misses + hits
    # another K shares the prefixes
    other = build_model(cfg.replace(num_steps=1), clip=model.clip)
    evaluate_task(other, resolve_task(cfg), cfg.replace(num_steps=1), cache=cache)
    assert cache.misses == misses


def test_keys_change_with_j_dataset_template_weights(make_tiny_perl, tmp_path):
    cache = FeatureCache(str(tmp_path))
    m = make_tiny_perl(seed=0)
    imgs = torch.randn(2, 3, *([m.image_size] * 2 if isinstance(m.image_size, int)
                               else m.image_size))
    base = dict(dataset="A", split="test", transform="t", items=["a", "b"])
    cache.image_prefix(m, imgs, **base)
    assert cache.misses == 1
    cache.image_prefix(m, imgs, **base)
    assert cache.hits == 1
    cache.image_prefix(m, imgs, **{**base, "dataset": "B"})
    assert cache.misses == 2
    cache.image_prefix(make_tiny_perl(seed=0, inject_layer=1), imgs, **base)
    assert cache.misses == 3
    m2 = make_tiny_perl(seed=1)
    assert model_fingerprint(m2.clip) != model_fingerprint(m.clip)
    cache.image_prefix(m2, imgs, **base)
    assert cache.misses == 4
    tok = m.tokenize(["a photo of a cat"])
    cache.text_prefix(m, tok, dataset="A", template="x", classnames=["cat"])
    cache.text_prefix(m, tok, dataset="A", template="y", classnames=["cat"])
    assert cache.misses == 6
    cache.text_prefix(m, tok, dataset="A", template="y", classnames=["cat"])
    assert cache.hits == 2


def test_size_cap_evicts_oldest(tmp_path):
    cache = FeatureCache(str(tmp_path), max_bytes=10**9, dtype=torch.float32)
    for i in range(4):
        cache.put(f"k{i}", torch.zeros(1000))
        t = time.time() - 100 + i
        os.utime(cache._path(f"k{i}"), (t, t))
    one = os.path.getsize(cache._path("k0"))
    cache.max_bytes = 2 * one + 10
    assert cache.evict() == 2
    assert cache.get("k0") is None and cache.get("k1") is None
    assert cache.get("k3") is not None and cache.size_bytes() <= cache.max_bytes


def test_truncated_blob_is_recomputed(tmp_path):
    cache = FeatureCache(str(tmp_path), dtype=torch.float32)
    x = torch.arange(100.0)
    cache.put("k", x)
    p = cache._path("k")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-37])
    assert cache.get("k") is None and cache.corrupt == 1
    calls = []
    y = cache.get_or_compute("k", lambda: calls.append(1) or x.clone())
    assert calls == [1] and torch.equal(y, x)
    assert torch.equal(cache.get("k"), x)
    assert not [f for f in os.listdir(os.path.dirname(p)) if ".tmp-" in f]
