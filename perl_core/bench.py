"""Throughput benchmark: plain CLIP vs PERL evaluation (uncached / from the FeatureCache), training
steps with and without cached frozen features, achieved FLOP rate vs a dense matmul, and a small
ablation_steps-like sweep run naively vs with one backbone + one FeatureCache.

    python -m perl_core.bench [--arch ViT-B-16-quickgelu] [--pretrained TAG] [--quick] [--json]
                              [--threads N]

On CUDA the eval, FLOP-rate and training stages run in fp32 (what the paper sweeps run; the
top-level keys) and in bf16 autocast (`by_precision`), timed with CUDA events over CUDA_ITERS
calls per round at the sweeps' eval batch (128); the CPU runs fp32 only. `--quick` uses the
`perl-tiny` arch (ViT-B/16 block structure, 48 px) with its embedded weights for the throughput
and sweep stages, and ViT-B/16 (random init) for the FLOP-rate stage. Every comparison is
interleaved (A B A B ... rounds, medians or ratios of sums) so that a load change on a shared
machine hits both sides alike. Numbers are what this machine measured in this run; nothing is
extrapolated.

    python -m perl_core.bench --step-memory [--classes 100,1000] [--modes whole,chunk128]
                              [--steps 2] [--precision fp32] [--quick] [--json] [--threads N]

runs only `step_memory`: the peak memory one training step adds and its time, per class count
and text path (whole graph, `text_chunk` N, or activation checkpointing), each configuration in
a fresh process (docs/benchmarks.md, "Text memory").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import torch

from perl_core.cache import FeatureCache, image_features, text_features
from perl_core.factory import create_clip
from perl_core.model import PerlModel


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# What the paper sweeps run (`precision: fp32`, TF32 matmuls off: fidelity) and the fast mode;
# on CUDA the bench measures both (docs/benchmarks.md), on the CPU fp32 only (bf16 on a CPU is
# neither what a sweep runs nor faster there).
PRECISIONS_CUDA = ("fp32", "bf16")
# calls per timed round on CUDA: one call of a small kernel mostly measures launch overhead
CUDA_ITERS = 20


def precisions_for(device: torch.device) -> tuple[str, ...]:
    return PRECISIONS_CUDA if device.type == "cuda" else ("fp32",)


def _ac(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, reps: int,
                 warmup: int = 1, iters: int | None = None) -> dict[str, float]:
    """Median seconds per call of each fn, timed in rounds (a b c a b c ...): a load change on a
    shared machine lands on every contender instead of on whichever ran last. On CUDA each round
    runs `iters` calls (default CUDA_ITERS) between two CUDA events, so the figure is device
    time per call rather than one launch's host latency; on the CPU one call, perf_counter."""
    cuda = device.type == "cuda"
    n = (CUDA_ITERS if iters is None else iters) if cuda else 1
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    fn()
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3 / n
            else:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- analytic FLOPs ----------------------------------------------------------------------------
def _block_flops(n: int, d: int, mlp: int) -> float:
    """2 x multiply-adds of one pre-LN transformer block on n tokens (qkv+out proj, MLP, attn)."""
    return 2.0 * n * (4 * d * d + 2 * d * mlp) + 4.0 * n * n * d


def _read_block_flops(n: int, d: int, mlp: int) -> float:
    """The same block computing one read row of n (`backbone.block_rows`): K/V of every row, the
    query, attention, output projection and MLP of that row only."""
    return 2.0 * n * 2 * d * d + 2.0 * (2 * d * d + 2 * d * mlp) + 4.0 * n * d


def vision_flops(model: PerlModel, steps: int | None = None, read_rows: bool = True
                 ) -> tuple[float, float]:
    """(plain CLIP image forward, PERL eval forward with all steps) FLOPs per image.

    read_rows: the last block of each upper pass computes the CLS row only, as PerlModel runs it;
    False counts whole blocks (the paper's J + (K+1)(L-J) block evaluations)."""
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
    last = _read_block_flops if read_rows else _block_flops

    def upper(m: int) -> float:  # one pass of blocks[J:] over m tokens
        return (L - J - 1) * _block_flops(m, d, mlp) + last(m, d, mlp)

    plain = embed + L * _block_flops(n, d, mlp)
    perl = embed + J * _block_flops(n, d, mlp) + sum(upper(n + k) for k in range(K + 1))
    return plain, perl


