"""The embedded tiny CLIP: config shape, committed weights, zero-shot far above chance,
pretraining data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from perl_core import pretrain as P
from perl_core.data import synthetic as syn

CONFIG_DIR = Path(P.__file__).resolve().parent / "model_configs"
WEIGHTS = Path(P.__file__).resolve().parent / "assets" / "perl-tiny.safetensors"
# Measured on the committed weights (MODEL_CARD.md) with 8 test images per class of the seed-0
# world; the floors leave a wide margin for other torch builds and BLAS summation orders.
# x chance, base and novel (measured novel 7.2, 7.0, 4.1)
FLOOR = {"ToyShapes": 4.0, "ToyPatterns": 4.0, "ToyCounts": 2.5}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if "perl-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    m = open_clip.create_model("perl-tiny", pretrained=None, device="cpu")
    open_clip.load_checkpoint(m, str(WEIGHTS), strict=True, weights_only=True)
    return m.eval()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_world")
    syn.generate_world(root, seed=0, datasets=list(syn.BASE2NOVEL),
                       sizes={"train": 0, "val": 0, "test": 8})
    return root


def test_config_keeps_vit_b16_block_structure():
    cfg = json.loads((CONFIG_DIR / "perl-tiny.json").read_text())
    assert cfg["quick_gelu"] is True
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert v["layers"] == t["layers"] == 12  # the paper's J=7, K=4 run unchanged
    assert v["image_size"] == syn.IMAGE_SIZE and v["image_size"] % v["patch_size"] == 0
    assert t["vocab_size"] == 49408  # open_clip's BPE tokenizer
    assert "pool_type" not in v and "pool_type" not in t  # tok / argmax, as ViT-B/16


def test_weights_load_and_metadata(model):
    assert WEIGHTS.is_file(), "perl_core/assets/perl-tiny.safetensors is missing"
    assert WEIGHTS.stat().st_size < 12e6
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["arch"] == "perl-tiny" and meta["dtype"] == "float16"
    config = json.loads((CONFIG_DIR / "perl-tiny.json").read_text())
    assert json.loads(meta["model_config"]) == config
    assert int(meta["steps"]) > 0 and "zero_shot" in meta and "held_out" in meta
    # stored fp16, loaded into the fp32 model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model.visual.transformer.resblocks) == len(model.transformer.resblocks) == 12
    assert model.context_length == 16 and model.visual.image_size == (48, 48)


def test_zero_shot_far_above_chance(model, small_world):
    res = P.evaluate_zero_shot(model, small_world, syn.BASE2NOVEL, template="a photo of a {}.")
    for name, floor in FLOOR.items():
        r = res[name]
        assert r["novel"] >= floor * r["chance_novel"], (name, r)
        assert r["base"] >= floor * r["chance_base"], (name, r)


def test_zero_shot_plain_open_clip_agrees(model, small_world):
    """The same number computed inline with encode_image / encode_text only."""
    split = json.loads(syn.split_path(small_world, "ToyShapes").read_text())["test"]
    d = syn.toy_dataset("ToyShapes")
    m = d.num_base()
    novel = [it for it in split if it[1] >= m]
    img_root = syn.split_path(small_world, "ToyShapes").parent / "images"
    _, _, preprocess = open_clip.create_model_and_transforms("perl-tiny", pretrained=None)
    from PIL import Image

    x = torch.stack([preprocess(Image.open(img_root / rel).convert("RGB")) for rel, _, _ in novel])
    y = torch.tensor([it[1] - m for it in novel])
    with torch.no_grad():
        t = model.encode_text(open_clip.tokenize([f"a photo of a {c}." for c in d.classnames()[m:]],
                                                 context_length=16))
        i = model.encode_image(x)
    pred = (torch.nn.functional.normalize(i, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T)
    acc = 100 * (pred.argmax(1) == y).float().mean().item()
    ref = P.evaluate_zero_shot(model, small_world, ["ToyShapes"])["ToyShapes"]["novel"]
    assert abs(acc - ref) < 2.0  # the eval transform at 48 px is the identity up to resampling


def test_pretraining_never_shows_held_out_compositions():
    rng = np.random.default_rng(0)
    scenes = [P.sample_scene(rng) for _ in range(3000)]
    assert not any(syn.is_held_out(s) for s in scenes)
    held = [set(syn.classname(s).split()) for v in syn.held_out_scenes().values() for s in v]
    alone = set()
    for s in scenes:
        for _ in range(3):
            _, claim = P.sample_caption(s, rng)
            words = {w for k, w in claim if k != "style"}
            assert not any(h <= words for h in held), (s, claim)
            if len(words) == 1:
                alone |= words
    # every word of every class name is also captioned alone, so each word is grounded by itself
    assert {w for d in syn.DATASETS for n in d.classnames() for w in n.split()} <= alone


def test_caption_truth_and_loss():
    s = syn.Scene("count", count="two", shape="circle", colour="red", style="sketch")
    attrs = P.scene_attributes(s)
    assert ("shapes", "circles") in attrs and ("style", "sketch") in attrs
    rng = np.random.default_rng(1)
    for _ in range(200):
        text, claim = P.sample_caption(s, rng)
        assert claim <= attrs and all(w in text for _, w in claim if _ != "style")
    # with one positive per row the loss is CLIP's symmetric InfoNCE
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    ours = P.multi_positive_clip_loss(img, txt, torch.tensor(10.0), torch.eye(8, dtype=torch.bool))
    ref = open_clip.ClipLoss()(img, txt, torch.tensor(10.0))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_pretrain_command_smoke(tmp_path):
    out = tmp_path / "w.safetensors"
    world = tmp_path / "world"
    syn.generate_world(world, datasets=list(syn.BASE2NOVEL),
                       sizes={"train": 0, "val": 0, "test": 1})
    model, info = P.pretrain(steps=2, batch_size=8, seed=0, pool_size=32, lr=1e-3,
                             weight_decay=0.1, warmup=1, world_root=None, eval_every=0,
                             max_minutes=None, log=lambda m: None)
    P.save_weights(model, out, {"arch": "perl-tiny", "steps": info["steps"]})
    again, _ = P.pretrain(steps=2, batch_size=8, seed=0, pool_size=32, lr=1e-3, weight_decay=0.1,
                          warmup=1, world_root=None, eval_every=0, max_minutes=None,
                          log=lambda m: None)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic for a seed
    loaded = P.load_tiny_clip(out)
    assert P.evaluate_zero_shot(loaded, world, ["ToyCounts"])["ToyCounts"]["chance_novel"] > 0
    with pytest.raises(FileNotFoundError, match="perl_core.pretrain"):
        P.load_tiny_clip(tmp_path / "missing.safetensors")


def test_no_false_random_init_notice_when_weights_are_loaded(caplog):
    """open_clip logs "No pretrained weights loaded" for every pretrained=None build; the
    factory drops that line when its own checkpoint load follows, and only then."""
    from perl_core.factory import create_clip

    with caplog.at_level("WARNING"):
        create_clip("perl-tiny", "embedded")
    assert "No pretrained weights loaded" not in caplog.text
    with caplog.at_level("WARNING"):
        create_clip("perl-tiny", None)  # really random: the notice is true and stays
    assert "No pretrained weights loaded" in caplog.text
