"""Image transforms: Dassl's defaults as used by CoOp, MaPLe and PromptSRC (notes §8).

- train: RandomResizedCrop(size, scale=(scale_min, 1), bicubic) -> RandomHorizontalFlip ->
  ToTensor -> Normalize(CLIP mean/std). scale_min = 0.08 is Dassl's default (MMRL uses 0.5).
- eval: Resize(shorter side = size, bicubic) -> CenterCrop(size) -> ToTensor -> Normalize; the
  same as open_clip's eval preprocess for ViT-B/16 at size 224.

Inputs are RGB PIL images (`perl_core.data.images` converts every mode).
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_size(image_size: int) -> int:
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"image_size={image_size!r}: only square sizes are supported")
        image_size = image_size[0]
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int")
    return image_size


def normalize() -> T.Normalize:
    return T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)


def train_transform(image_size: int = 224, scale_min: float = 0.08) -> T.Compose:
    """Dassl's train transform at `image_size`, crop scale (scale_min, 1)."""
    size = _check_size(image_size)
    if not 0.0 < float(scale_min) <= 1.0:
        raise ValueError(f"scale_min={scale_min!r} (aug_scale_min) must be in (0, 1]")
    return T.Compose([
        T.RandomResizedCrop(size, scale=(float(scale_min), 1.0),
                            interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


def eval_transform(image_size: int = 224) -> T.Compose:
    """Resize the shorter side to `image_size` (bicubic), center-crop, normalise."""
    size = _check_size(image_size)
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        normalize(),
    ])


__all__ = ["train_transform", "eval_transform", "normalize", "CLIP_MEAN", "CLIP_STD"]
