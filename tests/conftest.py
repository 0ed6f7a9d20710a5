"""Shared fixtures: a tiny open_clip CLIP (4 layers, vision width 64, text width 32) for fast CPU tests.

- `tiny_clip_cfg`: the open_clip model config dict (a fresh copy), for `build_perl(model_cfg=...)`.
- `tiny_arch`: the same config registered with open_clip under the arch name "perl-test-tiny", for
  code that builds from a TrainConfig (`TrainConfig(arch=tiny_arch, pretrained="", ...)`).
- `make_tiny_perl(seed=0, **build_perl_kwargs)`: a PerlModel on the tiny CLIP, J=2, K=2 by
  default; the same seed gives the same frozen CLIP whatever the variant.
"""

from __future__ import annotations

import json
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
def make_tiny_perl(tiny_clip_cfg):
    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        kwargs.setdefault("inject_layer", 2)
        kwargs.setdefault("num_steps", 2)
        return build_perl(model_cfg=tiny_clip_cfg, **kwargs)

    return make
