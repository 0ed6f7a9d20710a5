"""perl_core: PERL (Parameter Efficient Reasoning in CLIP Latent Space) on open_clip. Pure PyTorch."""

from perl_core.config import TrainConfig

__all__ = ["TrainConfig"]