def _matmul(device: torch.device, n: int, precision: str = "bf16") -> Callable[[], Any]:
    dtype = torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


def machine_matmul_gflops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    s = _interleaved({"mm": _matmul(device, n)}, device, reps)["mm"]
    return 2.0 * n ** 3 / s / 1e9


# ---- memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one trial, in MB.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (tensors only, the usual figure).
    CPU: the process's peak resident set size during the trial. Linux keeps a high-water mark
    (VmHWM) that `/proc/self/clear_refs` ("5") resets, so each trial gets its own peak, exact and
    free of sampling; where that is not allowed a thread samples VmRSS every 2 ms. `delta_mb` is
    the peak above the RSS at the trial's start (what the trial added; freed memory that the
    allocator keeps resident is counted by the trials that reuse it, not again).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "unavailable"
        # CUDA: what the caching allocator holds (>= allocated; what another trial on the same
        # GPU cannot use); None elsewhere
        self.reserved: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        except OSError:
            return None
        return int(m.group(1)) / 1024.0 if m else None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2 ** 20
            return self
        self.start = self._status("VmRSS") or 0.0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset per trial"
        except OSError:
            if self._status("VmRSS") is not None:
                self.method = "VmRSS sampled every 2 ms"
                self._sampled = self.start
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, self._status("VmRSS") or 0.0)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
            self.reserved = torch.cuda.max_memory_reserved() / 2 ** 20
        elif self.method.startswith("VmHWM"):
            self.peak = self._status("VmHWM") or 0.0
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled
        else:
            self.peak = 0.0
        self.delta = max(0.0, self.peak - self.start)


# ---- one training step: added peak memory and time, per text path ------------------------------
# A mode is how the text side of the step keeps its graph: "whole" (text_chunk 0: every
# prompt's K passes kept until backward), "chunk<N>" (text_chunk N: gradient caching,
# perl_core/gradcache.py), and the alternative measured against it, activation checkpointing of
# the text recurrence ("ckpt_step": one torch.utils.checkpoint per recurrent pass; "ckpt_block":
# one per upper block), which only this bench implements (docs/benchmarks.md, "Text memory").
STEP_MODES = ("whole", "chunk128")


def _imagenet_prompts(n: int) -> list[str]:
    """The generic template over ImageNet's class names (repeated past 1,000): the prompt lengths
    of the 1,000-class trials (L_eff 18; 14 for the first 100)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return [f"a photo of a {IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)]}." for i in range(n)]


def _checkpoint_text(model: PerlModel, per: str) -> None:
    """Activation checkpointing of the text recurrence, on this model instance only."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    if per == "step":
        upper = model._upper

        def checkpointed(name: str, prefix: torch.Tensor, idx: torch.Tensor, thoughts: Any
                         ) -> torch.Tensor:
            if name != "text" or thoughts is None or not torch.is_grad_enabled():
                return upper(name, prefix, idx, thoughts)
            return checkpoint(upper, name, prefix, idx, thoughts, use_reentrant=False)

        model._upper = checkpointed  # type: ignore[method-assign]
    elif per == "block":
        tower = model.towers["text"]
        for block in tower.blocks[model.text_depths[0]:tower.num_layers - 1]:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    else:
        raise ValueError(f"checkpointing per {per!r}: 'step' or 'block'")


