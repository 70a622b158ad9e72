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
               device: str | torch.device | None = None, quantization: str | None = None,
               model_types: dict | None = None, **kwargs):
    """Load any supported LFM2 checkpoint (hub id or folder), choosing the class by `model_type`
    in `model_types` (default: this package's classes). `quantization` ("int8" / "int4"):
    weight-only quantization at load time for the CPU kernels (fastlfm.cpu_linear); a checkpoint
    saved quantized loads quantized as it is. GGUF files: fastlfm.gguf."""
    folder = resolve_model_dir(name_or_path, kwargs.get("revision"), kwargs.get("local_files_only"))
    raw = read_config_dict(folder)
    model_type = raw.get("model_type")
    cls = (model_types or MODEL_TYPES).get(model_type)
    if cls is None:
        raise CheckpointError(
            f"{folder / 'config.json'}: unknown model_type {model_type!r}; fastlfm supports "
            + ", ".join(sorted(MODEL_TYPES))
        )
    saved_quantization = (raw.get("quantization_config") or {}).get("quant_method")
    if saved_quantization is not None:
        return _load_quantized(cls, folder, raw, dtype, device, quantization, name_or_path)
    model = cls.from_pretrained(folder, dtype=dtype, device=device)
    if quantization is not None:
        from ..cpu_linear import prepare_for_cpu

        prepare_for_cpu(model, quantization)
    return model


def _load_quantized(cls, folder, raw: dict, dtype, device, quantization: str | None, name_or_path):
    from ..cpu_linear import QUANT_METHOD, load_quantized_checkpoint
    from ..loading import resolve_device, resolve_dtype

    qc = raw["quantization_config"]
    if qc.get("quant_method") != QUANT_METHOD or qc.get("scheme") not in ("int8", "int4"):
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config {qc} is not one fastlfm reads "
                              f"(quant_method {QUANT_METHOD!r}, scheme int8 or int4)")
    if quantization is not None and quantization != qc["scheme"]:
        raise ValueError(f"{folder} is saved quantized as {qc['scheme']}; it cannot be loaded as {quantization}")
    if resolve_device(device).type != "cpu":
        raise ValueError(f"{folder} is quantized; its kernels run on the CPU only (device {device} requested)")
    try:
        config = cls.config_class.from_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    model = load_quantized_checkpoint(cls, folder, raw, config, resolve_dtype(dtype, raw.get("torch_dtype") or raw.get("dtype")))
    model.name_or_path = str(name_or_path)
    return model


__all__ = ["Lfm2Config", "Lfm2Model", "Lfm2ForCausalLM", "Lfm2Cache", "Lfm2VlConfig", "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
           "Lfm2VlForConditionalGeneration", "load_model", "MODEL_TYPES"]
