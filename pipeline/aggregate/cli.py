"""`python -m pipeline.aggregate [SWEEP.yaml]`: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.aggregate.build import Aggregate, aggregate
from pipeline.aggregate.output import count_lines, log_to_mlflow, write_outputs
from pipeline.aggregate.read import AGGREGATE_EXPERIMENT, make_client
from pipeline.layout import default_tracking_uri, redact_uri
from pipeline.tables import to_markdown

DESCRIPTION = "`python -m pipeline.aggregate`: MLflow runs -> the paper's tables, plots and an " \
              "HTML report."


def parser() -> argparse.ArgumentParser:
    from pipeline.spec import add_set_argument  # (no torch: pydantic and the config rules)

    ap = argparse.ArgumentParser(prog="python -m pipeline.aggregate", description=DESCRIPTION)
    ap.add_argument("sweep", nargs="?", default=None, metavar="SWEEP.yaml",
                    help="summarise this sweep: its experiment and tracking URI come from the "
                         "file (as pipeline.run reads them); --experiment adds more")
    ap.add_argument("--experiment", action="append", nargs="+", metavar="NAME",
                    help="experiment name(s) to read (default: every experiment whose runs carry "
                         "a `sweep` tag)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                         "sqlite:///<cwd>/runs/mlflow.db)")
    ap.add_argument("--out", default="runs/aggregate", help="output folder (default: %(default)s)")
    ap.add_argument("--ui-url", default=None,
                    help="MLflow UI base URL for run links in the report (default: the tracking "
                         "URI when it is http(s))")
    ap.add_argument("--no-log", action="store_true",
                    help="do not log the outputs as an `aggregate` run in MLflow")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown tables")
    add_set_argument(ap)  # the sweep as it was submitted with --set (its experiment, its URI)
    return ap


def _sweep_target(sweep: str, names: list[str] | None, tracking_uri: str | None,
                  overrides: list[str] = ()) -> tuple[str, list[str]]:
    """The sweep file's tracking URI and experiment (first, then `names`), with its `--set`
    overrides; a suite file's: its sweeps' experiments. SpecError / OSError when a file does
    not load."""
    from pipeline.spec import SpecError, load_spec, locate_sweep, resolve_tracking_uri
    from pipeline.suite import is_suite, load_suite

    path = locate_sweep(sweep)
    files = load_suite(path)[1] if is_suite(path) else [path]  # a suite: all its sweeps
    specs = [load_spec(f, overrides=overrides) for f in files]
    uris = {resolve_tracking_uri(s, tracking_uri) for s in specs}
    if len(uris) > 1:
        raise SpecError(path, [("", "its sweeps name different tracking stores; give "
                                    "--tracking-uri")])
    mine = [s.experiment for s in specs]
    return uris.pop(), mine + [n for n in names or [] if n not in mine]


def _print(agg: Aggregate, uri: str, out: Path, files: list[Path], quiet: bool) -> None:
    print(f"read {len(agg.runs)} run(s) from {len(agg.experiments)} experiment(s) at "
          f"{redact_uri(uri)}")
    for w in agg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not quiet:
        for sec in ("tables", "dynamics", "search"):
            for t in agg.tables:
                if t.section == sec:
                    print()
                    print(to_markdown(t))
    print("cell counts (expected vs found):")
    for line in count_lines(agg) or ["(no tables: no trial runs found)"]:
        print(f"  {line}")
    print(f"wrote {len(files)} file(s) to {out}/ (report: {out / 'report.html'})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [n for group in (args.experiment or []) for n in group] or None
    uri = args.tracking_uri or default_tracking_uri()
    if args.overrides and not args.sweep:
        print("--set overrides a sweep file's keys: give the SWEEP.yaml", file=sys.stderr)
        return 2
    if args.sweep:
        from pipeline.spec import SpecError

        try:
            uri, names = _sweep_target(args.sweep, names, args.tracking_uri, args.overrides)
        except (SpecError, OSError) as e:
            print(str(e), file=sys.stderr)
            return 2
    client = make_client(uri)
    agg = aggregate(uri, names, client=client)
    out = Path(args.out)
    files = write_outputs(agg, out, ui_url=args.ui_url)
    _print(agg, uri, out, files, args.quiet)
    if not args.no_log:
        rid = log_to_mlflow(agg, out, client=client)
        print(f"logged outputs as artifacts of run {rid} in experiment '{AGGREGATE_EXPERIMENT}'")
    return 0
