"""PerlModel, ThoughtProjector, perl_loss and build_perl on a tiny random CLIP (CPU, offline)."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import perl_core.factory as factory
from perl_core import (PerlModel, ThoughtProjector, TrainConfig, build_perl, build_perl_from_config,
                       perl_loss)
from perl_core.backbone import causal_mask, uses_quick_gelu
from perl_core.model import resolve_variant, scale_depths

PLACEMENTS = ("after_bos", "front")
TINY_UNIT = 5 * 64 + 1 + 5 * 32 + 1  # one projector pair on the tiny CLIP: 482


def _fp32_close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---- reference recurrence, written from notes/open_clip_injection.md §3 ------------------------
def ref_image(clip, phi, images, J, K):
    x = clip.visual._embeds(images)
    for blk in clip.visual.transformer.resblocks[:J]:
        x = blk(x)

    def upper(z):
        k = 0 if z is None else z.shape[1]
        y = x if k == 0 else torch.cat([z, x], dim=1)
        for blk in clip.visual.transformer.resblocks[J:]:
            y = blk(y)
        return y[:, k]

    h, zs = upper(None), []
    for _ in range(K):
        zs.append(phi(h).unsqueeze(1))
        h = upper(torch.cat(zs, 1))
    return clip.visual.ln_post(h) @ clip.visual.proj


def ref_text(clip, phi, text, J, K, where):
    x = clip.token_embedding(text) + clip.positional_embedding
    for blk in clip.transformer.resblocks[:J]:
        x = blk(x, attn_mask=clip.attn_mask)
    eos = text.argmax(-1)

    def upper(z):
        k = 0 if z is None else z.shape[1]
        if k == 0:
            y = x
        elif where == "front":
            y = torch.cat([z, x], dim=1)
        else:
            y = torch.cat([x[:, :1], z, x[:, 1:]], dim=1)
        mask = torch.full((y.shape[1], y.shape[1]), float("-inf")).triu_(1)
        for blk in clip.transformer.resblocks[J:]:
            y = blk(y, attn_mask=mask)
        return y[torch.arange(y.shape[0]), eos + k]

    h, zs = upper(None), []
    for _ in range(K):
        zs.append(phi(h).unsqueeze(1))
        h = upper(torch.cat(zs, 1))
    return clip.ln_final(h) @ clip.text_projection


# ---- parameter counts ----------------------------------------------------------------------
def test_projector_shape_and_count():
    phi = ThoughtProjector(768)
    assert sum(p.numel() for p in phi.parameters()) == 5 * 768 + 1
    assert phi(torch.randn(4, 768)).shape == (4, 768)
    low_rank = ThoughtProjector(64, rank=3)
    assert sum(p.numel() for p in low_rank.parameters()) == 3 * 64 + 2 * 64 * 3 + 3


def test_vitb16_counts_per_variant_and_modality():
    torch.manual_seed(0)
    model = build_perl("ViT-B-16-quickgelu", pretrained=None)
    assert uses_quick_gelu(model.clip)
    assert model.num_trainable_parameters() == 6402
    assert model.trainable_parameter_counts() == {"vision": 3841, "text": 2561, "total": 6402}
    assert model.vision_depths == model.text_depths == (7,)
    # the weights artifact of a ViT-B/16 run: 6,402 fp32 values, ~25 KB (the paper's 6K params)
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in model.projector_state_dict().items()})
    assert 6402 * 4 <= len(blob) < 6402 * 4 + 2048, len(blob)
    clip = model.clip
    expected = {  # the paper prints 6K / 6K / 6K / 32K / 26K / 83K; both readings of the
        # specific variants: tests/test_loop_readings.py
        "shared": 6402, "early": 6402, "deep": 6402,
        "step": (1 + 4) * 6402, "layer": (1 + 3) * 6402, "layerstep": (1 + 12) * 6402}
    for variant, n in expected.items():
        assert PerlModel(clip, variant=variant).num_trainable_parameters() == n, variant
    assert PerlModel(clip, variant="deep").vision_depths == (3, 7, 11)
    assert PerlModel(clip, variant="layer").text_depths == (7, 9, 11)
    assert PerlModel(clip, variant="early").vision_depths == (0,)
    assert PerlModel(clip, modality="vision").num_trainable_parameters() == 3841
    assert PerlModel(clip, modality="text").num_trainable_parameters() == 2561
    assert sum(p.numel() for p in clip.parameters() if p.requires_grad) == 0


# ---- step 0 is zero-shot CLIP ----------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_steps_equals_clip_for_every_J(make_tiny_perl, images, tokens, placement):
    for J in range(4):
        model = make_tiny_perl(inject_layer=J, text_placement=placement)
        clip = model.clip
        assert _fp32_close(model.encode_image(images, steps=0), clip.encode_image(images))
        assert _fp32_close(model.encode_text(tokens, steps=0), clip.encode_text(tokens))
        assert _fp32_close(model.encode_image_all_steps(images)[0], clip.encode_image(images))
        assert _fp32_close(model.encode_text_all_steps(tokens)[0], clip.encode_text(tokens))


@pytest.mark.parametrize("variant", ["deep", "layer", "layerstep", "step", "early"])
def test_zero_steps_equals_clip_for_every_variant(make_tiny_perl, images, tokens, variant):
    model = make_tiny_perl(variant=variant)
    assert _fp32_close(model.encode_image(images, steps=0), model.clip.encode_image(images))
    assert _fp32_close(model.encode_text(tokens, steps=0), model.clip.encode_text(tokens))


def test_causal_mask_matches_open_clip(make_tiny_perl):
    clip = make_tiny_perl().clip
    assert torch.equal(causal_mask(77, torch.device("cpu"), torch.float32), clip.attn_mask)


# ---- the recurrence ----------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_matches_reference_recurrence(make_tiny_perl, images, tokens, placement):
    model = make_tiny_perl(inject_layer=1, num_steps=3, text_placement=placement)
    clip, K = model.clip, 3
    with torch.no_grad():
        ref_v = ref_image(clip, model.projectors["vision"][0][0], images, 1, K)
        ref_t = ref_text(clip, model.projectors["text"][0][0], tokens, 1, K, placement)
        assert _fp32_close(model.encode_image(images), ref_v)
        assert _fp32_close(model.encode_text(tokens), ref_t)
        # and the readout is not at a thought token or at the wrong row
        assert not _fp32_close(model.encode_image(images), model.encode_image(images, steps=0),
                               1e-3)


def test_steps_change_output_and_all_steps_match(make_tiny_perl, images, tokens):
    model = make_tiny_perl(num_steps=3)
    with torch.no_grad():
        all_v, all_t = model.encode_image_all_steps(images), model.encode_text_all_steps(tokens)
        assert all_v.shape == (4, 3, 32) and all_t.shape == (4, 3, 32)
        for s in range(4):
            assert _fp32_close(all_v[s], model.encode_image(images, steps=s), 1e-6)
            assert _fp32_close(all_t[s], model.encode_text(tokens, steps=s), 1e-6)
        for s in range(1, 4):
            assert (all_v[s] - all_v[0]).abs().max() > 1e-3
            assert (all_t[s] - all_t[0]).abs().max() > 1e-3
        assert _fp32_close(model.encode_image(images), all_v[-1], 1e-6)  # default steps = K
        # the prefix seams give the same thing
        sv, st = model.image_prefix(images), model.text_prefix(tokens)
        assert _fp32_close(model.image_from_prefix(sv, all_steps=True), all_v, 1e-6)
        assert _fp32_close(model.text_from_prefix(st, tokens, steps=2), all_t[2], 1e-6)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_text_causality_with_thought_tokens(make_tiny_perl, tokens, placement):
    """EOS (and so the embedding) cannot see tokens after it, even with k thoughts inserted."""
    model = make_tiny_perl(num_steps=3, text_placement=placement)
    eos = tokens.argmax(-1)
    later = tokens.clone()
    g = torch.Generator().manual_seed(0)
    for i, e in enumerate(eos.tolist()):
        later[i, e + 1:] = torch.randint(1, 49000, (77 - e - 1,), generator=g)  # < EOT id
    assert torch.equal(later.argmax(-1), eos)
    earlier = tokens.clone()
    earlier[:, 1] = 320  # a word before EOS
    with torch.no_grad():
        base = model.encode_text_all_steps(tokens)
        assert _fp32_close(model.encode_text_all_steps(later), base, 1e-6)
        assert (model.encode_text_all_steps(earlier) - base).abs().max() > 1e-4


def test_text_placement_matters_vision_unaffected(make_tiny_perl, images, tokens):
    after = make_tiny_perl(text_placement="after_bos")
    front = make_tiny_perl(text_placement="front")
    with torch.no_grad():
        assert _fp32_close(after.encode_text(tokens, 0), front.encode_text(tokens, 0))
        assert (after.encode_text(tokens) - front.encode_text(tokens)).abs().max() > 1e-4
        assert _fp32_close(after.encode_image(images), front.encode_image(images))


def test_logits(make_tiny_perl, images, tokens):
    model = make_tiny_perl()
    v, t = model.encode_image(images), model.encode_text(tokens)
    logits = model.logits(v, t)
    expected = model.clip.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    assert logits.shape == (3, 3) and _fp32_close(logits, expected)
    per_step = model.logits(model.encode_image_all_steps(images),
                            model.encode_text_all_steps(tokens))
    assert per_step.shape == (3, 3, 3) and _fp32_close(per_step[-1], logits, 1e-5)


# ---- training: gradients reach only the projectors --------------------------------------------
def test_gradients_only_to_projectors_backbone_unchanged(make_tiny_perl, images, tokens):
    model = make_tiny_perl(num_steps=2)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    start = model.projector_state_dict()
    model.train()
    assert model.projectors.training and not model.clip.training
    assert not any(m.training for m in model.clip.modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 2])
    for _ in range(3):
        sv = model.image_prefix(images)
        v = model.image_from_prefix(sv, all_steps=True)
        t = model.encode_text(tokens)
        loss, parts = perl_loss(model.logits(v[-1], t), labels, v[0], v[-1], anchor_weight=1.0)
        opt.zero_grad()
        loss.backward()
        for name, p in model.projectors.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in model.clip.parameters())
        opt.step()
    assert set(parts) == {"ce", "anchor"} and not parts["ce"].requires_grad
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    after = model.projector_state_dict()
    assert any(not torch.equal(after[k], start[k]) for k in start)


def test_perl_loss_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vK = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos 1 and 0 -> anchor 0.5
    loss, parts = perl_loss(logits, labels, v0, vK, anchor_weight=2.0)
    ce = F.cross_entropy(logits, labels)
    assert torch.isclose(parts["ce"], ce) and torch.isclose(parts["anchor"], torch.tensor(0.5))
    assert torch.isclose(loss, ce + 1.0)
    with pytest.raises(ValueError, match="v0"):
        perl_loss(logits, labels, v0, vK[:1], 1.0)


def test_projector_state_roundtrip_and_mismatch(make_tiny_perl, images):
    a, b = make_tiny_perl(seed=0), make_tiny_perl(seed=0)
    torch.manual_seed(5)
    b2 = PerlModel(b.clip, inject_layer=2, num_steps=2)  # same CLIP, other projectors
    b2.load_projector_state_dict(a.projector_state_dict())
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b2.encode_image(images))
    with pytest.raises(ValueError, match="variant='step'"):
        PerlModel(b.clip, inject_layer=2, num_steps=2, variant="step").load_projector_state_dict(
            a.projector_state_dict())


# ---- variants ---------------------------------------------------------------------------------
def test_variant_resolution_and_depth_scaling():
    assert scale_depths((3, 7, 11), 12) == (3, 7, 11)
    assert scale_depths((3, 7, 11), 4) == (1, 2, 3)
    assert scale_depths((7, 9, 11), 4) == (2, 3)
    assert scale_depths((7, 9, 11), 6) == (3, 4, 5)
    spec = resolve_variant("layerstep", 7, None, 12)
    assert (spec.depths, spec.layer_specific, spec.step_specific) == ((7, 9, 11), True, True)
    spec = resolve_variant("deep", 7, None, 12)
    assert (spec.depths, spec.layer_specific, spec.step_specific) == ((3, 7, 11), False, False)
    assert resolve_variant("layer", 7, (1, 3), 4).depths == (1, 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_variant("layer", 7, (3, 1), 4)
    with pytest.raises(ValueError, match="only applies to the multi-depth"):
        resolve_variant("shared", 2, (1, 2), 4)
    with pytest.raises(ValueError, match="variant='bogus'"):
        resolve_variant("bogus", 2, None, 4)


def test_variant_counts_and_outputs(make_tiny_perl, images, tokens):
    K, depths = 2, (1, 2, 3)
    # the specific variants keep the shared pair (default variant_projectors)
    expected = {"shared": 1, "early": 1, "deep": 1, "step": 1 + K, "layer": 1 + 3,
                "layerstep": 1 + 3 * K}
    outputs = {}
    for variant, units in expected.items():
        kwargs = {"inject_layers": depths} if variant in ("deep", "layer", "layerstep") else {}
        model = make_tiny_perl(num_steps=K, variant=variant, **kwargs)
        assert model.num_trainable_parameters() == units * TINY_UNIT, variant
        with torch.no_grad():
            v, t = model.encode_image(images), model.encode_text(tokens)
        assert torch.isfinite(v).all() and torch.isfinite(t).all()
        outputs[variant] = (v, t)
    step = make_tiny_perl(num_steps=K, variant="step")
    assert len(step.projectors["vision"][0]) == K and len(step.projectors["text"][0]) == K
    assert len(make_tiny_perl(variant="layerstep", inject_layers=depths).projectors["text"]) == 3
    names = list(outputs)
    for i, a in enumerate(names):  # every variant computes something different
        for b in names[i + 1:]:
            assert (outputs[a][0] - outputs[b][0]).abs().max() > 1e-4, (a, b)
    with pytest.raises(ValueError, match="one projector per step"):
        step.encode_image(images, steps=K + 1)


def test_single_depth_multidepth_reduces_to_perl(make_tiny_perl, images, tokens):
    perl = make_tiny_perl(inject_layer=2)
    deep = make_tiny_perl(variant="deep", inject_layers=(2,))
    deep.load_projector_state_dict(perl.projector_state_dict())
    with torch.no_grad():
        assert _fp32_close(deep.encode_image(images), perl.encode_image(images), 1e-6)
        assert _fp32_close(deep.encode_text(tokens), perl.encode_text(tokens), 1e-6)


def test_multidepth_resets_thoughts_at_deeper_depths(make_tiny_perl, images):
    """layer variant at (1, 2): the depth-2 projector matters (its tokens overwrite the
    thoughts)."""
    model = make_tiny_perl(variant="layer", inject_layers=(1, 2))
    with torch.no_grad():
        before = model.encode_image(images)
        # (a uniform shift would be a no-op: the blocks' pre-LN removes the mean)
        model.projectors["vision"][1][0].fc2.bias.add_(torch.randn(64))
        assert (model.encode_image(images) - before).abs().max() > 1e-4
        deeper_only = make_tiny_perl(variant="layer", inject_layers=(1, 2))
        deeper_only.load_projector_state_dict(model.projector_state_dict())
        deeper_only.projectors["vision"][0][0].fc2.bias.add_(torch.randn(64))  # depth 1 matters
        assert (deeper_only.encode_image(images) - model.encode_image(images)).abs().max() > 1e-4


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_single_modality_other_side_zero_shot(make_tiny_perl, images, tokens, modality):
    model = make_tiny_perl(modality=modality)
    assert list(model.projectors) == [modality]
    assert model.num_trainable_parameters() == (321 if modality == "vision" else 161)
    with torch.no_grad():
        v_changed = (model.encode_image(images) - model.clip.encode_image(images)).abs().max()
        t_changed = (model.encode_text(tokens) - model.clip.encode_text(tokens)).abs().max()
        assert (v_changed > 1e-4) == (modality == "vision")
        assert (t_changed > 1e-4) == (modality == "text")
        assert model.encode_text_all_steps(tokens).shape == (3, 3, 32)


def test_text_inject_layer_may_differ(make_tiny_perl, images, tokens):
    model = make_tiny_perl(inject_layer=1, text_inject_layer=3)
    assert model.vision_depths == (1,) and model.text_depths == (3,)
    assert _fp32_close(model.encode_text(tokens, 0), model.clip.encode_text(tokens))
    assert model.text_prefix(tokens).shape == (3, 8, 32)  # cut after the last EOS


# ---- errors -----------------------------------------------------------------------------------
def test_clear_errors_for_bad_settings(make_tiny_perl, tiny_clip_cfg):
    with pytest.raises(ValueError, match=r"inject_layer=4 is outside \[0, 4\)"):
        make_tiny_perl(inject_layer=4)
    with pytest.raises(ValueError, match=r"text_inject_layer=-2"):
        make_tiny_perl(text_inject_layer=-2)
    with pytest.raises(ValueError, match="variant='wide'"):
        make_tiny_perl(variant="wide")
    with pytest.raises(ValueError, match="text_placement='middle'"):
        make_tiny_perl(text_placement="middle")
    with pytest.raises(ValueError, match="text_inject_layer=3 applies to single-depth"):
        make_tiny_perl(variant="deep", text_inject_layer=3)
    model = make_tiny_perl()
    with pytest.raises(ValueError, match="steps=-1"):
        model.encode_image(torch.zeros(1, 3, 32, 32), steps=-1)
    with pytest.raises(ValueError, match=r"tokens must be \(C, 77\)"):
        model.encode_text(torch.zeros(2, 10, dtype=torch.long))


def test_unsupported_architectures_refused(tiny_clip_cfg):
    cfg = dict(tiny_clip_cfg)
    custom = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    with pytest.raises(TypeError, match="CustomTextCLIP"):
        PerlModel(custom, inject_layer=1)
    with pytest.raises(ValueError, match="CustomTextCLIP"):
        build_perl(model_cfg={**cfg, "custom_text": True}, inject_layer=1)
    avg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "pool_type": "avg"}}
    with pytest.raises(ValueError, match="pool_type='avg'"):
        build_perl(model_cfg=avg, inject_layer=1)
    last = {**cfg, "text_cfg": {**cfg["text_cfg"], "pool_type": "last"}}
    with pytest.raises(ValueError, match="text_pool_type='last'"):
        build_perl(model_cfg=last, inject_layer=1)


# ---- checkpoints and the factory --------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_roundtrip(make_tiny_perl, tiny_clip_cfg, tmp_path, images, tokens,
                                    suffix):
    src = make_tiny_perl(seed=3)
    path = tmp_path / f"tiny{suffix}"
    sd = {k: v.contiguous() for k, v in src.clip.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = make_tiny_perl(seed=9, pretrained=str(path))
    loaded.load_projector_state_dict(src.projector_state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), src.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), src.encode_text(tokens))
    assert not loaded.clip.training and loaded.num_trainable_parameters() == TINY_UNIT


def test_checkpoint_errors_name_the_file(make_tiny_perl, tiny_clip_cfg, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        make_tiny_perl(pretrained=str(missing))
    wider = {**tiny_clip_cfg, "vision_cfg": {**tiny_clip_cfg["vision_cfg"], "width": 96}}
    other = tmp_path / "other.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**wider).state_dict().items()},
              str(other))
    with pytest.raises(ValueError, match="other.safetensors"):
        make_tiny_perl(pretrained=str(other))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        make_tiny_perl(pretrained=str(corrupt))
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        make_tiny_perl(pretrained="not-a-tag")


def test_quickgelu_guard(make_tiny_perl, tiny_clip_cfg, tmp_path):
    # OpenAI's tag on a GELU arch is refused before any download
    with pytest.raises(ValueError, match="QuickGELU"):
        build_perl("ViT-B-16", pretrained="openai")
    gelu = {**tiny_clip_cfg, "quick_gelu": False}
    path = tmp_path / "gelu.safetensors"
    sd = open_clip.CLIP(**gelu).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.warns(UserWarning, match="QuickGELU"):
        model = build_perl(model_cfg=gelu, pretrained=str(path), inject_layer=1)
    assert not uses_quick_gelu(model.clip)
    quick = tmp_path / "quick.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(quick))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_perl(model_cfg=tiny_clip_cfg, pretrained=str(quick), inject_layer=1)


def test_embedded_resolution(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="arch='perl-tiny'"):
        build_perl("ViT-B-16-quickgelu", pretrained="embedded")
    monkeypatch.setattr(factory, "EMBEDDED_WEIGHTS", tmp_path / "perl-tiny.safetensors")
    with pytest.raises(FileNotFoundError, match="perl-tiny.safetensors"):
        build_perl("perl-tiny", pretrained="embedded")


@pytest.mark.skipif(not factory.EMBEDDED_WEIGHTS.is_file(), reason="embedded asset not built yet")
def test_embedded_builds():
    model = build_perl("perl-tiny", pretrained="embedded", inject_layer=1, num_steps=1)
    size = model.image_size
    with torch.no_grad():
        v = model.encode_image(torch.zeros(1, 3, size, size))
    assert torch.isfinite(v).all()


def test_build_from_config(tiny_arch, images, tokens):
    cfg = TrainConfig(arch=tiny_arch, pretrained="", inject_layer=1, text_inject_layer=-1,
                      num_steps=3, variant="layer", inject_layers=(1, 3), modality="vision",
                      device="cpu")
    model = build_perl_from_config(cfg)
    assert model.vision_depths == model.text_depths == (1, 3)
    assert model.num_trainable_parameters() == (1 + 2) * 321  # shared + 2 layer-specific
    assert build_perl_from_config(cfg.replace(variant_projectors="specific_only")
                                  ).num_trainable_parameters() == 2 * 321
    assert model.num_steps == 3 and model.context_length == 77 and model.image_size == 32
    assert model.tokenize(["a cat"]).shape == (1, 77)
    cfg = cfg.replace(variant="shared", inject_layers=(), text_inject_layer=2, modality="both")
    model = build_perl_from_config(cfg, device="cpu")
    assert model.vision_depths == (1,) and model.text_depths == (2,)


# ---- precision ---------------------------------------------------------------------------------
def test_bf16_autocast_close_to_fp32(make_tiny_perl, images, tokens):
    model = make_tiny_perl(num_steps=2)
    with torch.no_grad():
        v32, t32 = model.encode_image(images), model.encode_text(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16 = model.encode_image_all_steps(images)
        t16 = model.encode_text(tokens)
        loss, _ = perl_loss(model.logits(v16[-1], t16), torch.tensor([0, 1, 2]), v16[0], v16[-1],
                            1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.projectors.parameters())
    assert F.cosine_similarity(v16[-1].float(), v32, dim=-1).min() > 0.99
    assert F.cosine_similarity(t16.float(), t32, dim=-1).min() > 0.99
