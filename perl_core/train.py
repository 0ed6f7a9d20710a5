"""Training and evaluation of PERL's thought projectors: `fit(cfg) -> TrainResult`, and the CLI.

    result = fit(cfg, callbacks=[...], model=None, checkpoint=None)

What `fit` does (PERL.md §2.5-2.6, §4; data_protocol.md §5-§9):

1. Resolves the task from `cfg.protocol` (`perl_core.protocol.resolve_task`):
   - the few-shot sets: `fewshot_splits` (its own RNG), or with `fewshot_source: coop_pickle`
     CoOp's own `split_fewshot/*.pkl` picks (`perl_core.data.coop_pickle`); either way over
     all classes, before any base/novel cut.
   - base2novel: few-shot over all classes (`fewshot_splits`, its own RNG), then the base half
     for training; evaluates `base` (base test images among base classes) and `novel` (novel
     test images among novel classes); `hm` and `hm_step{k}` from their accuracies.
   - all: trains and evaluates on every class (`all/`).
   - every protocol also evaluates the few-shot validation split of the training classes
     (`val/`), which is what hyper-parameter search selects on (not for ImageNet, whose CoOp
     val split is its test set).
   - cross_dataset / domain_generalization: trains on every class of `cfg.dataset`, evaluates
     the source (`all/`) and each of `cfg.eval_datasets` on its full test set with its own class
     names (`<Target>/`); `target_avg` is the mean target accuracy. For domain_generalization an
     empty `eval_datasets` means every registered test-only variant whose source is cfg.dataset.
2. Builds the model (`build_model`: the projectors' init is drawn right after seeding with
   cfg.seed), seeds python/numpy/torch again, and moves the model to cfg.device ("auto": cuda
   if available), or to the `device` a scheduler resolved (`fit(device=...)`); the precision is
   checked against that device and both TF32 flags are set for it first.
3. Trains the projectors only: AdamW(lr, weight_decay), constant lr, batch_size, epochs, Dassl's
   drop_last (when the train set has >= batch_size images). Per step: the image side runs every
   step in one pass (v0 is the zero-shot embedding, no grad; vK the refined one), the text side
   re-encodes all training classes with gradient (its frozen lower blocks and zero-shot state
   are computed once, as they do not change; more than `cfg.text_chunk` classes go through
   `perl_core.gradcache`, which bounds that graph's memory), and `perl_loss` is taken on step
   K only. With
   `cache=` (a FeatureCache) the frozen features of prompts, training views and evaluation
   images are read from / written to it (see `fit`).
4. Evaluates every evaluation set at every step 0..K (`perl_core.evaluate.evaluate`), and
   reports `train/loss`, `train/ce`, `train/anchor` as the means over the last epoch.

Determinism and resume. The order of the training images comes from a dedicated generator
(`torch.Generator().manual_seed(cfg.seed)`): each epoch draws a permutation and an augmentation
seed from it. Each image's augmentation runs under its own seed (epoch seed + position in the
epoch) in a forked RNG, so the augmented batch is a pure function of (seed, epoch, position):
identical with any `num_workers` (an execution field, outside the config hash) and after a
resume. A checkpoint holds the projector and AdamW state, the RNG states, the data generator's
state at the start of the current epoch and the position (epoch, step within it); resuming
regenerates the epoch's plan and skips the batches already done, which gives bitwise the same
final weights on CPU as an uninterrupted run.

CLI: `python -m perl_core.train --dataset NAME --data-root ROOT [--field value ...] [--out DIR]`;
every TrainConfig field is a flag (`--inject-layer 7`, tuples as comma lists).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence, get_type_hints

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from perl_core.checkpoint import Checkpoint, DirCheckpoint
from perl_core.config import (FIELD_NAMES, ConfigError, TrainConfig, file_value_problem,
                              literal_choices)
from perl_core.configfile import ConfigFileError, read_yaml
from perl_core.evaluate import (autocast, class_text_tokens, evaluate,
                                loader_options)
from perl_core.factory import (build_perl_from_config, cast_frozen_matmul_weights,
                               check_precision, create_clip, frozen_matmul_dtype, resolve_device,
                               set_precision_flags, wants_bf16_frozen)
from perl_core.gradcache import encode_text
from perl_core.loss import perl_loss
from perl_core.metrics import harmonic_mean
from perl_core.model import PerlModel
from perl_core.protocol import Task, resolve_task

logger = logging.getLogger(__name__)

PROJECTORS_FORMAT = "perl-projectors/1"
CHECKPOINT_VERSION = 1


# --- public types ------------------------------------------------------------------------------


class Callback:
    """Hooks into `fit`; every method is a no-op by default.

    on_train_start(info): once, after the model and data are ready (info: parameter counts,
        sizes, total steps, device, start step when resuming).
    on_step_end(step, logs): after each optimizer step (and after its checkpoint, if any);
        logs = the history record {"step", "epoch", "loss", "ce", "anchor", "lr"}.
    on_epoch_end(epoch, logs): after each epoch (1-based), with the epoch's mean loss parts.
    on_eval_end(metrics): once, with the final flat metrics.
    """

    def on_train_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step_end(self, step: int, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_eval_end(self, metrics: dict[str, float]) -> None:
        pass


@dataclass
class TrainResult:
    config: TrainConfig
    metrics: dict[str, float]  # flat `<evalset>/<metric>` and top-level keys
    history: list[dict[str, Any]]  # one record per optimizer step
    projector_state: dict[str, torch.Tensor]  # CPU copies
    per_class: dict[str, dict[str, float]]  # evalset -> classname -> final-step accuracy (%)
    num_trainable_parameters: int
    train_seconds: float
    eval_seconds: float
    epoch_history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch


# --- model -------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, clip: torch.nn.Module | None = None,
                frozen_dtype: torch.dtype | None = None) -> PerlModel:
    """The PerlModel `fit` trains: a frozen CLIP, then fresh projectors (`fit` moves it).

    The RNGs are seeded with cfg.seed right before the projectors are made, so their initial
    weights depend on the seed only, not on how the CLIP was obtained (built here on the CPU
    from a seeded RNG, or passed in, e.g. a backbone shared across trials, which stays on its
    device).

    frozen_dtype: store the frozen CLIP's matmul weights in this dtype
    (`factory.cast_frozen_matmul_weights`: the same numbers under autocast, without re-casting
    them on every pass). Default: bf16 when cfg.precision is bf16 and cfg.device is CUDA
    (`factory.wants_bf16_frozen`), else as built (fp32). A passed CLIP in another dtype is
    copied first, since fp32 trials may share it.
    """
    if frozen_dtype is None and wants_bf16_frozen(cfg.precision, resolve_device(cfg.device)):
        frozen_dtype = torch.bfloat16
    if clip is None:
        seed_everything(cfg.seed)  # random-init CLIPs (pretrained="") come from the seed too
        clip = create_clip(cfg.arch, cfg.pretrained or None)
        if frozen_dtype is not None:
            cast_frozen_matmul_weights(clip, frozen_dtype)
    elif frozen_dtype is not None and frozen_matmul_dtype(clip) != frozen_dtype:
        clip = cast_frozen_matmul_weights(copy.deepcopy(clip), frozen_dtype)
    seed_everything(cfg.seed)
    return build_perl_from_config(cfg, device=next(clip.parameters()).device, clip=clip)


# --- data order and augmentation -----------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_plan(generator: torch.Generator, n: int, batch_size: int
               ) -> list[list[tuple[int, int]]]:
    """One epoch's batches of (item index, augmentation seed), drawn from `generator`.

    A random permutation (as Dassl's RandomSampler) cut into batches, the last one dropped when
    short and n >= batch_size (Dassl's drop_last rule); seeds are the epoch's seed + position.
    """
    perm = torch.randperm(n, generator=generator).tolist()
    aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    pairs = [(idx, aug_seed + pos) for pos, idx in enumerate(perm)]
    batches = [pairs[i:i + batch_size] for i in range(0, n, batch_size)]
    if n >= batch_size and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class SeededItems(Dataset):
    """Wraps an (image, label) dataset: item (index, seed) is loaded under torch seed `seed`.

    The global torch RNG is forked, so the caller's RNG stream is left untouched and the random
    crop/flip of an image depends only on its seed (not on the worker or the batch it lands in).
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed would also reset the CUDA generators, which
            # fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(seed)
            return self.base[index]


class _ListBatchSampler(Sampler):
    """Yields `batches`; the list can be swapped between iterations (one persistent loader
    serves every epoch: the sampler is iterated in the main process, the workers only load)."""

    def __init__(self, batches: list[list[tuple[int, int]]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --- checkpoint state -----------------------------------------------------------------------------


def _rng_state(data_state: torch.Tensor) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state(), "data": data_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> torch.Tensor:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["data"]


@dataclass
class _Progress:
    """Where training stands: what a checkpoint must carry besides weights and RNGs."""

    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # batches of this epoch already done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


# --- fit ------------------------------------------------------------------------------------------


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _validate(cfg: TrainConfig, checkpoint_every: int) -> None:
    # the config's own values were checked when it was made (TrainConfig's rules)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be >= 0")


def _epoch_means(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in records) for k in ("loss", "ce", "anchor")}


def fit(cfg: TrainConfig, callbacks: Sequence[Callback] | None = None,
        model: PerlModel | None = None, checkpoint: Checkpoint | None = None, *,
        progress: bool | None = None, checkpoint_every: int = 0, cache: Any = None,
        device: str | torch.device | None = None) -> TrainResult:
    """Train PERL's projectors as described by `cfg`, evaluate, and return everything.

    model: a prebuilt PerlModel to train in place (default: `build_model(cfg)`, whose initial
        projectors depend on cfg.seed only).
    checkpoint: an object with load() -> dict | None and save(state); a saved state is resumed
        (its config hash must match cfg's), and state is saved every `checkpoint_every` optimizer
        steps (0: never mid-epoch) and at the end of every epoch.
    progress: a tqdm bar; None = only when stderr is a terminal.
    cache: a `perl_core.cache.FeatureCache` shared by trials (same CLIP weights): the frozen
        features (lower-block prefix and zero-shot state h(0)) of the class prompts, of every
        training batch (the augmented view is a pure function of the data seed, so trials that
        differ only in K, lr, anchor_weight, weight_decay read the same ones; a hit decodes no
        image) and of the evaluation sets come from it. Same numbers as without it (bitwise
        with an fp32 cache; at the storage rounding otherwise).
    device: where to train (None: `resolve_device(cfg.device)`); a scheduler that assigns GPUs
        resolves it itself (`pipeline.trainable.trial_device`).
    Before any model is built, the precision is checked against the device (`check_precision`)
    and both TF32 flags are set for it (`set_precision_flags`: fp32 means no TF32).
    Raises FloatingPointError on a non-finite loss (naming the step and the loss parts).
    """
    _validate(cfg, checkpoint_every)
    callbacks = list(callbacks or [])
    show = _want_progress(progress)
    model, task, device = _prepare(cfg, model, device)
    if not task.train_items and cfg.epochs > 0:
        raise ValueError(f"{task.dataset}: the few-shot train set is empty (shots={cfg.shots})")
    counts = model.trainable_parameter_counts()
    n_params = model.num_trainable_parameters()
    logger.info("PERL %s on %s (%s): %s trainable parameters (vision %s, text %s), device %s",
                cfg.variant, task.dataset, cfg.protocol, f"{n_params:,}", f"{counts['vision']:,}",
                f"{counts['text']:,}", device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) \
        if params else None
    data_gen = torch.Generator().manual_seed(cfg.seed)
    state = _Progress()
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        _restore(resumed, cfg, model, optimizer, state, data_gen)
        logger.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch + 1,
                    state.global_step)

    n_train = len(task.train_items)
    steps_per_epoch = (n_train // cfg.batch_size if n_train >= cfg.batch_size
                       else (1 if n_train else 0))
    total_steps = steps_per_epoch * cfg.epochs
    info = {"num_trainable_parameters": n_params, "trainable_parameter_counts": counts,
            "num_train": n_train, "num_classes": len(task.train_classnames),
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "device": str(device),
            "start_step": state.global_step, "evalsets": [e.name for e in task.evalsets],
            "config_hash": cfg.config_hash()}
    for cb in callbacks:
        cb.on_train_start(info)

    if state.epoch < cfg.epochs and steps_per_epoch:
        _train(cfg, task, model, optimizer, data_gen, state, device, callbacks, checkpoint,
               checkpoint_every, total_steps, show, cache)

    t0 = time.perf_counter()
    metrics, per_class = evaluate_task(model, task, cfg, progress=show, cache=cache)
    if state.epoch_history:
        last = state.epoch_history[-1]
        metrics.update({f"train/{k}": last[k] for k in ("loss", "ce", "anchor")})
    eval_seconds = time.perf_counter() - t0
    for cb in callbacks:
        cb.on_eval_end(metrics)
    return TrainResult(config=cfg, metrics=metrics, history=state.history,
                       projector_state={k: v.cpu() for k, v in
                                        model.projector_state_dict().items()},
                       per_class=per_class, num_trainable_parameters=n_params,
                       train_seconds=state.train_seconds, eval_seconds=eval_seconds,
                       epoch_history=state.epoch_history)


def _prepare(cfg: TrainConfig, model: PerlModel | None, device: str | torch.device | None
             ) -> tuple[PerlModel, Task, torch.device]:
    """What training and evaluation-only both start with: the device (precision checked and
    TF32 flags set for it), the model, the RNGs seeded, the task, the model on the device."""
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    check_precision(cfg.precision, device)
    set_precision_flags(cfg.precision)
    if model is None:
        model = build_model(cfg)
    seed_everything(cfg.seed)  # a given model was built by the caller; the RNGs restart anyway
    task = resolve_task(cfg)
    model.to(device)
    return model, task, device


def evaluate_projectors(cfg: TrainConfig, projector_state: dict[str, torch.Tensor], *,
                        model: PerlModel | None = None, progress: bool | None = None,
                        cache: Any = None, device: str | torch.device | None = None
                        ) -> TrainResult:
    """Evaluate projectors trained elsewhere as `cfg` evaluates, without training: a DG cell
    served by the cross-dataset training of the same `perl_core.protocol.training_hash`
    (`pipeline.reuse`). `cfg` must describe that training (the caller checks the hash); its
    history is empty and its train/* metrics are the caller's to add. Same numbers as the
    evaluation at the end of `fit` with those weights."""
    model, task, device = _prepare(cfg, model, device)
    model.load_projector_state_dict({k: v.to(device) for k, v in projector_state.items()})
    t0 = time.perf_counter()
    metrics, per_class = evaluate_task(model, task, cfg, progress=_want_progress(progress),
                                       cache=cache)
    return TrainResult(config=cfg, metrics=metrics, history=[],
                       projector_state={k: v.cpu() for k, v in
                                        model.projector_state_dict().items()},
                       per_class=per_class,
                       num_trainable_parameters=model.num_trainable_parameters(),
                       train_seconds=0.0, eval_seconds=time.perf_counter() - t0)


def _train(cfg: TrainConfig, task: Task, model: PerlModel, optimizer: torch.optim.Optimizer | None,
           data_gen: torch.Generator, state: _Progress, device: torch.device,
           callbacks: list[Callback], checkpoint: Checkpoint | None, checkpoint_every: int,
           total_steps: int, show: bool, cache: Any) -> None:
    from perl_core.cache import cached_batches, image_features, text_features, to_device
    from perl_core.data.images import ImageListDataset
    from perl_core.data.transforms import train_transform

    transform = train_transform(model.image_size, cfg.aug_scale_min)
    dataset = SeededItems(ImageListDataset(task.train_items, transform))
    # a view is a pure function of (image, label, per-item seed, transform): SeededItems
    view_transform = f"SeededItems({transform!r})"
    tokens = class_text_tokens(model, task.train_classnames, task.dataset, cfg.template)
    text_len = model.text_length(tokens)  # once, on the CPU: no host sync per step
    tokens = tokens.to(device)
    with torch.no_grad(), autocast(cfg, device):
        # The lower text blocks and the zero-shot pass h(0) are frozen and the prompts fixed:
        # compute them once. Only the recurrent steps (which the projectors feed) are re-run,
        # with gradient, every step.
        if cache is None:
            text = text_features(model, tokens)
        else:
            text = to_device(cache.text_features(
                model, tokens, dataset=task.dataset, template=cfg.template,
                classnames=task.train_classnames), device)
        fixed_text = None if "text" in model.projectors else \
            model.text_from_prefix(text["prefix"], tokens, h0=text["h0"], length=text_len)

    def compute(batch: Any) -> dict[str, torch.Tensor]:
        with autocast(cfg, device):
            return image_features(model, batch[0].to(device, non_blocking=True))

    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.global_step, desc=f"train {task.dataset}",
                   unit="step", dynamic_ncols=True)
    # One loader for every epoch: with workers they stay alive between epochs
    # (persistent_workers) instead of being forked again; `decode` swaps the epoch's batches in.
    sampler = _ListBatchSampler([])
    loader = DataLoader(dataset, batch_sampler=sampler, **loader_options(cfg.num_workers, device),
                        # the loader draws its workers' base seed from this generator;
                        # augmentation does not use it (SeededItems), it only keeps the
                        # global RNG untouched
                        generator=torch.Generator().manual_seed(cfg.seed))
    t_start = time.perf_counter() - state.train_seconds
    model.train()
    try:
        while state.epoch < cfg.epochs:
            epoch_start_gen = data_gen.get_state()
            batches = epoch_plan(data_gen, len(dataset), cfg.batch_size)
            todo = batches[state.step_in_epoch:]

            def decode(which: Sequence[int], todo: list = todo) -> DataLoader:
                sampler.batches = [todo[i] for i in which]
                return loader

            if cache is None:
                features: Iterator[dict[str, torch.Tensor]] = map(compute,
                                                                  decode(range(len(todo))))
            else:
                with autocast(cfg, device):  # the compute mode is part of the key
                    keys = [cache.image_key(
                        model, dataset=task.dataset, split="train", transform=view_transform,
                        items=[f"{task.train_items[i].impath}|{task.train_items[i].label}|"
                               f"{seed}" for i, seed in b]) for b in todo]
                # on a hit the batch is not decoded at all (labels come from the items)
                features = cached_batches(
                    cache, keys, decode,
                    lambda i, todo=todo: default_collate([dataset[k] for k in todo[i]]), compute,
                    device=device)
            for batch, feats in zip(todo, features):
                labels = torch.tensor([task.train_items[i].label for i, _ in batch])
                record = _train_step(cfg, model, optimizer, to_device(feats, device), labels,
                                     tokens, text, fixed_text, device, state, text_len)
                state.step_in_epoch += 1
                state.global_step += 1
                state.history.append(record)
                state.train_seconds = time.perf_counter() - t_start
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if (checkpoint is not None and checkpoint_every
                        and state.global_step % checkpoint_every == 0
                        and state.step_in_epoch < len(batches)):  # epoch end saves below
                    checkpoint.save(_snapshot(cfg, model, optimizer, state, epoch_start_gen))
                for cb in callbacks:
                    cb.on_step_end(state.global_step, record)
            epoch_records = [r for r in state.history if r["epoch"] == state.epoch + 1]
            summary = {"epoch": state.epoch + 1, "step": state.global_step,
                       "seconds": time.perf_counter() - t_start,
                       **_epoch_means(epoch_records)}
            state.epoch_history.append(summary)
            state.epoch += 1
            state.step_in_epoch = 0
            state.train_seconds = time.perf_counter() - t_start
            logger.info("epoch %d/%d: loss %.4f (ce %.4f, anchor %.4f), %d steps, %.1f s",
                        summary["epoch"], cfg.epochs, summary["loss"], summary["ce"],
                        summary["anchor"], len(epoch_records), summary["seconds"])
            if checkpoint is not None:
                checkpoint.save(_snapshot(cfg, model, optimizer, state, data_gen.get_state()))
            for cb in callbacks:
                cb.on_epoch_end(summary["epoch"], summary)
    finally:
        if bar is not None:
            bar.close()
        model.eval()


def _train_step(cfg: TrainConfig, model: PerlModel, optimizer: torch.optim.Optimizer | None,
                image_feats: dict[str, torch.Tensor], labels: torch.Tensor, tokens: torch.Tensor,
                text_feats: dict[str, torch.Tensor], fixed_text: torch.Tensor | None,
                device: torch.device, state: _Progress, text_len: int) -> dict[str, Any]:
    labels = labels.to(device, non_blocking=True)
    with autocast(cfg, device):
        image = model.image_from_prefix(image_feats["prefix"], all_steps=True,
                                        h0=image_feats["h0"])
        v0, vk = image[0].detach(), image[-1]  # zero-shot (a constant) and step K
    # cfg.text_chunk prompts at a time keep the text graph bounded (perl_core/gradcache.py);
    # text_backward then back-propagates the text side after loss.backward()
    text, text_backward = (fixed_text, None) if fixed_text is not None else encode_text(
        model, text_feats, tokens, text_len, cfg.text_chunk, lambda: autocast(cfg, device))
    # the logits in fp32 from the fp32 embeddings, outside autocast, as evaluation computes them:
    # an autocast matmul rounds them to bf16 (at logit scale 100 that moves the CE by ~2 % and the
    # projector gradient by ~4 %), which the fp32 upcast in perl_loss comes too late to undo
    logits = model.logits(vk.float(), text.float())
    loss, parts = perl_loss(logits, labels, v0, vk, cfg.anchor_weight)
    if optimizer is not None:  # queued before the host waits for the values below
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if text_backward is not None:
            text_backward()
    # the one host sync of the step: the three logged values in one copy, then the finiteness
    # check, before the optimizer step can spread a non-finite gradient into the projectors
    loss_v, ce_v, anchor_v = torch.stack([loss.detach(), parts["ce"], parts["anchor"]]).tolist()
    values = {"loss": loss_v, "ce": ce_v, "anchor": anchor_v}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(
            f"non-finite training loss at step {state.global_step + 1} (epoch {state.epoch + 1}, "
            f"batch {state.step_in_epoch + 1}): loss={values['loss']}, ce={values['ce']}, "
            f"anchor={values['anchor']} (lr={cfg.lr}, precision={cfg.precision})")
    if optimizer is not None:
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
    return {"step": state.global_step + 1, "epoch": state.epoch + 1, **values, "lr": lr}


def train_step(cfg: TrainConfig, model: PerlModel, optimizer: torch.optim.Optimizer,
               image_feats: dict[str, torch.Tensor], labels: torch.Tensor, tokens: torch.Tensor,
               text_feats: dict[str, torch.Tensor], text_len: int) -> dict[str, Any]:
    """One training step exactly as `fit` runs it, outside `fit` (`perl_core.bench`, tests),
    from the frozen features (`cache.image_features` / `text_features`); `text_len` =
    `model.text_length(tokens)`. Returns the step's record (loss, ce, anchor, lr)."""
    return _train_step(cfg, model, optimizer, image_feats, labels, tokens, text_feats, None,
                       image_feats["prefix"].device, _Progress(), text_len)


def _snapshot(cfg: TrainConfig, model: PerlModel, optimizer: torch.optim.Optimizer | None,
              state: _Progress, data_gen_state: torch.Tensor) -> dict[str, Any]:
    """Everything needed to continue exactly; `data_gen_state` is the data generator's state at
    the start of `state.epoch` (the epoch's plan is regenerated from it on resume)."""
    return {
        "version": CHECKPOINT_VERSION,
        "config_hash": cfg.config_hash(),
        "config": cfg.to_dict(),
        "position": {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                     "global_step": state.global_step},
        "projector": model.projector_state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(data_gen_state),
        "history": state.history,
        "epoch_history": state.epoch_history,
        "train_seconds": state.train_seconds,
    }


def _restore(saved: dict[str, Any], cfg: TrainConfig, model: PerlModel,
             optimizer: torch.optim.Optimizer | None, state: _Progress,
             data_gen: torch.Generator) -> None:
    if saved.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {saved.get('version')!r} is not "
                         f"{CHECKPOINT_VERSION}; start afresh")
    if saved.get("config_hash") != cfg.config_hash():
        raise ValueError(f"the checkpoint belongs to another config (hash "
                         f"{saved.get('config_hash')} != {cfg.config_hash()}); refusing to resume "
                         f"({_config_diff(saved.get('config', {}), cfg)})")
    model.load_projector_state_dict(saved["projector"])
    if optimizer is not None and saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])
    data_gen.set_state(_set_rng_state(saved["rng"]))
    pos = saved["position"]
    state.epoch, state.step_in_epoch = int(pos["epoch"]), int(pos["step_in_epoch"])
    state.global_step = int(pos["global_step"])
    state.history = list(saved["history"])
    state.epoch_history = list(saved["epoch_history"])
    state.train_seconds = float(saved["train_seconds"])


