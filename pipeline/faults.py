"""Fault-injection test hooks: off unless their environment variable is set.

The one seam: the trainable's step callback calls `step_hook(cell, dataset)` once per trial and,
when it returns a hook, calls it after every optimizer step. Nothing else in production code
reads a `PERL_TEST_*` variable.

- `PERL_TEST_STEP_DELAY_S=<s>`: sleep this long after every optimizer step, so a test can kill a
  worker or the driver mid-training (tests/reliability/test_worker_kill.py). Timing only.
- `PERL_TEST_FAULT=oom:<dataset>:<step>`: raise torch.OutOfMemoryError (the class a CUDA
  allocation failure raises) once a trial on that dataset has finished optimizer step <step>,
  so the OOM path of a real GPU runs on a CPU (tests/reliability/test_oom.py). A malformed value
  is an error, not ignored.
"""

from __future__ import annotations

import os
import time
from typing import Callable

STEP_DELAY_ENV = "PERL_TEST_STEP_DELAY_S"
FAULT_ENV = "PERL_TEST_FAULT"


def step_delay_s() -> float:
    return float(os.environ.get(STEP_DELAY_ENV) or 0)


def injected_oom_step(dataset: str) -> int | None:
    """The optimizer step after which `$PERL_TEST_FAULT` makes a trial on `dataset` run out of
    memory (None: no fault for this dataset, the default)."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    target, _, step = rest.rpartition(":")
    if kind != "oom" or not target or not step.isdigit() or int(step) < 1:
        raise ValueError(f"${FAULT_ENV}={spec!r}: expected 'oom:<dataset>:<step>' (a test hook; "
                         f"unset it for real runs)")
    return int(step) if target == dataset else None


def step_hook(cell: str, dataset: str) -> Callable[[int], None] | None:
    """The hook to call after each optimizer step of this trial, or None (no hook set: the
    default). Read when the trial starts."""
    delay, oom_at = step_delay_s(), injected_oom_step(dataset)
    if not delay and oom_at is None:
        return None

    def after_step(step: int) -> None:
        if delay:
            time.sleep(delay)
        if oom_at is not None and step >= oom_at:
            import torch

            raise torch.OutOfMemoryError(
                f"injected by ${FAULT_ENV} after optimizer step {step} of {cell} (test hook; a "
                f"CUDA allocation failure raises this class)")

    return after_step


__all__ = ["STEP_DELAY_ENV", "FAULT_ENV", "step_delay_s", "injected_oom_step", "step_hook"]
