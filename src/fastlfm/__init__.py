"""fastlfm: fast inference, serving and fine-tuning for Liquid AI's LFM2 models."""

from .auto import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor,
                   AutoTokenizer, pipeline)
from .generation import (Lfm2ForCausalLM, Lfm2MoeForCausalLM, Lfm2VlForConditionalGeneration, TextIteratorStreamer,
                         TextStreamer, load_model)
from .llm import LLM, Conversation, GenerationResult
from .loading import CheckpointError
from .models import Lfm2Cache, Lfm2Config, Lfm2Model
from .sampling import GenerationConfig, SamplingParams

__version__ = "0.1.0"
__all__ = ["Lfm2Config", "Lfm2Model", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm2VlForConditionalGeneration",
           "Lfm2Cache", "load_model", "CheckpointError", "LLM", "Conversation", "GenerationResult", "SamplingParams",
           "TextStreamer", "TextIteratorStreamer",
           # transformers' names (fastlfm.auto): `from fastlfm import AutoModelForCausalLM, ...`
           "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoTokenizer",
           "AutoProcessor", "pipeline", "GenerationConfig"]
