"""What happened to the trials of a submission: each phase returns a `PhaseResult` (`collect`
from Tune's result grid, `collect_from_mlflow` when Tune's grid is lost) and the submission adds
it to its `Outcome` (`Outcome.add`), the one place the totals change. The summary and the exit
code are read from the `Outcome`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline import layout, queries, tracking


@dataclass
class PhaseResult:
    """The trials of one phase of this submission."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished meanwhile by another submission
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    unlogged: list[str] = field(default_factory=list)  # finished, MLflow unreachable: record only
    linked: list[str] = field(default_factory=list)  # runs of other experiments linked here
    storage_error: str = ""  # Tune itself stopped (its storage unreachable)
    best: dict[str, Any] | None = None  # the search phase's best sample


@dataclass
class Outcome:
    """What happened to the cells of one submission (for the summary and the exit code).
    Changed only through its methods, by the submission that owns it."""

    done_before: list[Any] = field(default_factory=list)  # cells FINISHED before it started
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    search_best: dict[str, Any] | None = None
    replayed: int = 0
    killed: int = 0
    unlogged: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)  # `pipeline.links`
    evaluated: list[str] = field(default_factory=list)  # planned `evaluate` (pipeline.reuse)
    tracking_error: str = ""  # set when the final replay could not reach MLflow
    storage_error: str = ""  # set when Tune or the final replay could not use the storage

    def add(self, result: PhaseResult) -> None:
        self.finished += result.finished
        self.skipped += result.skipped
        self.failed += result.failed
        self.unlogged += result.unlogged
        self.linked += result.linked
        self.storage_error = self.storage_error or result.storage_error
        self.search_best = result.best if result.best is not None else self.search_best

    def replayed_at_end(self, count: int) -> None:
        """The final replay logged the records MLflow lacked: nothing is unlogged any more."""
        self.replayed += count
        self.unlogged = []

    @property
    def num_skipped(self) -> int:
        return len(self.done_before) + len(self.skipped)

    def count_tags(self) -> dict[str, str]:
        """The parent run's closing tags."""
        return {"num_finished": str(len(self.finished)), "num_failed": str(len(self.failed)),
                "num_skipped": str(self.num_skipped), "num_linked": str(len(self.linked))}

    @property
    def ok(self) -> bool:
        return not (self.failed or self.storage_error)

    def exit_code(self) -> int:
        return 1 if not self.ok else (3 if self.tracking_error else 0)


def trial_label(r: Any) -> str:
    cfg, m = r.config or {}, r.metrics or {}
    return (cfg.get("cell") or {}).get("name") or m.get("cell") or \
        f"{layout.SEARCH_PHASE} trial {m.get('trial_id', '?')}"


def collect(grid: Any, context: Any, counted: Iterable[str] = ()) -> PhaseResult:
    """Sort a ResultGrid's trials into finished / skipped / failed (with the reason). `counted`:
    cells found FINISHED at the start (a restored Tune experiment lists them again)."""
    reasons, counted, out = mlflow_failures(context), set(counted), PhaseResult()
    for r in grid:
        name, m = trial_label(r), r.metrics or {}
        if name in counted:
            continue
        if r.error is not None:
            out.failed.append((name, reasons.get(name) or first_line(str(r.error))))
        elif m.get("skipped"):
            out.skipped.append(name)
        elif m.get("done"):
            out.finished.append(name)
            if m.get("mlflow_logged") == 0.0:
                out.unlogged.append(name)
        else:
            out.failed.append((name, "the trial ended without a result (stopped or lost)"))
    return out


def _children(context: Any, failed_only: bool = False) -> list:
    """This submission's trial runs, oldest first ([] when MLflow cannot be read)."""
    query = queries.failed_children if failed_only else queries.children
    try:
        tracker = tracking.Tracker(context.tracking_uri)
        runs = query(tracker.client, context.experiment_id, context.parent_run_id)
    except Exception:  # the summary then says less; the runs are there for the next look
        return []
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def collect_from_mlflow(todo: list[Any], context: Any) -> PhaseResult:
    """Sort the cells by their latest run under this submission's parent when Tune's own
    result grid is lost: FINISHED -> finished, FAILED -> failed with its reason, none or still
    RUNNING -> failed as not finished (the next submission runs them)."""
    latest = {r.data.tags["cell"]: r for r in _children(context) if r.data.tags.get("cell")}
    out = PhaseResult()
    for c in todo:
        r = latest.get(c.name)
        if r is not None and r.info.status == "FINISHED":
            out.finished.append(c.name)
        elif r is not None and r.info.status == "FAILED":
            out.failed.append((c.name, first_line(r.data.tags.get("status_detail", ""))))
        else:
            out.failed.append((c.name, "not finished when the grid phase stopped"))
    return out


def mlflow_failures(context: Any) -> dict[str, str]:
    """cell -> status_detail of its latest FAILED run under this submission's parent."""
    return {r.data.tags["cell"]: first_line(r.data.tags.get("status_detail", ""))
            for r in _children(context, failed_only=True) if r.data.tags.get("cell")}


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # Tune wraps trial errors; the last "Error: ..." line is the cause
    for ln in reversed(lines):
        if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]:
            return ln[:500]
    return (lines[0] if lines else "unknown error")[:500]


__all__ = ["PhaseResult", "Outcome", "collect", "collect_from_mlflow", "mlflow_failures",
           "first_line", "trial_label"]
