"""Table 4's two readings of the specific variants (`variant_projectors`) and `projector_init`.

shared_plus_specific: thought token = phi_shared(h) + phi_specific(h) (the paper's printed sizes);
specific_only: the specific projectors alone (the reading before issue 14). See docs/method.md,
"Variants (Table 4)" and "projector_init".
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from perl_core import PerlModel, ThoughtProjector, TrainConfig
from perl_core.projector import NEAR_IDENTITY_SCALE
from test_model import TINY_UNIT, ref_image, ref_text

READINGS = ("shared_plus_specific", "specific_only")
SPECIFIC = ("step", "layer", "layerstep")


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---- (1) the six counts at ViT-B/16 size, both readings -----------------------------------------
VITB16 = {  # (variant, reading) -> total; Table 4 prints 6K 6K 6K 32K 26K 83K
    ("shared", "shared_plus_specific"): 6402, ("early", "shared_plus_specific"): 6402,
    ("deep", "shared_plus_specific"): 6402, ("step", "shared_plus_specific"): 32010,
    ("layer", "shared_plus_specific"): 25608, ("layerstep", "shared_plus_specific"): 83226,
    ("shared", "specific_only"): 6402, ("early", "specific_only"): 6402,
    ("deep", "specific_only"): 6402, ("step", "specific_only"): 25608,
    ("layer", "specific_only"): 19206, ("layerstep", "specific_only"): 76824,
}


def test_vitb16_counts_both_readings():
    # meta tensors: the real ViT-B/16 shapes without allocating or initialising 150M weights
    with torch.device("meta"):
        clip = CLIP(**open_clip.get_model_config("ViT-B-16-quickgelu"))
    for (variant, reading), total in VITB16.items():
        with torch.device("meta"):
            model = PerlModel(clip, variant=variant, variant_projectors=reading)
        counts = model.trainable_parameter_counts()
        pairs = total // 6402
        assert counts == {"vision": pairs * 3841, "text": pairs * 2561, "total": total}, \
            (variant, reading, counts)
        assert model.num_trainable_parameters() == total
        # every trainable value is in the saved state (nothing trained is left out of a file)
        assert sum(v.numel() for v in model.projector_state_dict().values()) == total
    # the default reading is the paper's sizes
    with torch.device("meta"):
        assert PerlModel(clip, variant="step").num_trainable_parameters() == 32010


# ---- the hand-written reference recurrence of test_model, with a per-step projector -----------
def _stepwise(phi, K):
    """phi(step, h) as the phi(h) that test_model's references call once per step, in order."""
    steps = iter(range(1, K + 1))
    return lambda h: phi(next(steps), h)


def _ref_image(clip, phi, images, J, K):
    return ref_image(clip, _stepwise(phi, K), images, J, K)


def _ref_text(clip, phi, text, J, K):
    return ref_text(clip, _stepwise(phi, K), text, J, K, "after_bos")


