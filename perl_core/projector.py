"""ThoughtProjector: phi(h) = W2 GELU(W1 LN(h)) (PERL Eq. 1), the only trainable part of PERL.

It maps a pooled state h (the raw CLS/EOS residual, width d) to one thought token of the same
width. At rank r=1 it has 5d + 1 parameters: LN 2d, Linear(d, 1) d + 1, Linear(1, d) 2d.

Initialisation (the paper is silent): PyTorch defaults (LayerNorm 1/0, nn.Linear's
kaiming-uniform weights and biases). Why not zero-init the last layer, as adapters often do:
the thought token enters the frozen blocks through their pre-attention LayerNorm, which is scale
invariant (and LN(0) is its bias), so neither a zero nor a small output makes step 1 a no-op; a
zero last layer would only make every thought token the same constant and block the gradient to
W1 at the first update. With defaults both layers get a gradient from the first step and the
thought token depends on h from the start; the anchor loss bounds the drift from zero-shot.
"""

from __future__ import annotations

import torch
from torch import nn


class ThoughtProjector(nn.Module):
    def __init__(self, width: int, rank: int = 1):
        super().__init__()
        if width < 1 or rank < 1:
            raise ValueError(f"ThoughtProjector needs width >= 1 and rank >= 1, "
                             f"got {width=}, {rank=}")
        self.width, self.rank = width, rank
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, rank)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(rank, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., width) pooled state -> (..., width) thought token."""
        return self.fc2(self.act(self.fc1(self.ln(h))))

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"
