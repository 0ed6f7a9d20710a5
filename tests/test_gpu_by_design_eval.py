"""Issue 19, half B, on the CPU: defects that only a GPU would show, seen through what the CPU can
observe (profiler op lists, dispatched ops, dtypes, recorded DataLoader arguments, a CUDA check
that says "no device")."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from perl_core import metrics as M
from perl_core.cache import FeatureCache, cached_batches, restore
from perl_core.config import TrainConfig
from perl_core.evaluate import MAX_AUTO_WORKERS, resolve_num_workers
from perl_core.factory import cast_frozen_matmul_weights, frozen_matmul_dtype, wants_bf16_frozen

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield


def _batch(seed: int, steps: int = 3, n: int = 6, c: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    image = torch.randn(steps, n, d, generator=g)
    text = torch.randn(steps, c, d, generator=g)
    return logits, labels, image, text


# --- (1) eval metrics: no host sync per batch ---


def test_metric_update_has_no_host_sync_and_matches_the_reference():
    acc = M.StepMetricAccumulator(num_classes=5)
    b1, b2 = _batch(1), _batch(2)
    acc.update(b1[0], b1[1], image_steps=b1[2], text_steps=b1[3])  # warm (lazy state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        acc.update(b2[0], b2[1], image_steps=b2[2], text_steps=b2[3])
    ops = {e.key for e in prof.key_averages()}
    assert not ops & set(SYNC_OPS), sorted(ops & set(SYNC_OPS))

    out = acc.compute()
    logits = torch.cat([b1[0], b2[0]], dim=1)
    labels = torch.cat([b1[1], b2[1]])
    image = torch.cat([b1[2], b2[2]], dim=1)
    for k in range(3):  # the public per-batch functions on the whole set: the old numbers
        assert out[f"acc_step{k}"] == pytest.approx(M.accuracy(logits[k], labels), rel=1e-6)
        assert out[f"confidence_step{k}"] == pytest.approx(
            M.mean_confidence(logits[k], labels), rel=1e-6)  # fp32 mean
        assert out[f"brier_step{k}"] == pytest.approx(M.brier_score(logits[k], labels), rel=1e-6)
        assert out[f"kl_step{k}"] == pytest.approx(M.kl_drift(logits[0], logits[k]), abs=1e-6)
    assert out["anchor_cos"] == pytest.approx(M.anchor_cosine(image[0], image[-1]), rel=1e-6)
    assert out["n"] == 12.0
    ref = M.drift_group_stats(M.kl_divergence(logits, logits[:1]),
                              M.correct(logits, labels))
    assert {k: out[k] for k in ref} == pytest.approx(ref, rel=1e-12)
    names = list("abcde")
    assert acc.per_class(names) == pytest.approx(M.per_class_accuracy(logits[-1], labels, names))


def test_metric_labels_are_still_checked():
    acc = M.StepMetricAccumulator(num_classes=5)
    logits, labels, _, _ = _batch(3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        acc.update(logits, labels + 5)


# --- (2) DataLoader workers ---


def test_auto_workers_follow_the_cpu_share():
    assert resolve_num_workers(-1, "cpu", cpu_share=8) == 0  # compute already uses the cores
    assert resolve_num_workers(-1, "cuda", cpu_share=4) == 4
    assert resolve_num_workers(-1, "cuda", cpu_share=0.5) == 1
    assert resolve_num_workers(-1, "cuda", cpu_share=64) == MAX_AUTO_WORKERS
    assert resolve_num_workers(3, "cuda", cpu_share=1) == 3  # an explicit count is kept
    with pytest.raises(ValueError, match="num_workers=-2"):
        resolve_num_workers(-2, "cpu")
    assert TrainConfig().num_workers == -1


def test_trial_workers_from_ray_share_leave_the_hash(monkeypatch):
    from pipeline import trainable

    monkeypatch.setattr(trainable, "ray_cpu_share", lambda: 3.0)
    cfg = TrainConfig(dataset="ToyShapes")
    out = trainable.with_trial_workers(cfg, torch.device("cuda"))
    assert out.num_workers == 3 and out.config_hash() == cfg.config_hash()
    assert trainable.with_trial_workers(cfg, torch.device("cpu")).num_workers == 0


def test_training_loader_is_built_once_and_persistent(monkeypatch, world, tiny_arch):
    import perl_core.evaluate as E
    import perl_core.train as T

    made = []
    real = T.DataLoader

    def recording(*a, **k):
        made.append(k)
        return real(*a, **k)

    monkeypatch.setattr(T, "DataLoader", recording)
    # resolve 'auto' to one worker as on a GPU, without a GPU (the device stays the CPU)
    monkeypatch.setattr(E, "resolve_num_workers", lambda n, device, share=None: 1)
    cfg = TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                      inject_layer=2, num_steps=1, shots=2, epochs=2, batch_size=4,
                      device="cpu", eval_batch_size=64, jacobian_samples=0)
    T.fit(cfg, progress=False)
    train_loaders = [k for k in made if "batch_sampler" in k]
    assert len(train_loaders) == 1, made  # one loader for both epochs
    assert train_loaders[0]["persistent_workers"] is True
    assert train_loaders[0]["num_workers"] == 1


def test_every_loader_pins_host_memory_on_cuda_only():
    """One rule for the training, evaluation and cache-miss loaders: pinned pages make the
    batch's non_blocking copy asynchronous, on CUDA only (pinning on a CPU run only costs)."""
    from perl_core.evaluate import loader_options

    assert loader_options(0, torch.device("cuda")) == {
        "num_workers": 0, "pin_memory": True, "persistent_workers": False}
    assert loader_options(2, torch.device("cpu")) == {
        "num_workers": 2, "pin_memory": False, "persistent_workers": True}
    assert loader_options(-1, torch.device("cpu"))["num_workers"] == 0


