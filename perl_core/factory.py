"""build_perl: an open_clip CLIP (random, tag, local file or embedded), frozen, in a PerlModel.

`pretrained` is one of
- None / "": random init, no download (plumbing tests, CI);
- an open_clip tag ("openai", ...): `open_clip.create_model(arch, pretrained=tag)` downloads it
  where a network exists;
- a local checkpoint file (`.safetensors`, or a `.pt`/`.pth`/`.bin` state dict), loaded strictly
  with `weights_only=True` through `open_clip.load_checkpoint`;
- "embedded": the project's tiny CLIP, `perl_core/assets/perl-tiny.safetensors`, arch `perl-tiny`
  (config `perl_core/model_configs/perl-tiny.json`, registered with open_clip on first use).

QuickGELU: OpenAI's weights need QuickGELU (`ViT-B-16-quickgelu`). A tag whose weights were trained
with QuickGELU on a GELU arch is refused; a local file on a GELU arch gets a loud warning (we cannot
tell whose weights a file holds, and open_clip itself says nothing in that case).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
from torch import nn
from open_clip.model import CLIP

from perl_core.backbone import TEXT_PLACEMENTS, uses_quick_gelu
from perl_core.config import TrainConfig
from perl_core.model import MODALITIES, VARIANT_PROJECTORS, VARIANTS, PerlModel
from perl_core.projector import PROJECTOR_INITS

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
EMBEDDED_ARCH = "perl-tiny"
EMBEDDED_WEIGHTS = PACKAGE_DIR / "assets" / "perl-tiny.safetensors"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def register_model_configs() -> None:
    """Make perl_core/model_configs/*.json known to open_clip (only adds what is missing)."""
    if not MODEL_CONFIG_DIR.is_dir():
        return
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_device(device: str | torch.device,
                   gpu_ids: Sequence[int | str] | None = None) -> torch.device:
    """The torch device of `device` ("auto", "cpu", "cuda", "cuda:1", ...).

    gpu_ids: the GPUs a scheduler assigned to this process (a Ray trial: `ray.get_gpu_ids()`,
    read by the caller: perl_core stays Ray-free); None when nothing schedules it, and then
    "auto" is cuda when available, else cpu. With gpu_ids given:
    - none assigned: "auto" is the CPU and a cuda device is refused. Such a process may still
      see every GPU of its node (Ray leaves CUDA_VISIBLE_DEVICES unset for num_gpus=0), so
      "cuda" would land on physical GPU 0, uncounted, with every other such trial;
    - some assigned: "auto" is cuda, and CUDA must be usable: never a silent fall-back to the CPU
      (a trial meant for a GPU would run ~100x slower and hold its GPU share idle).
    """
    name = str(device)
    if gpu_ids is None:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)
    if name == "auto":
        name = "cuda" if len(gpu_ids) else "cpu"
    if torch.device(name).type != "cuda":  # an explicit cpu on a GPU share is the user's call
        return torch.device(name)
    if not gpu_ids:
        raise ValueError(f"device={name!r} but this trial was assigned no GPU (Ray: "
                         f"resources.gpu: 0): it would run on a GPU the scheduler does not count. "
                         f"Set resources.gpu > 0 (0.25 packs four trials on one GPU), or device: "
                         f"auto / cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"GPU(s) {list(gpu_ids)} were assigned to this trial but CUDA is "
                           f"unusable here (torch.cuda.is_available() is False; torch "
                           f"{torch.__version__}, CUDA build {torch.version.cuda}): fix the "
                           f"node's driver / torch build, or run on the CPU with resources.gpu: "
                           f"0 and device: cpu. Not falling back to the CPU silently")
    return torch.device(name)


# TF32 (10-bit mantissa) for fp32 cuBLAS matmuls and cuDNN convolutions (the patch embedding),
# per precision: fp32 means fp32, so both off; a bf16 run has already traded precision for speed,
# and TF32 is finer than bf16 (7-bit), so the ops that stay fp32 under autocast (the fp32
# logits, ...) keep it and run on tensor cores
TF32_BY_PRECISION = {"fp32": False, "bf16": True}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before any model is built (a V100 or T4 has no
    bf16: it would fail, or crawl through emulation, only after the model is on the GPU)."""
    if precision not in TF32_BY_PRECISION:
        raise ValueError(f"precision={precision!r} is not one of {list(TF32_BY_PRECISION)}")
    # including_emulation=False: torch's default counts a V100's emulated (slow) bf16 as support
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        info = gpu_info(device)
        raise ValueError(f"precision='bf16' but {info['gpu']} (compute capability "
                         f"{info['gpu_capability']}) has no bf16 support (it needs 8.0+): set "
                         f"precision: fp32")


def set_precision_flags(precision: str) -> dict[str, bool]:
    """Set both TF32 flags for `precision` (`TF32_BY_PRECISION`; process-wide, so every run sets
    them at its start instead of inheriting torch's defaults: matmul off, cuDNN on) and return
    them (`tf32_flags`)."""
    if precision not in TF32_BY_PRECISION:
        raise ValueError(f"precision={precision!r} is not one of {list(TF32_BY_PRECISION)}")
    torch.backends.cuda.matmul.allow_tf32 = TF32_BY_PRECISION[precision]
    torch.backends.cudnn.allow_tf32 = TF32_BY_PRECISION[precision]
    return tf32_flags()


def tf32_flags() -> dict[str, bool]:
    """Whether fp32 matmuls (cuBLAS) and convolutions (cuDNN) may use TF32 now."""
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


def gpu_info(device: torch.device | str | None) -> dict[str, str]:
    """{"gpu": device name, "gpu_capability": "major.minor"} of a cuda device; "none" for any
    other device (what decides the GPU kernels, and so the rounding, beside the TF32 flags)."""
    if device is None or torch.device(device).type != "cuda":
        return {"gpu": "none", "gpu_capability": "none"}
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "gpu_capability": f"{major}.{minor}"}


def _check_cfg(cfg: dict[str, Any], what: str) -> None:
    """Refuse configs that build something other than a plain ViT CLIP (before any download)."""
    if cfg.get("custom_text") or "multimodal_cfg" in cfg or "hf_model_name" in cfg.get(
            "text_cfg", {}):
        raise ValueError(f"{what} builds a CustomTextCLIP/CoCa; PERL supports the plain open_clip "
                         f"CLIP (text tower on the CLIP object) only")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"{what} has a timm vision tower; PERL needs open_clip's "
                         f"VisionTransformer")


def _model_config(arch: str, model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    if model_cfg is not None:
        cfg = copy.deepcopy(model_cfg)
        _check_cfg(cfg, "model_cfg")
        return cfg
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"arch={arch!r} is not an open_clip model config (see "
                         f"open_clip.list_models())")
    _check_cfg(cfg, f"arch={arch!r}")
    return cfg


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" for every
    pretrained=None build; when our own checkpoint load follows, that line is false."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _random_clip(arch: str, model_cfg: dict[str, Any] | None, weights_follow: bool = False
                 ) -> CLIP:
    cfg = _model_config(arch, model_cfg)
    if model_cfg is not None:
        cfg.pop("custom_text", None)
        return CLIP(**cfg)
    if not weights_follow:
        return open_clip.create_model(arch, pretrained=None, device="cpu")
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        return open_clip.create_model(arch, pretrained=None, device="cpu")
    finally:
        root.removeFilter(notice)


def _load_file(clip: CLIP, path: Path, what: str) -> None:
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True, weights_only=True)
    except Exception as e:  # corrupt file, pickle refused, or another architecture's weights
        hint = (" (an OpenAI TorchScript archive? convert it with open_clip.load_openai_model and "
                "save its state_dict)" if path.suffix in (".pt", ".pth") else "")
        raise ValueError(f"cannot load checkpoint {path} into {what}: {type(e).__name__}: "
                         f"{str(e)[:2000]}{hint}") from e


def create_clip(arch: str = "ViT-B-16-quickgelu", pretrained: str | None = None,
                model_cfg: dict[str, Any] | None = None) -> CLIP:
    """Build the open_clip CLIP described by (arch or model_cfg, pretrained), on the CPU, fp32."""
    pretrained = pretrained or None
    register_model_configs()
    what = "the given model_cfg" if model_cfg is not None else f"arch={arch!r}"
    if pretrained is None:
        return _random_clip(arch, model_cfg)

    if pretrained == "embedded":
        if model_cfg is not None or arch != EMBEDDED_ARCH:
            raise ValueError(f"pretrained='embedded' is the {EMBEDDED_ARCH} checkpoint; set "
                             f"arch={EMBEDDED_ARCH!r} (got arch={arch!r}"
                             f"{', and a model_cfg' if model_cfg is not None else ''})")
        if not EMBEDDED_WEIGHTS.is_file():
            raise FileNotFoundError(f"embedded weights {EMBEDDED_WEIGHTS} not found (they ship "
                                    f"with the package under perl_core/assets/)")
        clip = _random_clip(arch, None, weights_follow=True)
        _load_file(clip, EMBEDDED_WEIGHTS, what)
        return clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if model_cfg is None else {}
    if tag_cfg:  # an open_clip tag: open_clip downloads and loads it
        arch_quick_gelu = bool(_model_config(arch, None).get("quick_gelu", False))
        if tag_cfg.get("quick_gelu", False) and not arch_quick_gelu:
            raise ValueError(f"pretrained={pretrained!r} weights were trained with QuickGELU but "
                             f"arch={arch!r} uses nn.GELU, which silently degrades accuracy; use "
                             f"arch='{arch}-quickgelu'")
        try:
            return open_clip.create_model(arch, pretrained=pretrained, device="cpu")
        except RuntimeError as e:
            raise RuntimeError(f"could not get open_clip weights arch={arch!r} pretrained="
                               f"{pretrained!r} (no network? pass a local checkpoint path "
                               f"instead): {e}") from e

    path = Path(pretrained).expanduser()
    if not path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained or "/" in pretrained:
            raise FileNotFoundError(f"checkpoint file {path} not found (pretrained={pretrained!r})")
        tags = open_clip.list_pretrained_tags_by_model(arch) if model_cfg is None else []
        raise ValueError(f"pretrained={pretrained!r} is neither an open_clip tag for {what} "
                         f"(known: {tags}) nor an existing checkpoint file")
    clip = _random_clip(arch, model_cfg, weights_follow=True)
    _load_file(clip, path, what)
    if not uses_quick_gelu(clip):
        warnings.warn(
            f"checkpoint {path} is loaded into {what}, which uses nn.GELU. OpenAI CLIP weights "
            f"were trained with QuickGELU and lose accuracy silently under GELU: use a "
            f"'-quickgelu' arch for them. Ignore this only if the checkpoint was trained with "
            f"GELU.",
            UserWarning, stacklevel=3)
    return clip


def build_perl(arch: str = "ViT-B-16-quickgelu", pretrained: str | None = None,
               inject_layer: int = 7, num_steps: int = 4, rank: int = 1, modality: str = "both",
               variant: str = "shared", inject_layers: Sequence[int] | None = None,
               text_inject_layer: int | None = None, text_placement: str = "after_bos",
               variant_projectors: str = "shared_plus_specific", projector_init: str = "default",
               device: str | torch.device = "cpu",
               model_cfg: dict[str, Any] | None = None) -> PerlModel:
    """A frozen CLIP (eval mode, requires_grad False) with fresh thought projectors, on `device`.

    The projectors are initialised from torch's global RNG: seed before calling.
    """
    # cheap checks first, so a typo does not cost building (or downloading) a model
    for name, value, allowed in (("modality", modality, MODALITIES), ("variant", variant, VARIANTS),
                                 ("text_placement", text_placement, TEXT_PLACEMENTS),
                                 ("variant_projectors", variant_projectors, VARIANT_PROJECTORS),
                                 ("projector_init", projector_init, PROJECTOR_INITS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
    clip = create_clip(arch, pretrained, model_cfg)
    model = PerlModel(clip, inject_layer=inject_layer, num_steps=num_steps, rank=rank,
                      modality=modality, variant=variant, inject_layers=inject_layers,
                      text_inject_layer=text_inject_layer, text_placement=text_placement,
                      variant_projectors=variant_projectors, projector_init=projector_init)
    return model.to(resolve_device(device))


def wants_bf16_frozen(precision: str, device: str | torch.device) -> bool:
    """Whether a model built for `precision` on `device` keeps a bf16 copy of the frozen CLIP's
    matmul weights (`cast_frozen_matmul_weights`): bf16 on CUDA only. On the CPU the casts are
    cheap next to the matmuls and fp32 runs must stay bitwise as they are."""
    return precision == "bf16" and torch.device(device).type == "cuda"


def cast_frozen_matmul_weights(clip: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """In place: the frozen weights (and biases) that autocast casts to `dtype` on every matmul
    (Linear, Conv2d, attention in/out projections, the towers' output projections) are stored
    in `dtype`; everything else (embeddings, LayerNorms, logit_scale) stays fp32.

    Why: autocast caches its casts only for weights that require grad, so a frozen CLIP's
    weights are re-cast on every pass (81 casts per K=4 vision forward at ViT-B/16). Casting
    them once gives the same numbers (autocast's cast is the same round-to-nearest), so a bf16
    trial's results do not move. Only for use under autocast (a bf16 matmul weight meets an
    fp32 input otherwise); the projectors, the only trained weights, stay fp32 masters. Returns
    `clip`.
    """
    # open_clip's Transformer takes the text embedding's dtype from its first MLP weight
    # (get_cast_dtype): pin it to the current one, so the residual stream stays as under
    # autocast (fp32) instead of turning bf16 with the weights
    for tower in (getattr(clip, "transformer", None), getattr(clip, "visual", None)):
        t = getattr(tower, "transformer", tower)
        if t is not None and hasattr(t, "get_cast_dtype"):
            t.get_cast_dtype = functools.partial(lambda d: d, t.get_cast_dtype())
    for m in clip.modules():
        names: tuple[str, ...] = ()
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            names = ("weight", "bias")
        elif isinstance(m, nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                     "v_proj_weight")
        for name in names:
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor) and not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    for owner, name in ((getattr(clip, "visual", None), "proj"), (clip, "text_projection")):
        p = getattr(owner, name, None) if owner is not None else None
        if isinstance(p, nn.Parameter) and not p.requires_grad:
            p.data = p.data.to(dtype)
    return clip


def frozen_matmul_dtype(clip: nn.Module) -> torch.dtype:
    """The dtype the frozen CLIP's matmul weights are stored in (fp32, or bf16 after
    `cast_frozen_matmul_weights`), read from its first Linear/Conv2d."""
    for m in clip.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return m.weight.dtype
    return next(clip.parameters()).dtype


def perl_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The PerlModel arguments of a TrainConfig's model fields (one mapping for every builder)."""
    return dict(inject_layer=cfg.inject_layer, num_steps=cfg.num_steps, rank=cfg.rank,
                modality=cfg.modality, variant=cfg.variant,
                inject_layers=cfg.inject_layers or None,
                text_inject_layer=None if cfg.text_inject_layer < 0 else cfg.text_inject_layer,
                text_placement=cfg.text_placement, variant_projectors=cfg.variant_projectors,
                projector_init=cfg.projector_init)


def build_perl_from_config(cfg: TrainConfig, device: str | torch.device | None = None,
                           clip: CLIP | None = None) -> PerlModel:
    """build_perl with the TrainConfig's model fields; device defaults to cfg.device ("auto").

    clip: an existing frozen CLIP to wrap (e.g. one backbone shared by many trials) instead of
    building cfg.arch / cfg.pretrained; it is frozen and moved to `device` in place.
    """
    device = cfg.device if device is None else device
    if clip is None:
        return build_perl(arch=cfg.arch, pretrained=cfg.pretrained or None, device=device,
                          **perl_kwargs(cfg))
    return PerlModel(clip, **perl_kwargs(cfg)).to(resolve_device(device))
