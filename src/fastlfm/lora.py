"""LoRA for `fastlfm train --lora-rank R`: low-rank adapters on the model's linear layers.

Each chosen `nn.Linear` (weight W, out x in) becomes W x + (alpha / R) * B (A x) with A (R x in)
random, B (out x R) zero, so training starts from the base model exactly. Only A and B train.
Checkpoints are written *merged* (W + (alpha/R) B A under the original names), so a LoRA run
saves an ordinary HF-format LFM2 that fastlfm and transformers load as is; the adapters are
kept beside it (`adapter.safetensors`) for resuming.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The projections of attention (q/k/v/out), the short conv (in/out) and the SwiGLU MLP.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")
ADAPTER_FILE = "adapter.safetensors"


class LoRAError(ValueError):
    """LoRA settings or adapter files that do not fit the model."""


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `targets`.
    Returns the wrapped module paths."""
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(2 * rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{path}.{name}" if path else name)
    if not wrapped:
        raise LoRAError(f"no linear layer named {', '.join(targets)} found for LoRA")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the original (un-wrapped) names, adapters merged in."""
    loras = lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path.endswith(".base") and path[: -len(".base")] in loras:
            lora = loras[path[: -len(".base")]]
            out[f"{path[: -len('.base')]}.{leaf}"] = lora.merged_weight().detach() if leaf == "weight" else value
        elif leaf in ("lora_a", "lora_b") and path in loras:
            continue
        else:
            out[key] = value
    return out


def save_adapters(model: nn.Module, folder: Path) -> None:
    tensors = {f"{path}.{n}": getattr(m, n).detach().contiguous().cpu()
               for path, m in lora_modules(model).items() for n in ("lora_a", "lora_b")}
    save_file(tensors, str(folder / ADAPTER_FILE))


def load_adapters(model: nn.Module, folder: Path) -> None:
    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise LoRAError(f"{folder}: no {ADAPTER_FILE} (was that run trained with --lora-rank?)")
    tensors = load_file(str(file))
    loras = lora_modules(model)
    expected = {f"{p}.{n}" for p in loras for n in ("lora_a", "lora_b")}
    if set(tensors) != expected:
        raise LoRAError(f"{file}: adapters do not match this model and --lora settings "
                         f"({len(tensors)} tensors in the file, {len(expected)} expected)")
    with torch.no_grad():
        for key, t in tensors.items():
            path, _, leaf = key.rpartition(".")
            param = getattr(loras[path], leaf)
            if param.shape != t.shape:
                raise LoRAError(f"{file}: {key} has shape {tuple(t.shape)}, expected {tuple(param.shape)} "
                                 f"(a different --lora-rank?)")
            param.copy_(t)
