"""`text_chunk`: the gradient-cached text path (perl_core/gradcache.py) gives today's gradients.

On the tiny test CLIP (J=2, K=2), through the production step (`train.train_step`) and `fit`:
- one chunk of the cached path (the no-grad pass, the loss on a detached leaf, one re-encoding
  back-propagated with the cached gradient) is bitwise the whole-graph path in fp32: the same
  arithmetic;
- several chunks (chunk=1, and 3 for 7 prompts: not a divisor) agree within float rounding, for
  both text placements and every variant with text projectors, and under CPU bf16 autocast
  within bf16 rounding;
- `text_chunk` is an execution field: validated, outside the config hash, a CLI flag.
A chunk whose gradient slice is misaligned, or whose backward is skipped, moves the gradients by
orders of magnitude more than the tolerances used here (tried by mutating gradcache.py).
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from perl_core import TrainConfig
from perl_core import gradcache
from perl_core import train as train_mod
from perl_core.cache import image_features, text_features
from perl_core.config import ConfigError
from perl_core.train import build_parser, fit, train_step

VARIANTS = ("shared", "step", "early", "deep", "layer", "layerstep")
PLACEMENTS = ("after_bos", "front")
# 7 prompts of different lengths: the EOS rows sit at different positions, as in a real batch
PROMPTS = [f"a photo of a {w}." for w in
           ("cat", "large brown dog", "crane", "red origami crane on a wooden table", "fish",
            "small green tree frog", "car")]
# relative to the largest entry of each gradient: today's fp32 path is itself 2e-5 from an fp64
# reference here (the text gradient sums class terms that cancel); a wrong chunk moves it by ~1
FP32_TOL = 1e-4
BF16_SHARE = 0.5  # of bf16's own error (vs fp32) that chunking may add under bf16 autocast


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield


def _forced_one_chunk(model, feats, tokens, length, chunk, autocast):
    """encode_text taking the cached path with one chunk of every prompt (C <= chunk would keep
    the whole graph instead)."""
    return gradcache.cached_text(model, feats, tokens, length, feats["prefix"].shape[0], autocast)


def _step_grads(make_tiny_perl, *, chunk: int, variant: str = "shared",
                placement: str = "after_bos", precision: str = "fp32", modality: str = "both"
                ) -> dict[str, torch.Tensor]:
    """Projector gradients of one production training step (`train_step`, lr 0 so the
    weights stay; the gradients stay on the parameters after the step)."""
    model = make_tiny_perl(variant=variant, text_placement=placement, modality=modality).train()
    cfg = TrainConfig(precision=precision, text_chunk=chunk, device="cpu")
    tokens = open_clip.tokenize(PROMPTS)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    device = torch.device("cpu")
    with torch.no_grad(), train_mod.autocast(cfg, device):
        tf, vf = text_features(model, tokens), image_features(model, images)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    train_step(cfg, model, opt, vf, torch.tensor([0, 3, 6]), tokens, tf, model.text_length(tokens))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item()
               for k in a)


def _text_keys(grads: dict[str, torch.Tensor]) -> list[str]:
    keys = [k for k in grads if "text" in k]
    assert keys and all(grads[k].abs().max() > 0 for k in keys)  # the text side is reached
    return keys


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_chunk_is_bitwise_the_whole_graph(make_tiny_perl, monkeypatch, variant, placement):
    whole = _step_grads(make_tiny_perl, chunk=0, variant=variant, placement=placement)
    monkeypatch.setattr(train_mod, "encode_text", _forced_one_chunk)
    cached = _step_grads(make_tiny_perl, chunk=0, variant=variant, placement=placement)
    _text_keys(whole)
    assert all(torch.equal(whole[k], cached[k]) for k in whole)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_several_chunks_match_within_rounding(make_tiny_perl, variant, placement):
    whole = _step_grads(make_tiny_perl, chunk=0, variant=variant, placement=placement)
    for chunk in (1, 3):  # 7 chunks; 3 chunks of 3, 3, 1
        grads = _step_grads(make_tiny_perl, chunk=chunk, variant=variant, placement=placement)
        _text_keys(whole)
        for k in whole:  # the image side too: its logits see the chunk-encoded text
            assert _rel_diff({k: whole[k]}, {k: grads[k]}) < FP32_TOL, (chunk, k)


def test_chunk_at_least_the_class_count_is_the_whole_graph(make_tiny_perl):
    whole = _step_grads(make_tiny_perl, chunk=0)
    for chunk in (len(PROMPTS), 128):
        grads = _step_grads(make_tiny_perl, chunk=chunk)
        assert all(torch.equal(whole[k], grads[k]) for k in whole)


def test_text_only_modality_and_vision_only(make_tiny_perl):
    text = (_step_grads(make_tiny_perl, chunk=0, modality="text"),
            _step_grads(make_tiny_perl, chunk=2, modality="text"))
    assert _rel_diff(*text) < FP32_TOL
    vision = (_step_grads(make_tiny_perl, chunk=0, modality="vision"),
              _step_grads(make_tiny_perl, chunk=2, modality="vision"))  # no text projector
    assert all(torch.equal(vision[0][k], vision[1][k]) for k in vision[0])


def _rel_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a|| over the text projectors' gradients."""
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in _text_keys(a))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_within_tolerance(make_tiny_perl, variant, placement):
    # bf16 itself moves the text gradients by 3-18 % from fp32 here; chunking under bf16 moves
    # them by 0.5-7 % from the whole-graph bf16 ones (chunk-sized matmuls round differently):
    # it must stay well inside bf16's own error and add nearly nothing to it
    fp32 = _step_grads(make_tiny_perl, chunk=0, variant=variant, placement=placement)
    whole = _step_grads(make_tiny_perl, chunk=0, variant=variant, placement=placement,
                        precision="bf16")
    bf16_error = _rel_norm(fp32, whole)
    for chunk in (1, 3):
        grads = _step_grads(make_tiny_perl, chunk=chunk, variant=variant, placement=placement,
                            precision="bf16")
        assert _rel_norm(whole, grads) < BF16_SHARE * bf16_error, chunk
        assert _rel_norm(fp32, grads) < 1.25 * bf16_error, chunk


