"""The text prefix is cut after the batch's last EOS (`PerlModel.text_prefix`): exact.

CLIP's text tower is causal and PERL reads the EOS row at every step (the thought tokens sit
before it), so the positions after the last EOS of a batch reach no readout. Every variant and
both placements must give the untruncated embeddings (all steps) and projector gradients up to
float rounding; prompts cut by the tokenizer (EOS at ctx - 1) are not truncated at all.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from perl_core import TrainConfig
from perl_core.cache import FeatureCache, text_features
from perl_core.model import PerlModel
from perl_core.train import fit

PLACEMENTS = ("after_bos", "front")
VARIANTS = ("shared", "step", "early", "deep", "layer", "layerstep")
PROMPTS = ["a photo of a cat.", "a dog", "an origami crane on a table", "x"]
TOL = 1e-5


@pytest.fixture
def tokens():
    return open_clip.tokenize(PROMPTS)


def _model(make_tiny_perl, variant, placement, num_steps=3):
    kw = {"inject_layers": (1, 2, 3)} if variant in ("deep", "layer", "layerstep") else {}
    return make_tiny_perl(variant=variant, num_steps=num_steps, text_placement=placement,
                          inject_layer=2, **kw)


def _untruncated(model, tokens, **kw):
    return model.text_from_prefix(model.text_prefix(tokens, truncate=False), tokens, **kw)


def _truncated(model, tokens, **kw):
    return model.text_from_prefix(model.text_prefix(tokens), tokens, **kw)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_text_length(make_tiny_perl, tokens):
    model = make_tiny_perl()
    eos = tokens.argmax(-1)
    assert model.text_length(tokens) == int(eos.max()) + 1 == 8  # BOS + 6 tokens + EOS
    assert model.text_prefix(tokens).shape == (4, 8, 32)
    assert model.text_prefix(tokens, truncate=False).shape == (4, 77, 32)
    assert model.text_length(tokens[1:2]) == 4  # BOS a dog EOS
    # a prompt cut by the tokenizer keeps its EOS at the last position: no truncation at all
    long = open_clip.tokenize(["a " * 100])
    assert long[0, -1] == long.max() and model.text_length(long) == 77
    assert model.text_prefix(torch.cat([tokens, long])).shape == (5, 77, 32)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_step_equals_untruncated(make_tiny_perl, tokens, variant, placement):
    model = _model(make_tiny_perl, variant, placement)
    with torch.no_grad():
        ref = _untruncated(model, tokens, all_steps=True)
        got = _truncated(model, tokens, all_steps=True)
        assert got.shape == ref.shape == (4, 4, 32)
        assert _max_diff(got, ref) < TOL, (variant, placement)
        for s in range(1, 4):  # the thoughts do something (else equality says little)
            assert _max_diff(ref[s], ref[0]) > 1e-3
        # the zero-shot state and a given h(0) agree too
        pre, full = model.text_prefix(tokens), model.text_prefix(tokens, truncate=False)
        h0 = model.text_zero_shot_state(pre, tokens)
        assert _max_diff(h0, model.text_zero_shot_state(full, tokens)) < TOL
        assert torch.equal(model.text_from_prefix(pre, tokens, all_steps=True, h0=h0), got)
        assert _max_diff(model.encode_text_all_steps(tokens), ref) < TOL
        assert _max_diff(ref[0], model.clip.encode_text(tokens)) < TOL


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_projector_gradients_equal_untruncated(make_tiny_perl, tokens, variant, placement):
    model = _model(make_tiny_perl, variant, placement)
    target = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for path in (_untruncated, _truncated):
        model.zero_grad(set_to_none=True)
        emb = path(model, tokens, all_steps=True)
        (emb * target).sum().backward()  # every step 0..K reaches the loss
        grads.append({n: p.grad.clone() for n, p in model.projectors["text"].named_parameters()})
    ref, got = grads
    assert ref.keys() == got.keys() and ref
    for n in ref:
        scale = max(1.0, ref[n].abs().max().item())
        assert ref[n].abs().max() > 0, n
        assert _max_diff(got[n], ref[n]) < TOL * scale, (variant, placement, n)


def test_subset_of_a_prefix_and_too_short_prefix(make_tiny_perl, tokens):
    model = make_tiny_perl(num_steps=2)
    with torch.no_grad():
        pre = model.text_prefix(tokens)  # 8 positions (the longest prompts)
        short = tokens[[1, 3]]  # needs 4
        got = model.text_from_prefix(pre[[1, 3]], short, all_steps=True)
        assert _max_diff(got, _untruncated(model, short, all_steps=True)) < TOL
        assert model.text_prefix(short).shape[1] == 4
        with pytest.raises(ValueError, match="the text prefix has 4 positions; these tokens "
                                             "need 8 to 77"):
            model.text_from_prefix(model.text_prefix(short), tokens[[0, 2]])


def test_untruncatable_batch_is_bitwise_the_old_path(make_tiny_perl, tokens):
    """A prompt without EOS inside the context (cut by the tokenizer) forces L_eff = ctx: the
    truncated path is then the untruncated computation, bitwise."""
    model = make_tiny_perl(num_steps=2)
    batch = torch.cat([tokens, open_clip.tokenize(["a photo of " * 40])])
    with torch.no_grad():
        assert torch.equal(_truncated(model, batch, all_steps=True),
                           _untruncated(model, batch, all_steps=True))


def test_cache_stores_the_truncated_prefix_and_hits(make_tiny_perl, tokens, tmp_path):
    model = make_tiny_perl(num_steps=2)
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    key = dict(dataset="A", template="t", classnames=PROMPTS)
    with torch.no_grad():
        miss = cache.text_features(model, tokens, **key)
        hit = cache.text_features(model, tokens, **key)
        direct = text_features(model, tokens)
    assert cache.counts["text/miss"] == 1 and cache.counts["text/hit"] == 1
    assert miss["prefix"].shape == (4, 8, 32)
    for k in ("prefix", "h0"):
        assert torch.equal(miss[k], hit[k]) and torch.equal(hit[k], direct[k])
    with torch.no_grad():
        assert torch.equal(model.text_from_prefix(hit["prefix"], tokens, h0=hit["h0"]),
                           model.encode_text(tokens))


def test_fit_equals_untruncated_fit(tmp_path, tiny_arch, monkeypatch):
    from perl_core.data.synthetic import generate_world

    generate_world(tmp_path / "w", datasets=["ToyShapes"],
                   sizes={"train": 4, "val": 1, "test": 2})
    cfg = TrainConfig(dataset="ToyShapes", data_root=str(tmp_path / "w"), arch=tiny_arch,
                      pretrained="", inject_layer=2, num_steps=2, shots=2, epochs=1,
                      batch_size=4, lr=1e-3, device="cpu", eval_batch_size=16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lengths = []
        orig = PerlModel.text_length
        monkeypatch.setattr(PerlModel, "text_length",
                            lambda self, t: lengths.append(orig(self, t)) or orig(self, t))
        got = fit(cfg)
        assert lengths and max(lengths) < 77  # the run did truncate
        monkeypatch.setattr(PerlModel, "text_length", lambda self, t: t.shape[-1])  # no cut
        ref = fit(cfg)
    finally:
        torch.set_num_threads(n)
    assert ref.metrics.keys() == got.metrics.keys()
    for k, v in ref.metrics.items():
        assert abs(got.metrics[k] - v) <= 1e-4 * max(1.0, abs(v)), k
    for k in ref.projector_state:
        assert _max_diff(got.projector_state[k], ref.projector_state[k]) < 1e-5, k
    for a, b in zip(got.history, ref.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5
