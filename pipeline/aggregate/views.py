"""Sweep views: the runs one sweep submitted, per experiment and protocol, with the fields that
index a table's rows (its axes) and its arms; and the helpers every table family shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import pandas as pd

from perl_core.config import TrainConfig
from pipeline import reference as ref
from pipeline.aggregate.arms import view_arms
from pipeline.aggregate.runs import (HPO_RESOLUTION, KEY_FIELDS, NO_PARAMS, NOT_A_TRIAL, Key,
                                        kget, kreplace, plain, row_key, seed_order, sweep_name)

DEFAULTS = TrainConfig()  # the paper's settings
# FALLBACK ONLY, for stores written before each submission logged its resolved sweep file
# (`read.recorded_axes`): the field(s) each known sweep varies, by sweep name, so that an
# ablation whose other values are not run yet still gets its axis (and the paper's rows as
# missing). Unknown sweeps without a record are grouped by whatever fields vary among their runs.
SWEEP_AXES: dict[str, tuple[str, ...]] = {
    "base2novel": (), "cross_dataset": (), "domain_generalization": (),
    "ablation_steps": ("num_steps",), "ablation_layer": ("inject_layer",),
    "ablation_modality": ("modality",), "ablation_loop": ("variant",),
    "alignment": ("anchor_weight",),
}
# Fields that describe data, not a setting being ablated.
_DATA_FIELDS = ("dataset", "eval_datasets", "protocol")


@dataclass
class SweepView:
    """The runs one sweep submitted (phase final), for one protocol."""
    sweep: str
    protocol: str
    keys: list[Key]  # distinct cell keys the sweep has runs for (any status)
    seeds: list[Any]
    axis: tuple[str, ...]  # fields that index the rows (empty: a plain protocol table)
    constants: dict[str, Any]  # fields with one value across the sweep
    datasets: list[str]
    experiment_id: str
    experiment: str  # experiment name
    # a sweep with arms (`spec.py`): the arm names in sweep order and each arm's cell keys (a key
    # two arms share is in both); empty for sweeps without arms and for runs older than arms
    arms: tuple[str, ...] = ()
    arm_keys: dict[str, list[Key]] = field(default_factory=dict)
    # per arm the values it pins (`spec.arm_signature`); in an arm's own view, that arm's
    arm_pins: dict[str, dict[str, Any]] = field(default_factory=dict)
    pins: dict[str, Any] = field(default_factory=dict)
    # the axes the sweep declares: its recorded grid's, else SWEEP_AXES's (the head of `axis`)
    declared: tuple[str, ...] = ()

    def template(self) -> Key:
        """A key to derive never-run cells from: an observed one, with what the arm pins spelled
        out (an observed J=7 key reads "text follows"; the vision_J arm pins the text J at 7)."""
        pins = dict(self.pins)
        text_j = {text_j_of(k) for k in self.keys}
        if "text_inject_layer" not in pins and len(text_j) == 1:  # a constant text J is pinned
            pins["text_inject_layer"] = text_j.pop()
        return kreplace(self.keys[0], **{f: v for f, v in pins.items() if f in KEY_FIELDS},
                        canonical=False)


def dataset_order(names: Iterable[str]) -> list[str]:
    """The paper's order for its datasets, then everything else alphabetically."""
    names = list(dict.fromkeys(n for n in names if n))
    pos = {d: i for i, d in enumerate(ref.PAPER_DATASETS)}

    def k(n: str) -> tuple:
        p = ref.paper_dataset(n)
        return (0, pos[p], n) if p in pos else (1, 0, n.lower())
    return sorted(names, key=k)


def _view(sub: pd.DataFrame, sweep: str, protocol: str, exp_id: Any,
          declared: tuple[str, ...] | None) -> SweepView:
    keys = list(dict.fromkeys(row_key(r) for _, r in sub.iterrows()))
    seeds = sorted({plain(s) for s in sub.get("params.seed", pd.Series(dtype="str"))},
                   key=seed_order)
    distinct = {f: {kget(k, f) for k in keys} for f in KEY_FIELDS}
    varying = tuple(f for f in KEY_FIELDS if f not in _DATA_FIELDS and varies(keys, f))
    axis = varying if declared is None else \
        declared + tuple(f for f in varying if f not in declared)
    arms, arm_keys, arm_pins = view_arms(sub)
    return SweepView(
        sweep=sweep or "(untagged)", protocol=protocol, keys=keys, seeds=seeds, axis=axis,
        constants={f: next(iter(v)) for f, v in distinct.items() if len(v) == 1},
        datasets=dataset_order(str(kget(k, "dataset")) for k in keys),
        experiment_id=str(exp_id), experiment=str(sub["experiment"].iloc[0]),
        arms=arms, arm_keys=arm_keys, arm_pins=arm_pins, declared=declared or ())


