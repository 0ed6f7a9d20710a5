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
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
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


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
