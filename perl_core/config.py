"""TrainConfig: the one flat, typed description of a PERL training run.

The same field names are used everywhere: dataclass field = sweep YAML key = MLflow param = table
column. Defaults are the paper's (arXiv 2605.18464, Appendix A); where the paper is silent the
default is our documented choice (see README, "Method decisions").
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
from dataclasses import fields
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from pydantic import (ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator)
from pydantic.dataclasses import dataclass

# Bump when the meaning of a field changes, so that old runs stop matching new cells.
SCHEMA_VERSION = 1

Protocol = Literal["base2novel", "cross_dataset", "domain_generalization", "all"]
Modality = Literal["both", "vision", "text"]
Variant = Literal["shared", "step", "early", "deep", "layer", "layerstep"]
Template = Literal["generic", "coop"]
# Table 4's step/layer/layerstep: the paper's sizes (32K/26K/83K) = (1 + specific) x 6,402, i.e.
# the shared pair is kept and the specific projectors are added to it (docs/method.md)
VariantProjectors = Literal["shared_plus_specific", "specific_only"]
SPECIFIC_VARIANTS = ("step", "layer", "layerstep")  # the variants variant_projectors applies to
ProjectorInit = Literal["default", "near_identity"]
FewshotSource = Literal["sample", "coop_pickle"]
Precision = Literal["fp32", "bf16"]
TextPlacement = Literal["after_bos", "front"]


# The one set of rules for every value of every source (sweep YAML, single-run CLI and config files,
# trial records, MLflow params): strict types (no bool for an int, no list for a scalar), finite
# numbers only, and ranges whose upper ends refuse the absurd (a typo such as `num_steps: 1000` or
# `rank: 1e9`), not the unusual. Strings from params and the CLI are decoded first (`_decode`).
_RULES = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_LAYER = Field(ge=0, le=255)  # a transformer depth; each arch's own depth is checked per cell


@dataclass(frozen=True, config=_RULES)
class TrainConfig:
    # --- data ------------------------------------------------------------------------------
    dataset: str = ""  # registry name, e.g. "Caltech101" (case-insensitive, CoOp names accepted)
    protocol: Protocol = "base2novel"
    # cross_dataset / domain_generalization: datasets evaluated with the trained projectors
    eval_datasets: tuple[str, ...] = ()
    shots: Annotated[int, Field(gt=0, le=1024)] = 16
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 1  # numpy's seed range
    template: Template = "generic"
    # where the few-shot picks come from: our seeded sampler, or CoOp's split_fewshot/*.pkl files
    fewshot_source: FewshotSource = "sample"
    # RandomResizedCrop lower scale (Dassl default 0.08)
    aug_scale_min: Annotated[float, Field(gt=0, le=1)] = 0.08
    # --- model -----------------------------------------------------------------------------
    arch: Annotated[str, Field(min_length=1)] = "ViT-B-16-quickgelu"
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, "" for random init
    inject_layer: Annotated[int, _LAYER] = 7
    # -1: same as inject_layer (paper: J=7 for both encoders)
    text_inject_layer: Annotated[int, Field(ge=-1, le=255)] = -1
    num_steps: Annotated[int, Field(ge=0, le=64)] = 4  # the paper sweeps K = 1..5
    rank: Annotated[int, Field(ge=1, le=1024)] = 1  # at most a ViT-L width
    modality: Modality = "both"
    variant: Variant = "shared"
    # multi-depth variants (deep/layer/layerstep); empty = the variant's default depths
    inject_layers: tuple[Annotated[int, _LAYER], ...] = ()
    text_placement: TextPlacement = "after_bos"
    variant_projectors: VariantProjectors = "shared_plus_specific"
    projector_init: ProjectorInit = "default"
    # --- objective and optimiser -------------------------------------------------------------
    anchor_weight: Annotated[float, Field(ge=0, le=1000)] = 1.0
    # no upper end: a diverging lr is a real experiment (the non-finite-loss tests use 1e30)
    lr: Annotated[float, Field(gt=0)] = 1e-4
    # [INF] paper silent; 0 keeps a 6K-param adapter unregularised
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 4
    epochs: Annotated[int, Field(ge=0, le=10000)] = 1
    precision: Precision = "fp32"
    # --- execution (not part of the config hash: they do not change the result) ------------
    data_root: str = ""
    device: Annotated[str, Field(min_length=1)] = "auto"
    eval_batch_size: Annotated[int, Field(ge=1, le=65536)] = 128
    # DataLoader workers; -1 (auto): 0 on the CPU, else the trial's CPU share
    # (`perl_core.evaluate.resolve_num_workers`; the pipeline passes resources.cpu)
    num_workers: Annotated[int, Field(ge=-1, le=512)] = -1
    # seeded test images per evaluation set for the per-step Jacobian norm (0: not measured);
    # a diagnostic of the evaluation, not of the training, so it is left out of the hash;
    # 16: one image's Jacobian (K=4) costs ~9-25 evaluated images, so 16 stay under 10 % of a
    # typical B2N half test set (~1,900 images; docs/method.md)
    # 6 images: under 10 % of a median B2N half's evaluation at ViT-B/16's measured CPU cost
    # ratio (docs/method.md, Jacobian "Which images, how many")
    jacobian_samples: Annotated[int, Field(ge=0, le=100_000)] = 6
    # class prompts re-encoded with gradient at a time (perl_core/gradcache.py); 0: all at once.
    # Same gradients either way (float rounding), so not hashed. 128: more classes than that
    # (ImageNet's 1,000) keep the step's memory bounded; up to 128 it is the whole-graph path,
    # with no extra text pass (docs/benchmarks.md, "Text memory")
    text_chunk: Annotated[int, Field(ge=0, le=65536)] = 128

    @field_validator("*", mode="before")
    @classmethod
    def _decode(cls, value: Any, info: ValidationInfo) -> Any:
        return _decode(info.field_name, value)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes`, validated like any other source (ConfigError)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def effective_text_inject_layer(self) -> int:
        return self.inject_layer if self.text_inject_layer < 0 else self.text_inject_layer

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (YAML, JSON, MLflow params as strings); every problem of every
        key (unknown keys included) is in the one ConfigError."""
        problems = [(k, unknown_field(k)) for k in d if k not in _FIELD_INFO]
        if problems:
            raise ConfigError(problems)
        try:
            return cls(**d)
        except ValidationError as e:
            raise ConfigError([(_field_of(err), _message(err)) for err in e.errors()]) from None

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "TrainConfig":
        """`from_dict` for a stored config (trial record, MLflow params, projector file): a field
        it lacks was added after it was written, so it takes the value that gives the behaviour
        of that time (LEGACY_VALUES), not today's default."""
        return cls.from_dict({**{k: v for k, v in LEGACY_VALUES.items() if k not in d}, **d})

    def hashed_fields(self) -> dict[str, Any]:
        d = canonical_values(self.to_dict())
        for k in EXECUTION_FIELDS:
            d.pop(k)
        # a field added after schema 1 enters the hash only when it differs from the value that
        # gives the earlier behaviour, so runs finished before it existed keep their hashes
        for k, legacy in LEGACY_VALUES.items():
            if d[k] == legacy:
                d.pop(k)
        if self.variant not in SPECIFIC_VARIANTS:  # no specific projectors: nothing to combine
            d.pop("variant_projectors", None)
        d["schema_version"] = SCHEMA_VERSION
        return d

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of every field that can change the result."""
        return fields_digest(self.hashed_fields())


def fields_digest(d: dict[str, Any]) -> str:
    """The 16-hex sha256 of a mapping's canonical JSON: `config_hash`, and
    `perl_core.protocol.training_hash` of a reduced set of the hashed fields."""
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


EXECUTION_FIELDS = ("data_root", "device", "eval_batch_size", "num_workers", "jacobian_samples",
                    "text_chunk")
# field -> the value that reproduces what the code did before the field existed (see hashed_fields)
LEGACY_VALUES: dict[str, Any] = {"fewshot_source": "sample", "variant_projectors": "specific_only",
                                 "projector_init": "default"}
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
CANONICAL_FIELDS = ("variant", "variant_projectors", "inject_layer", "text_inject_layer")


def canonical_values(d: dict[str, Any]) -> dict[str, Any]:
    """One spelling for each model that can be written two ways (the hash and the aggregate's
    table keys both use it): variant_projectors of a variant without specific projectors is the
    default (it changes nothing), and a text_inject_layer equal to inject_layer is -1 ("text
    follows J"). A copy of `d`, which may hold any subset of the fields."""
    d = dict(d)
    if "variant_projectors" in d and d.get("variant") not in SPECIFIC_VARIANTS:
        d["variant_projectors"] = _DEFAULT_VARIANT_PROJECTORS
    if d.get("text_inject_layer") is not None and d.get("text_inject_layer") == d.get(
            "inject_layer"):
        d["text_inject_layer"] = -1
    return d


_DEFAULT_VARIANT_PROJECTORS = TrainConfig.variant_projectors


def literal_choices(name: str) -> tuple[str, ...] | None:
    """Allowed values of a Literal-typed field, else None (used by error messages)."""
    hint = get_type_hints(TrainConfig)[name]
    return tuple(get_args(hint)) if get_origin(hint) is Literal else None


def is_list_field(name: str) -> bool:
    """A tuple-typed field (eval_datasets, inject_layers): a YAML file gives it as a list."""
    return name in FIELD_NAMES and get_origin(get_type_hints(TrainConfig)[name]) is tuple


def file_value_problem(name: str, value: Any) -> str | None:
    """The rule of a value read from a file (a sweep YAML, a --config file): a tuple field is a
    YAML list, never a bare string (only a command-line flag is comma-split), since
    `eval_datasets: ImageNetV2, ImageNetSketch` would otherwise silently mean two datasets."""
    if isinstance(value, str) and is_list_field(name):
        return f"{name}: give a YAML list ([{value}] or [a, b]), not the string {value!r}"
    return None


class ConfigError(ValueError):
    """Invalid TrainConfig values; `problems` are (field, message) pairs, all of them at once.
    Callers that know where a value came from (a sweep file's line, a CLI flag) prefix that."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))


_FIELD_INFO = TrainConfig.__pydantic_fields__
_KIND = {name: get_type_hints(TrainConfig)[name] for name in _FIELD_INFO}
_WHAT = {int: "an integer", float: "a number", str: "a string"}
_WHATS = {int: "integers", float: "numbers", str: "strings"}  # _WHAT of a tuple's items


def _decode(name: str, value: Any) -> Any:
    """Text (MLflow params, CLI flags, YAML 1.1's `1e-4`) and numpy scalars (Optuna samples) ->
    the field's Python type, where the text is unambiguous; anything else is left for the strict
    check to refuse (a bool stays a bool, so `shots: true` is an error, not 1)."""
    kind = _KIND.get(name)
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, tuple)):
        value = value.item()  # numpy scalar
    if get_origin(kind) is tuple:
        if isinstance(value, str):  # a param's JSON list, or a CLI comma list
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:  # left as text: the strict check names the field
                    return value
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        return tuple(_decode_scalar(get_args(kind)[0], v) for v in value) \
            if isinstance(value, list) else value
    return _decode_scalar(kind, value)


def _decode_scalar(kind: Any, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if kind is int and isinstance(value, (str, float)):
        try:
            f = float(value)
        except ValueError:
            return value
        return int(f) if f.is_integer() else value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind is str and isinstance(value, (int, float)):
        return str(value)
    return value


def validate_field(name: str, value: Any) -> Any:
    """One value of one field, checked by the field's own rules -> its decoded value; ConfigError
    (one problem) otherwise. Sweep checks use it to name the exact key or grid entry at fault."""
    if name not in _FIELD_INFO:
        raise ConfigError([(name, unknown_field(name))])
    try:
        return _ADAPTERS[name].validate_python(_decode(name, value))
    except ValidationError as e:
        err = e.errors()[0]  # an adapter's loc lacks the field name: add it (tuple items)
        raise ConfigError([(name, _message({**err, "loc": (name, *err["loc"])}))]) from None


def decode_param(name: str, text: Any) -> Any:
    """A stored value of field `name` (an MLflow param string, a record's JSON value) -> the
    field's Python type: int, float (finite), str (a Literal field's too), or a tuple of them.
    The decoding is the one every source goes through (`TrainConfig.from_dict`), plus the Python
    repr of a tuple ("(3, 7)", "()"), which is what MLflow stores for a tuple logged as is.
    Ranges and Literal choices are not checked: a finished run is read as it was logged
    (`validate_field` checks a value about to run). ConfigError (one problem) when `text` is no
    value of the field's type, or `name` no field."""
    if name not in _FIELD_INFO:
        raise ConfigError([(name, unknown_field(name))])
    kind = _KIND[name]
    many = get_origin(kind) is tuple
    item_kind = get_args(kind)[0] if many else kind
    value = _decode(name, _tuple_repr(text) if many else text)
    items = value if many else (value,)
    if item_kind is float and isinstance(items, tuple):  # an int is a float value, as in pydantic
        items = tuple(float(v) if type(v) is int else v for v in items)
    if not isinstance(items, tuple) or not all(_is_a(item_kind, v) for v in items):
        base = str if get_origin(item_kind) is Literal else item_kind
        what = f"a list of {_WHATS.get(base, 'values')}" if many else _WHAT.get(base, "a value")
        raise ConfigError([(name, f"expected {what} (got {text!r})")])
    return items if many else items[0]


def _tuple_repr(text: Any) -> Any:
    """A Python tuple's repr ("(3, 7)") -> a list; anything else as it is."""
    if not (isinstance(text, str) and text.strip().startswith("(")):
        return text
    try:
        return list(ast.literal_eval(text.strip()))
    except (ValueError, TypeError, SyntaxError):
        return text


def _is_a(kind: Any, value: Any) -> bool:
    """`value` is of the base type `kind` (a Literal field's: str), bools and non-finite
    numbers excluded, as TrainConfig's strict rules do."""
    if get_origin(kind) is Literal:
        kind = str
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return kind is not float or math.isfinite(value)


_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # pydantic's bound names, as we write them


def field_rule(name: str) -> str:
    """The allowed range of a numeric field as text ("> 0 and <= 1024"), '' if none."""
    return " and ".join(f"{op} {getattr(m, attr):g}" for m in _FIELD_INFO[name].metadata
                        for attr, op in _OPS.items() if getattr(m, attr, None) is not None)


def unknown_field(name: str) -> str:
    """The message for a key that is no TrainConfig field (sweep checks use it too)."""
    return f"unknown TrainConfig field {name!r}; allowed: {', '.join(FIELD_NAMES)}"


def _field_of(err: dict) -> str:
    return str(err["loc"][0]) if err["loc"] else ""


def _message(err: dict) -> str:
    """A pydantic error as our message: what is allowed, and the value given."""
    name = _field_of(err)
    value, kind = err.get("input"), err["type"]
    if kind == "literal_error":
        return f"{value!r} is not one of {list(literal_choices(name) or ())}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if len(err["loc"]) > 1:  # an item of a tuple field: its own bound
            rule = " and ".join(f"{_OPS[k]} {v:g}" for k, v in err.get("ctx", {}).items())
            return f"{name}[{err['loc'][1]}]={value!r} must be {rule}"
        return f"{name}={value!r} must be {field_rule(name)}"
    if kind == "finite_number":
        return f"{name}={value!r} must be a finite number"
    if kind == "string_too_short":
        return f"{name} must not be empty"
    if kind == "unexpected_keyword_argument":
        return unknown_field(name)
    base = _KIND.get(name)
    what = (f"a list of {_WHATS.get(get_args(base)[0], 'values')}" if get_origin(base) is tuple
            else _WHAT.get(base, err["msg"].lower()))
    return f"expected {what} (got {value!r})"


_ADAPTERS = {name: TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata
                               else info.annotation, config=_RULES)
             for name, info in _FIELD_INFO.items()}


__all__ = ["TrainConfig", "ConfigError", "validate_field", "decode_param", "field_rule",
           "unknown_field",
           "SCHEMA_VERSION", "fields_digest", "FIELD_NAMES", "EXECUTION_FIELDS", "LEGACY_VALUES",
           "SPECIFIC_VARIANTS", "CANONICAL_FIELDS", "canonical_values", "literal_choices",
           "is_list_field"]