def test_cached_evaluation_builds_its_loaders_with_the_shared_options(monkeypatch, world,
                                                                      tiny_arch, tmp_path):
    import perl_core.cache as C
    import perl_core.evaluate as E
    from perl_core import build_perl_from_config
    from perl_core.protocol import resolve_task

    seen = []
    real = E.loader_options

    def recording(num_workers, device):
        seen.append(str(device))
        return real(num_workers, device)

    monkeypatch.setattr(E, "loader_options", recording)
    cfg = TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                      inject_layer=2, num_steps=1, shots=2, device="cpu", eval_batch_size=64,
                      jacobian_samples=0)
    model = build_perl_from_config(cfg)
    task = resolve_task(cfg)
    es = task.evalsets[0]
    C.evaluate_cached(model, es.items, es.classnames, es.dataset, cfg,
                      C.FeatureCache(str(tmp_path / "c")), split="test")
    assert seen and set(seen) == {"cpu"}  # the cache-miss loader went through the one rule


def test_the_bench_measures_both_precisions_on_cuda_only():
    from perl_core.bench import precisions_for

    assert precisions_for(torch.device("cuda")) == ("fp32", "bf16")
    assert precisions_for(torch.device("cpu")) == ("fp32",)


# --- (3) feature cache: read ahead, upcast on the device ---


def test_cached_batches_read_ahead_in_a_thread(tmp_path):
    cache = FeatureCache(str(tmp_path), dtype=torch.float16)
    keys = [f"k{i}" for i in range(4)]
    for i, k in enumerate(keys):
        cache.put(k, {"prefix": torch.full((2, 3), float(i)), "h0": torch.ones(2)})
    threads = []
    real = cache.read

    def read(key, pin=False):
        threads.append(threading.current_thread().name)
        return real(key, pin)

    cache.read = read  # type: ignore[method-assign]
    gen = cached_batches(cache, keys, lambda w: iter(()), lambda i: None, lambda b: {},
                         device="cpu")
    first = next(gen)
    # the next blob is read while the consumer holds the first, without being asked for (the
    # read-ahead thread may not have started yet on a loaded machine: wait for it, bounded)
    deadline = time.monotonic() + 10.0
    while len(threads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(threads) == 2  # the current blob and the next one
    out = [first, *gen]
    assert all(name.startswith("feature-cache-read") for name in threads)
    assert [float(f["prefix"][0, 0]) for f in out] == [0.0, 1.0, 2.0, 3.0]
    assert all(f["prefix"].dtype == torch.float32 for f in out)  # back to the computed dtype


class _CopyLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            self.copies.append((args[0].device.type, args[0].dtype,
                                kwargs.get("device", args[0].device), kwargs.get("dtype")))
        return func(*args, **kwargs)


def test_restore_copies_the_storage_dtype_then_upcasts_on_the_device(tmp_path):
    cache = FeatureCache(str(tmp_path), dtype=torch.float16)
    cache.put("k", torch.randn(4, 4))
    blob = cache.read("k")
    with _CopyLog() as log:
        x = restore(blob, torch.device("meta"))
    assert x.device.type == "meta" and x.dtype == torch.float32
    # first the fp16 bytes leave the CPU, then the cast runs on the device
    assert log.copies[0][:2] == ("cpu", torch.float16) and log.copies[0][3] in (None,
                                                                               torch.float16)
    assert log.copies[-1][0] == "meta" and log.copies[-1][3] == torch.float32


# --- (4) a bf16 copy of the frozen CLIP ---


def test_frozen_bf16_copy_matches_autocast(make_tiny_perl):
    import copy

    model = make_tiny_perl().eval()
    cast = copy.deepcopy(model)
    cast_frozen_matmul_weights(cast.clip)
    assert frozen_matmul_dtype(cast.clip) == torch.bfloat16
    assert cast.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert cast.clip.logit_scale.dtype == torch.float32  # an exact scale: never rounded
    assert cast.clip.token_embedding.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in cast.projectors.parameters())  # fp32 masters
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(["a photo of a cat.", "a dog"])
    prev = torch.backends.mha.get_fastpath_enabled()
    try:
        # CPU autocast does not block MHA's fused fast path when every dtype matches (CUDA's
        # does): off, the two are the same computation
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = model.encode_image_all_steps(x), cast.encode_image_all_steps(x)
            ta, tb = model.encode_text_all_steps(tokens), cast.encode_text_all_steps(tokens)
        assert torch.equal(a, b) and torch.equal(ta, tb)
        torch.backends.mha.set_fastpath_enabled(True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            b = cast.encode_image_all_steps(x)
        assert torch.allclose(a.float(), b.float(), atol=0.05 * a.float().abs().max().item())
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def test_build_model_casts_only_for_bf16_on_cuda_and_never_a_shared_clip(tiny_arch):
    from perl_core.train import build_model

    assert wants_bf16_frozen("bf16", "cuda") and not wants_bf16_frozen("bf16", "cpu")
    assert not wants_bf16_frozen("fp32", "cuda")
    cfg = TrainConfig(dataset="ToyShapes", arch=tiny_arch, pretrained="", inject_layer=2,
                      num_steps=1, device="cpu", precision="bf16")
    assert frozen_matmul_dtype(build_model(cfg).clip) == torch.float32  # CPU: as built
    shared = build_model(cfg.replace(precision="fp32")).clip
    m = build_model(cfg, clip=shared, frozen_dtype=torch.bfloat16)
    assert frozen_matmul_dtype(m.clip) == torch.bfloat16
    assert frozen_matmul_dtype(shared) == torch.float32  # fp32 trials may share it


# --- (5) the estimate's precision ---


def _bench_file(tmp_path, by_precision=None, precision="bf16"):
    def figures(s):
        return {"perl_eval_img_per_s_uncached": 100.0 * s, "perl_eval_img_per_s_cached": 200.0 * s,
                "train_step_s_by_classes": {"10": {"cached": 0.1 / s, "uncached": 0.2 / s}}}

    res = {"device": "cuda", "arch": "ViT-B-16-quickgelu", "precision": precision,
           **figures(1.0)}
    if by_precision:
        res["by_precision"] = {p: figures(s) for p, s in by_precision.items()}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(res))
    return str(path)


