"""Shared fixtures: a tiny open_clip CLIP (4 layers, vision width 64, text width 32) for fast CPU
tests.

- `tiny_clip_cfg`: the open_clip model config dict (a fresh copy), for `build_perl(model_cfg=...)`.
- `tiny_arch`: the same config registered with open_clip under the arch name "perl-test-tiny", for
  code that builds from a TrainConfig (`TrainConfig(arch=tiny_arch, pretrained="", ...)`).
- `make_tiny_perl(seed=0, **build_perl_kwargs)`: a PerlModel on the tiny CLIP, J=2, K=2 by
  default; the same seed gives the same frozen CLIP whatever the variant.
- `world` (session): a small synthetic CoOp world (ToyShapes, ToyCounts; 4 train / 2 val / 3 test
  images per class) for sweeps; `weights` (session): perl-tiny weights (seed 0) as a local
  `.safetensors` checkpoint, so trials take the cached-backbone path. Used by the pipeline,
  Ray job and reliability tests (one copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch

from perl_core import build_perl

TINY_CONFIG_FILE = Path(__file__).parent / "model_configs" / "perl-test-tiny.json"
TINY_ARCH = TINY_CONFIG_FILE.stem


@pytest.fixture
def tiny_clip_cfg() -> dict:
    return json.loads(TINY_CONFIG_FILE.read_text())


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG_FILE)
    return TINY_ARCH


@pytest.fixture
def images():
    """Three random 32 px images for the tiny CLIP (fixed seed)."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tokens():
    """Three prompts of different lengths (EOS at different positions)."""
    return open_clip.tokenize(["a photo of a cat.", "a dog", "an origami crane on a table"])


@pytest.fixture
def make_tiny_perl(tiny_clip_cfg):
    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        kwargs.setdefault("inject_layer", 2)
        kwargs.setdefault("num_steps", 2)
        return build_perl(model_cfg=tiny_clip_cfg, **kwargs)

    return make


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, datasets=["ToyShapes", "ToyCounts"],
                   sizes={"train": 4, "val": 2, "test": 3})
    return root


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """perl-tiny weights as a local checkpoint file: trials take the cached-backbone path."""
    from safetensors.torch import save_file

    from perl_core.factory import create_clip

    torch.manual_seed(0)
    clip = create_clip("perl-tiny", None)
    path = tmp_path_factory.mktemp("weights") / "perl-tiny-test.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API on 127.0.0.1: moto's ThreadedMotoServer (buckets: make your own)."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def one_thread():
    """One torch thread for the test (shared 2-core machines: two OpenMP threads per process
    under load run ~30x slower; tiny models do not gain from threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_here():
    """A local Ray (2 CPUs) for the tests of one module that call `pipeline.run.main` in-process:
    trial workers import the project from the repository (PYTHONPATH)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    os.environ.update(env)
    import ray

    repo = Path(__file__).resolve().parents[1]
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False,
             runtime_env={"env_vars": {**env, "PYTHONPATH": str(repo)}})
    yield ray
    ray.shutdown()
