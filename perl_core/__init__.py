"""perl_core: PERL (Parameter Efficient Reasoning in CLIP Latent Space) on open_clip.

Pure PyTorch.
"""

from perl_core.config import TrainConfig
from perl_core.factory import build_perl, build_perl_from_config
from perl_core.loss import perl_loss
from perl_core.model import PerlModel
from perl_core.projector import ThoughtProjector

__all__ = ["TrainConfig", "build_perl", "build_perl_from_config", "PerlModel", "ThoughtProjector",
           "perl_loss"]