def test_estimate_uses_the_sweeps_precision_and_warns_on_a_mismatch(tmp_path):
    from pipeline import estimate as E

    cfg = TrainConfig(dataset="ToyShapes", arch="ViT-B-16-quickgelu", precision="fp32")
    work = E.Workload(train_images=40, train_classes=10, steps=10, eval_images=1000,
                      source="table")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "cell_workload", lambda c, s=None: work)
        only_bf16 = E.estimate([("a", cfg)], E.load_bench(_bench_file(tmp_path)))
        both = E.estimate([("a", cfg)], E.load_bench(
            _bench_file(tmp_path, {"fp32": 0.25, "bf16": 1.0}, precision="fp32")))
    assert any("precision fp32" in w and "bf16" in w for w in only_bf16.warnings)
    assert not any("precision" in w for w in both.warnings)
    # fp32 measured 4x slower: the fp32 cell's times are fp32's
    assert both.cells[0].eval_s == pytest.approx(only_bf16.cells[0].eval_s * 4)


# --- (7) the GPU check on a machine without one ---


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys, tmp_path):
    from pipeline import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "g.md")]) == gpu_check.EXIT_NO_CUDA == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g.md").exists()


def test_gpu_check_helpers():
    from pipeline import gpu_check

    class W:
        def __init__(self, msg, line):
            self.message, self.filename, self.lineno = msg, "/x/train.py", line

    recs = [W("called a synchronizing CUDA operation", 5)] * 3 + \
        [W("called a synchronizing CUDA operation", 9), W("something else", 1)]
    assert gpu_check.count_syncs(recs) == {"train.py:5": 3, "train.py:9": 1}
    block = gpu_check.markdown_block(
        {"fit": {"fp32": {"train_s": 1.0, "eval_s": 2.0, "acc": 50.0, "sync_total": 4,
                          "syncs": {"train.py:5": 3}}},
         "vit_step": {"fp32/100": {"precision": "fp32", "classes": 100, "step_s": 0.1,
                                   "allocated_mb": 900.0, "reserved_mb": 1200.0}},
         "ray": {"error": "RuntimeError: boom"}},
        {"date": "d", "device": "H100", "seconds": 3})
    assert "| fp32 | 1.00 | 2.00 | 50.00 | 4 | train.py:5 x3 |" in block
    assert "| fp32 | 100 | 0.1000 | 900 | 1,200 |" in block
    assert "**ray failed**: `RuntimeError: boom`" in block
