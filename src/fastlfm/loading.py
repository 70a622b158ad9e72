"""Finding, reading and writing HF-format checkpoints (config.json + safetensors)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .sampling import GenerationConfig

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
           "float": torch.float32}


# `fastlfm chat demo`: a tiny trained LFM2 shipped inside the package (see scripts/train_demo.py).
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo"



_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                   "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skipped_init():
    """torch.nn.init's functions as no-ops while modules are built on the meta device (their weights
    are loaded next). A meta tensor's random init runs through torch's Python references, whose first
    use imports torch._dynamo: ~1 s of a CPU process's cold start for nothing."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def model_on_meta(cls, config):
    """`cls(config)` on the meta device without random init: the shell a loader fills with weights."""
    with torch.device("meta"), skipped_init():
        return cls(config)


@contextlib.contextmanager
def collection_paused():
    """No cyclic garbage collection while a model and its tokenizer load (restored after, if it was
    on). Loading makes enough objects (modules, tensors, the imports it triggers) to start a full
    collection, which walks every tracked object of the process: 83-107 ms after `import torch` on
    the 2-core development machine, LLM() of the 350M model 0.33-0.40 -> 0.26-0.29 s. What loading
    makes is mostly kept, so there was little to find. Objects made meanwhile are walked by the next
    young-generation collection instead, which is cheap for loading's few; a pause around `import
    torch` (~200k objects) only moved the same cost to the first token (measured, not kept)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not fit the model."""


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      local_files_only: bool | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub."""
    if str(name_or_path) == DEMO_MODEL_NAME:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"the bundled demo model is missing from this install ({DEMO_MODEL_DIR})")
        return DEMO_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"model path {name!r} is not a folder with a config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                      local_files_only=local_files_only))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name!r} is neither a local folder nor a model on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        how = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache" if local_files_only \
            else f"the hub could not be reached and it is not in the local cache ({type(e).__name__})"
        raise CheckpointError(
            f"cannot resolve model {name!r}: {how}. Download it where the hub is reachable, or pass the path "
            f"of a local folder that holds config.json and *.safetensors"
        ) from None


def read_config_dict(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this an HF-format LFM2 checkpoint folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


def resolve_dtype(dtype: str | torch.dtype | None, config_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return _DTYPES.get(config_dtype or "float32", torch.float32) if dtype == "auto" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, bfloat16, float16, float32")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def load_state_dict_into(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device,
                         rename=None, export=None) -> None:
    """Read safetensors (memory-mapped) into a model built on the meta device.

    `rename(name, tensor) -> list[(name, tensor)]` maps checkpoint names to module names
    (the mlx-lm `sanitize` step). An item may also be `(name, tensor, index)`: `tensor` is the
    part `index` of the model tensor `name` (e.g. one expert of a layer's stacked experts), written
    into place on `device`; the parts must cover it (`export`, the inverse of `rename`, names the
    ones missing). Shapes and names are checked against the model first.
    """
    expected = {k: v for k, v in model.state_dict().items()}
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        name for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[list[str], int]] = {}  # tensors loaded in parts: checkpoint names, values written
    keep_fp32 = tuple(getattr(model, "keep_in_fp32", ()))  # name endings loaded as float32 whatever `dtype`
    unexpected = []
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                items = rename(name, f.get_tensor(name)) if rename else [(name, f.get_tensor(name))]
                for key, tensor, *part in items:
                    if key not in expected:
                        unexpected.append(f"{key} (in {file.name})")
                        continue
                    to_dtype = (torch.float32 if keep_fp32 and key.endswith(keep_fp32) else dtype) \
                        if tensor.is_floating_point() else None
                    if part:
                        if key in loaded and key not in parts:
                            raise CheckpointError(f"{file.name}: {name!r} is a part of {key!r}, which the "
                                                  "checkpoint also holds whole")
                        if key not in loaded:
                            loaded[key] = torch.empty(expected[key].shape, dtype=to_dtype or tensor.dtype, device=device)
                            parts[key] = ([], 0)
                        target = loaded[key][part[0]]
                        if tuple(tensor.shape) != tuple(target.shape):
                            raise CheckpointError(
                                f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                                f"implies {tuple(target.shape)}")
                        target.copy_(tensor)
                        parts[key] = (parts[key][0] + [name], parts[key][1] + tensor.numel())
                        continue
                    if key in parts:
                        raise CheckpointError(f"{file.name}: {key!r} is in the checkpoint whole and in parts")
                    if tuple(tensor.shape) != tuple(expected[key].shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} has shape {tuple(tensor.shape)}, but the config "
                            f"implies {tuple(expected[key].shape)}"
                        )
                    loaded[key] = tensor.to(device=device, dtype=to_dtype)
    for key, (names, count) in parts.items():
        if count != loaded[key].numel():
            missing = sorted({n for n, _ in export(key, expected[key])} - set(names)) if export else []
            raise CheckpointError(
                f"{folder}: {key!r} is loaded from parts, and they do not cover it ({count} of {loaded[key].numel()} "
                f"values): " + (f"tensors missing from the checkpoint: {', '.join(missing[:10])}" if missing
                                else "a part is missing or repeated"))
    if unexpected:
        raise CheckpointError(f"{folder}: tensors the model does not have: {', '.join(unexpected[:10])}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = [k for k in expected if k not in loaded and k not in tied]
    # A tied head is stored once; a checkpoint may hold either name.
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {', '.join(missing[:10])}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    model.load_state_dict(loaded, strict=False, assign=True)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A copy only for views into a larger buffer (fused projections): safetensors refuses
    tensors that share memory."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def save_safetensors(model: torch.nn.Module, folder: Path, skip: set[str] = frozenset(),
                     max_shard_bytes: int = 5 * 2**30, export=None) -> None:
    """Write model.safetensors (or shards + index), HF layout, tied weights stored once.
    `export(name, tensor) -> list[(name, tensor)]` maps a model tensor to the checkpoint's
    (the inverse of `sanitize`; e.g. stacked experts back to one tensor per expert)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if k not in skip:
            for name, t in (export(k, v) if export else [(k, v)]):
                tensors[name] = _own_storage(t.detach().contiguous().cpu())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for fastlfm models (HF layout on disk).

    A model class sets `config_class` and may define `sanitize(name, tensor)` to map
    checkpoint names to its modules, `checkpoint_tensors(name, tensor)` for the way back
    (save_pretrained), `keep_in_fp32` (name endings of tensors that stay float32 whatever the
    dtype), and `reset_buffers(device)` on submodules whose
    non-persistent buffers must be rebuilt after loading on the meta device.
    """

    config_class: Any
    generation_config: dict[str, Any] | None = None

    @classmethod
    @collection_paused()
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
                        device: str | torch.device | None = None, revision: str | None = None,
                        local_files_only: bool | None = None):
        folder = resolve_model_dir(name_or_path, revision, local_files_only)
        raw = read_config_dict(folder)
        try:
            config = cls.config_class.from_dict(raw)
        except ValueError as e:
            raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
        torch_dtype = resolve_dtype(dtype, raw.get("torch_dtype") or raw.get("dtype"))
        device = resolve_device(device)
        model = model_on_meta(cls, config)
        load_state_dict_into(model, folder, torch_dtype, device, rename=getattr(model, "sanitize", None),
                             export=getattr(model, "checkpoint_tensors", None))
        for module in model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers(device)
        model.tie_weights()
        gen_path = folder / "generation_config.json"
        model.generation_config = GenerationConfig.from_dict(json.loads(gen_path.read_text())) if gen_path.is_file() \
            else None
        model.name_or_path = str(name_or_path)
        return model.eval()

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (`.to()`, `.float()`, ...); a float model whose projections an engine packed
        for the CPU kernels gets its nn.Linear layers back first, so that they convert with the rest (a
        weight packed for oneDNN would not) and the next engine packs them in the new dtype."""
        if getattr(self, "cpu_linears", None) is not None:
            from .cpu_linear import QUANTIZATION_SCHEMES, restore_float_linears

            if self.cpu_linears not in QUANTIZATION_SCHEMES:
                restore_float_linears(self)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        """nn.Module.train; a model whose projections an engine packed for the CPU kernels gets its
        plain nn.Linear layers back first (trainable, exact weights)."""
        if mode and getattr(self, "cpu_linears", None) is not None:
            from .cpu_linear import restore_float_linears

            restore_float_linears(self)
        return super().train(mode)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        if getattr(self, "cpu_linears", None) is not None:  # packed for the CPU kernels (an engine did it)
            from .cpu_linear import restore_float_linears

            restore_float_linears(self)  # quantized ones refuse: their float weights are gone
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        tied = {n for n, _ in self.named_parameters(remove_duplicate=False)} - {n for n, _ in self.named_parameters()}
        save_safetensors(self, folder, skip=tied, export=getattr(self, "checkpoint_tensors", None))
        if self.generation_config:
            (folder / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2))
