"""FeatureCache: cached == uncached (fp32, exactly) for evaluation and for a whole fit (training
views + zero-shot states + text), hits across trials that differ in K / lr without decoding any
image, resume with a cache, bf16 within tolerance, keys, size cap, corruption."""

from __future__ import annotations

import os
import time

import pytest
import torch

from perl_core.cache import FeatureCache, model_fingerprint
from perl_core.config import TrainConfig
from perl_core.protocol import resolve_task
from perl_core.train import Callback, build_model, evaluate_task, fit


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, datasets=["ToyShapes"], sizes={"train": 2, "val": 1, "test": 2})
    return root


@pytest.fixture
def cfg(world, tiny_arch):
    return TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                       inject_layer=2, num_steps=2, shots=1, epochs=0, batch_size=4,
                       device="cpu", eval_batch_size=16)


def test_cached_eval_equals_uncached_fp32_and_hits(cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg)
    task = resolve_task(cfg)
    ref, ref_pc = evaluate_task(model, task, cfg)
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    got, got_pc = evaluate_task(model, task, cfg, cache=cache)
    assert got == ref and got_pc == ref_pc
    assert cache.misses > 0  # (val and base share their class prompts: a hit or two already)
    misses, hits = cache.misses, cache.hits
    again, _ = evaluate_task(model, task, cfg, cache=cache)
    assert again == ref
    assert cache.misses == misses and cache.hits == hits + misses + hits
    # another K shares the prefixes
    other = build_model(cfg.replace(num_steps=1), clip=model.clip)
    evaluate_task(other, resolve_task(cfg), cfg.replace(num_steps=1), cache=cache)
    assert cache.misses == misses


def test_keys_change_with_j_dataset_template_weights(make_tiny_perl, tmp_path):
    cache = FeatureCache(str(tmp_path))
    m = make_tiny_perl(seed=0)
    imgs = torch.randn(2, 3, *([m.image_size] * 2 if isinstance(m.image_size, int)
                               else m.image_size))
    base = dict(dataset="A", split="test", transform="t", items=["a", "b"])
    cache.image_prefix(m, imgs, **base)
    assert cache.misses == 1
    cache.image_prefix(m, imgs, **base)
    assert cache.hits == 1
    cache.image_prefix(m, imgs, **{**base, "dataset": "B"})
    assert cache.misses == 2
    cache.image_prefix(make_tiny_perl(seed=0, inject_layer=1), imgs, **base)
    assert cache.misses == 3
    m2 = make_tiny_perl(seed=1)
    assert model_fingerprint(m2.clip) != model_fingerprint(m.clip)
    cache.image_prefix(m2, imgs, **base)
    assert cache.misses == 4
    tok = m.tokenize(["a photo of a cat"])
    cache.text_prefix(m, tok, dataset="A", template="x", classnames=["cat"])
    cache.text_prefix(m, tok, dataset="A", template="y", classnames=["cat"])
    assert cache.misses == 6
    cache.text_prefix(m, tok, dataset="A", template="y", classnames=["cat"])
    assert cache.hits == 2


def test_size_cap_evicts_oldest(tmp_path):
    cache = FeatureCache(str(tmp_path), max_bytes=10**9, dtype=torch.float32)
    for i in range(4):
        cache.put(f"k{i}", torch.zeros(1000))
        t = time.time() - 100 + i
        os.utime(cache._path(f"k{i}"), (t, t))
    one = os.path.getsize(cache._path("k0"))
    cache.max_bytes = 2 * one + 10
    assert cache.evict() == 2
    assert cache.get("k0") is None and cache.get("k1") is None
    assert cache.get("k3") is not None and cache.size_bytes() <= cache.max_bytes