def _one_step(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process: the production training step
    (`perl_core.train.train_step`) on `batch` random images and `classes` prompts, the frozen
    features computed before it (as `fit` does); the memory it adds and its seconds per step."""
    from perl_core.cache import image_features, text_features
    from perl_core.config import TrainConfig
    from perl_core.factory import cast_frozen_matmul_weights
    from perl_core.train import train_step

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = _device()
    mode, precision = spec["mode"], spec.get("precision", "fp32")
    chunk = int(mode[len("chunk"):]) if mode.startswith("chunk") else 0
    torch.manual_seed(0)
    clip = create_clip(spec["arch"], spec.get("pretrained") or None)
    if precision == "bf16" and device.type == "cuda":
        cast_frozen_matmul_weights(clip)  # as train.build_model does for a bf16 CUDA trial
    layers = len(clip.visual.transformer.resblocks)
    model = PerlModel(clip, inject_layer=spec.get("inject_layer", 7 if layers > 7 else 2),
                      num_steps=spec.get("num_steps", 4)).to(device)
    if mode.startswith("ckpt_"):
        _checkpoint_text(model, mode[len("ckpt_"):])
    elif mode != "whole" and not chunk:
        raise ValueError(f"mode {mode!r}: one of whole, chunk<N>, ckpt_step, ckpt_block")
    cfg = TrainConfig(precision=precision, text_chunk=chunk, device=str(device))
    tokens = model.tokenize(_imagenet_prompts(spec["classes"]))
    length = model.text_length(tokens)
    tokens = tokens.to(device)
    images = _images(model, spec.get("batch", 4), device)
    labels = torch.arange(images.shape[0]) % spec["classes"]
    with torch.no_grad(), _ac(device, precision):
        tf, vf = text_features(model, tokens), image_features(model, images)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(spec.get("steps", 2)):
            _sync(device)
            t0 = time.perf_counter()
            train_step(cfg, model, opt, vf, labels, tokens, tf, length)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {"classes": spec["classes"], "mode": mode, "text_chunk": chunk, "L_eff": length,
            "precision": precision, "device": str(device), "arch": spec["arch"],
            "batch": images.shape[0], "num_steps": model.num_steps,
            "inject_layer": model.text_depths[0], "step_s": statistics.median(times),
            "step_s_all": times, "added_mb": mem.delta, "peak_mb": mem.peak,
            "start_mb": mem.start, "reserved_mb": mem.reserved, "memory_method": mem.method,
            "torch_threads": torch.get_num_threads()}


def step_memory(arch: str = "ViT-B-16-quickgelu", classes: Sequence[int] = (100, 1000),
                modes: Sequence[str] = STEP_MODES, *, pretrained: str = "", batch: int = 4,
                num_steps: int = 4, inject_layer: int | None = None, precision: str = "fp32",
                steps: int = 2, threads: int = 0, timeout_s: float | None = None
                ) -> dict[str, Any]:
    """The peak memory one training step adds (CPU: VmHWM above the RSS before it; CUDA:
    `max_memory_allocated` above the allocated before it) and its seconds (median of `steps`),
    for each (class count, mode). Each configuration runs in a fresh subprocess, so no peak or
    allocator cache of one masks another. `ratios`: each mode against "whole" at the same
    class count (added memory, step time)."""
    records = []
    for c in classes:
        for mode in modes:
            spec = {"arch": arch, "pretrained": pretrained, "classes": int(c), "mode": mode,
                    "batch": batch, "num_steps": num_steps, "precision": precision,
                    "steps": steps, "threads": threads}
            if inject_layer is not None:
                spec["inject_layer"] = inject_layer
            proc = subprocess.run([sys.executable, "-m", "perl_core.bench", "--step-child",
                                   json.dumps(spec)], capture_output=True, text=True,
                                  timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"step_memory child {spec} failed (exit {proc.returncode}): "
                                   f"{proc.stderr[-2000:]}")
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        base = next((b for b in records if b["classes"] == r["classes"] and
                     b["mode"] == "whole"), None)
        if base is not None and r is not base:
            ratios.setdefault(str(r["classes"]), {})[r["mode"]] = {
                "added_memory": r["added_mb"] / max(base["added_mb"], 1e-9),
                "step_time": r["step_s"] / base["step_s"]}
    return {"records": records, "ratios": ratios, "load_avg": _loadavg()}


# ---- pieces ------------------------------------------------------------------------------------
def _images(model: PerlModel, batch: int, device: torch.device) -> torch.Tensor:
    size = model.image_size
    hw = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, *hw, device=device)


def _eval_rates(model: PerlModel, device: torch.device, batch: int, reps: int,
                cache_dir: str, precision: str = "fp32") -> dict[str, float]:
    """img/s of plain CLIP, PERL eval uncached, PERL eval from a FeatureCache hit (S_v and h(0)
    read from disk, only the K thought passes run), timed in interleaved rounds. The cache
    stores fp32, the pipeline's default (`cache.dtype`)."""
    images = _images(model, batch, device)
    clip = model.clip
    cache = FeatureCache(cache_dir, dtype=torch.float32)
    key = dict(dataset="bench", split="test", transform="randn", items=list(range(batch)))

    def cached() -> torch.Tensor:
        f = cache.image_features(model, images, **key)
        return model.image_from_prefix(f["prefix"].to(device), all_steps=True,
                                       h0=f["h0"].to(device))

    with torch.no_grad(), _ac(device, precision):
        cache.image_features(model, images, **key)  # the miss: computed and stored
        t = _interleaved({"plain": lambda: clip.encode_image(images),
                          "perl": lambda: model.encode_image_all_steps(images),
                          "cached": cached}, device, reps)
    return {"plain_clip_img_per_s": batch / t["plain"],
            "perl_eval_img_per_s_uncached": batch / t["perl"],
            "perl_eval_img_per_s_cached": batch / t["cached"]}


def _roofline(arch: str, pretrained: str, device: torch.device, batch: int, reps: int,
              matmul_n: int, precision: str = "fp32") -> dict[str, Any]:
    """Achieved GFLOP/s of the PERL eval forward (J=7, K=4) at `arch` size vs a dense matmul,
    timed in interleaved rounds."""
    torch.manual_seed(0)
    clip = create_clip(arch, pretrained or None)
    depth = len(clip.visual.transformer.resblocks)
    model = PerlModel(clip, inject_layer=min(7, depth - 1), num_steps=4).to(device).eval()
    images = _images(model, batch, device)
    with torch.no_grad(), _ac(device, precision):
        t = _interleaved({"perl": lambda: model.encode_image_all_steps(images),
                          "matmul": _matmul(device, matmul_n, precision)}, device, reps)
    plain_f, perl_f = vision_flops(model)  # what runs: the last upper block reads CLS only
    achieved = perl_f * batch / t["perl"] / 1e9
    mm = 2.0 * matmul_n ** 3 / t["matmul"] / 1e9
    return {"roofline_arch": arch, "analytic_gflop_per_img_plain": plain_f / 1e9,
            "analytic_gflop_per_img_perl_eval": perl_f / 1e9,
            "analytic_gflop_per_img_perl_eval_whole_blocks":
                vision_flops(model, read_rows=False)[1] / 1e9,
            "achieved_gflops": achieved,
            "machine_matmul_gflops": mm, "roofline_fraction": achieved / mm}


def _train_steps(model: PerlModel, device: torch.device, classes: Sequence[int], batch: int,
                 reps: int, cache_dir: str, precision: str = "fp32"
                 ) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step (batch images, C classes).

    cached: as `fit(cache=...)` runs it: the text S_t and h(0) of the C prompts read from the
    FeatureCache once (per trial), the image S_v and h(0) of the batch read from it every step
    (a training-view hit); only the K thought passes run, with gradient. uncached: every frozen
    feature is computed inside the step. Interleaved rounds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = _images(model, batch, device)
    labels = torch.randint(0, min(classes), (batch,), device=device)
    cache = FeatureCache(cache_dir, dtype=torch.float32)  # the pipeline's default
    key = dict(dataset="bench", split="train", transform="randn", items=list(range(batch)))
    out: dict[str, dict[str, float]] = {}
    model.train()
    for c in classes:
        tokens = model.tokenize([f"a photo of a class {i}." for i in range(c)]).to(device)
        names = [str(i) for i in range(c)]

        with _ac(device, precision):
            cache.text_features(model, tokens, dataset="bench", template="t", classnames=names)
            hoisted = {k: v.to(device) for k, v in cache.text_features(
                model, tokens, dataset="bench", template="t", classnames=names).items()}

        def step(use_cache: bool) -> None:
            with _ac(device, precision):
                if use_cache:
                    tf = hoisted
                    vf = {k: v.to(device) for k, v in
                          cache.image_features(model, images, **key).items()}
                else:
                    tf, vf = text_features(model, tokens), image_features(model, images)
                img = model.image_from_prefix(vf["prefix"], all_steps=True, h0=vf["h0"])
                txt = model.text_from_prefix(tf["prefix"], tokens, h0=tf["h0"])
                logits = model.logits(img[-1].float(), txt.float())
                loss = torch.nn.functional.cross_entropy(logits, labels) + \
                    (1 - torch.nn.functional.cosine_similarity(img[0].float(), img[-1].float(),
                                                               dim=-1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = _interleaved({"cached": lambda: step(True), "uncached": lambda: step(False)},
                         device, reps)
        out[str(c)] = {**t, "speedup": t["uncached"] / t["cached"]}
    model.eval()
    return out


def _sweep(arch: str, pretrained: str, root: str, datasets: Sequence[str], ks: Sequence[int],
           seeds: Sequence[int], device: torch.device, cache_dir: str, shots: int
           ) -> dict[str, Any]:
    """The same trials run naive (fp32, backbone rebuilt per trial, no cache) and optimized (one
    backbone, one FeatureCache; bf16 autocast on CUDA), alternating naive/optimized trial by trial
    (ABBA order), so a load change lands on both. Returns sums, their ratio and per-trial records.
    """
    from perl_core.config import TrainConfig
    from perl_core.train import build_model, fit

    base = dict(data_root=root, arch=arch, pretrained=pretrained, inject_layer=7, shots=shots,
                epochs=1, batch_size=4, lr=1e-2, device=str(device), eval_batch_size=64)
    cuda = device.type == "cuda"
    cache = FeatureCache(cache_dir, dtype=torch.float32)  # the pipeline's default
    clip: list[torch.nn.Module] = []  # the optimized side's one backbone, built in its 1st trial
    records: list[dict[str, Any]] = []
    same: list[bool] = []

    def naive(cfg: TrainConfig) -> Any:
        return fit(cfg.replace(precision="fp32"), progress=False)

    def optimized(cfg: TrainConfig) -> Any:
        cfg = cfg.replace(precision="bf16" if cuda else "fp32")
        if not clip:
            clip.append(build_model(cfg).clip.to(device))
        return fit(cfg, model=build_model(cfg, clip=clip[0]), progress=False, cache=cache)

    trials = [(d, s, k) for d in datasets for s in seeds for k in ks]
    for i, (d, s, k) in enumerate(trials):
        cfg = TrainConfig(dataset=d, num_steps=k, seed=s, **base)
        order = [("naive", naive), ("optimized", optimized)]
        results = {}
        for mode, run_trial in order if i % 2 == 0 else order[::-1]:
            hits = cache.hits
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                results[mode] = run_trial(cfg)
                seconds = time.perf_counter() - t0
            records.append({"mode": mode, "dataset": d, "K": k, "seed": s, "seconds": seconds,
                            "train_s": results[mode].train_seconds,
                            "eval_s": results[mode].eval_seconds,
                            "peak_memory_mb": mem.peak, "peak_memory_delta_mb": mem.delta,
                            "peak_memory_reserved_mb": mem.reserved,
                            "memory_method": mem.method, "cache_hits": cache.hits - hits})
        a, b = results["naive"], results["optimized"]
        same.append(a.metrics == b.metrics and all(
            torch.equal(a.projector_state[n], b.projector_state[n]) for n in a.projector_state))
    def total(mode: str, what: str = "seconds") -> float:
        return sum(r[what] for r in records if r["mode"] == mode)

    return {"sweep_trials": len(trials), "sweep_naive_s": total("naive"),
            "sweep_optimized_s": total("optimized"),
            "sweep_speedup_vs_naive": total("naive") / total("optimized"),
            # robust to one trial hit by a load spike: the median of per-trial ratios
            "sweep_speedup_median_trial": statistics.median(
                n["seconds"] / o["seconds"] for n, o in zip(
                    (r for r in records if r["mode"] == "naive"),
                    (r for r in records if r["mode"] == "optimized"))),
            # where it comes from: fit's training loop vs its evaluation (ratios of sums)
            "sweep_train_speedup": total("naive", "train_s") / total("optimized", "train_s"),
            "sweep_eval_speedup": total("naive", "eval_s") / total("optimized", "eval_s"),
            "sweep_results_identical": all(same) if not cuda else None,
            "sweep_cache": cache.stats(), "peak_memory_mb": records}


def run(arch: str = "ViT-B-16-quickgelu", pretrained: str = "", *, quick: bool = False,
        batch: int | None = None, reps: int = 5, classes: Sequence[int] = (10, 100, 1000),
        train_reps: int | None = None, sweep_ks: Sequence[int] = (1, 2, 3, 4),
        sweep_seeds: Sequence[int] = (1, 2),
        sweep_datasets: Sequence[str] = ("ToyShapes", "ToyPatterns"), sweep_shots: int = 16,
        world_sizes: dict | None = None, matmul_n: int | None = None,
        roofline_arch: str | None = "ViT-B-16-quickgelu", roofline_batch: int | None = None
        ) -> dict[str, Any]:
    """Every stage; `quick` = perl-tiny with its embedded weights for throughput and sweep.
    roofline_arch: the arch of the FLOP-rate stage (None: the bench arch).

    Sizes (None: by device): batch, the eval batch, 128 on CUDA (the sweeps' eval_batch_size)
    and 16 on the CPU (quick); roofline_batch 128 / 2; matmul_n 8192 / 1024 (a matmul large
    enough to reach the device's rate, not its launch latency). On CUDA the eval, roofline and
    train stages run in each of PRECISIONS_CUDA: the top-level keys are fp32's (what the paper
    sweeps run), `by_precision` holds every precision's."""
    from perl_core.data.synthetic import generate_world

    device = _device()
    cuda = device.type == "cuda"
    batch = batch or (128 if cuda else 16)
    roofline_batch = roofline_batch or (128 if cuda else 2)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    if quick:
        arch, pretrained = "perl-tiny", pretrained or "embedded"
    torch.manual_seed(0)
    clip = create_clip(arch, pretrained or None)
    model = PerlModel(clip, inject_layer=7 if len(clip.visual.transformer.resblocks) > 7 else 2,
                      num_steps=4).to(device).eval()
    tmp = tempfile.mkdtemp(prefix="perl-bench-")
    started = time.perf_counter()
    try:
        res: dict[str, Any] = {"device": str(device), "arch": arch, "pretrained": pretrained,
                               "precision": "fp32", "precisions": list(precisions_for(device)),
                               "torch_threads": torch.get_num_threads(), "batch": batch,
                               "matmul_n": matmul_n, "load_avg_start": _loadavg()}
        by: dict[str, dict[str, Any]] = {}
        for prec in precisions_for(device):
            r = _eval_rates(model, device, batch, reps, f"{tmp}/eval-cache-{prec}", prec)
            r.update(_roofline(roofline_arch or arch, "" if roofline_arch else pretrained,
                               device, roofline_batch if roofline_arch else batch,
                               max(2, reps // 2), matmul_n, prec))
            r["train_step_s_by_classes"] = _train_steps(
                model, device, classes, 4, train_reps or max(2, reps // 2),
                f"{tmp}/train-cache-{prec}", prec)
            by[prec] = r
        res.update(by["fp32"])
        res["by_precision"] = by
        del model
        if not pretrained:  # random init: one fixed file, so naive rebuilds the same weights
            from safetensors.torch import save_file

            pretrained = f"{tmp}/random-init.safetensors"
            torch.manual_seed(0)
            save_file({k: v.contiguous() for k, v in create_clip(arch).state_dict().items()},
                      pretrained)
        world = f"{tmp}/world"
        generate_world(world, datasets=list(sweep_datasets),
                       sizes=world_sizes or {"train": sweep_shots, "val": 4, "test": 8})
        res.update(_sweep(arch, pretrained, world, sweep_datasets, sweep_ks, sweep_seeds,
                          device, f"{tmp}/sweep-cache", sweep_shots))
        res["load_avg_end"] = _loadavg()
        res["bench_seconds"] = time.perf_counter() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
                          f"{d['cached']:.4f} / {d['uncached']:.4f} ({d['speedup']:.2f}x)")
        elif k == "peak_memory_mb":
            for mode in ("naive", "optimized"):
                peaks = [r["peak_memory_mb"] for r in v if r["mode"] == mode]
                t.add_row(f"peak memory MB per trial, {mode} (min / max)",
                          f"{min(peaks):.1f} / {max(peaks):.1f}")
        elif k == "sweep_cache":
            t.add_row(k, ", ".join(f"{a} {b}" for a, b in v.items()))
        else:
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console(file=sys.stderr, width=120).print(t)


def _step_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = res["records"][0] if res["records"] else {}
    t = Table(title=f"one training step ({first.get('arch')}, {first.get('device')}, "
                    f"{first.get('precision')}, batch {first.get('batch')}, "
                    f"K={first.get('num_steps')})")
    for col in ("classes", "L_eff", "text path", "step s", "added peak MB", "vs whole"):
        t.add_column(col, justify="left" if col == "text path" else "right")
    for r in res["records"]:
        q = res["ratios"].get(str(r["classes"]), {}).get(r["mode"])
        t.add_row(str(r["classes"]), str(r["L_eff"]), r["mode"], f"{r['step_s']:.2f}",
                  f"{r['added_mb']:,.0f}",
                  f"memory x{q['added_memory']:.2f}, time x{q['step_time']:.2f}" if q else "")
    Console(file=sys.stderr, width=120).print(t)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-16-quickgelu")
    p.add_argument("--pretrained", default="", help="open_clip tag or file (default: random "
                                                    "init; --quick: perl-tiny's embedded weights)")
    p.add_argument("--quick", action="store_true", help="perl-tiny arch, small sizes")
    p.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice). On a loaded machine 1 "
                        "avoids OpenMP threads spinning against other processes, which can "
                        "make small ops 10-30x slower")
    p.add_argument("--step-memory", action="store_true",
                   help="only the training-step stage: the peak memory one step adds and its "
                        "time, per class count and text path, each in a fresh process "
                        "(ViT-B/16 random init, 4 images, K=4, J=7; --quick: perl-tiny)")
    p.add_argument("--classes", default="", help="--step-memory class counts (default 100,1000; "
                                                 "--quick 10,300)")
    p.add_argument("--modes", default=",".join(STEP_MODES),
                   help="--step-memory text paths: whole, chunk<N>, ckpt_step, ckpt_block "
                        "(default %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="--step-memory steps per configuration")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="--step-memory precision (bf16: autocast, on CUDA)")
    p.add_argument("--step-child", help=argparse.SUPPRESS)  # one configuration (step_memory)
    a = p.parse_args(argv)
    if a.step_child:
        print(json.dumps(_one_step(json.loads(a.step_child))))
        return 0
    if a.threads < 0:
        p.error(f"--threads={a.threads} must be >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    import logging
    logging.basicConfig(level=logging.WARNING)
    if a.step_memory:
        classes = [int(c) for c in a.classes.split(",") if c.strip()] or \
            ([10, 300] if a.quick else [100, 1000])
        res = step_memory("perl-tiny" if a.quick else a.arch, classes,
                          [m.strip() for m in a.modes.split(",") if m.strip()],
                          pretrained=a.pretrained, precision=a.precision, steps=a.steps,
                          threads=a.threads)
        _step_table(res)
        if a.json:
            print(json.dumps(res, indent=1))
        return 0
    res = run(a.arch, a.pretrained, quick=a.quick, reps=5 if a.quick else 7)
    _table(res)
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
