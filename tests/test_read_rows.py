"""The last block of every upper pass computes the read rows only (`backbone.block_rows`): exact.

A pass of blocks[J:] is read at one row per sequence (CLS / EOS). In the last block the other
rows matter only as keys and values, so the query, attention output and MLP run for the read row
only. These tests compare that with running the block whole and indexing it, for a single block
(forward and input gradient, with and without the causal mask, read rows that differ per
sequence) and for the whole model (every variant, both text placements, every step and the
projector gradients), with the whole-block path as the reference.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

import perl_core.model as model_module
from perl_core.backbone import block_rows, causal_mask

VARIANTS = ("shared", "step", "early", "deep", "layer", "layerstep")
TOL = 1e-5


def _whole(block, x, rows, attn_mask=None):
    return block(x, attn_mask=attn_mask)[torch.arange(x.shape[0]), rows]


@pytest.mark.parametrize("masked", [False, True])
def test_block_rows_equals_the_whole_block(make_tiny_perl, masked):
    model = make_tiny_perl()
    tower = model.towers["text" if masked else "vision"]
    block = tower.blocks[-1]
    torch.manual_seed(0)
    x = torch.randn(5, 9, tower.width, requires_grad=True)
    rows = torch.tensor([8, 3, 0, 5, 8]) if masked else torch.zeros(5, dtype=torch.long)
    mask = causal_mask(9, x.device, x.dtype) if masked else None
    ref = _whole(block, x, rows, mask)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    got = block_rows(block, x, rows, mask)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert got.shape == ref.shape == (5, tower.width)
    assert (got - ref).abs().max() < TOL
    assert (g_got - g_ref).abs().max() < TOL
    if masked:  # a causal read row sees no later row: their gradient is exactly zero
        assert torch.count_nonzero(g_got[1, 4:]) == 0
        assert torch.count_nonzero(g_got[1, :4]) > 0


def test_other_block_layouts_run_whole(make_tiny_perl):
    """A block type it does not know (here a wrapper) is run whole and indexed, not guessed at."""
    block = make_tiny_perl().towers["vision"].blocks[-1]

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = block
            self.calls = 0

        def forward(self, x, attn_mask=None):
            self.calls += 1
            return self.inner(x, attn_mask=attn_mask)

    w = Wrapped()
    x = torch.randn(2, 4, block.ln_1.normalized_shape[0])
    rows = torch.zeros(2, dtype=torch.long)
    assert torch.equal(block_rows(w, x, rows), _whole(block, x, rows)) and w.calls == 1


@pytest.mark.parametrize("placement", ["after_bos", "front"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_equals_whole_last_block(make_tiny_perl, monkeypatch, variant, placement):
    kw = {"inject_layers": (1, 2, 3)} if variant in ("deep", "layer", "layerstep") else {}
    model = make_tiny_perl(variant=variant, num_steps=3, text_placement=placement, **kw)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = open_clip.tokenize(["a photo of a cat.", "a dog", "an origami crane on a table"])

    def run():
        model.zero_grad(set_to_none=True)
        img = model.encode_image_all_steps(images)
        txt = model.encode_text_all_steps(tokens)
        (img[-1].square().sum() + txt[-1].square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return img.detach(), txt.detach(), grads

    got = run()
    monkeypatch.setattr(model_module, "block_rows", _whole)
    ref = run()
    for a, b in zip(got[:2], ref[:2]):
        assert a.shape == b.shape and (a - b).abs().max() < TOL, (variant, placement)
        assert (b[-1] - b[0]).abs().max() > 1e-3  # the thoughts do something
    assert got[2].keys() == ref[2].keys() and got[2]
    for name in ref[2]:
        assert (got[2][name] - ref[2][name]).abs().max() < TOL * max(
            1.0, ref[2][name].abs().max().item()), name
    # step 0 is still zero-shot CLIP
    assert (got[0][0] - model.clip.encode_image(images)).abs().max() < TOL
    assert (got[1][0] - model.clip.encode_text(tokens)).abs().max() < TOL


def test_bf16_autocast_close(make_tiny_perl, monkeypatch):
    """Under bf16 autocast (the GPU path; CPU autocast as the stand-in) the two agree at bf16
    rounding."""
    model = make_tiny_perl(num_steps=2)
    tokens = open_clip.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.encode_text_all_steps(tokens).float()
        monkeypatch.setattr(model_module, "block_rows", _whole)
        ref = model.encode_text_all_steps(tokens).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
