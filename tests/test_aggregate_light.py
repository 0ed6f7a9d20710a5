"""`pipeline.aggregate` runs where only the tracking dependencies are: importing it and building
every table (the drift table included) imports neither torch nor open_clip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import pipeline.aggregate as agg
from fake_runs import B2N, N_TEST, b2n_metrics, memory_runs
from perl_core.config import TrainConfig

base = TrainConfig(protocol="base2novel", num_steps=2)
runs = memory_runs([("base2novel", base.replace(dataset=d, seed=s),
                     b2n_metrics(b, n, 2, n_test=N_TEST[d]))
                    for d, seeds in B2N.items() for s, (b, n) in seeds.items()])
pool, df = agg.resolve(agg.cast_params(agg.runs_frame(runs, {{"7": "perl/x"}})))
names = [t.name for t in agg.build_tables(pool, agg.sweep_views(df))]
assert "dynamics_drift__base2novel" in names and "dynamics_jacobian__base2novel" in names, names
print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""


def test_aggregate_imports_and_builds_tables_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


SWEEP = """name: base2novel
experiment: perl/base2novel
tracking_uri: {uri}
fixed: {{protocol: base2novel, num_steps: 2, data_root: /coop}}
grid: {{dataset: [DTD], seed: [1]}}
"""


def test_aggregate_of_a_sweep_file_reads_its_experiment_and_tracking_uri(tmp_path, capsys):
    """`python -m pipeline.aggregate SWEEP.yaml`: the sweep's experiment only, at its URI."""
    from fake_runs import Store
    from perl_core.config import TrainConfig
    from pipeline import aggregate as agg_mod

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Store(uri, tmp_path)
    base = TrainConfig(protocol="base2novel", num_steps=2)
    s.b2n_sweep(s.experiment("perl/base2novel"), base, {})
    s.steps_sweep(s.experiment("perl/ablation_steps"), {}, "boom")
    sweep = tmp_path / "b2n.yaml"
    sweep.write_text(SWEEP.format(uri=uri))
    assert agg_mod.main([str(sweep), "--out", str(tmp_path / "out"), "--no-log", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "from 1 experiment(s)" in out and "table1_5_base2novel__base2novel" in out
    assert "ablation_steps" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(SWEEP.format(uri=uri).replace("num_steps: 2", "num_stepz: 2"))
    assert agg_mod.main([str(bad), "--no-log"]) == 2
    assert "num_stepz" in capsys.readouterr().err


def test_aggregate_takes_set_overrides_validated_like_pipeline_run(tmp_path, capsys):
    """`--set` as on `pipeline.run`: the overridden sweep names the experiment read; a bad value
    is refused with the `--set` named, before any MLflow read."""
    from fake_runs import Store
    from perl_core.config import TrainConfig
    from pipeline import aggregate as agg_mod

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Store(uri, tmp_path)
    s.b2n_sweep(s.experiment("perl/base2novel"), TrainConfig(protocol="base2novel",
                                                             num_steps=2), {})
    s.steps_sweep(s.experiment("perl/ablation_steps"), {}, "boom")
    sweep = tmp_path / "b2n.yaml"
    sweep.write_text(SWEEP.format(uri=uri))
    assert agg_mod.main([str(sweep), "--set", "experiment=perl/ablation_steps", "--out",
                         str(tmp_path / "out"), "--no-log", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "from 1 experiment(s)" in out and "base2novel__base2novel" not in out, out
    assert agg_mod.main([str(sweep), "--set", "fixed.num_steps=999", "--no-log"]) == 2
    assert "--set fixed.num_steps" in capsys.readouterr().err
    assert agg_mod.main(["--set", "fixed.lr=1", "--no-log"]) == 2  # no sweep to override
    assert "give the SWEEP.yaml" in capsys.readouterr().err
