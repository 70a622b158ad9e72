"""LFM2 model families: one file each, loaded through `load_model` by `model_type`."""

from __future__ import annotations

import os

import torch

from ..loading import CheckpointError, read_config_dict, resolve_model_dir
from .config import Lfm2Config
from .lfm2 import Lfm2Cache, Lfm2ForCausalLM, Lfm2Model
from .lfm2_moe import Lfm2MoeConfig, Lfm2MoeForCausalLM
from .lfm2_vl import Lfm2VlConfig, Lfm2VlForConditionalGeneration

MODEL_TYPES = {
    "lfm2": Lfm2ForCausalLM,
    "lfm2_moe": Lfm2MoeForCausalLM,
    "lfm2_vl": Lfm2VlForConditionalGeneration,
    "lfm2-vl": Lfm2VlForConditionalGeneration,  # remote-code era checkpoints
}


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = None, model_types: dict | None = None, **kwargs):
    """Load any supported LFM2 checkpoint (hub id or folder), choosing the class by `model_type`
    in `model_types` (default: this package's classes)."""
    folder = resolve_model_dir(name_or_path, kwargs.get("revision"), kwargs.get("local_files_only"))
    model_type = read_config_dict(folder).get("model_type")
    cls = (model_types or MODEL_TYPES).get(model_type)
    if cls is None:
        raise CheckpointError(
            f"{folder / 'config.json'}: unknown model_type {model_type!r}; fastlfm supports "
            + ", ".join(sorted(MODEL_TYPES))
        )
    return cls.from_pretrained(folder, dtype=dtype, device=device)


__all__ = ["Lfm2Config", "Lfm2Model", "Lfm2ForCausalLM", "Lfm2Cache", "Lfm2VlConfig", "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
           "Lfm2VlForConditionalGeneration", "load_model", "MODEL_TYPES"]