def test_size_cap_holds_on_put_without_listing_every_write(tmp_path, monkeypatch):
    cache = FeatureCache(str(tmp_path), dtype=torch.float32)
    cache.put("k0", torch.zeros(1000))
    one = cache.size_bytes()
    cache.max_bytes = int(2.5 * one)
    scans = []
    real = cache._files
    monkeypatch.setattr(cache, "_files", lambda: scans.append(1) or real())
    for i in range(1, 6):
        cache.put(f"k{i}", torch.zeros(1000))
        assert cache.size_bytes() <= cache.max_bytes
    # scans: 5 by the assert above, 4 evictions (from the 3rd blob on), not one per write more
    assert len(scans) == 5 + 4
    assert cache.get("k5") is not None and cache.get("k0") is None


def test_truncated_blob_is_recomputed(tmp_path):
    cache = FeatureCache(str(tmp_path), dtype=torch.float32)
    x = torch.arange(100.0)
    cache.put("k", x)
    p = cache._path("k")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-37])
    assert cache.get("k") is None and cache.corrupt == 1
    calls = []
    y = cache.get_or_compute("k", lambda: calls.append(1) or x.clone())
    assert calls == [1] and torch.equal(y, x)
    assert torch.equal(cache.get("k"), x)
    assert not [f for f in os.listdir(os.path.dirname(p)) if ".tmp-" in f]


# ---- the model seam: a given h(0) skips the zero-shot pass, same numbers ------------------------


def test_zero_shot_state_seam(make_tiny_perl):
    m = make_tiny_perl(seed=0)
    imgs = torch.randn(3, 3, 32, 32)
    tok = torch.zeros(2, 77, dtype=torch.long)
    tok[:, 0] = 49406  # BOS, then a few tokens and EOS (the largest id) at different places
    tok[0, 1:4], tok[1, 1:3] = torch.tensor([5, 6, 49407]), torch.tensor([7, 49407])
    with torch.no_grad():
        pre = m.image_prefix(imgs)
        h0 = m.image_zero_shot_state(pre)
        assert torch.equal(m.image_from_prefix(pre, all_steps=True, h0=h0),
                           m.encode_image_all_steps(imgs))
        tpre = m.text_prefix(tok)
        th0 = m.text_zero_shot_state(tpre, tok)
        assert torch.equal(m.text_from_prefix(tpre, tok, h0=th0), m.encode_text(tok))
        # steps=0 needs h(0) only: the zero-shot embedding
        assert torch.equal(m.image_from_prefix(pre, steps=0, h0=h0), m.encode_image(imgs, 0))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 64\)"):
        m.image_from_prefix(pre, h0=h0[:2])


# ---- a whole fit through the cache ----------------------------------------------------------


def _world(root, train=4):
    from perl_core.data.synthetic import generate_world

    generate_world(root, datasets=["ToyShapes"], sizes={"train": train, "val": 1, "test": 2})
    return root


