"""fastlfm: fast inference, serving and fine-tuning for Liquid AI's LFM2 models."""

from .loading import CheckpointError
from .generation import TextIteratorStreamer, TextStreamer, generate
from .llm import LLM, Conversation
from .models import Lfm2Cache, Lfm2Config, Lfm2ForCausalLM, Lfm2Model, load_model
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["Lfm2Config", "Lfm2Model", "Lfm2ForCausalLM", "Lfm2Cache", "load_model", "CheckpointError",
           "LLM", "Conversation", "SamplingParams", "generate", "TextStreamer", "TextIteratorStreamer"]
