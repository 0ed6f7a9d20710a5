"""The bench's quickest path on tiny sizes: the JSON keys exist and the values are positive."""

from __future__ import annotations

from perl_core.bench import run

KEYS = ["plain_clip_img_per_s", "perl_eval_img_per_s_uncached", "perl_eval_img_per_s_cached",
        "achieved_gflops", "machine_matmul_gflops", "roofline_fraction", "sweep_speedup_vs_naive"]


def test_bench_quick_tiny_sizes():
    res = run(quick=True, batch=2, reps=1, classes=(2, 3), sweep_ks=(1,), sweep_seeds=(1,),
              sweep_datasets=("ToyShapes",), world_sizes={"train": 1, "val": 1, "test": 1},
              matmul_n=64)
    for k in KEYS:
        assert res[k] > 0, k
    assert set(res["train_step_s_by_classes"]) == {"2", "3"}
    for d in res["train_step_s_by_classes"].values():
        assert d["cached"] > 0 and d["uncached"] > 0
    assert res["peak_memory_mb"] and all(r["peak_memory_mb"] >= 0 for r in res["peak_memory_mb"])