def _config_diff(saved: dict[str, Any], cfg: TrainConfig) -> str:
    now = cfg.to_dict()
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    return "differs in " + ", ".join(diff) if diff else "unknown difference"


# --- evaluation of a task ------------------------------------------------------------------------


def evaluate_task(model: PerlModel, task: Task, cfg: TrainConfig, *, progress: bool = False,
                  cache: Any = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Evaluate every evaluation set; returns (flat metrics, per-class accuracy per evalset).

    cache: an optional `perl_core.cache.FeatureCache`; the frozen image/text prefixes are then
    read from it (computed and stored on a miss). Same numbers (exactly, with an fp32 cache).
    """
    metrics: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    for es in task.evalsets:
        # the Jacobian is a test-set diagnostic (Figs. 4/7); on the ~100-image few-shot val split
        # its 16 images would cost more than the evaluation itself
        es_cfg = cfg.replace(jacobian_samples=0) if es.name == "val" else cfg
        if cache is not None:
            from perl_core.cache import evaluate_cached

            out = evaluate_cached(model, es.items, es.classnames, es.dataset, es_cfg, cache,
                                  split=es.name)
        else:
            out = evaluate(model, es.items, es.classnames, es.dataset, es_cfg, progress=progress)
        per_class[es.name] = out.pop("per_class")
        metrics.update({f"{es.name}/{k}": float(v) for k, v in out.items()})
    if "base/acc" in metrics and "novel/acc" in metrics:
        metrics["hm"] = harmonic_mean(metrics["base/acc"], metrics["novel/acc"])
        k = 0
        while f"base/acc_step{k}" in metrics and f"novel/acc_step{k}" in metrics:
            metrics[f"hm_step{k}"] = harmonic_mean(metrics[f"base/acc_step{k}"],
                                                   metrics[f"novel/acc_step{k}"])
            k += 1
    if task.targets:
        metrics["target_avg"] = statistics.fmean(metrics[f"{t}/acc"] for t in task.targets)
    return metrics, per_class


# --- projector files ------------------------------------------------------------------------------


def _perl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("perl-pipeline")
    except PackageNotFoundError:
        return "0+unknown"


def save_projectors(path: str | Path, result: TrainResult) -> None:
    """Write the projector weights as safetensors, with the config (JSON), its hash, the metrics
    and the package version in the file's metadata. `path` may be an fsspec URL (s3://...)."""
    import fsspec
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in result.projector_state.items()}
    meta = {"format": PROJECTORS_FORMAT, "config": json.dumps(result.config.to_dict()),
            "config_hash": result.config.config_hash(),
            "metrics": json.dumps(result.metrics),
            "num_trainable_parameters": str(result.num_trainable_parameters),
            "perl_version": _perl_version()}
    blob = save(tensors, metadata=meta)
    with fsspec.open(str(path), "wb", auto_mkdir=True) as f:
        f.write(blob)


