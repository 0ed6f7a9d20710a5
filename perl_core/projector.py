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

`init="near_identity"` (TrainConfig.projector_init): the one place where LN is *not* scale
invariant is near 0, where its eps dominates: LN(z) = beta + gamma * (z - mean z) / sqrt(var z +
eps) ~ beta + gamma * (z - mean z) / sqrt(eps) once std(z) << sqrt(eps) (open_clip's eps 1e-5:
sqrt 3.2e-3). So W2 is the default draw times NEAR_IDENTITY_SCALE and b2 = 0: every frozen LN
maps the thought token to within ~3 % (at most) of its bias beta, the same token for every
image, step and seed, with an h-dependent part that is linear and small; the frozen model starts
as "CLIP with K constant beta-tokens", independent of the init seed. Unlike W2 = 0, W1 still
gets a (small, nonzero) gradient, and Adam's scale-free step moves it at the full lr. What it
cannot do is start at zero-shot: any extra token moves the CLS/EOS state (docs/method.md,
"projector_init").
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_INITS = ("default", "near_identity")
# W2's default draw is U(-1/sqrt(r), 1/sqrt(r)) and GELU(W1 LN(h)) is O(1), so |z| <~ 1e-4:
# ~30x below sqrt(eps) = 3.2e-3 of the frozen blocks' LayerNorm (eps 1e-5)
NEAR_IDENTITY_SCALE = 1e-4


class ThoughtProjector(nn.Module):
    def __init__(self, width: int, rank: int = 1, init: str = "default"):
        super().__init__()
        if width < 1 or rank < 1:
            raise ValueError(f"ThoughtProjector needs width >= 1 and rank >= 1, "
                             f"got {width=}, {rank=}")
        if init not in PROJECTOR_INITS:
            raise ValueError(f"projector_init={init!r} is not one of {list(PROJECTOR_INITS)}")
        self.width, self.rank, self.init = width, rank, init
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, rank)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(rank, width)
        if init == "near_identity":
            # rescale the default draw (no extra RNG draws: LN and W1 equal the default init's)
            with torch.no_grad():
                self.fc2.weight.mul_(NEAR_IDENTITY_SCALE)
                self.fc2.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., width) pooled state -> (..., width) thought token."""
        return self.fc2(self.act(self.fc1(self.ln(h))))

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}, init={self.init!r}"