# --- a whole fit: the trained weights ------------------------------------------------------------


@pytest.fixture
def cfg(world, tiny_arch) -> TrainConfig:
    # ToyShapes base2novel: 10 base classes, 2 shots: 5 steps of batch 4
    return TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                       inject_layer=2, num_steps=2, shots=2, epochs=1, batch_size=4, lr=1e-3,
                       device="cpu", eval_batch_size=64, jacobian_samples=0, text_chunk=0)


def test_fit_trained_weights(cfg, monkeypatch):
    ref = fit(cfg, progress=False).projector_state
    same = fit(cfg.replace(text_chunk=10), progress=False).projector_state  # C <= chunk
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    for chunk in (1, 3):  # 10 chunks; 4 chunks of 3, 3, 3, 1
        got = fit(cfg.replace(text_chunk=chunk), progress=False).projector_state
        moved = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert moved < 1e-6, (chunk, moved)  # lr 1e-3 x 5 steps moves them by ~5e-3
    monkeypatch.setattr(train_mod, "encode_text", _forced_one_chunk)
    forced = fit(cfg, progress=False).projector_state
    assert all(torch.equal(ref[k], forced[k]) for k in ref)


def test_text_chunk_is_an_execution_field():
    cfg = TrainConfig(dataset="ToyShapes")
    assert cfg.text_chunk == 128
    assert "text_chunk" not in cfg.hashed_fields()
    assert {cfg.replace(text_chunk=n).config_hash() for n in (0, 1, 128, 4096)} == \
        {cfg.config_hash()}
    with pytest.raises(ConfigError, match="text_chunk"):
        cfg.replace(text_chunk=-1)
    args = build_parser().parse_args(["--dataset", "ToyShapes", "--text-chunk", "32"])
    assert TrainConfig.from_dict({k: v for k, v in vars(args).items()
                                  if k in ("dataset", "text_chunk")}).text_chunk == 32


def test_chunked_step_keeps_one_host_sync(cfg):
    """The chunked step reads nothing from the device besides the step's one `.tolist()`
    (the same profiler count as tests/test_gpu_by_design_train.py, 10 classes in 4 chunks)."""
    from test_gpu_by_design_train import profiled_scalar_reads

    steps, reads = profiled_scalar_reads(cfg.replace(text_chunk=3, num_workers=0))
    assert steps >= 3 and reads == 0