def read_projectors_metadata(blob: bytes, where: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header is 8-byte length + JSON)."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
    except (struct.error, ValueError) as e:
        raise ValueError(f"{where} is not a safetensors file: {e}") from None
    return header.get("__metadata__") or {}


def load_projectors(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig]:
    """Read a file written by `save_projectors` -> (projector state dict, its TrainConfig)."""
    import fsspec

    with fsspec.open(str(path), "rb") as f:
        return projectors_from_bytes(f.read(), str(path))


def projectors_from_bytes(blob: bytes, where: str) -> tuple[dict[str, torch.Tensor], TrainConfig]:
    """`load_projectors` of a file's bytes (`where` names it in the errors)."""
    from safetensors.torch import load

    meta = read_projectors_metadata(blob, where)
    if meta.get("format") != PROJECTORS_FORMAT or "config" not in meta:
        raise ValueError(f"{where} is not a PERL projector file (format {meta.get('format')!r}, "
                         f"expected {PROJECTORS_FORMAT!r})")
    return load(blob), TrainConfig.from_record(json.loads(meta["config"]))


# --- CLI ------------------------------------------------------------------------------------------


def ensure_synthetic_data(cfg: TrainConfig) -> bool:
    """Generate the synthetic world under cfg.data_root when a synthetic dataset of `cfg` is
    missing there (cheap, and cached by the generator). Returns whether it generated."""
    from perl_core.data.registry import get_spec

    if not cfg.data_root or "://" in cfg.data_root:
        return False
    root = Path(cfg.data_root)
    missing = []
    for name in (cfg.dataset, *cfg.eval_datasets):
        spec = get_spec(name)
        if spec.synthetic and not (root / spec.dataset_dir / (spec.split_file or "")).is_file():
            missing.append(spec.name)
    if not missing:
        return False
    from perl_core.data.synthetic import generate_world

    logger.info("synthetic dataset(s) %s missing under %s: generating the world", missing, root)
    generate_world(root)
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m perl_core.train",
        description="Train PERL's thought projectors on one dataset and evaluate them. Every "
                    "TrainConfig field is a flag (tuples as comma lists); defaults are the "
                    "paper's.")
    hints = get_type_hints(TrainConfig)
    group = ap.add_argument_group("TrainConfig fields")
    for f in fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        hint = hints[f.name]
        kind = ("comma list" if getattr(hint, "__origin__", None) is tuple
                else getattr(hint, "__name__", "value"))
        group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                           choices=literal_choices(f.name),
                           help=f"{kind} (default: {f.default!r})")
    ap.add_argument("--config", help="JSON or YAML file of TrainConfig fields (flags override)")
    ap.add_argument("--out", help="write projectors.safetensors, metrics.json, config.json, "
                                  "per_class.json and history.json here")
    ap.add_argument("--checkpoint-dir", help="save checkpoints here and resume from them")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="also checkpoint every N optimizer steps (default: epoch ends only)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    ap.add_argument("--log-level", default="INFO", help="of perl_core's loggers (default INFO)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import this module first, e.g. one that registers a dataset "
                         "(repeatable; a sweep's `imports:`)")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config's fields, then the flags over them, through TrainConfig's one set of rules; a
    ValueError names each bad value's origin: `file: line N, key` or `--flag`."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if args.config:
        try:
            text = Path(args.config).read_text()
        except OSError as e:
            raise ConfigFileError(args.config, [("", f"cannot read it: {e.strerror or e}")]) \
                from None
        raw, lines = read_yaml(text, args.config)
        if not isinstance(raw, (dict, type(None))):
            raise ConfigFileError(args.config, [("line 1", "expected a mapping of TrainConfig "
                                                           "fields (dataset: ..., lr: ...)")])
        values.update(raw or {})
        origin.update({k: f"{args.config}: line {lines[(k,)]}, {k}" for k in raw or {}})
        listed = [(origin[k], m) for k, v in (raw or {}).items()
                  if (m := file_value_problem(k, v))]
        if listed:
            raise ValueError("\n".join(f"{where}: {m}" for where, m in listed))
    flags = {k: getattr(args, k) for k in FIELD_NAMES if hasattr(args, k)}
    values.update(flags)
    origin.update({k: f"--{k.replace('_', '-')}" for k in flags})
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as e:
        raise ValueError("\n".join(f"{origin.get(k, k)}: {m}" for k, m in e.problems)) from None


