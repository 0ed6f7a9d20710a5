"""Table 4's readings of the reasoning loop: which paper row a `variant` is, and each row's
trainable-parameter count beside the paper's params column."""

from __future__ import annotations

from pipeline.aggregate.runs import Key, Pool

VARIANT_METHOD = {"early": "PERL-Early", "deep": "PERL-Deep", "shared": "PERL-Shared",
                  "step": "PERL-Step", "layer": "PERL-Layer", "layerstep": "PERL-LayerStep"}
PARAM_COUNT_KEYS = ("num_trainable_parameters", "trainable_parameters", "num_trainable_params")
PARAMS_OURS, PARAMS_PAPER = "trainable params (ours)", "params (paper)"  # info column headers
LOOP_NOTE = (f"{PARAMS_OURS}: each row's trainable parameters as its runs logged them; "
             f"{PARAMS_PAPER}: Table 4's params column. The paper's 32K/26K/83K fit "
             f"variant_projectors shared_plus_specific (the shared pair kept, the specific "
             f"projectors added); specific_only is the other reading (docs/method.md).")


def param_count(pool: Pool, keys: list[Key]) -> str:
    """The row's own trainable-parameter count, as its finished runs logged it (metric or tag);
    counts that disagree are all shown ("a / b"), never one picked."""
    seen: list[str] = []
    for k in keys:
        for r in pool.finished_seeds(k).values():
            for name in PARAM_COUNT_KEYS:
                v = r.metrics.get(name, r.extra.get(name))
                if v is not None:
                    try:
                        text = f"{int(float(v)):,}"
                    except ValueError:
                        text = str(v)
                    if text not in seen:
                        seen.append(text)
                    break
    return " / ".join(seen) or "—"
