"""One set of rules for every TrainConfig value (issue 16 part 3): the sweep YAML, the single-run
CLI and its --config file, trial records and MLflow params all go through `TrainConfig`'s typed
model; non-finite numbers, absurd ranges, bools for ints and lists for scalars are refused, and
every message names where the value came from."""

from __future__ import annotations

import numpy as np
import pytest

from perl_core.config import ConfigError, TrainConfig, validate_field
from pipeline.tracking import config_params
from tests.test_spec import BASE, assert_spec_error

SEARCH = BASE + "search:\n  space:\n    lr: {type: loguniform, low: 1.0e-5, high: %s}\n" \
                "  metric: val/acc\n"
# (case, YAML, fragments of the message: file and line are checked by assert_spec_error's path)
SWEEP_CASES = [
    ("lr_inf", BASE + "  lr: .inf\n", ["line 7, fixed.lr", "finite"]),
    ("anchor_inf", BASE + "  anchor_weight: .inf\n", ["line 7, fixed.anchor_weight", "finite"]),
    ("lr_zero", BASE + "  lr: 0\n", ["fixed.lr", "lr=0 must be > 0"]),
    ("num_steps_absurd", BASE + "  num_steps: 1000\n", ["line 7, fixed.num_steps", "<= 64"]),
    ("rank_absurd", BASE + "  rank: 1e9\n", ["fixed.rank", "<= 1024"]),
    ("shots_bool", BASE + "  shots: true\n", ["fixed.shots", "expected an integer (got True)"]),
    ("list_for_scalar", BASE + "  lr: [0.1]\n", ["fixed.lr", "expected a number"]),
    ("grid_item_range", BASE + "grid:\n  num_steps: [1, 999]\n",
     ["line 8, grid.num_steps[1]: num_steps=999 must be"]),
    ("layers_item", BASE + "  variant: deep\n  inject_layers: [3, -1]\n",
     ["fixed.inject_layers", "inject_layers[1]=-1 must be >= 0"]),
    ("cache_inf", BASE + "cache: {max_gb: .inf}\n", ["line 7, cache.max_gb", "finite"]),
    ("search_high_inf", SEARCH % ".inf", ["search.space.lr.high", "finite"]),
    ("search_high_field_rule", BASE + "search:\n  space:\n    rank: {type: int, low: 1, "
                                      "high: 100000}\n  metric: val/acc\n",
     ["search.space.rank.high", "rank=100000 must be >= 1 and <= 1024"]),
    ("gpu_fraction", BASE + "resources: {gpu: 2.5}\n", ["resources.gpu", "at most 1"]),
    ("gpu_bool", BASE + "resources: {gpu: true}\n", ["resources.gpu", "expected a number"]),
    ("max_failures_bool", BASE + "max_failures: true\n", ["max_failures", "not true"]),
    ("search_seed_range", SEARCH.replace("  metric:", "  seed: -1\n  metric:") % "1.0e-2",
     ["line 10, search.seed", "greater than or equal to 0 (got -1)"]),
    # a tuple field takes a YAML list only: a bare string is not comma-split in a file
    ("tuple_bare_string", BASE + "  eval_datasets: ToyPatterns,ToyCounts\n",
     ["line 7, fixed.eval_datasets", "give a YAML list", "'ToyPatterns,ToyCounts'"]),
    ("tuple_grid_string", BASE + "grid:\n  eval_datasets: [ToyPatterns, [ToyCounts]]\n",
     ["grid.eval_datasets[0]", "give a YAML list"]),
]


