"""SIGKILL a Ray trial worker mid-training (after a checkpoint was reported), under the real CLI.

Tune retries the trial (max_failures: 1); the trainable resumes from its last Tune checkpoint
(projectors + AdamW state + RNG + data position), and its final projector weights and metrics
equal, bit for bit, those of an uninterrupted `python -m perl_core.train` run of the same config
on CPU. Test hooks (pipeline/trainable.py, off by default): PERL_CHECKPOINT_EVERY=3 (a Tune
checkpoint every 3 optimizer steps) and PERL_TEST_STEP_DELAY_S (a pause after each step so the
kill lands mid-training); neither changes a result.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, child_runs, cli_env, finish, start_cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

CONFIG = dict(dataset="ToyShapes", arch="perl-tiny", shots=4, seed=1, num_steps=2, epochs=2,
              batch_size=4, lr=0.01, device="cpu", eval_batch_size=64)
# 10 base classes x 4 shots = 40 images, batch 4: 10 steps per epoch, 20 in all


def _sweep(path: Path, world: Path, weights: Path, tmp: Path) -> Path:
    fixed = "\n".join(f"  {k}: {v}" for k, v in CONFIG.items() if k != "num_steps")
    path.write_text(f"""\
name: wkill
experiment: rel/wkill
fixed:
  pretrained: {weights}
  data_root: {world}
{fixed}
grid:
  num_steps: [{CONFIG['num_steps']}]
resources: {{cpu: 1, gpu: 0}}
storage: {tmp / 'runs'}
tracking_uri: sqlite:///{tmp / 'mlflow.db'}
max_failures: 1
""")
    return path


def _trial_workers(session: int) -> list[int]:
    """Pids of Ray trial workers (`ray::ImplicitFunc...`) in the driver's session."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            if cmd.startswith("ray::ImplicitFunc") and os.getsid(int(d.name)) == session:
                out.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return out


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _comparable(metrics: dict) -> dict:
    """Result metrics (not wall-clock timings or cache counters, which differ between runs)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith(("timing/", "feature_cache/")) and "seconds" not in k}


def test_worker_sigkill_mid_training_resumes_to_the_same_result(tmp_path, world, weights):
    import torch

    y = _sweep(tmp_path / "wkill.yaml", world, weights, tmp_path)
    log = tmp_path / "run.log"
    p = start_cli([str(y), "--ignore-code-version"], log,
                  env={"PERL_CHECKPOINT_EVERY": "3", "PERL_TEST_STEP_DELAY_S": "0.4"})
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            # the 2nd checkpoint folder: the 1st one appears while it is written, before the
            # driver has registered it (killing then made the retry start from scratch in a CI
            # run); by the 2nd, Tune has taken the 1st
            ckpts = [c for c in (tmp_path / "runs" / "tune").glob("*/trial_*/checkpoint_*")
                     if c.name != "checkpoint_000000"]
            workers = _trial_workers(p.pid)
            if ckpts and workers:
                assert len(workers) == 1, workers
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.1)
        assert killed, f"no checkpoint/worker seen:\n{log.read_text()}"
        rc = finish(p, 400)
    finally:
        if p.poll() is None:
            finish(p, 1)
    out = log.read_text(errors="replace")
    assert rc == 0, out
    assert "1 finished" in out and "0 failed" in out, out

    # the retried trial resumed from a checkpoint instead of starting over
    records = list((tmp_path / "runs" / "records" / "rel__wkill").glob("*.json"))
    assert len(records) == 1, records
    rec = json.loads(records[0].read_text())
    resumed = rec["extra"].get("resumed_from_step")
    assert resumed is not None and 3 <= resumed < 20, rec["extra"]
    assert len(rec["history"]) == 20 and [h["step"] for h in rec["history"]] == \
        list(range(1, 21))
    # the retried attempt's timing/* phases are its own disjoint parts: none negative
    # (fit_other was, when fit's time counted the resumed state's earlier attempts)
    timing = {k: v for k, v in rec["metrics"].items() if k.startswith("timing/")}
    assert {"timing/fit_compute_s", "timing/fit_other_s"} <= set(timing), timing
    assert all(v >= 0 for v in timing.values()), timing
    # MLflow: one FINISHED run; the attempt that died is KILLED, none left RUNNING
    runs = child_runs(tmp_path / "mlflow.db")
    status = collections.Counter(r["status"] for r in runs)
    assert status["FINISHED"] == 1 and status["RUNNING"] == 0, status

    # an uninterrupted run of the same config (one thread, like a 1-CPU Ray trial)
    ref = tmp_path / "ref"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]
    proc = subprocess.run([sys.executable, "-m", "perl_core.train", *args,
                           f"--pretrained={weights}", f"--data-root={world}", f"--out={ref}"],
                          cwd=REPO, env=cli_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mine = _tensors(records[0].with_suffix(".safetensors"))
    theirs = _tensors(ref / "projectors.safetensors")
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k  # bit for bit
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert _comparable(rec["metrics"]) == _comparable(ref_metrics)
    ref_hist = json.loads((ref / "history.json").read_text())["steps"]
    assert [h["loss"] for h in rec["history"]] == [h["loss"] for h in ref_hist]
    print(f"\nworker {killed} SIGKILLed; the retry resumed at step {resumed} of 20; weights and "
          f"{len(_comparable(ref_metrics))} metrics equal to the uninterrupted run")
