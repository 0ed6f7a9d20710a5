"""Issue 19, the training path: GPU defects seen on CPU (device choice under Ray, precision and
TF32 flags, fp32 training logits, host syncs per step, out-of-memory classification).

No GPU is needed: Ray's GPU ids and torch.cuda's device queries are monkeypatched, bf16 runs as
CPU autocast, and host syncs are counted from the profiler's op list (`_local_scalar_dense`,
which every `.item()` / `float()` / `int()` of a tensor goes through).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import perl_core.train as train_mod
from perl_core import TrainConfig
from perl_core.cache import compute_id
from perl_core.factory import (check_precision, resolve_device, set_precision_flags,
                               tf32_flags)
from perl_core.model import PerlModel
from perl_core.train import Callback, fit

K = 2


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield


@pytest.fixture(autouse=True)
def _keep_tf32_flags():
    """fit and trial_device set the process-wide TF32 flags: give the next test torch's own."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cfg(world, tiny_arch) -> TrainConfig:
    # base2novel on ToyShapes: 10 base classes x 2 shots = 20 images, 5 steps of 4
    return TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                       inject_layer=2, num_steps=K, shots=2, epochs=1, batch_size=4, lr=1e-3,
                       device="cpu", eval_batch_size=64, num_workers=0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as on a node with one GPU of the given (name, capability)."""
    def install(name: str = "NVIDIA A100-SXM4-80GB", capability: tuple[int, int] = (8, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None: capability)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: capability >= (8, 0)
                            or including_emulation)  # torch's default counts emulation
    return install


# --- (1) the device from the GPUs the scheduler assigned --------------------------------------


def test_no_gpu_assigned_means_cpu_even_where_cuda_is_visible(fake_gpu):
    fake_gpu()
    assert resolve_device("auto") == torch.device("cuda")  # unscheduled: as before
    assert resolve_device("auto", gpu_ids=[]) == torch.device("cpu")
    assert resolve_device("cpu", gpu_ids=["0"]) == torch.device("cpu")  # explicit: user's call
    assert resolve_device("auto", gpu_ids=["3"]) == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda'.*no GPU.*resources\.gpu"):
        resolve_device("cuda", gpu_ids=[])
    with pytest.raises(ValueError, match=r"device='cuda:1'.*resources\.gpu"):
        resolve_device("cuda:1", gpu_ids=[])


def test_gpu_assigned_but_cuda_unusable_fails_instead_of_running_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "cuda"):
        with pytest.raises(RuntimeError, match=r"GPU\(s\) \['0'\] were assigned.*CUDA is "
                                               r"unusable.*Not falling back"):
            resolve_device(device, gpu_ids=["0"])


def test_trial_device_reads_ray_gpu_ids(monkeypatch, fake_gpu):
    import ray

    from pipeline.trainable import ray_gpu_ids, trial_device

    fake_gpu()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert ray_gpu_ids() is None  # a direct call: no Ray started for it
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # what a gpu 0 trial gets
    torch.backends.cudnn.allow_tf32 = True
    assert trial_device(TrainConfig(device="auto")) == torch.device("cpu")
    assert tf32_flags() == {"tf32_matmul": False, "tf32_cudnn": False}  # set before the tags
    with pytest.raises(ValueError, match="resources.gpu"):
        trial_device(TrainConfig(device="cuda"))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])
    assert trial_device(TrainConfig(device="auto")) == torch.device("cuda")


def test_sweep_check_refuses_cuda_without_a_gpu_share(tmp_path, monkeypatch):
    from pipeline.spec import SpecError, parse_spec

    monkeypatch.chdir(tmp_path)
    text = ("name: t\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, pretrained: "
            "embedded, data_root: w, device: cuda}\nresources: {cpu: 1, gpu: 0}\n")
    with pytest.raises(SpecError) as e:
        parse_spec(text, source="t.yaml")
    assert "fixed.device" in str(e.value) and "resources.gpu 0" in str(e.value)
    parse_spec(text.replace("gpu: 0", "gpu: 0.25"), source="t.yaml")
    parse_spec(text.replace("device: cuda", "device: auto"), source="t.yaml")


# --- (2) bf16 on a card without it --------------------------------------------------------------


def test_bf16_on_a_card_without_it_is_refused_before_the_model_is_built(cfg, fake_gpu,
                                                                        monkeypatch):
    fake_gpu("Tesla V100-SXM2-32GB", (7, 0))  # bf16 by emulation only
    check_precision("fp32", torch.device("cuda"))
    check_precision("bf16", torch.device("cpu"))  # CPU autocast has bf16
    with pytest.raises(ValueError, match=r"precision='bf16' but Tesla V100.*7\.0.*set "
                                         r"precision: fp32"):
        check_precision("bf16", torch.device("cuda"))

    def no_build(*a, **k):
        raise AssertionError("the model was built before the precision check")

    monkeypatch.setattr(train_mod, "build_model", no_build)
    with pytest.raises(ValueError, match="set precision: fp32"):
        fit(cfg.replace(precision="bf16"), device="cuda")
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    check_precision("bf16", torch.device("cuda"))


# --- (3) training logits in fp32 ------------------------------------------------------------------


def test_bf16_training_logits_are_fp32_from_the_same_embeddings(cfg, monkeypatch):
    seen: dict = {"pairs": [], "losses": []}
    logits_fn, loss_fn = PerlModel.logits, train_mod.perl_loss

    def spy_logits(self, image_emb, text_emb):
        seen["last"] = (self, image_emb.detach(), text_emb.detach())
        return logits_fn(self, image_emb, text_emb)

    def spy_loss(logits, labels, v0, vK, anchor_weight):
        loss, parts = loss_fn(logits, labels, v0, vK, anchor_weight)
        seen["losses"].append((logits.detach(), labels, parts["ce"], seen["last"]))
        return loss, parts

    monkeypatch.setattr(PerlModel, "logits", spy_logits)
    monkeypatch.setattr(train_mod, "perl_loss", spy_loss)
    fit(cfg.replace(precision="bf16"))
    assert len(seen["losses"]) == 5
    for logits, labels, ce, (model, img, txt) in seen["losses"]:
        assert logits.dtype == torch.float32
        # the reference: fp32 embeddings, fp32 matmul, no autocast
        with torch.autocast("cpu", enabled=False):
            ref = model.logit_scale * F.normalize(img.float(), dim=-1) @ F.normalize(
                txt.float(), dim=-1).T
        assert torch.allclose(logits, ref, rtol=0, atol=1e-6)
        assert float(ce) == pytest.approx(float(F.cross_entropy(ref, labels)), rel=1e-6)


# --- (4) TF32 flags, the cache key and the tags ---------------------------------------------------


def test_fit_sets_both_tf32_flags_from_precision(cfg):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fit(cfg.replace(epochs=0))
    assert tf32_flags() == {"tf32_matmul": False, "tf32_cudnn": False}  # fp32 means fp32
    fit(cfg.replace(epochs=0, precision="bf16"))
    assert tf32_flags() == {"tf32_matmul": True, "tf32_cudnn": True}
    with pytest.raises(ValueError, match="precision='fp16'"):
        set_precision_flags("fp16")


def test_cache_compute_id_holds_the_gpu_and_tf32(fake_gpu):
    cuda = torch.device("cuda")
    assert compute_id("cpu") == "cpu/fp32"  # CPU keys as before: old CPU blobs stay valid
    fake_gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    set_precision_flags("fp32")
    a100 = compute_id(cuda)
    assert a100 == "cuda/fp32/NVIDIA A100-SXM4-80GB/sm8.0/tf32-matmul=0,cudnn=0"
    torch.backends.cudnn.allow_tf32 = True  # torch's default: a TF32 patch embedding
    assert compute_id(cuda) != a100
    set_precision_flags("fp32")
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert compute_id(cuda) not in (a100, "cuda/fp32")


def test_device_info_tags_the_trial_device_not_gpu_0(fake_gpu):
    from pipeline.env import device_info

    fake_gpu("NVIDIA L4", (8, 9))
    set_precision_flags("fp32")
    cpu = device_info(torch.device("cpu"))  # a gpu 0 trial on a GPU node
    assert (cpu["device_resolved"], cpu["gpu"], cpu["gpu_capability"]) == ("cpu", "none", "none")
    gpu = device_info(torch.device("cuda"))
    assert (gpu["gpu"], gpu["gpu_capability"]) == ("NVIDIA L4", "8.9")
    assert (gpu["tf32_matmul"], gpu["tf32_cudnn"]) == ("false", "false")


# --- (5) host syncs per training step -------------------------------------------------------------


SCALAR_READ = "aten::_local_scalar_dense"  # under every .item() / float() / int() of a tensor
# not device syncs: AdamW's step counters live on the CPU (capturable=False), and the loader's
# scope holds the image augmentation's CPU random draws
NOT_THE_STEP = ("Optimizer.step#", "enumerate(DataLoader)#")


def _scalar_reads(events) -> int:
    n = 0
    for ev in events:
        if ev.name != SCALAR_READ:
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(NOT_THE_STEP):
            parent = parent.cpu_parent
        n += parent is None
    return n


def profiled_scalar_reads(cfg) -> tuple[int, int]:
    """(steps profiled, device-to-host scalar reads in them) of `fit(cfg)`: steps 2..N (the
    first one warms up; the epoch's plan is drawn before it)."""
    class Profile(Callback):
        def on_train_start(self, info):
            self.total = info["total_steps"]
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

        def on_step_end(self, step, logs):
            if step == 1:
                self.prof.start()
            elif step == self.total:
                self.prof.stop()

    p = Profile()
    fit(cfg, callbacks=[p], progress=False)
    return p.total - 1, _scalar_reads(p.prof.events())


def test_at_most_one_host_sync_per_training_step(cfg):
    steps, reads = profiled_scalar_reads(cfg)  # modality both: the text side every step
    assert steps >= 3
    # The step's one host read, `.tolist()` of the three logged values, copies without a scalar
    # op; any other read in the step (a float() of a loss part, text_length's int()) shows here,
    # one per step. 0 in steps 2..N: one sync per step on a GPU.
    assert reads == 0


def test_text_length_given_once_gives_the_same_embeddings(make_tiny_perl):
    model = make_tiny_perl()
    tokens = model.tokenize(["a photo of a cat.", "a photo of a very small dog."])
    prefix = model.text_prefix(tokens)
    n = model.text_length(tokens)
    assert torch.equal(model.text_from_prefix(prefix, tokens, length=n),
                       model.text_from_prefix(prefix, tokens))
    with pytest.raises(ValueError, match="need"):  # still checked against the prefix
        model.text_from_prefix(prefix, tokens, length=prefix.shape[1] + 1)


# --- (6) out-of-memory classification -------------------------------------------------------------


@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),  # only RuntimeErrors carry these messages
])
def test_is_oom_takes_cublas_and_cudnn_allocation_failures(error, oom):
    from pipeline.trainable import is_oom

    assert is_oom(error) is oom
    wrapped = RuntimeError("trial failed")
    wrapped.__cause__ = error
    assert is_oom(wrapped) is oom
