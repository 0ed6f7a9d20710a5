"""A short GPU check, for when a CUDA device is lent: `make gpu-check` or
`python -m pipeline.gpu_check [--out gpu-check.md] [--skip NAME ...]`.

Needs only the wheels (nothing downloaded: perl-tiny's embedded weights, ViT-B/16 at random
init, the generated toy world). It runs, each check on its own (a failing one is reported and
the rest still run):

- `fit`: a perl-tiny `fit` in fp32 and in bf16 under `torch.cuda.set_sync_debug_mode("warn")`,
  with the host syncs counted (the warnings torch emits for each synchronizing call);
- `vit_step`: the ViT-B/16 (random init) training step (`perl_core.bench.step_memory`: K=4,
  J=7, batch 4, the frozen features once, then `train._train_step`, each configuration in a
  fresh process) at 100 and 1,000 classes, whole text graph and `text_chunk` 128, with peak
  allocated (and added by the step) and reserved memory, in fp32 and bf16;
- `ray`: four perl-tiny trials at `gpu: 0.25` on one device through Ray (`pipeline.run`);
- `bench`: `perl_core.bench.run(quick=True)` (fp32 and bf16, CUDA-event timing).

It prints a Markdown block for docs/benchmarks.md and writes it to `--out`.
Exit codes: 0 every check ran, 1 a check failed (its error is in the block), 2 no CUDA device
(nothing is measured; the message says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 2
CHECKS = ("fit", "vit_step", "ray", "bench")
NO_CUDA = ("gpu-check: no CUDA device (torch.cuda.is_available() is False): nothing was measured. "
           "Run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch.")


def is_sync_warning(message: str) -> bool:
    """Whether a warning is torch's sync-debug report of a synchronizing CUDA call."""
    return "synchroniz" in message.lower() and "cuda" in message.lower()


