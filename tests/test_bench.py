"""The bench's quickest path on tiny sizes: the JSON keys exist and the values are positive, the
naive and optimized sweeps give the same results (fp32 CPU), the optimized one hits its cache."""

from __future__ import annotations

import pytest
import torch

from perl_core.bench import PeakMemory, run


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield

KEYS = ["plain_clip_img_per_s", "perl_eval_img_per_s_uncached", "perl_eval_img_per_s_cached",
        "achieved_gflops", "machine_matmul_gflops", "roofline_fraction", "sweep_speedup_vs_naive"]


def test_bench_quick_tiny_sizes():
    res = run(quick=True, batch=2, reps=1, classes=(2, 3), sweep_ks=(1, 2), sweep_seeds=(1,),
              sweep_datasets=("ToyShapes",), sweep_shots=1,
              world_sizes={"train": 1, "val": 1, "test": 1}, matmul_n=64, roofline_arch=None)
    for k in KEYS:
        assert res[k] > 0, k
    assert set(res["train_step_s_by_classes"]) == {"2", "3"}
    for d in res["train_step_s_by_classes"].values():
        assert d["cached"] > 0 and d["uncached"] > 0
    records = res["peak_memory_mb"]
    assert [r["mode"] for r in records] == ["naive", "optimized", "optimized", "naive"]
    assert all(r["peak_memory_mb"] > 0 for r in records)
    assert res["sweep_trials"] == 2 and res["sweep_results_identical"] is True
    assert res["sweep_train_speedup"] > 0 and res["sweep_eval_speedup"] > 0
    assert res["sweep_speedup_median_trial"] > 0
    # the K=2 trial reads what the K=1 trial stored: prompts, training views, test images
    opt = [r for r in records if r["mode"] == "optimized"]
    assert opt[0]["cache_hits"] < opt[1]["cache_hits"]
    assert res["sweep_cache"]["image/hit"] >= res["sweep_cache"]["image/miss"]


def test_peak_memory_is_per_trial():
    device = torch.device("cpu")
    with PeakMemory(device) as big:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        del x
    with PeakMemory(device) as small:
        pass
    if big.method == "unavailable":
        return
    assert big.delta > 50
    assert small.delta < 30  # the earlier peak does not leak into this trial


def test_step_memory_in_fresh_processes_per_text_path():
    """`step_memory` (perl-tiny, 300 prompts): one fresh process per configuration; the chunked
    text path adds a fraction of the whole graph's memory (~1.6 MB per prompt here)."""
    from perl_core.bench import step_memory

    res = step_memory("perl-tiny", classes=(300,), modes=("whole", "chunk16", "ckpt_step"),
                      steps=1, threads=1, timeout_s=300)
    rec = {r["mode"]: r for r in res["records"]}
    assert set(rec) == {"whole", "chunk16", "ckpt_step"}
    assert rec["chunk16"]["text_chunk"] == 16 and rec["whole"]["text_chunk"] == 0
    assert rec["whole"]["L_eff"] == rec["chunk16"]["L_eff"] > 1
    assert all(r["step_s"] > 0 and r["classes"] == 300 for r in rec.values())
    assert set(res["ratios"]["300"]) == {"chunk16", "ckpt_step"}
    if rec["whole"]["memory_method"] == "unavailable":
        return
    assert rec["whole"]["added_mb"] > 200
    assert rec["chunk16"]["added_mb"] < 0.3 * rec["whole"]["added_mb"]
