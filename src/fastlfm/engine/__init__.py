"""Continuous-batching inference engine: paged KV cache + conv-state slots, CUDA graphs on GPU."""

from .async_engine import AsyncLLMEngine
from .block_manager import BlockManager, CacheLeakError
from .context import PagedContext
from .llm_engine import EngineStats, LLMEngine, RequestOutput, TokenLogprob
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

__all__ = ["AsyncLLMEngine", "LLMEngine", "RequestOutput", "TokenLogprob", "EngineStats", "PagedContext",
           "BlockManager", "CacheLeakError", "Scheduler", "Sequence", "SequenceStatus"]
