"""Evaluation of a PerlModel on one test set: every reasoning step 0..K from one pass.

The class text embeddings do not depend on the image (PERL.md §2.6), so they are computed once per
evaluation set (all steps, no grad) and every image batch is scored against them with
`encode_image_all_steps`. Metrics stream through `StepMetricAccumulator`, so memory does not grow
with the test set.

`evaluate` is re-exported by `perl_core.train` (the contract's import path).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from perl_core.config import TrainConfig
from perl_core.metrics import StepMetricAccumulator
from perl_core.model import PerlModel

logger = logging.getLogger(__name__)


def model_device(model: PerlModel) -> torch.device:
    """The device the frozen CLIP lives on (the projectors follow it)."""
    return next(model.clip.parameters()).device


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast around forward passes when cfg.precision == "bf16"; fp32 otherwise.

    Parameters stay fp32 (autocast only changes the compute dtype of eligible ops), which gives
    fp32 master weights for the projectors without a GradScaler (bf16 has fp32's range).
    """
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.precision != "fp32":
        raise ValueError(f"precision={cfg.precision!r} is not one of ['fp32', 'bf16']")
    return contextlib.nullcontext()


def class_text_tokens(model: PerlModel, classnames: Sequence[str], dataset_name: str,
                      template: str) -> torch.Tensor:
    """The tokenized prompts of `classnames` (C, ctx), on the CPU."""
    from perl_core.data.templates import class_prompts

    return model.tokenize(class_prompts(list(classnames), dataset_name, template))


@torch.no_grad()
def encode_classes(model: PerlModel, tokens: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """(C, ctx) tokens -> (K+1, C, D) fp32 text embeddings, in chunks of cfg.eval_batch_size."""
    device = model_device(model)
    chunks = []
    for start in range(0, tokens.shape[0], max(1, cfg.eval_batch_size)):
        with autocast(cfg, device):
            chunks.append(model.encode_text_all_steps(
                tokens[start:start + cfg.eval_batch_size].to(device)).float())
    return torch.cat(chunks, dim=1)


def check_eval_inputs(items: Sequence[Any], classnames: Sequence[str], dataset_name: str) -> None:
    """Refuse an empty evaluation set and labels outside the class names (before any work)."""
    if not items:
        raise ValueError(f"{dataset_name}: no test items to evaluate")
    if not classnames:
        raise ValueError(f"{dataset_name}: no class names to evaluate against")
    bad = sorted({d.label for d in items if not 0 <= d.label < len(classnames)})
    if bad:
        raise ValueError(f"{dataset_name}: test labels {bad[:10]} are outside the "
                         f"{len(classnames)} class names")


@torch.no_grad()
def evaluate(model: PerlModel, items: Sequence[Any], classnames: Sequence[str], dataset_name: str,
             cfg: TrainConfig, *, progress: bool = False) -> dict[str, Any]:
    """Score `items` (Datum: impath, label, classname) among `classnames`, at every step 0..K.

    `dataset_name` picks the prompt template (cfg.template == "coop": that dataset's CoOp
    template). Returns the unprefixed metrics of docs/architecture.md for this evaluation set:
    `acc`, `acc_step{k}`, `confidence_step{k}`, `brier_step{k}`, `kl_step{k}`, `anchor_cos`, `n`
    (test count), plus `per_class`: {classname: final-step accuracy in percent}.
    """
    from perl_core.data.images import ImageListDataset
    from perl_core.data.transforms import eval_transform

    check_eval_inputs(items, classnames, dataset_name)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        text = encode_classes(model, class_text_tokens(model, classnames, dataset_name,
                                                       cfg.template), cfg)
        loader = DataLoader(ImageListDataset(list(items), eval_transform(model.image_size)),
                            batch_size=cfg.eval_batch_size, shuffle=False,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        acc = StepMetricAccumulator(num_classes=len(classnames))
        batches = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"eval {dataset_name}", leave=False)
        for images, labels in batches:
            with autocast(cfg, device):
                image = model.encode_image_all_steps(images.to(device, non_blocking=True))
            image = image.float()
            logits = model.logits(image, text)  # (K+1, N, C)
            acc.update(logits, torch.as_tensor(labels), image[0], image[-1])
        out: dict[str, Any] = dict(acc.compute())
        out["per_class"] = acc.per_class(list(classnames))
    finally:
        model.train(was_training)
    logger.info("eval %s: acc %.2f (step 0: %.2f) on %d images, %d classes", dataset_name,
                out["acc"], out["acc_step0"], int(out["n"]), len(classnames))
    return out


__all__ = ["evaluate", "autocast", "model_device", "encode_classes", "class_text_tokens",
           "check_eval_inputs"]