def _bump(model):
    """Make every projector's output clearly non-trivial (fc2 bias), so sums are visible."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim == 1 and p.shape[0] in (32, 64):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


# ---- (2) shared_plus_specific: the sum rule, gradients, nesting ---------------------------------
def test_shared_plus_specific_is_the_sum_by_hand(make_tiny_perl, images, tokens):
    K = 3
    model = make_tiny_perl(variant="step", num_steps=K, variant_projectors="shared_plus_specific")
    _bump(model)
    v_shared, t_shared = model.shared_projectors["vision"], model.shared_projectors["text"]
    v_spec, t_spec = model.projectors["vision"][0], model.projectors["text"][0]
    assert len(v_spec) == K and len(t_spec) == K
    with torch.no_grad():
        ref_v = _ref_image(model.clip, lambda k, h: v_shared(h) + v_spec[k - 1](h), images, 2, K)
        ref_t = _ref_text(model.clip, lambda k, h: t_shared(h) + t_spec[k - 1](h), tokens, 2, K)
        assert _close(model.encode_image(images), ref_v)
        assert _close(model.encode_text(tokens), ref_t)
        # the shared term matters: dropping it is a different model
        alone = _ref_image(model.clip, lambda k, h: v_spec[k - 1](h), images, 2, K)
        assert (alone - ref_v).abs().max() > 1e-3


def test_shared_plus_specific_multidepth_sum(make_tiny_perl, images):
    """layerstep at depths (1, 2, 3): each (depth, step) thought is shared + specific."""
    kw = dict(variant="layerstep", inject_layers=(1, 2, 3), num_steps=2)
    model = make_tiny_perl(variant_projectors="shared_plus_specific", **kw)
    _bump(model)
    twin = make_tiny_perl(variant_projectors="specific_only", **kw)

    class Summed(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, h):
            return self.a(h) + self.b(h)

    shared = model.shared_projectors["vision"]
    for d, row in enumerate(model.projectors["vision"]):
        for s, phi in enumerate(row):
            twin.projectors["vision"][d][s] = Summed(shared, phi)
    with torch.no_grad():
        assert _close(model.encode_image(images), twin.encode_image(images))


def test_all_projectors_get_gradients(make_tiny_perl, images, tokens):
    model = make_tiny_perl(variant="layerstep", inject_layers=(1, 2), num_steps=2)
    assert model.has_shared
    loss = model.logits(model.encode_image(images), model.encode_text(tokens)).logsumexp(-1).sum()
    loss.backward()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert any(n.startswith("shared_projectors.vision.") for n in trainable)
    assert any(n.startswith("shared_projectors.text.") for n in trainable)
    assert len(trainable) == 2 * (1 + 2 * 2) * 6  # 2 modalities x 5 projectors x 6 tensors
    for n in trainable:
        g = named[n].grad
        assert g is not None and g.abs().sum() > 0, n


@pytest.mark.parametrize("variant,nested", [("step", "shared"), ("layer", "deep")])
def test_zero_specific_is_the_shared_model(make_tiny_perl, images, tokens, variant, nested):
    """With every specific projector = 0, step is PERL-Shared and layer is PERL-Deep."""
    depths = {"inject_layers": (1, 2, 3)} if variant == "layer" else {}
    model = make_tiny_perl(variant=variant, **depths)
    base = make_tiny_perl(variant=nested, **depths)
    with torch.no_grad():
        for name in ("vision", "text"):
            base.projectors[name][0][0].load_state_dict(
                model.shared_projectors[name].state_dict())
            for row in model.projectors[name]:
                for phi in row:
                    phi.fc2.weight.zero_()
                    phi.fc2.bias.zero_()
        assert _close(model.encode_image(images), base.encode_image(images), 1e-6)
        assert _close(model.encode_text(tokens), base.encode_text(tokens), 1e-6)


# ---- (3) specific_only is the reading before issue 14 -------------------------------------------
def test_specific_only_reproduces_the_old_model(make_tiny_perl, images, tokens):
    K = 3
    model = make_tiny_perl(variant="step", num_steps=K, variant_projectors="specific_only")
    assert not model.has_shared and len(model.shared_projectors) == 0
    # the old RNG order: the grid only, vision then text, step by step
    torch.manual_seed(7)
    fresh = PerlModel(model.clip, inject_layer=2, num_steps=K, variant="step",
                      variant_projectors="specific_only")
    torch.manual_seed(7)
    old = {name: [ThoughtProjector(w) for _ in range(K)] for name, w in (("vision", 64),
                                                                        ("text", 32))}
    want = {f"{name}.0.{s}.{k}": v for name, row in old.items() for s, phi in enumerate(row)
            for k, v in phi.state_dict().items()}
    got = fresh.projector_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the old forward: the step-k projector alone
    v_spec, t_spec = model.projectors["vision"][0], model.projectors["text"][0]
    with torch.no_grad():
        assert _close(model.encode_image(images),
                      _ref_image(model.clip, lambda k, h: v_spec[k - 1](h), images, 2, K))
        assert _close(model.encode_text(tokens),
                      _ref_text(model.clip, lambda k, h: t_spec[k - 1](h), tokens, 2, K))
    # an old checkpoint loads into specific_only, and the new default says why it does not fit
    state = model.projector_state_dict()
    make_tiny_perl(variant="step", num_steps=K, variant_projectors="specific_only"
                   ).load_projector_state_dict(state)
    with pytest.raises(ValueError, match=r"vision\.shared\.fc1\.weight.*specific_only"):
        make_tiny_perl(variant="step", num_steps=K).load_projector_state_dict(state)


def test_shared_plus_specific_state_roundtrip(make_tiny_perl, images):
    a = make_tiny_perl(variant="layer", inject_layers=(1, 3), seed=1)
    torch.manual_seed(2)  # other projectors around the same frozen CLIP
    b = PerlModel(a.clip, inject_layer=2, num_steps=2, variant="layer", inject_layers=(1, 3))
    assert not torch.equal(b.shared_projectors["vision"].fc1.weight,
                           a.shared_projectors["vision"].fc1.weight)
    state = a.projector_state_dict()
    assert "vision.shared.fc1.weight" in state and "vision.1.0.fc1.weight" in state
    b.load_projector_state_dict(state)
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))


# ---- (4) K = 0 is zero-shot whatever the reading and init ---------------------------------------
@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("init", ("default", "near_identity"))
def test_zero_steps_is_zero_shot(make_tiny_perl, images, tokens, reading, init):
    for variant in SPECIFIC:
        depths = {"inject_layers": (1, 3)} if variant != "step" else {}
        model = make_tiny_perl(variant=variant, variant_projectors=reading, projector_init=init,
                               **depths)
        with torch.no_grad():
            assert _close(model.encode_image(images, steps=0), model.clip.encode_image(images))
            assert _close(model.encode_text(tokens, steps=0), model.clip.encode_text(tokens))
            assert _close(model.encode_image_all_steps(images)[0],
                          model.clip.encode_image(images))


# ---- (5) projector_init = near_identity ---------------------------------------------------------
def test_near_identity_is_the_default_draw_with_a_small_w2():
    torch.manual_seed(3)
    d = ThoughtProjector(64)
    torch.manual_seed(3)
    n = ThoughtProjector(64, init="near_identity")
    sd, sn = d.state_dict(), n.state_dict()
    for k in ("ln.weight", "ln.bias", "fc1.weight", "fc1.bias"):
        assert torch.equal(sd[k], sn[k]), k
    assert torch.equal(sn["fc2.weight"], sd["fc2.weight"] * NEAR_IDENTITY_SCALE)
    assert torch.count_nonzero(sn["fc2.bias"]) == 0
    with pytest.raises(ValueError, match="projector_init='zero'"):
        ThoughtProjector(64, init="zero")


def test_near_identity_thought_is_the_ln_bias_token(make_tiny_perl, images):
    """The claim: every frozen LN maps the initial thought to (nearly) its bias beta."""
    out = {}
    for init in ("default", "near_identity"):
        model = make_tiny_perl(projector_init=init)
        with torch.no_grad():
            h0 = model.image_zero_shot_state(model.image_prefix(images))
            z = model.projectors["vision"][0][0](h0)
            ln = model.towers["vision"].blocks[model.vision_depths[0]].ln_1
            # distance from beta in units of gamma (a unit-variance token has rms 1)
            out[init] = (((ln(z) - ln.bias) / ln.weight) ** 2).mean().sqrt()
    assert out["near_identity"] < 0.05, out
    assert out["default"] > 0.5, out


def test_near_identity_start_does_not_depend_on_the_seed(make_tiny_perl, images, tokens):
    """Every seed starts from (nearly) the same function; with default init the seeds differ."""
    spread = {}
    for init in ("default", "near_identity"):
        with torch.no_grad():
            a, b = (make_tiny_perl(seed=0, projector_init=init) for _ in range(2))
            b.load_projector_state_dict(make_tiny_perl(seed=1, projector_init=init)
                                        .projector_state_dict())
            spread[init] = max((a.encode_image(images) - b.encode_image(images)).abs().max(),
                               (a.encode_text(tokens) - b.encode_text(tokens)).abs().max())
    assert spread["near_identity"] < 0.1 * spread["default"], spread


def test_near_identity_trains_both_layers(make_tiny_perl, images, tokens):
    """Unlike a zero W2, W1 gets a nonzero gradient at the first step."""
    model = make_tiny_perl(projector_init="near_identity")
    model.logits(model.encode_image(images), model.encode_text(tokens)).logsumexp(-1).sum(
        ).backward()
    for name in ("vision", "text"):
        phi = model.projectors[name][0][0]
        assert phi.fc1.weight.grad.abs().sum() > 0 and phi.fc2.weight.grad.abs().sum() > 0


# ---- fit runs with each reading and init ---------------------------------------------------------
@pytest.mark.parametrize("reading,init,pairs", [("shared_plus_specific", "default", 3),
                                                ("specific_only", "default", 2),
                                                ("shared_plus_specific", "near_identity", 3)])
def test_fit_runs_with_each_reading(world, tiny_arch, tmp_path, one_thread, reading, init, pairs):
    from perl_core.train import build_model, fit, load_projectors, save_projectors

    cfg = TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                      inject_layer=2, num_steps=2, shots=2, epochs=1, batch_size=4, lr=1e-3,
                      device="cpu", eval_batch_size=64, variant="step",
                      variant_projectors=reading, projector_init=init, jacobian_samples=0)
    result = fit(cfg)
    assert result.num_trainable_parameters == pairs * TINY_UNIT
    assert ("vision.shared.fc1.weight" in result.projector_state) == (pairs == 3)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in result.metrics.values()
               if isinstance(v, float))
    # the saved file rebuilds the same model from its own config
    save_projectors(tmp_path / "p.safetensors", result)
    state, saved_cfg = load_projectors(tmp_path / "p.safetensors")
    assert saved_cfg.variant_projectors == reading and saved_cfg.projector_init == init
    build_model(saved_cfg).load_projector_state_dict(state)
