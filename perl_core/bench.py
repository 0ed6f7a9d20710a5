"""Throughput benchmark: plain CLIP vs PERL evaluation (uncached / prefix-cached), training steps
with and without the hoisted text prefix, achieved FLOP rate vs a dense matmul, and a small
sweep run naively vs with a shared backbone + FeatureCache.

    python -m perl_core.bench [--arch ViT-B-16-quickgelu] [--quick] [--json]

Runs on CUDA with bf16 autocast when a GPU is present, else fp32 on the CPU. `--quick` uses the
`perl-tiny` arch (ViT-B/16 block structure, 48 px, random init) and small sizes. Numbers are what
this machine measured in this run; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from perl_core.cache import FeatureCache
from perl_core.factory import create_clip
from perl_core.model import PerlModel


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ac(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---- analytic FLOPs ----------------------------------------------------------------------------
def _block_flops(n: int, d: int, mlp: int) -> float:
    """Multiply-adds x2 of one pre-LN transformer block on n tokens (qkv+out proj, MLP, attention)."""
    return 2.0 * n * (4 * d * d + 2 * d * mlp) + 4.0 * n * n * d


def vision_flops(model: PerlModel, steps: int | None = None) -> tuple[float, float]:
    """(plain CLIP image forward, PERL eval forward with all steps) FLOPs per image."""
    visual = model.clip.visual
    blocks = visual.transformer.resblocks
    d = blocks[0].mlp.c_fc.in_features
    mlp = blocks[0].mlp.c_fc.out_features
    size = model.image_size
    h, w = (size, size) if isinstance(size, int) else size
    p = visual.conv1.kernel_size[0]
    patches = (h // p) * (w // p)
    n = patches + 1
    embed = 2.0 * patches * (3 * p * p) * d
    L = len(blocks)
    J = model.vision_depths[0]
    K = model.num_steps if steps is None else steps
    plain = embed + L * _block_flops(n, d, mlp)
    perl = embed + J * _block_flops(n, d, mlp) + (L - J) * _block_flops(n, d, mlp)
    perl += sum((L - J) * _block_flops(n + k, d, mlp) for k in range(1, K + 1))
    return plain, perl


def machine_matmul_gflops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = _time(lambda: a @ b, device, reps)
    return 2.0 * n ** 3 / s / 1e9


# ---- memory ------------------------------------------------------------------------------------
def _mem_start(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _mem_peak_mb(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    # RSS high-water mark delta (monotonic: 0 when the trial stayed under an earlier peak)
    return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - start)


# ---- pieces ------------------------------------------------------------------------------------
def _eval_rates(model: PerlModel, device: torch.device, batch: int, reps: int,
                cache_dir: str) -> dict[str, float]:
    size = model.image_size
    hw = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, *hw, device=device)
    clip = model.clip
    with torch.no_grad():
        with _ac(device):
            t_plain = _time(lambda: clip.encode_image(images), device, reps)
            t_perl = _time(lambda: model.encode_image_all_steps(images), device, reps)
            cache = FeatureCache(cache_dir, dtype=torch.float16 if device.type == "cuda"
                                 else torch.float32)
            key = dict(dataset="bench", split="test", transform="randn", items=list(range(batch)))
            cache.image_prefix(model, images, **key)  # miss: computed and stored

            def cached() -> torch.Tensor:
                pre = cache.image_prefix(model, images, **key).to(device)
                return model.image_from_prefix(pre, all_steps=True)
            t_cached = _time(cached, device, reps)
    return {"plain_clip_img_per_s": batch / t_plain, "perl_eval_img_per_s_uncached": batch / t_perl,
            "perl_eval_img_per_s_cached": batch / t_cached, "_t_perl": t_perl}


def _train_steps(model: PerlModel, device: torch.device, classes: Sequence[int], batch: int,
                 reps: int) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step (batch images, C classes): text prefix hoisted vs recomputed."""
    size = model.image_size
    hw = (size, size) if isinstance(size, int) else size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(batch, 3, *hw, device=device)
    labels = torch.randint(0, min(classes), (batch,), device=device)
    out: dict[str, dict[str, float]] = {}
    model.train()
    for c in classes:
        tokens = model.tokenize([f"a photo of a class {i}." for i in range(c)]).to(device)
        with _ac(device):
            hoisted = model.text_prefix(tokens)

        def step(recompute: bool) -> None:
            with _ac(device):
                s_t = model.text_prefix(tokens) if recompute else hoisted
                s_v = model.image_prefix(images)
                img = model.image_from_prefix(s_v, all_steps=True)
                txt = model.text_from_prefix(s_t, tokens, all_steps=True)
                logits = model.logits(img.float(), txt.float())  # (K+1, N, C)
                loss = torch.nn.functional.cross_entropy(logits[-1], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[str(c)] = {"cached": _time(lambda: step(False), device, reps),
                       "uncached": _time(lambda: step(True), device, reps)}
    model.eval()
    return out


def _sweep(arch: str, pretrained: str, root: str, datasets: Sequence[str], ks: Sequence[int],
           seeds: Sequence[int], device: torch.device, cache_dir: str
           ) -> tuple[float, float, list[dict[str, Any]]]:
    """(naive seconds, optimized seconds, per-trial records) for the same trials and data."""
    from perl_core.config import TrainConfig
    from perl_core.train import build_model, fit

    precision = "bf16" if device.type == "cuda" else "fp32"
    base = dict(data_root=root, arch=arch, pretrained=pretrained, inject_layer=7, shots=2,
                epochs=1, batch_size=4, lr=1e-3, device=str(device), eval_batch_size=64)
    trials = [(d, k, s) for d in datasets for k in ks for s in seeds]
    records: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    for d, k, s in trials:  # naive: fp32, backbone rebuilt per trial, no cache
        cfg = TrainConfig(dataset=d, num_steps=k, seed=s, **{**base, "precision": "fp32"})
        m0 = _mem_start(device)
        fit(cfg, progress=False)
        records.append({"mode": "naive", "dataset": d, "K": k, "seed": s,
                        "peak_memory_mb": _mem_peak_mb(device, m0)})
    naive = time.perf_counter() - t0

    t0 = time.perf_counter()
    clip = None
    cache = FeatureCache(cache_dir, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    for d, k, s in trials:  # optimized: one backbone, shared FeatureCache
        cfg = TrainConfig(dataset=d, num_steps=k, seed=s, precision=precision, **base)
        m0 = _mem_start(device)
        if clip is None:
            clip = build_model(cfg).clip
        fit(cfg, model=build_model(cfg, clip=clip), progress=False, cache=cache)
        records.append({"mode": "optimized", "dataset": d, "K": k, "seed": s,
                        "peak_memory_mb": _mem_peak_mb(device, m0)})
    optimized = time.perf_counter() - t0
    return naive, optimized, records


def run(arch: str = "ViT-B-16-quickgelu", pretrained: str = "", *, quick: bool = False,
        batch: int = 16, reps: int = 3, classes: Sequence[int] = (10, 100, 1000),
        sweep_ks: Sequence[int] = (1, 2, 4), sweep_seeds: Sequence[int] = (1, 2),
        sweep_datasets: Sequence[str] = ("ToyShapes", "ToyWorld"),
        world_sizes: dict | None = None, matmul_n: int = 1024) -> dict[str, Any]:
    from perl_core.data.synthetic import generate_world

    device = _device()
    if quick:
        arch = "perl-tiny"
    torch.manual_seed(0)
    clip = create_clip(arch, pretrained or None)
    model = PerlModel(clip, inject_layer=7 if len(clip.visual.transformer.resblocks) > 7 else 2,
                      num_steps=4).to(device).eval()
    tmp = tempfile.mkdtemp(prefix="perl-bench-")
    try:
        res: dict[str, Any] = {"device": str(device), "arch": arch,
                               "precision": "bf16" if device.type == "cuda" else "fp32",
                               "torch_threads": torch.get_num_threads(), "batch": batch}
        rates = _eval_rates(model, device, batch, reps, f"{tmp}/eval-cache")
        t_perl = rates.pop("_t_perl")
        res.update(rates)
        plain_f, perl_f = vision_flops(model)
        res["analytic_gflop_per_img_plain"] = plain_f / 1e9
        res["analytic_gflop_per_img_perl_eval"] = perl_f / 1e9
        res["achieved_gflops"] = perl_f * batch / t_perl / 1e9
        res["machine_matmul_gflops"] = machine_matmul_gflops(device, matmul_n)
        res["roofline_fraction"] = res["achieved_gflops"] / res["machine_matmul_gflops"]
        res["train_step_s_by_classes"] = _train_steps(model, device, classes, 4, reps)
        del model
        world = f"{tmp}/world"
        generate_world(world, datasets=list(sweep_datasets),
                       sizes=world_sizes or {"train": 2, "val": 1, "test": 4})
        naive, opt, records = _sweep(arch, pretrained, world, sweep_datasets, sweep_ks,
                                     sweep_seeds, device, f"{tmp}/sweep-cache")
        res["sweep_trials"] = len(records) // 2
        res["sweep_naive_s"] = naive
        res["sweep_optimized_s"] = opt
        res["sweep_speedup_vs_naive"] = naive / opt
        res["peak_memory_mb"] = records
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"PERL bench ({res['arch']}, {res['device']}, {res['precision']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res.items():
        if k == "train_step_s_by_classes":
            for c, d in v.items():
                t.add_row(f"train step s, {c} classes (cached / uncached)",
                          f"{d['cached']:.4f} / {d['uncached']:.4f}")
        elif k == "peak_memory_mb":
            for mode in ("naive", "optimized"):
                t.add_row(f"peak memory MB per trial, {mode} (max)",
                          f"{max(r['peak_memory_mb'] for r in v if r['mode'] == mode):.1f}")
        else:
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console(file=sys.stderr).print(t)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-16-quickgelu")
    p.add_argument("--pretrained", default="", help="open_clip tag (default: random init)")
    p.add_argument("--quick", action="store_true", help="perl-tiny arch, small sizes")
    p.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    a = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    res = run(a.arch, a.pretrained, quick=a.quick)
    _table(res)
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
