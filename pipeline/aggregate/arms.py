"""The arms of a sweep (`spec.py`), read back from its runs' `arm` / `sweep_arms` /
`sweep_arm_spec` tags."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from perl_core.config import CANONICAL_FIELDS, canonical_values
from pipeline.aggregate.runs import Key, plain, row_key


def _tag_list(v: Any) -> list[str]:
    v = plain(v)
    return [a for a in str(v).split(",") if a] if v is not None else []


def _arm_spec(v: Any) -> dict[str, dict]:
    v = plain(v)
    try:
        return json.loads(v) if v else {}
    except ValueError:
        return {}


def _fits_arm(row: pd.Series, sig: dict) -> bool:
    """Does a run's config belong to the arm `sig` (`spec.arm_signature`)? Compared in canonical
    spelling (`canonical_values`), so e.g. text J 7 at J=7 fits an arm that says "text follows"."""
    def param(f: str) -> Any:
        v = plain(row.get(f"params.{f}"))
        return json.loads(v) if isinstance(v, str) and v.startswith("[") else v
    own = {f: param(f) for f in CANONICAL_FIELDS}
    mine = canonical_values(own)
    for f, want in (sig.get("fixed") or {}).items():
        got = mine[f] if f in mine else param(f)
        if f in mine:
            want = canonical_values({**own, f: want})[f]
        if got != want:
            return False
    return all(param(f) in values for f, values in (sig.get("grid") or {}).items())


def view_arms(sub: pd.DataFrame
              ) -> tuple[tuple[str, ...], dict[str, list[Key]], dict[str, dict[str, Any]]]:
    """The arms of one view's runs, from their `arm` / `sweep_arms` tags (none: no arms). The
    order is the sweep file's (`sweep_arms` of the latest run), then any other arm seen. A run
    without an `arm` tag (finished before the sweep had arms) joins every arm whose
    `sweep_arm_spec` it fits."""
    if "tags.arm" not in sub:
        return (), {}, {}
    arm_keys: dict[str, list[Key]] = {}
    order: list[str] = []
    signature: dict[str, dict] = {}
    untagged = []
    for _, r in sub.sort_values(["end_time", "start_time"], kind="stable").iterrows():
        order = _tag_list(r.get("tags.sweep_arms")) or order
        signature = _arm_spec(r.get("tags.sweep_arm_spec")) or signature
        arms_of_run = _tag_list(r.get("tags.arm"))
        if not arms_of_run:
            untagged.append(r)
        for a in arms_of_run:
            keys = arm_keys.setdefault(a, [])
            if row_key(r) not in keys:
                keys.append(row_key(r))
    if not arm_keys:
        return (), {}, {}
    for r in untagged:
        for a, sig in signature.items():
            if _fits_arm(r, sig) and row_key(r) not in arm_keys.setdefault(a, []):
                arm_keys[a].append(row_key(r))
    arms = tuple(a for a in order if a in arm_keys) + tuple(a for a in arm_keys if a not in order)
    return arms, arm_keys, {a: dict(signature.get(a, {}).get("fixed") or {}) for a in arms}
