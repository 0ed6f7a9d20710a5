"""The text side of a training step in bounded memory: gradient caching (GradCache, Gao et al.,
2021, arXiv 2101.06983).

Each step re-encodes all C class prompts with gradient: K passes over the upper text blocks, whose
activations autograd keeps for every prompt until backward, so the step's memory grows as
C x K x L_eff (10.9 GB at 1,000 ImageNet classes on ViT-B/16). The loss is a softmax over the C
classes and needs every text embedding at once, but its gradient with respect to them is one small
(C, D) tensor, and each prompt's embedding depends on its own row only (the projectors act per row,
the frozen blocks attend within a prompt). So, with `chunk` < C:

1. encode the prompts without gradient (no activations kept), `chunk` at a time, and hand the
   loss the (C, D) result as a leaf that requires grad;
2. the caller's `loss.backward()` back-propagates the image side as usual and leaves the
   (C, D) gradient of the text embeddings on that leaf;
3. `backward()` encodes the prompts again, `chunk` at a time, with gradient, and back-propagates
   each chunk's slice of that gradient into the projectors; a chunk's activations are freed
   before the next one is built.

The projector gradients are the whole-batch ones: the same graph per prompt, summed per chunk
(within float rounding of the per-chunk sums and of the chunk-sized matmuls; bitwise in fp32
with one chunk, tests/test_text_chunk.py). The cost is one more text forward, without gradient.
With C <= chunk (or chunk 0) the whole text graph is kept, as before: no extra pass.
Activation checkpointing was measured against this and not chosen (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from perl_core.model import PerlModel


def _nothing() -> None:
    return None


def encode_text(model: PerlModel, feats: dict[str, torch.Tensor], tokens: torch.Tensor,
                length: int, chunk: int | None,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> tuple[torch.Tensor, Callable[[], None]]:
    """(text embeddings (C, D) for the loss, backward) for the prompts' frozen features `feats`
    ({"prefix": S_t, "h0": h(0)}, as `text_features` gives them).

    Call `backward()` right after `loss.backward()`: it back-propagates the text side chunk by
    chunk when chunked, and does nothing when the whole graph was kept (C <= chunk, chunk 0 or
    None: the embeddings carry their graph and `loss.backward()` reached the projectors).
    `autocast`: a factory of the step's autocast context (each chunk's forward runs in it, as the
    first pass did). `length`: `text_length(tokens)`, taken once from the CPU tokens.
    """
    # no text projector (modality "vision"): no text graph to bound
    if not chunk or feats["prefix"].shape[0] <= chunk or "text" not in model.projectors:
        with autocast():
            return model.text_from_prefix(feats["prefix"], tokens, h0=feats["h0"],
                                          length=length), _nothing
    return cached_text(model, feats, tokens, length, chunk, autocast)


def cached_text(model: PerlModel, feats: dict[str, torch.Tensor], tokens: torch.Tensor,
                length: int, chunk: int,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> tuple[torch.Tensor, Callable[[], None]]:
    """`encode_text`'s gradient-cached path, whatever the class count (with chunk >= C: one
    chunk, the arithmetic of the whole-graph path, which the tests compare bitwise)."""
    prefix, h0 = feats["prefix"], feats["h0"]
    n = prefix.shape[0]

    def encode(rows: slice) -> torch.Tensor:
        with autocast():
            # a prefix of the whole batch is cut at its L_eff (>= a chunk's own): still exact
            return model.text_from_prefix(prefix[rows], tokens[rows], h0=h0[rows], length=length)

    chunks = [slice(start, start + chunk) for start in range(0, n, chunk)]
    # the first pass goes chunk by chunk too: a pass over all C prompts at once, even without
    # gradient, holds ~0.7 GB of block temporaries at 1,000 classes (ViT-B/16), growing with C;
    # and each prompt is then encoded in the same chunk, so by the same arithmetic, both times
    with torch.no_grad():
        text = torch.cat([encode(rows) for rows in chunks]).requires_grad_()  # a leaf: the
        # loss's backward stops here and leaves the (C, D) gradient on it

    def backward() -> None:
        grad = text.grad
        if grad is None:  # the loss did not reach the text side: nothing to propagate
            return
        for rows in chunks:
            encode(rows).backward(grad[rows])
        text.grad = None  # the (C, D) cache is no longer needed

    return text, backward


__all__ = ["encode_text", "cached_text"]
