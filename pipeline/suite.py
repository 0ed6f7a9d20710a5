"""Several sweeps in one `pipeline.run`: a suite file, or several sweep files on the command line.

    python -m pipeline.run sweeps/paper.yaml              # the whole paper (sweeps/paper.yaml)
    python -m pipeline.run sweeps/base2novel.yaml sweeps/ablation_steps.yaml

A suite file names its sweep files (relative to itself) and nothing else:

    name: paper
    description: ...
    sweeps: [base2novel.yaml, cross_dataset.yaml, domain_generalization.yaml, ...]

The sweeps run one after another in that order, each as its own submission in its own
experiment, all against one tracking store. `pipeline.reuse` makes each distinct training run
once: a cell an earlier sweep already finished is linked (same config hash) or evaluated from
that training's weights (same training hash) instead of trained again. Every sweep file is
checked before the first one starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perl_core.configfile import ConfigFileError, read_yaml


class SuiteError(ConfigFileError):
    """An invalid suite file, or suite arguments (it names the file and the key)."""

    what = "suite file"


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    description: str = ""
    sweeps: list[str] = Field(min_length=1)


def is_suite(path: str) -> bool:
    """Whether `path` is a suite file (a YAML mapping with `sweeps:`), not a sweep file."""
    try:
        raw, _ = read_yaml(Path(path).read_text(), source=path)
    except (OSError, ConfigFileError):
        return False  # the sweep loader reports what is wrong with it
    return isinstance(raw, dict) and "sweeps" in raw


def load_suite(path: str) -> tuple[SuiteSpec, list[str]]:
    """The suite and its sweep files (paths relative to the suite file resolved, each
    existing); SuiteError naming the file and the key otherwise."""
    raw, _ = read_yaml(Path(path).read_text(), source=path)
    try:
        suite = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        raise SuiteError(path, [(".".join(str(p) for p in err["loc"]), err["msg"])
                                for err in e.errors()]) from None
    here = Path(path).parent
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for i, name in enumerate(suite.sweeps):
        f = Path(name) if os.path.isabs(name) else here / name
        if not f.is_file():
            problems.append((f"sweeps[{i}]", f"no sweep file {name!r} (looked for {f})"))
        elif is_suite(str(f)):
            problems.append((f"sweeps[{i}]", f"{name!r} is a suite itself; list its sweeps"))
        files.append(str(f))
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        problems.append(("sweeps", f"listed more than once: {', '.join(dup)}"))
    if problems:
        raise SuiteError(path, problems)
    return suite, files


def sweep_files(given: list[str], locate: Any) -> tuple[str, list[str]]:
    """(label, sweep files) of the command line's SWEEP arguments: one suite file expands to its
    sweeps; sweep files are taken as they are (`locate`: the driver's `locate_sweep`)."""
    # (absolute as each is located: `locate` may move to the project folder for the next one)
    located = [locate(g) for g in given] if len(given) == 1 else \
        [os.path.abspath(locate(g)) for g in given]
    suites = [g for g in located if is_suite(g)]
    if suites and len(located) > 1:
        raise SuiteError(suites[0], [("", "a suite file is given alone (it lists its sweeps)")])
    if suites:
        suite, files = load_suite(suites[0])
        return suite.name, files
    if len(set(located)) != len(located):
        raise SuiteError(located[0], [("", "the same sweep file is given twice: "
                                       + ", ".join(located))])
    return (Path(located[0]).stem if len(located) == 1 else "sweeps"), located


__all__ = ["SuiteError", "SuiteSpec", "is_suite", "load_suite", "sweep_files"]