def sweep_views(df: pd.DataFrame,
                recorded: dict[tuple[str, str], tuple[str, ...]] | None = None
                ) -> list[SweepView]:
    """One view per (experiment, sweep tag, protocol). Split by experiment too, so that e.g. a
    toy-world and a real-data submission of the same sweep file are never averaged together.
    The axes: the fields the sweep's recorded grid varies (`recorded`, from
    `read.recorded_axes`), else `SWEEP_AXES`' entry, then any other field its runs vary."""
    trial = df[~df["resolution"].isin([NOT_A_TRIAL, NO_PARAMS, HPO_RESOLUTION])]
    views = []
    sweeps = trial["tags.sweep"].map(sweep_name)
    groups = sorted({(e, sw) for e, sw in zip(trial["experiment_id"], sweeps)},
                    key=lambda g: (g[1], str(g[0])))
    for exp_id, sw in groups:
        part = trial[(sweeps == sw) & (trial["experiment_id"] == exp_id)]
        declared = (recorded or {}).get((str(exp_id), sw), SWEEP_AXES.get(sw))
        protos = part["params.protocol"] if "params.protocol" in part else \
            pd.Series(["base2novel"] * len(part), index=part.index)
        for proto in sorted(set(protos.astype("str"))):
            views.append(_view(part[protos.astype("str") == proto], sw, proto, exp_id,
                               declared))
    return views


def text_j_of(key: Key) -> Any:
    """The text tower's J of a cell (`text_inject_layer` -1 or not logged: the vision J)."""
    t = kget(key, "text_inject_layer")
    return kget(key, "inject_layer") if t is None or t < 0 else t


def varies(keys: list[Key], f: str) -> bool:
    if f == "text_inject_layer":
        # a cell whose text J equals its vision J is one run whether written J or -1
        # (TrainConfig.hashed_fields): the text J varies only if it is neither constant nor J
        text_j = [text_j_of(k) for k in keys]
        return len(set(text_j)) > 1 and any(t != kget(k, "inject_layer")
                                            for t, k in zip(text_j, keys))
    return len({kget(k, f) for k in keys}) > 1


def arm_axis(view: SweepView) -> tuple[str, ...]:
    """The fields of `view.axis` that vary within some arm (the rows inside an arm's block); the
    fields that only differ between arms are named by the arm label instead."""
    if not view.arms:
        return view.axis
    return tuple(f for f in view.axis if any(varies(view.arm_keys[a], f) for a in view.arms))


def arm_views(view: SweepView) -> list[tuple[str | None, SweepView]]:
    """(arm, the view restricted to that arm's keys and to `arm_axis`) per arm, in sweep order;
    [(None, view)] for a sweep without arms."""
    if not view.arms:
        return [(None, view)]
    axis = arm_axis(view)
    return [(a, replace(view, keys=view.arm_keys[a], axis=axis, arms=(), arm_keys={},
                        arm_pins={}, pins=view.arm_pins.get(a, {})))
            for a in view.arms]


def keys_for_datasets(view: SweepView, datasets: list[str], **fields: Any) -> list[Key]:
    """The cell key of each dataset for one row: an observed key when there is one, else the
    sweep's template with the fields replaced (a cell that was never submitted)."""
    out = []
    for d in datasets:
        want = {"dataset": d, **fields}
        match = [k for k in view.keys if all(kget(k, f) == v for f, v in want.items())]
        out.append(match[0] if match else kreplace(view.template(), **want))
    return out


def on_paper_data(view: SweepView) -> bool:
    """Whether the sweep ran any of the paper's datasets (then the paper's numbers apply)."""
    return any(ref.paper_dataset(d) for d in view.datasets)


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def is_default(field_: str, v: Any) -> bool:
    """Whether `v` is the paper's (TrainConfig's default) value of the field."""
    d = getattr(DEFAULTS, field_, None)
    numeric = isinstance(d, (int, float)) and isinstance(v, (int, float))
    return v == d or (numeric and float(v) == float(d))


def differing_settings(view: SweepView) -> list[str]:
    """Constant settings of the sweep that differ from the paper's (TrainConfig defaults)."""
    out = []
    for f in ("arch", "pretrained", "shots", "epochs", "lr", "batch_size", "rank",
              "anchor_weight", "inject_layer", "num_steps", "modality", "variant", "template",
              "precision", "weight_decay", "aug_scale_min"):
        if f in view.axis or f not in view.constants:
            continue
        v = view.constants[f]
        if v is not None and not is_default(f, v):
            out.append(f"{f}={fmt_value(v)}")
    return out


def settings_note(view: SweepView) -> list[str]:
    diff = differing_settings(view)
    if not diff:
        return []
    return ["Settings that differ from the paper's defaults: " + ", ".join(diff)
            + ". Paper numbers are a reference, not a like-for-like target."]