@pytest.mark.parametrize("case,text,fragments", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_values_follow_the_config_rules(case, text, fragments, tmp_path):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert_spec_error(path, fragments)


def test_whole_gpus_and_fractions_up_to_one_pass(tmp_path):
    from pipeline.spec import load_spec

    for gpu in ("0.25", "1", "2"):
        (tmp_path / "g.yaml").write_text(BASE + f"resources: {{gpu: {gpu}}}\n")
        assert load_spec(tmp_path / "g.yaml").resources.gpu == float(gpu)


def test_cli_and_its_config_file_name_the_origin(tmp_path):
    from perl_core.train import build_parser, config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: ToyShapes\nshots: true\nlr: [0.1]\n")
    args = build_parser().parse_args(["--config", str(cfg_file), "--num-steps", "1000",
                                      "--lr", "0"])
    with pytest.raises(ValueError) as e:
        config_from_args(args)
    msg = str(e.value)
    # the file's shots (line 2) stays; its lr is overridden by the flag, which is named
    assert f"{cfg_file}: line 2, shots: expected an integer (got True)" in msg, msg
    assert "--num-steps: num_steps=1000 must be >= 0 and <= 64" in msg, msg
    assert "--lr: lr=0.0 must be > 0" in msg, msg
    ok = build_parser().parse_args(["--dataset", "ToyShapes", "--lr", "1e-3", "--shots", "4"])
    assert config_from_args(ok) == TrainConfig(dataset="ToyShapes", lr=1e-3, shots=4)


def test_records_and_params_round_trip_and_are_checked():
    cfg = TrainConfig(dataset="ToyShapes", eval_datasets=("A", "B"), lr=3e-4, inject_layers=(),
                      protocol="cross_dataset")
    params = config_params(cfg)  # MLflow's strings
    back = TrainConfig.from_record(params)
    assert back == cfg and back.config_hash() == cfg.config_hash()
    with pytest.raises(ConfigError, match=r"shots: expected an integer \(got 'True'\)"):
        TrainConfig.from_record({**params, "shots": "True"})
    with pytest.raises(ConfigError, match="lr=nan must be a finite number"):
        TrainConfig.from_record({**params, "lr": "nan"})
    # numpy scalars (Optuna's samples) are plain numbers
    assert TrainConfig(lr=np.float64(0.01), shots=np.int64(4)) == TrainConfig(lr=0.01, shots=4)
    with pytest.raises(ConfigError, match="rank=0 must be >= 1"):
        cfg.replace(rank=0)  # replace is checked too
    assert validate_field("eval_datasets", "A,B") == ("A", "B")
    with pytest.raises(ConfigError, match="unknown TrainConfig field 'nope'"):
        TrainConfig.from_dict({"nope": 1, "shots": 2})


def test_decode_param_reads_stored_values_by_type_only():
    """`decode_param`: one MLflow param string -> the field's type, by TrainConfig's decoding
    (the aggregate reads finished runs with it), ranges and choices unchecked."""
    from perl_core.config import decode_param

    params = config_params(TrainConfig(dataset="DTD", inject_layers=(3, 7), lr=1e-3))
    decoded = {k: decode_param(k, v) for k, v in params.items()}
    assert decoded == TrainConfig(dataset="DTD", inject_layers=(3, 7), lr=1e-3).to_dict() | {
        "inject_layers": (3, 7), "eval_datasets": ()}
    assert decode_param("shots", "3.0") == 3 and decode_param("lr", "1") == 1.0
    assert decode_param("inject_layers", "(3, 7)") == (3, 7)  # a tuple logged as is
    assert decode_param("inject_layers", "()") == () == decode_param("inject_layers", "")
    assert decode_param("eval_datasets", "('A', 'B')") == ("A", "B")
    assert decode_param("lr", "0") == 0.0 and decode_param("protocol", "old") == "old"
    for name, text in [("shots", "3.5"), ("shots", "True"), ("lr", "nan"), ("lr", "x"),
                       ("inject_layers", "[1.5]"), ("nope", "1")]:
        with pytest.raises(ConfigError):
            decode_param(name, text)


def test_a_malformed_json_list_is_a_config_error_naming_the_field():
    from perl_core.config import decode_param

    for call in (lambda: validate_field("eval_datasets", "[ToyShapes,"),
                 lambda: TrainConfig.from_dict({"dataset": "ToyShapes", "inject_layers": "[1,"}),
                 lambda: decode_param("inject_layers", "[1,")):
        with pytest.raises(ConfigError, match=r"(eval_datasets|inject_layers): expected a list"):
            call()


def test_a_config_file_gives_a_list_field_as_a_list(tmp_path):
    """The sweep files' rule (config.file_value_problem) holds for --config too: a bare string
    for a tuple field is refused, naming the line, instead of being comma-split."""
    from perl_core.train import build_parser, config_from_args

    f = tmp_path / "c.yaml"
    f.write_text("dataset: ImageNet\nprotocol: domain_generalization\n"
                 "eval_datasets: ImageNetV2, ImageNetSketch\n")
    with pytest.raises(ValueError, match=f"{f}: line 3, eval_datasets: eval_datasets: give a "
                                         "YAML list"):
        config_from_args(build_parser().parse_args(["--config", str(f)]))
    f.write_text("dataset: ImageNet\nprotocol: domain_generalization\n"
                 "eval_datasets: [ImageNetV2, ImageNetSketch]\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(f)]))
    assert cfg.eval_datasets == ("ImageNetV2", "ImageNetSketch")


def test_a_tab_indented_json_config_file_is_read_as_json(tmp_path):
    from perl_core.train import build_parser, config_from_args

    f = tmp_path / "c.json"
    f.write_text('{\n\t"dataset": "ToyShapes",\n\t"lr": 0.001,\n\t"shots": true\n}\n')
    with pytest.raises(ValueError, match=f"{f}: line 4, shots: expected an integer"):
        config_from_args(build_parser().parse_args(["--config", str(f)]))
    f.write_text('{\n\t"dataset": "ToyShapes",\n\t"eval_datasets": ["ToyCounts"]\n}\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(f)]))
    assert cfg.eval_datasets == ("ToyCounts",)
    f.write_text('{\n\t"dataset": "ToyShapes",\n}\n')
    with pytest.raises(ValueError, match=r"c.json: line 3, column 1: JSON syntax error"):
        config_from_args(build_parser().parse_args(["--config", str(f)]))