def count_syncs(records: Sequence[Any]) -> dict[str, int]:
    """{the reporting line (file:line, or the message's first line): count} over the sync
    warnings among `records` (warnings.WarningMessage-like), most frequent first."""
    counts: dict[str, int] = {}
    for r in records:
        msg = str(getattr(r, "message", r))
        if not is_sync_warning(msg):
            continue
        where = f"{Path(r.filename).name}:{r.lineno}" if getattr(r, "filename", None) else \
            msg.splitlines()[0]
        counts[where] = counts.get(where, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def markdown_block(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The check's results as a Markdown section for docs/benchmarks.md."""
    lines = [f"### GPU check ({meta.get('date', '?')}, {meta.get('device', '?')})", "",
             f"torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}, capability "
             f"{meta.get('capability', '?')}, commit {meta.get('commit', '?')}; "
             f"`python -m pipeline.gpu_check` ({meta.get('seconds', 0):.0f} s).", ""]
    fit = results.get("fit")
    if isinstance(fit, dict) and "error" not in fit:
        lines += ["| perl-tiny fit | train s | eval s | acc | host syncs (total) | top sites |",
                  "|---|---|---|---|---|---|"]
        for prec, r in fit.items():
            top = ", ".join(f"{k} x{v}" for k, v in list(r["syncs"].items())[:3]) or "none"
            lines.append(f"| {prec} | {r['train_s']:.2f} | {r['eval_s']:.2f} | "
                         f"{r['acc']:.2f} | {r['sync_total']} | {top} |")
        lines.append("")
    vit = results.get("vit_step")
    if isinstance(vit, dict) and "error" not in vit:
        lines += ["| ViT-B/16 step | classes | s/step | peak allocated MB | peak reserved MB |",
                  "|---|---|---|---|---|"]
        for key, r in vit.items():
            mode = f", {r['mode']}" if r.get("mode") else ""  # the text path (bench.STEP_MODES)
            added = f" (+{_mb(r['added_mb'])})" if r.get("added_mb") is not None else ""
            lines.append(f"| {r['precision']}{mode} | {r['classes']} | {r['step_s']:.4f} | "
                         f"{_mb(r['allocated_mb'])}{added} | {_mb(r['reserved_mb'])} |")
        lines.append("")
    ray = results.get("ray")
    if isinstance(ray, dict) and "error" not in ray:
        lines += [f"Ray, 4 trials at `gpu: 0.25` on one device: exit {ray['rc']}, "
                  f"{ray['seconds']:.1f} s wall, peak concurrent trials {ray.get('concurrent')}.",
                  ""]
    bench = results.get("bench")
    if isinstance(bench, dict) and "error" not in bench:
        lines += ["| bench (quick) | eval img/s uncached / cached | train step s @1000 cached "
                  "/ uncached | roofline fraction |", "|---|---|---|---|"]
        for prec, r in (bench.get("by_precision") or {"fp32": bench}).items():
            st = r.get("train_step_s_by_classes", {}).get("1000", {})
            lines.append(f"| {prec} | {r.get('perl_eval_img_per_s_uncached', 0):.0f} / "
                         f"{r.get('perl_eval_img_per_s_cached', 0):.0f} | "
                         f"{st.get('cached', 0):.4f} / {st.get('uncached', 0):.4f} | "
                         f"{r.get('roofline_fraction', 0):.3f} |")
        lines.append("")
    for name, r in results.items():
        if isinstance(r, dict) and "error" in r:
            lines += [f"**{name} failed**: `{r['error']}`", ""]
    lines += ["<details><summary>raw JSON</summary>", "", "```json",
              json.dumps(results, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


# --- the checks (CUDA only) ----------------------------------------------------------------------


def _world(root: Path) -> str:
    from perl_core.data.synthetic import generate_world

    generate_world(root, datasets=["ToyShapes"], sizes={"train": 8, "val": 4, "test": 16})
    return str(root)


def check_fit(work: Path) -> dict[str, Any]:
    import torch

    from perl_core.config import TrainConfig
    from perl_core.train import fit

    world = _world(work / "world-fit")
    out: dict[str, Any] = {}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded",
                          data_root=world, shots=8, epochs=2, device="cuda", precision=prec,
                          num_workers=0)
        fit(cfg, progress=False)  # warm-up: cuBLAS handles, allocator, lazy inits
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = fit(cfg, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = count_syncs(rec)
        out[prec] = {"train_s": res.train_seconds, "eval_s": res.eval_seconds,
                     "acc": res.metrics.get("base/acc", res.metrics.get("all/acc", float("nan"))),
                     "steps": len(res.history), "sync_total": sum(syncs.values()),
                     "syncs": syncs}
    return out


def check_vit_step(work: Path) -> dict[str, Any]:
    """`perl_core.bench.step_memory` on the GPU: the production step, each configuration in a
    fresh process, peak allocated (and what the step added) and reserved memory."""
    from perl_core.bench import STEP_MODES, step_memory

    out: dict[str, Any] = {}
    for prec in ("fp32", "bf16"):
        res = step_memory("ViT-B-16-quickgelu", (100, 1000), STEP_MODES, precision=prec,
                          steps=3, timeout_s=900)
        for r in res["records"]:
            out[f"{prec}/{r['classes']}/{r['mode']}"] = {
                **r, "allocated_mb": r["peak_mb"], "reserved_mb": r["reserved_mb"]}
    return out


def check_ray(work: Path) -> dict[str, Any]:
    import ray

    from pipeline import bench as pipeline_bench
    from pipeline import run as pipeline_run
    from pipeline.trainable import TIMINGS_ENV

    world = _world(work / "world-ray")
    sweep = work / "gpu_check_ray.yaml"
    sweep.write_text(pipeline_bench.sweep_text(
        world=world, storage=str(work / "runs"), tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        cache_dir=str(work / "cache"), trials=4, epochs=1, shots=2, device="auto", gpu=0.25))
    timings = work / "timings"
    os.environ[TIMINGS_ENV] = str(timings)
    t0 = time.time()
    try:
        rc = pipeline_run.main([str(sweep), "--max-concurrent", "4"])
    finally:
        os.environ.pop(TIMINGS_ENV, None)
        if ray.is_initialized():
            ray.shutdown()
    rows = pipeline_bench.read_timings(timings) if timings.exists() else []
    # how many trials overlapped in time (4 at gpu: 0.25 should share the one device)
    spans = [(r["entry_unix"], r["exit_unix"]) for r in rows]
    concurrent = max((sum(1 for a, b in spans if a <= s < b) for s, _ in spans), default=0)
    return {"rc": rc, "seconds": time.time() - t0, "trials": len(rows),
            "concurrent": concurrent}


def check_bench(work: Path) -> dict[str, Any]:
    from perl_core.bench import run

    return run(quick=True, reps=5)


RUNNERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "fit": check_fit, "vit_step": check_vit_step, "ray": check_ray, "bench": check_bench}


def _meta(seconds: float) -> dict[str, Any]:
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        commit = "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "capability": ".".join(
                map(str, torch.cuda.get_device_capability(0))),
            "host": platform.node(), "commit": commit, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check.md", help="the Markdown block's file")
    p.add_argument("--skip", nargs="*", default=[], choices=CHECKS, help="checks not to run")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return EXIT_NO_CUDA
    work = Path(tempfile.mkdtemp(prefix="perl-gpu-check-"))
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for name in CHECKS:
            if name in a.skip:
                continue
            print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = RUNNERS[name](work)
            except Exception as e:
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    block = markdown_block(results, _meta(time.perf_counter() - t0))
    Path(a.out).write_text(block)
    print(block)
    failed = any(isinstance(r, dict) and "error" in r for r in results.values())
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