def format_metrics(result: TrainResult) -> list[Any]:
    """Two rich Tables: per evaluation set (accuracy at every step, confidence, Brier, KL, anchor
    cos), and the top-level numbers (HM per step, target average, training loss)."""
    from rich.table import Table

    m = result.metrics
    evalsets = list(result.per_class)
    steps = sorted(int(k.rsplit("step", 1)[1]) for k in m
                   if evalsets and k.startswith(f"{evalsets[0]}/acc_step"))
    K = steps[-1] if steps else 0
    table = Table(title=f"PERL {result.config.dataset} ({result.config.protocol}), "
                        f"{result.num_trainable_parameters:,} trainable parameters")
    for col in ("evalset", "n", *[f"acc@{k}" for k in steps], f"conf@0/{K}", f"Brier@0/{K}",
                f"KL@{K}", "anchor cos"):
        table.add_column(col, justify="left" if col == "evalset" else "right")
    for e in evalsets:
        def g(name: str, fmt: str = "{:.2f}") -> str:
            v = m.get(f"{e}/{name}")
            return "-" if v is None else fmt.format(v)

        table.add_row(e, g("n", "{:.0f}"), *[g(f"acc_step{k}") for k in steps],
                      f"{g('confidence_step0', '{:.1f}')}/{g(f'confidence_step{K}', '{:.1f}')}",
                      f"{g('brier_step0', '{:.3f}')}/{g(f'brier_step{K}', '{:.3f}')}",
                      g(f"kl_step{K}", "{:.4f}"), g("anchor_cos", "{:.4f}"))
    top = {k: v for k, v in m.items() if "/" not in k or k.startswith("train/")}
    summary = Table(show_header=False, box=None)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for k, v in top.items():
        summary.add_row(k, f"{v:.4f}" if k.startswith("train/") else f"{v:.2f}")
    return [table, summary]


