"""Fields added after schema 1: old runs keep their hashes and are read with the legacy value."""

from __future__ import annotations

import pandas as pd

from perl_core.config import LEGACY_VALUES, TrainConfig
from pipeline.aggregate import cast_params


def test_a_field_at_its_legacy_value_leaves_the_hash_unchanged():
    base = TrainConfig(dataset="ToyShapes", variant="step")
    hashed = base.hashed_fields()
    for name in LEGACY_VALUES:
        assert name not in base.replace(**{name: LEGACY_VALUES[name]}).hashed_fields()
    # today's default reading of the step variant is not the legacy one: a new cell
    assert hashed["variant_projectors"] == "shared_plus_specific"
    assert base.config_hash() != base.replace(variant_projectors="specific_only").config_hash()
    # variants without specific projectors: the reading changes nothing, so neither does the hash
    shared = TrainConfig(dataset="ToyShapes")
    assert shared.config_hash() == shared.replace(variant_projectors="specific_only").config_hash()


def test_text_at_the_vision_layer_is_the_same_cell_as_text_follows():
    a = TrainConfig(dataset="ToyShapes", inject_layer=7, text_inject_layer=-1)
    assert a.config_hash() == a.replace(text_inject_layer=7).config_hash()
    assert a.config_hash() != a.replace(text_inject_layer=6).config_hash()


def test_a_stored_config_without_a_new_field_takes_its_legacy_value():
    old = TrainConfig(dataset="ToyShapes", variant="step").to_dict()
    for name in LEGACY_VALUES:
        old.pop(name)
    cfg = TrainConfig.from_record(old)
    assert cfg.variant_projectors == "specific_only"
    assert cfg.config_hash() == TrainConfig(dataset="ToyShapes", variant="step",
                                            variant_projectors="specific_only").config_hash()
    # a stored value wins; a user's config (from_dict) gets today's default
    assert TrainConfig.from_record({**old, "variant_projectors": "shared_plus_specific"}
                                   ).variant_projectors == "shared_plus_specific"
    assert TrainConfig.from_dict(old).variant_projectors == "shared_plus_specific"


def test_the_aggregate_reads_old_runs_with_the_legacy_value():
    df = pd.DataFrame({"params.dataset": ["ToyShapes", "ToyShapes", None],
                       "params.variant": ["step", "step", None],
                       "params.variant_projectors": [None, "shared_plus_specific", None]})
    out = cast_params(df)
    assert list(out["params.variant_projectors"][:2]) == ["specific_only", "shared_plus_specific"]
    assert out["params.fewshot_source"][0] == "sample"
    assert pd.isna(out["params.variant_projectors"][2])  # not a trial run (no dataset param)
