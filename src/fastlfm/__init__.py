"""fastlfm: fast inference, serving and fine-tuning for Liquid AI's LFM2 models."""

from .loading import CheckpointError
from .models import Lfm2Cache, Lfm2Config, Lfm2ForCausalLM, Lfm2Model, load_model

__version__ = "0.1.0"
__all__ = ["Lfm2Config", "Lfm2Model", "Lfm2ForCausalLM", "Lfm2Cache", "load_model", "CheckpointError"]
