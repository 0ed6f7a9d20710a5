"""The live progress of running trials (issue 16): the rich table pipeline.run shows on a terminal
and the plain line it prints otherwise (and pipeline.status under `running (...)`), from
`pipeline.status.TrialProgress`. The lines of a real sweep are checked in tests/test_status.py
(its one real sweep)."""

from __future__ import annotations

from rich.console import Console

from pipeline.status import TrialProgress, progress_from_metrics, progress_line, progress_table

NOW = 1_900_000_000.0


def running() -> list[TrialProgress]:
    """Two running trials: one after a progress report (the keys the trainable reports), one that
    has not reported yet."""
    report = {"step": 5.0, "total_steps": 12.0, "epoch": 1.0, "epochs": 2.0,
              "train_step/loss": 0.693147, "progress": 5 / 12}
    return [progress_from_metrics("b2n/ToyShapes/K4", report, NOW - 1, started=NOW - 65),
            progress_from_metrics("b2n/ToyCounts/K2", {}, None, started=NOW - 3)]


def test_progress_lines():
    reported, waiting = running()
    assert progress_line(reported, NOW) == \
        "b2n/ToyShapes/K4: step 5/12, epoch 1/2, loss 0.6931, elapsed 00:01:05"
    assert progress_line(waiting, NOW) == "b2n/ToyCounts/K2: no progress report yet, elapsed " \
        "00:00:03"
    # a NaN loss (what the trainable sends when fit's record has none) is not printed as "nan"
    nan = progress_from_metrics("c", {"step": 1.0, "total_steps": 2.0,
                                      "train_step/loss": float("nan")}, started=NOW)
    assert progress_line(nan, NOW) == "c: step 1/2, elapsed 00:00:00"


def test_progress_table_renders_each_running_trial():
    console = Console(record=True, width=100, color_system=None)
    console.print(progress_table(running(), NOW))
    text = console.export_text()
    assert "2 trial(s) running" in text, text
    rows = {ln.split()[1]: ln.split()[2:] for ln in text.splitlines() if "b2n/" in ln}
    assert rows["b2n/ToyShapes/K4"] == ["│", "5/12", "│", "1/2", "│", "0.6931", "│", "00:01:05",
                                        "│"], text
    assert rows["b2n/ToyCounts/K2"] == ["│", "-", "│", "-", "│", "-", "│", "00:00:03", "│"], text
    for col in ("cell", "step", "epoch", "loss", "elapsed"):
        assert col in text.splitlines()[2], text