def write_outputs(out: str | Path, result: TrainResult) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_projectors(out / "projectors.safetensors", result)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1, sort_keys=True))
    (out / "config.json").write_text(json.dumps(result.config.to_dict(), indent=1))
    (out / "per_class.json").write_text(json.dumps(result.per_class, indent=1))
    (out / "history.json").write_text(json.dumps(
        {"steps": result.history, "epochs": result.epoch_history,
         "num_trainable_parameters": result.num_trainable_parameters,
         "train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    # our loggers at --log-level; third-party ones (open_clip logs every model build at INFO)
    # only from WARNING up
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("perl_core", "__main__"):
        logging.getLogger(name).setLevel(args.log_level.upper())
    from perl_core.data.registry import import_modules

    for name in args.imports:  # dataset registrations, before any dataset name is looked up
        try:
            import_modules([name])
        except Exception as e:
            ap.error(f"--import {name}: cannot import module {name!r} "
                     f"({type(e).__name__}: {e}); is it on PYTHONPATH?")
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    if not cfg.dataset or not cfg.data_root:
        ap.error("--dataset and --data-root are required (or set them in --config)")
    from rich.console import Console

    # rich assumes 80 columns when stdout is not a terminal (logs, CI): too narrow for K=4
    console = Console(width=None if sys.stdout.isatty() else 140)
    ensure_synthetic_data(cfg)
    checkpoint = DirCheckpoint(args.checkpoint_dir) if args.checkpoint_dir else None

    class _Announce(Callback):
        def on_train_start(self, info: dict[str, Any]) -> None:
            c = info["trainable_parameter_counts"]
            console.print(f"trainable parameters: {info['num_trainable_parameters']:,} "
                          f"(vision {c['vision']:,}, text {c['text']:,}); "
                          f"{info['num_train']} training images, {info['num_classes']} classes, "
                          f"{info['total_steps']} steps on {info['device']}")

    result = fit(cfg, callbacks=[_Announce()], checkpoint=checkpoint, progress=args.progress,
                 checkpoint_every=args.checkpoint_every)
    for renderable in format_metrics(result):
        console.print(renderable)
    console.print(f"train {result.train_seconds:.1f} s, eval {result.eval_seconds:.1f} s")
    if args.out:
        write_outputs(args.out, result)
        console.print(f"wrote {args.out}/projectors.safetensors, metrics.json, config.json")
    return 0


__all__ = ["fit", "build_model", "evaluate", "evaluate_task", "Callback",
           "TrainResult", "save_projectors", "load_projectors", "projectors_from_bytes",
           "evaluate_projectors",
           "seed_everything", "epoch_plan", "ensure_synthetic_data", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
