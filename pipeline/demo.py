"""`make demo`: the whole pipeline on the embedded default, on a laptop, in minutes.

1. generate the synthetic CoOp-format world (cached; instant the second time),
2. `python -m pipeline.run sweeps/smoke.yaml` on a local Ray with MLflow on SQLite under runs/,
3. `python -m pipeline.aggregate` over the smoke experiment, printing the rebuilt tables,
4. say where the report and plots are and how to open the MLflow UI.

Each step is the same command a user would type, run as a subprocess, so the demo exercises the
real entry points. Re-running skips finished cells (config-hash lookup in MLflow).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _run(args: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="sweeps/smoke.yaml")
    ap.add_argument("--runs-dir", default="runs", help="where the world, MLflow DB and outputs go")
    args = ap.parse_args(argv)

    runs = (REPO / args.runs_dir).resolve()
    world = runs / "world"
    db = runs / "mlflow.db"
    out = runs / "aggregate"
    env = {
        **os.environ,
        "PERL_DATA_ROOT": os.environ.get("PERL_DATA_ROOT", str(world)),
        "PERL_RUNS_DIR": str(runs),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{db}"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    t0 = time.time()

    _step("1/3 synthetic CoOp-format world")
    from perl_core.data.synthetic import generate_world

    generate_world(env["PERL_DATA_ROOT"])
    print(f"world at {env['PERL_DATA_ROOT']}")

    _step(f"2/3 sweep {args.sweep} (local Ray, MLflow at {env['MLFLOW_TRACKING_URI']})")
    _run(["-m", "pipeline.run", args.sweep], env)

    _step("3/3 aggregate: tables, plots, report")
    _run(["-m", "pipeline.aggregate", "--tracking-uri", env["MLFLOW_TRACKING_URI"],
          "--out", str(out)], env)

    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(f"  report:  {out / 'report.html'}")
    print(f"  tables and plots: {out}/")
    print("  MLflow UI (then open http://127.0.0.1:5000):")
    exe = Path(sys.executable)
    exe_shown = exe.relative_to(REPO) if exe.is_relative_to(REPO) else exe
    print(f"    {exe_shown} -m mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}"
          " --host 127.0.0.1 --port 5000")
    print("  Running `make demo` again skips every finished cell.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