@pytest.fixture
def fit_cfg(tmp_path, tiny_arch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machine; tiny models do not gain from threads
    yield TrainConfig(dataset="ToyShapes", data_root=str(_world(tmp_path / "w")), arch=tiny_arch,
                      pretrained="", inject_layer=2, num_steps=2, shots=2, epochs=1,
                      batch_size=4, lr=1e-3, device="cpu", eval_batch_size=16)
    torch.set_num_threads(n)


def _same(a, b):
    assert a.projector_state.keys() == b.projector_state.keys()
    for k in a.projector_state:
        assert torch.equal(a.projector_state[k], b.projector_state[k]), k
    assert a.metrics == b.metrics and a.history == b.history and a.per_class == b.per_class


def test_fit_cached_equals_uncached_exactly_and_second_trial_decodes_nothing(fit_cfg, tmp_path):
    other = fit_cfg.replace(num_steps=1, lr=5e-3, anchor_weight=0.5, weight_decay=0.01)
    ref, ref_other = fit(fit_cfg), fit(other)
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    first = fit(fit_cfg, cache=cache)
    _same(first, ref)
    steps = len(ref.history)
    assert steps == 5  # 10 base classes x 2 shots, batch 4
    assert cache.counts["image/miss"] > steps and "image/hit" not in cache.counts
    # every image file gone: a hit must not decode, and every batch of this trial is a hit
    pngs = list((tmp_path / "w").rglob("*.png"))
    assert pngs
    for p in pngs:
        p.unlink()
    before = dict(cache.counts)
    got = fit(other, cache=cache)
    _same(got, ref_other)
    assert cache.counts["image/miss"] == before["image/miss"]
    assert cache.counts["image/hit"] == before["image/miss"]  # 5 train views + eval batches
    # prompts: the train classes (base, also read by the base and val evaluations) and novel
    assert cache.counts["text/miss"] == before["text/miss"] == 2
    assert cache.counts["text/hit"] == before["text/hit"] + 4
    # another seed draws other views (and another few-shot set): those need the images
    with pytest.raises(OSError, match="image not found"):
        fit(fit_cfg.replace(seed=2), cache=cache)


def test_train_view_key_follows_seed_and_augmentation(fit_cfg, tmp_path):
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    fit(fit_cfg.replace(epochs=1), cache=cache)
    n = cache.counts["image/miss"]
    fit(fit_cfg.replace(aug_scale_min=0.5), cache=cache)  # other crops: 5 new train views
    assert cache.counts["image/miss"] == n + 5
    fit(fit_cfg.replace(epochs=2), cache=cache)  # epoch 1 is shared, epoch 2 draws new seeds
    assert cache.counts["image/miss"] == n + 10


class _Stop(Exception):
    pass


class _StopAt(Callback):
    def on_step_end(self, step, logs):
        if step == 3:
            raise _Stop


def test_resume_with_cache_is_bitwise_identical(fit_cfg, tmp_path):
    from perl_core.checkpoint import DirCheckpoint

    cfg = fit_cfg.replace(epochs=2)
    whole = fit(cfg)
    cache = FeatureCache(str(tmp_path / "c"), dtype=torch.float32)
    ckpt = DirCheckpoint(tmp_path / "ck")
    with pytest.raises(_Stop):
        fit(cfg, callbacks=[_StopAt()], checkpoint=ckpt, checkpoint_every=2, cache=cache)
    assert cache.counts["image/miss"] == 3 and ckpt.load()["position"]["global_step"] == 2
    torch.manual_seed(123)
    resumed = fit(cfg, checkpoint=ckpt, checkpoint_every=2, cache=cache)
    _same(resumed, whole)
    assert cache.counts["image/hit"] == 1  # step 3 was computed (and stored) before the stop


def test_bf16_autocast_cached_close_to_uncached(fit_cfg, tmp_path):
    cfg = fit_cfg.replace(precision="bf16")
    ref = fit(cfg)
    cache = FeatureCache(str(tmp_path / "c"))  # fp16 storage, the default
    a = fit(cfg, cache=cache)
    b = fit(cfg, cache=cache)  # all hits: the same inputs as the trial that filled the cache
    _same(a, b)
    for k, v in ref.projector_state.items():
        assert torch.allclose(a.projector_state[k], v, rtol=0.05, atol=2e-3), k
    assert abs(a.metrics["train/loss"] - ref.metrics["train/loss"]) < 0.02 * ref.metrics[
        "train/loss"]
    # zero-shot accuracy agrees up to bf16 ties on this handful of test images
    assert abs(a.metrics["base/acc_step0"] - ref.metrics["base/acc_step0"]) <= 10.0
    # an fp32 store holds bf16 features exactly, read back as bf16: bitwise the uncached run
    _same(fit(cfg, cache=FeatureCache(str(tmp_path / "c32"), dtype=torch.float32)), ref)


def test_exists_many_lists_once_for_many_keys(tmp_path):
    cache = FeatureCache(str(tmp_path), dtype=torch.float32)
    keys = [f"k{i}" for i in range(40)]
    for k in keys[::3]:
        cache.put(k, torch.zeros(2))
    expected = [i % 3 == 0 for i in range(40)]
    assert cache.exists_many(keys) == expected
    assert cache.exists_many(keys[:5]) == expected[:5]
    mem = FeatureCache("memory://perl-cache-test", dtype=torch.float32)  # a non-local fs too
    mem.put("k1", torch.zeros(2))
    assert mem.exists_many(keys) == [k == "k1" for k in keys]
