"""Evaluation of a PerlModel on one test set: every reasoning step 0..K from one pass.

The class text embeddings do not depend on the image (PERL.md §2.6), so they are computed once per
evaluation set (all steps, no grad) and every image batch is scored against them with
`encode_image_all_steps`. Metrics stream through `StepMetricAccumulator`, so memory does not grow
with the test set (beyond two scalars per sample and step).

The input Jacobian (Figs. 4/7) is measured by `jacobian_metrics` on a fixed subsample of
cfg.jacobian_samples test images (`jacobian_subsample`: the same images for every trial of a test
set), decoded again and sent through the whole vision tower with gradient; both evaluation paths
(this one and `perl_core.cache.evaluate_cached`) call it.

`evaluate` is re-exported by `perl_core.train` (the contract's import path).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, default_collate

from perl_core.config import TrainConfig
from perl_core.metrics import StepMetricAccumulator
from perl_core.model import PerlModel

logger = logging.getLogger(__name__)


def model_device(model: PerlModel) -> torch.device:
    """The device the frozen CLIP lives on (the projectors follow it)."""
    return next(model.clip.parameters()).device


# num_workers = -1: derived from the CPU share (`resolve_num_workers`)
AUTO_WORKERS = -1
# beyond this, more decoding processes rarely feed a single-GPU trial faster, and each holds a
# copy of the dataset object and torch
MAX_AUTO_WORKERS = 8


def cpu_share_of_process() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, device: torch.device | str,
                        cpu_share: float | None = None) -> int:
    """The DataLoader worker count for cfg.num_workers: itself when >= 0; for AUTO_WORKERS (-1),
    0 when the device is the CPU (the forward already uses the trial's cores: decoding processes
    would compete with it for them) and otherwise the trial's CPU share (`cpu_share`: the Ray
    trial's `resources.cpu`; default: this process's CPUs), floored, in [1, MAX_AUTO_WORKERS]:
    on an accelerator the main thread mostly waits on the device, so the share can decode."""
    if num_workers >= 0:
        return int(num_workers)
    if num_workers != AUTO_WORKERS:
        raise ValueError(f"num_workers={num_workers}: set a worker count >= 0, or "
                         f"{AUTO_WORKERS} (auto: from the CPU share)")
    if torch.device(device).type == "cpu":
        return 0
    share = cpu_share_of_process() if cpu_share is None else cpu_share
    return max(1, min(MAX_AUTO_WORKERS, int(math.floor(share))))


def loader_options(num_workers: int, device: torch.device) -> dict[str, Any]:
    """The DataLoader options every loader of a trial uses (training, evaluation, cache misses):
    the worker count (`resolve_num_workers`) and pinned host memory on CUDA, so that the batch's
    `.to(device, non_blocking=True)` copy is asynchronous; workers kept alive across epochs."""
    workers = resolve_num_workers(num_workers, device)
    return {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda",
            "persistent_workers": workers > 0}


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


# The Jacobian subsample does not depend on the trial's seed, so every trial of one test set is
# measured on the same images (their numbers compare without subsampling noise between them).
JACOBIAN_SEED = 0
# Images per gradient pass: the graph through all K+1 passes of the tower is kept for K+1
# backward passes, so memory grows with this (not with eval_batch_size): at ViT-B/16 in fp32
# about 32 block passes of 197 x 768 activations, ~0.4 GB an image; 4 keeps it near 1.5 GB, which
# four trials at gpu: 0.25 can afford on a 24 GB card
JACOBIAN_BATCH = 4


def jacobian_subsample(n_items: int, m: int) -> list[int]:
    """Sorted indices of the fixed, seeded subsample of m of n_items test items (all if m >= n)."""
    if m <= 0:
        return []
    if m >= n_items:
        return list(range(n_items))
    g = torch.Generator().manual_seed(JACOBIAN_SEED)
    return sorted(torch.randperm(n_items, generator=g)[:m].tolist())


def jacobian_norms(model: PerlModel, images: torch.Tensor, labels: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
    """(K+1, n): || d logit_k(i, y_i) / d x_i ||_2 per step k and image i.

    x_i: the normalised pixels (the eval transform's output, what the tower sees), all 3*H*W
    values in one L2 (Frobenius) norm; logit_k(i, y) = logit_scale * cos(v_k(i), t_k(y)), the
    step-k logit of the true class, with the step-k text embeddings `text` (K+1, C, D) held
    fixed. In the parameters' dtype (fp32), never under autocast: a derivative is what bf16
    rounding would disturb most. Images do not interact in the tower, so d(sum_i logit_k(i)) /
    d x_i is sample i's own gradient: one backward pass per step gives the whole batch.
    """
    from perl_core.factory import frozen_matmul_dtype

    device = model_device(model)
    dtype = next(model.clip.parameters()).dtype  # fp32 (float64 in the tests' check)
    matmul = frozen_matmul_dtype(model.clip)
    # a bf16 copy of the frozen weights (a bf16 CUDA trial: `train.build_model`) has no fp32
    # weights to differentiate through: the tower then runs under bf16 autocast, as its forward
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if matmul == torch.bfloat16 \
        else contextlib.nullcontext()
    if matmul == torch.bfloat16:
        dtype = torch.float32
    x = images.to(device, dtype).requires_grad_(True)
    labels = torch.as_tensor(labels).to(device)
    with torch.enable_grad():
        with ctx:
            image = model.encode_image_all_steps_differentiable(x).to(dtype)
        logits = model.logits(image, text.detach().to(device, dtype))  # (K+1, n, C)
        target = logits.gather(-1, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1))[..., 0]
        norms = []
        for k in range(target.shape[0]):
            # autograd.grad, not backward: no projector .grad is touched (evaluation may run
            # mid-training)
            (g,) = torch.autograd.grad(target[k].sum(), x, retain_graph=k < target.shape[0] - 1)
            norms.append(g.flatten(1).norm(dim=1))
    return torch.stack(norms).detach()


def decode_images(items: Sequence[Any], image_size: Any) -> torch.Tensor:
    """(n, 3, H, W): the eval-transformed (normalised) pixels of `items`."""
    from perl_core.data.images import ImageListDataset
    from perl_core.data.transforms import eval_transform

    dataset = ImageListDataset(list(items), eval_transform(image_size))
    return default_collate([dataset[j] for j in range(len(dataset))])[0]


def jacobian_metrics(model: PerlModel, items: Sequence[Any], text: torch.Tensor, cfg: TrainConfig,
                     acc: StepMetricAccumulator,
                     pixels: Callable[[list[Any]], torch.Tensor] | None = None) -> None:
    """Measure `jacobian_norms` on the `jacobian_subsample` of `items` (cfg.jacobian_samples; 0:
    not measured) into `acc` (it then reports jacobian_step{k}). `pixels(batch_items)` gives
    their normalised pixels (default `decode_images`; the feature cache passes a cached one)."""
    idx = jacobian_subsample(len(items), int(cfg.jacobian_samples))
    chosen = [items[i] for i in idx]
    for start in range(0, len(chosen), JACOBIAN_BATCH):
        batch = chosen[start:start + JACOBIAN_BATCH]
        images = pixels(batch) if pixels is not None else decode_images(batch, model.image_size)
        labels = torch.tensor([int(d.label) for d in batch])
        acc.add_jacobian(jacobian_norms(model, images, labels, text))


@torch.no_grad()
def evaluate(model: PerlModel, items: Sequence[Any], classnames: Sequence[str], dataset_name: str,
             cfg: TrainConfig, *, progress: bool = False) -> dict[str, Any]:
    """Score `items` (Datum: impath, label, classname) among `classnames`, at every step 0..K.

    `dataset_name` picks the prompt template (cfg.template == "coop": that dataset's CoOp
    template). Returns the unprefixed metrics of docs/architecture.md for this evaluation set:
    `acc`, `acc_step{k}`, `confidence_step{k}`, `brier_step{k}`, `kl_step{k}`, `anchor_cos`, `n`
    (test count), the alignment, drift-group and Jacobian metrics (`perl_core.metrics`), plus
    `per_class`: {classname: final-step accuracy in percent}.
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
                            **loader_options(cfg.num_workers, device))
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
            acc.update(logits, torch.as_tensor(labels), image_steps=image, text_steps=text)
        jacobian_metrics(model, list(items), text, cfg, acc)
        out: dict[str, Any] = dict(acc.compute())
        out["per_class"] = acc.per_class(list(classnames))
    finally:
        model.train(was_training)
    logger.info("eval %s: acc %.2f (step 0: %.2f) on %d images, %d classes", dataset_name,
                out["acc"], out["acc_step0"], int(out["n"]), len(classnames))
    return out


__all__ = ["evaluate", "autocast", "model_device", "resolve_num_workers", "AUTO_WORKERS",
           "MAX_AUTO_WORKERS", "cpu_share_of_process", "encode_classes", "class_text_tokens",
           "check_eval_inputs", "jacobian_subsample", "jacobian_norms", "jacobian_metrics",
           "decode_images",
           "JACOBIAN_SEED", "JACOBIAN_BATCH"]
