"""perl_core: PERL (Parameter Efficient Reasoning in CLIP Latent Space) on open_clip.

Pure PyTorch. The names below are imported on first use (PEP 562), so that `perl_core.config`
and the other torch-free modules (read by `pipeline.aggregate` on a laptop) do not pull torch and
open_clip in with the package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"TrainConfig": "perl_core.config", "build_perl": "perl_core.factory",
         "build_perl_from_config": "perl_core.factory", "perl_loss": "perl_core.loss",
         "PerlModel": "perl_core.model", "ThoughtProjector": "perl_core.projector"}

__all__ = ["TrainConfig", "build_perl", "build_perl_from_config", "PerlModel", "ThoughtProjector",
           "perl_loss"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perl_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
