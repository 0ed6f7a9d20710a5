"""PERL's objective (Eq. 4): CE on CLIP logits + anchor_weight * (1 - mean cos(v0, vK)).

Only the image embedding is anchored to its zero-shot value (the text classifier is shared by the
batch, so every CE update already limits its drift), and only the final step K enters the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def perl_loss(logits: torch.Tensor, labels: torch.Tensor, v0: torch.Tensor, vK: torch.Tensor,
              anchor_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (N, C), labels (N,), zero-shot v0 and refined vK image embeddings (N, D).

    Returns (loss, {"ce": ..., "anchor": ...}); the parts are detached 0-d tensors (no device
    sync here; call float() when logging). "anchor" is the unweighted 1 - mean cos.
    The CE and anchor are computed in fp32, but that upcast cannot undo logits that an autocast
    matmul already rounded to bf16: pass fp32 logits, computed outside autocast from the fp32
    embeddings (`perl_core.train._train_step` does; evaluation does the same).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if v0.shape != vK.shape:
        raise ValueError(f"v0 {tuple(v0.shape)} and vK {tuple(vK.shape)} must have the same shape")
    ce = F.cross_entropy(logits.float(), labels)
    anchor = 1.0 - F.cosine_similarity(v0.float(), vK.float(), dim=-1).mean()
    loss = ce + anchor_weight * anchor
    return loss, {"ce": ce.detach(), "anchor": anchor.detach()}
