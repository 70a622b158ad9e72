"""Linear layers for CPU inference, installed by a module swap at load time.

Batch-1 decode on CPU is a chain of matrix-vector products, bound by how fast their kernel
streams the weight. torch's default kernels (MKL sgemm, oneDNN bf16 without pre-packing)
stream ~20 GB/s on a CPU that reads ~50 GB/s; the same products through oneDNN with a weight
re-laid out once for the kernel (`torch.ops.mkldnn._reorder_linear_weight`) run near memory
speed, and fewer bytes per weight go faster still. bench/cpu_kernels.py measures every
candidate on every LFM2 decode shape (table in BENCHMARKS.md); this module installs the
winners:

- where fastlfm's own kernels run (`cpu_gemv`: AVX-512 VNNI + BF16), they take every
  projection (`GemvLinear`): fp32 / bf16 decode in `PlainLinear` (prefill through oneDNN on the
  same weight), int8 / int4 products at any row count, with the RMSNorm, SwiGLU gate and
  residual folded in (`fused`, the engine's `ctx.linear`). Elsewhere torch's kernels:
- fp32 / bf16 weights: `PackedLinear`, oneDNN's packed linear (the packed weight also serves
  prefill: oneDNN runs any row count on it), or `PlainLinear` (torch's `F.linear`) for the
  (dtype, shape) pairs where packing is not faster on this host: `prepare_for_cpu(pack="auto")`
  times both kernels once per process at load (`choose_float_kernels`).
- int8, per output channel: `Int8Linear`, `aten._weight_int8pack_mm` (bf16 activations).
- int4, group-wise (32 or 64 along the input): `Int4Linear`, `aten._weight_int4pack_mm_for_cpu`
  (bf16 activations); w = (q - 8) * scale (+ zero) per group. fastlfm quantizes symmetrically
  as GGUF's Q4_0 does (4.5 bits a weight with fp16 scales; a zero per group costs 0.5 bit more
  and measured no better), so Q4_0 files map onto it exactly; min/max groups with a zero
  (`quantize_int4(symmetric=False)`, older saved checkpoints) run on the same kernel.
- the embedding and the tied LM head: `Int8Embedding` + an `Int8Linear` over the same int8
  table (per-row scales are the head's per-output-channel scales).

`prepare_for_cpu(model, quantization)` fuses q/k/v and w1/w3 first (as the engine does), then
swaps each projection for its kernel module; the projections that now run fused are replaced
by `FusedAway` markers, so the float weights are freed. The model code is unchanged: the
layers call `ctx.linear(x, module)` / `module(x)` as before. Quantized weights are built from
float weights (`quantize_int8` / `quantize_int4`), read from a saved quantized checkpoint
(`save_quantized` / `load_quantized_state`) or from GGUF blocks (fastlfm.gguf).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gemv
from .sampling import GenerationConfig

QUANTIZATION_SCHEMES = ("int8", "int4")
QUANT_METHOD = "fastlfm"  # config.json "quantization_config.quant_method" of a saved quantized checkpoint
_KERNEL_DTYPE = torch.bfloat16  # activations of the int8 / int4 kernels (their fp32 paths are ~10x slower)


# ----------------------------------------------------------------------------- quantized weights
@dataclass
class Int8Weight:
    """w[n, k] ~= q[n, k] * scale[n] (symmetric, per output channel)."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


@dataclass
class Int4Weight:
    """w[n, k] ~= (q[n, k] - 8) * scale[n, g] (+ zero[n, g]) for k in group g = k // group_size,
    q in 0..15 (one uint8 each in memory; two per byte on disk); zero None: symmetric (Q4_0)."""

    q: torch.Tensor  # (N, K) uint8
    scale: torch.Tensor  # (N, K / group_size) float32
    zero: torch.Tensor | None  # (N, K / group_size) float32, or None
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        w = (self.q.float() - 8) * self.scale.repeat_interleave(g, 1)
        return w if self.zero is None else w + self.zero.repeat_interleave(g, 1)

    def zeros(self) -> torch.Tensor:
        """The zeros, explicit (0 where symmetric)."""
        return torch.zeros_like(self.scale) if self.zero is None else self.zero


QuantizedWeight = Union[Int8Weight, Int4Weight]
Weight = Union[torch.Tensor, Int8Weight, Int4Weight]


def _kernel_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the kernels' scale dtype (bf16), kept in fp32: codes are computed against the
    scale the kernel will really use."""
    return t.to(_KERNEL_DTYPE).float()


# Rows quantized at a time: the fp32 temporaries of a chunk stay in cache (whole-weight temporaries made
# quantizing a 350M model at load take ~2 s, memory-bound).
_QUANT_CHUNK_BYTES = 1 << 20


def _row_chunks(w: torch.Tensor):
    """(start, stop, fp32 copy of rows start:stop) over `w`, about _QUANT_CHUNK_BYTES of fp32 each;
    a NaN or inf raises (`NonFiniteWeight`): quantized, it would become finite garbage."""
    step = max(1, _QUANT_CHUNK_BYTES // (4 * w.shape[1]))
    for start in range(0, w.shape[0], step):
        stop = min(start + step, w.shape[0])
        rows = w[start:stop].detach().to(torch.float32, copy=True)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            raise NonFiniteWeight(f"row {start + int((~finite).nonzero()[0])} holds a non-finite value (NaN or inf)")
        yield start, stop, rows


class NonFiniteWeight(ValueError):
    """A weight to quantize holds NaN or inf."""


def run_quantizer(op, *args):
    """One of the kernel library's quantizers; its refusal of a non-finite row as NonFiniteWeight."""
    try:
        return op(*args)
    except RuntimeError as e:
        if "non-finite" not in str(e):
            raise
        raise NonFiniteWeight(str(e).split(": ", 1)[-1].splitlines()[0]) from None


def _quantizes_in_one_pass(w: torch.Tensor) -> bool:
    """Whether fastlfm's kernel library quantizes this weight (the same values as the torch code below)."""
    return w.dim() == 2 and w.dtype in (torch.float32, torch.bfloat16) and w.device.type == "cpu" \
        and cpu_gemv.available()


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    if _quantizes_in_one_pass(w):
        return Int8Weight(*run_quantizer(torch.ops.fastlfm_cpu.quantize_int8_rows, w.detach().contiguous()))
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for start, stop, rows in _row_chunks(w):
        s = _kernel_exact(rows.abs().amax(dim=1).clamp_(min=1e-12) / 127)
        q[start:stop] = rows.div_(s[:, None]).round_().clamp_(-127, 127)  # whole numbers: the cast is exact
        scale[start:stop] = s
    return Int8Weight(q, scale)


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = True) -> Int4Weight:
    """symmetric (GGUF Q4_0's scheme): the group's value of largest magnitude m is level -8, scale
    m / -8, so the levels span [-|m|, 7/8 |m|] on m's side; else min/max: the 16 levels span
    [min, max] of the group, with a zero per group."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input size {K}")
    if symmetric and _quantizes_in_one_pass(w):
        return Int4Weight(*run_quantizer(torch.ops.fastlfm_cpu.quantize_int4_symmetric, w.detach().contiguous(),
                                     group_size), None, group_size)
    q = torch.empty(N, K, dtype=torch.uint8)
    scale = torch.empty(N, K // group_size)
    zero = None if symmetric else torch.empty(N, K // group_size)
    for start, stop, rows in _row_chunks(w):
        wg = rows.view(-1, K // group_size, group_size)
        if symmetric:
            m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0]
            s = _kernel_exact(m / -8)
            s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)  # an all-zero group: codes 8
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = _kernel_exact(((hi - lo) / 15).clamp_(min=1e-12))
            z = _kernel_exact(lo + 8 * s)
            wg = wg.sub_(z[..., None])
            zero[start:stop] = z
        q[start:stop] = wg.div_(s[..., None]).add_(8).round_().clamp_(0, 15).view(-1, K)
        scale[start:stop] = s
    return Int4Weight(q, scale, zero, group_size)


def quantize(w: torch.Tensor, scheme: str, group_size: int = 32) -> QuantizedWeight:
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w, group_size)
    raise ValueError(f"unknown quantization {scheme!r}; use one of {', '.join(QUANTIZATION_SCHEMES)}")


def concat_weights(weights: list[Weight]) -> Weight:
    """One weight for projections that share an input (rows stacked), in any one format."""
    first = weights[0]
    if isinstance(first, torch.Tensor):
        # (ordinary pages: on huge ones, the 350M's cold start took 0.15-0.6 s longer for +5-7% decode)
        return torch.cat([w.detach() for w in weights])
    if not all(type(w) is type(first) for w in weights):
        raise TypeError("cannot fuse projections stored in different formats")
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]))
    if any(w.group_size != first.group_size for w in weights):
        raise TypeError("cannot fuse int4 projections with different group sizes")
    zero = None if all(w.zero is None for w in weights) else torch.cat([w.zeros() for w in weights])
    return Int4Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), zero,
                      first.group_size)


# ----------------------------------------------------------------------------- kernel modules
class CpuLinear(nn.Module):
    """Base: y = x W^T over the last axis of x, through `_mm` on 2-D rows."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return self._mm(rows).view(*x.shape[:-1], self.out_features)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T (kernels that can add it in the same pass override this)."""
        return residual + self(x)

    def fused(self, x: torch.Tensor, *, norm: nn.Module | None = None, silu_gate: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + prologue(x) W^T, the prologue being `norm(x)` or SiLU(gate) * up of x = [gate | up]
        (the engine's `ctx.linear`); `GemvLinear` runs it as one kernel call."""
        if norm is not None:
            x = norm(x)
        if silu_gate:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return self(x) if residual is None else self.add_to(x, residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class PackedLinear(CpuLinear):
    """fp32 / bf16 weight in oneDNN's blocked layout (packed once; `_linear_pointwise` runs it for
    any number of rows). Output equals F.linear's up to summation order."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0])
        self.dtype = weight.dtype
        # An opaque mkldnn tensor: kept as a plain attribute (not a buffer: no state_dict / .to()).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def _mm(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, None, "none",
                                                  [None], "")

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T in one oneDNN call (the sum is rounded once, in the weight's dtype)."""
        if residual.dtype != self.dtype:
            return residual + self(x)
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        res = residual.reshape(-1, self.out_features).contiguous()
        y = torch.ops.mkldnn._linear_pointwise.binary(rows, res, self.packed, None, "add")
        return y.view(residual.shape)


class GemvLinear(CpuLinear):
    """A projection that fastlfm's kernels (`cpu_gemv`) run where `self.gemv`: one call computes
    residual + prologue(rows) W^T, the RMSNorm (`norm.weight`, `norm.eps`: LFM2's norm) or SiLU
    gate and the residual add folded in. `_kernel()` names the op and this weight's arguments;
    `_gemv_rows` is the most rows it takes (more run through `_mm_torch`).

    A batch-1 decode step makes ~65 of these calls, so the call path is kept short: the op and its
    weight arguments are looked up once (`_bound`, rebuilt after `.to()` / `_apply`), as each module
    attribute lookup and Python frame costs ~1 us, a sizable share of a small product's time."""

    gemv = False
    _gemv_rows = 1 << 62
    out_dtype: torch.dtype | None = None  # without a residual: this dtype, or (None) the input's

    def _kernel(self) -> tuple:
        """(op, its weight arguments): op(x, *weights, out, residual, norm weight, eps, silu_gate)."""
        raise NotImplementedError

    def _mm_torch(self, x):
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_bound", None)  # the buffers may be new tensors
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        self.__dict__.pop("_bound", None)  # (a weight or buffer assigned anew)
        super().__setattr__(name, value)

    def _run(self, rows: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
             silu_gate: bool) -> torch.Tensor:
        """The kernel on 2-D fp32 / bf16 rows; the output in the residual's dtype if any."""
        bound = self.__dict__.get("_bound")
        if bound is None:
            op, weights = self._kernel()
            bound = self.__dict__["_bound"] = (op, weights)
        dtype = residual.dtype if residual is not None else self.out_dtype or rows.dtype
        out = torch.empty(rows.shape[0], self.out_features, dtype=dtype)
        bound[0](rows.contiguous(), *bound[1], out, residual, norm_weight, eps, silu_gate)
        return out

    def _mm(self, x):
        if self.gemv and x.shape[0] <= self._gemv_rows:
            return self._run(x if x.dtype in _GEMV_DTYPES else x.float(), None, None, 0.0, False)
        return self._mm_torch(x)

    def add_to(self, x, residual):
        return self.fused(x, residual=residual)

    def fused(self, x, *, norm=None, silu_gate=False, residual=None):
        rows = x.reshape(-1, x.shape[-1])
        if not (self.gemv and rows.shape[0] <= self._gemv_rows and x.dtype in _GEMV_DTYPES
                and (residual is None or residual.dtype in _GEMV_DTYPES)):
            y = super().fused(x, norm=norm, silu_gate=silu_gate)
            return y if residual is None else residual + y
        res = residual.reshape(-1, self.out_features).contiguous() if residual is not None else None
        y = self._run(rows, res, norm.weight if norm is not None else None, norm.eps if norm is not None else 0.0,
                      silu_gate)
        return y.view(*x.shape[:-1], self.out_features)


_GEMV_DTYPES = (torch.float32, torch.bfloat16)  # the activations fastlfm's kernels take


class PlainLinear(GemvLinear):
    """fp32 / bf16 weight kept as it is. Always where fastlfm's kernels run (`cpu_gemv`): up to
    `GEMV_ROWS` rows (decode) through its AVX-512 product, more (a prefill) through oneDNN.
    Otherwise chosen where pre-packing is not faster for one row on this host: one row runs
    through `F.linear` (torch's default kernel), several through oneDNN on the same unpacked
    weight, which there is as fast as the packed one (and up to 20% faster than F.linear for the
    wide projections). The weight shares the source tensor's storage (a tied
    LM head keeps reading the embedding's table: no copy)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0])
        self.dtype = weight.dtype
        # Plain attribute like PackedLinear.packed: the prepared model's state_dict has no projections.
        self.weight = weight.detach()
        self.out_dtype = weight.dtype  # (as F.linear on the input converted to the weight's dtype)
        self.gemv = gemv_runs(self.weight)
        self._gemv_rows = GEMV_ROWS

    def _kernel(self):
        return torch.ops.fastlfm_cpu.gemv_dense.default, (self.weight,)

    def _mm_torch(self, x):  # x: (rows, in_features)
        x = x.to(self.dtype)
        if x.shape[0] == 1:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [None], "")


def streamed_float_weights(model: nn.Module) -> list[torch.Tensor]:
    """The fp32 / bf16 weights that a prepared model's decode step reads in full (`PlainLinear`s; a
    tied head shares the embedding's table), each once."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, PlainLinear) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            out.append(m.weight)
    return out


class HugePageMove:
    """Moves a prepared model's streamed float weights onto 2 MB pages without holding up a step
    (`cpu_gemv.collapse_onto_huge_pages` says why). A thread started here collapses those in anonymous
    memory in place, and copies into huge-page memory those read in place from a checkpoint file
    (a bf16 checkpoint loaded as bf16), which the kernel does not collapse. The engine calls
    `finish()` between steps: once the thread is done, the modules that read a file-backed weight
    read its copy, and the file's pages leave the process (a reader left elsewhere reads the file
    again). Off with FASTLFM_HUGE_PAGES=0 or without transparent huge pages."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.copies: dict[int, torch.Tensor] = {}  # data_ptr of a file-backed weight -> its copy
        self.thread = threading.Thread(target=self._run, args=(streamed_float_weights(model),),
                                       name="fastlfm-huge-pages", daemon=True)
        self.thread.start()

    def _run(self, weights: list[torch.Tensor]) -> None:
        if not cpu_gemv.huge_pages_usable():
            return
        try:  # the lowest priority (Linux: this thread alone): the move takes the cores the steps leave idle
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        files = cpu_gemv.file_backed(weights)
        cpu_gemv.collapse_onto_huge_pages([w for w, f in zip(weights, files) if not f])
        for w, f in zip(weights, files):
            if f and w.nbytes >= cpu_gemv.HUGE_PAGE:
                copy = cpu_gemv.empty_on_huge_pages(tuple(w.shape), w.dtype)
                ctypes.memmove(copy.data_ptr(), w.data_ptr(), w.nbytes)  # one thread, the GIL released
                self.copies[w.data_ptr()] = copy

    def finish(self) -> bool:
        """Between steps: if the thread is done, point the model at the copies; True if any tensor of
        the model changed (its recorded steps read the old ones)."""
        if self.thread.is_alive() or not self.copies:
            return False
        old = {}
        for m in self.model.modules():
            if isinstance(m, PlainLinear) and m.weight.data_ptr() in self.copies:
                old[m.weight.data_ptr()] = m.weight
                m.weight = self.copies[m.weight.data_ptr()]
            for p in m.parameters(recurse=False):  # the tied embedding's table
                copy = self.copies.get(p.data_ptr())
                if copy is not None and p.shape == copy.shape and p.dtype == copy.dtype:
                    old[p.data_ptr()] = p.data
                    p.data = copy
        cpu_gemv.release_file_pages(list(old.values()))
        self.copies = {}
        return bool(old)


# Rows up to which a float product runs through fastlfm's kernel (decode of a few sequences); more
# rows (prefill, large decode batches) go to oneDNN, whose blocked kernels use the matrix units.
GEMV_ROWS = 8


def gemv_runs(weight: torch.Tensor) -> bool:
    """Whether fastlfm's dense kernel takes this fp32 / bf16 weight on this host (`cpu_gemv.available`)."""
    return (weight.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2 and weight.is_contiguous()
            and cpu_gemv.supports(*weight.shape) and cpu_gemv.available())


class Int8Linear(GemvLinear):
    """int8 weight, one scale per output channel; the input's dtype out. Where fastlfm's kernels
    run (`cpu_gemv`), every product goes through them (int8 inputs in blocks of 32, VNNI dot
    products: at memory speed for decode and several times torch's kernel for prefill), on the
    weight in their interleaved layout; elsewhere through `aten._weight_int8pack_mm` (bf16 inputs)."""

    def __init__(self, weight: Int8Weight):
        super().__init__(weight.shape[1], weight.shape[0])
        self.gemv = cpu_gemv.supports(*weight.shape) and cpu_gemv.available()
        if self.gemv:
            packed, scale = cpu_gemv.pack_int8(weight.q, weight.scale)
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("q", weight.q.contiguous())
            self.register_buffer("scale", weight.scale.to(_KERNEL_DTYPE))

    def _kernel(self):
        return torch.ops.fastlfm_cpu.gemv_q8.default, (self.packed, self.scale)

    def _mm_torch(self, x):
        return torch.ops.aten._weight_int8pack_mm(x.to(_KERNEL_DTYPE).contiguous(), self.q, self.scale).to(x.dtype)


class Int4Linear(GemvLinear):
    """int4 weight, scale and zero per group of inputs; the input's dtype out. Through fastlfm's
    kernels where they run (as `Int8Linear`), else in the layout of torch's CPU int4 kernel."""

    def __init__(self, weight: Int4Weight):
        super().__init__(weight.shape[1], weight.shape[0])
        self.group_size = weight.group_size
        self.gemv = cpu_gemv.supports(*weight.shape, weight.group_size) and cpu_gemv.available()
        if self.gemv:
            packed, coefficients = cpu_gemv.pack_int4(weight.q, weight.scale, weight.zero, weight.group_size)
            self.register_buffer("packed", packed)
            self.register_buffer("coefficients", coefficients)
            return
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weight.q.to(torch.int32).contiguous(), 1))
        # (K / group, N, 2): [scale, zero] per group and output channel
        self.register_buffer("scale_zero", torch.stack([weight.scale, weight.zeros()], -1).transpose(0, 1)
                             .contiguous().to(_KERNEL_DTYPE))

    def _kernel(self):
        return torch.ops.fastlfm_cpu.gemv_q4.default, (self.packed, self.coefficients, self.group_size)

    def _mm_torch(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(_KERNEL_DTYPE).contiguous(), self.packed,
                                                       self.group_size, self.scale_zero)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row; an `Int8Linear` over the same table is
    the tied LM head (where fastlfm's kernels run, the table is in their layout and a lookup
    gathers its rows from there: one copy serves both)."""

    def __init__(self, weight: Int8Weight, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        table = Int8Linear(weight)  # the head's layout; the embedding keeps its buffers
        self.gemv = table.gemv
        self.register_buffer("packed" if self.gemv else "q", table.packed if self.gemv else table.q)
        self.register_buffer("scale", table.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gemv:  # rows from the (N/16, K/4, 16, 4) layout of q + 128, in one kernel call
            return torch.ops.fastlfm_cpu.embedding_q8(self.packed, self.scale, ids, self.num_embeddings, self.dtype)
        return self.q[ids].to(self.dtype) * self.scale[ids, None].to(self.dtype)

    def head(self) -> Int8Linear:
        head = Int8Linear.__new__(Int8Linear)
        CpuLinear.__init__(head, self.embedding_dim, self.num_embeddings)
        head.gemv = self.gemv
        head.register_buffer("packed" if self.gemv else "q", self.packed if self.gemv else self.q)  # shared
        head.register_buffer("scale", self.scale)
        return head


class FusedAway(nn.Module):
    """Marks a projection whose weight now lives in a fused kernel module (q/k/v in
    `qkv_weight`, w1/w3 in `w13_weight`); the model never calls it once fused."""

    def __init__(self, in_features: int, out_features: int, fused_into: str):
        super().__init__()
        self.in_features, self.out_features, self.fused_into = in_features, out_features, fused_into

    def forward(self, x):
        raise RuntimeError(f"this projection runs fused in `{self.fused_into}` (the model was prepared for CPU "
                           "inference by fastlfm.cpu_linear.prepare_for_cpu)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused_into={self.fused_into}"


def kernel_supports(weight: Weight) -> bool:
    """Whether a quantized kernel takes this shape: fastlfm's where they run (`cpu_gemv.supports`:
    the modules then use them), else torch's (int8: K % 32; int4: N % 16 and K % group)."""
    N, K = weight.shape
    if isinstance(weight, (Int8Weight, Int4Weight)) and cpu_gemv.available() \
            and cpu_gemv.supports(N, K, getattr(weight, "group_size", None)):
        return True
    if isinstance(weight, Int8Weight):
        return K % 32 == 0  # other K crash or misbehave in torch 2.13's _weight_int8pack_mm
    if isinstance(weight, Int4Weight):
        return N % 16 == 0 and K % weight.group_size == 0
    return True


def make_linear(weight: Weight, packs: Callable[[torch.Tensor], bool] | None = None) -> nn.Module:
    """The kernel module for a weight: packed (or plain, where `packs(weight)` says so) fp32/bf16,
    int8 or int4. A shape the quantized kernels do not take runs as bf16 (packed), de-quantized
    once."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype in (torch.float32, torch.bfloat16):
            return PackedLinear(weight) if packs is None or packs(weight) else PlainLinear(weight)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return lin
    if not kernel_supports(weight):
        return PackedLinear(weight.dequantize().to(_KERNEL_DTYPE))
    return Int8Linear(weight) if isinstance(weight, Int8Weight) else Int4Linear(weight)


# ----------------------------------------------------------------------------- the module swap
def _plain(linear: nn.Module) -> bool:
    """A bias-free nn.Linear (LoRA wrappers and biased layers keep their own path)."""
    return type(linear) is nn.Linear and linear.bias is None


WeightSource = Callable[[str, nn.Linear], Weight]


def _float_source(scheme: str | None, group_size: int) -> WeightSource:
    def source(name: str, linear: nn.Linear) -> Weight:
        if scheme is None:
            return linear.weight.detach()
        with naming(f"{name}.weight"):
            return quantize(linear.weight, scheme, group_size)
    return source


@contextlib.contextmanager
def naming(tensor: str):
    """A NonFiniteWeight raised inside names `tensor`."""
    try:
        yield
    except NonFiniteWeight as e:
        raise NonFiniteWeight(f"tensor {tensor}: {e}") from None


@torch.no_grad()
def install_cpu_linears(model: nn.Module, source: WeightSource, head: Weight | None = None,
                        dtype: torch.dtype | None = None, packs: Callable[[torch.Tensor], bool] | None = None) -> None:
    """Swap the projections of every LFM2 layer (and the LM head) for kernel modules, with weights
    from `source(qualified module name, linear)`; q/k/v and w1/w3 are fused first. `head`: the
    LM head's weight (int8: the tied embedding too, with outputs in `dtype`, default the
    embedding's). `packs(float weight)`: whether a float weight is pre-packed (default: all are)
    or runs as `PlainLinear`."""
    for owner, prefix, names, attr in _projection_jobs(model):
        if attr is not None:
            fused = _fusable(owner, names)
            if fused is None:
                continue
            setattr(owner, attr, None)  # drop a previous fused float weight (fuse_projections) first
            kernel = make_linear(concat_weights([source(f"{prefix}{n}", m) for n, m in zip(names, fused)]), packs)
            for n, m in zip(names, fused):
                setattr(owner, n, FusedAway(m.in_features, m.out_features, attr))
            setattr(owner, attr, kernel)
        elif _plain(getattr(owner, names[0])):
            setattr(owner, names[0], make_linear(source(f"{prefix}{names[0]}", getattr(owner, names[0])), packs))
    lm_head = getattr(model, "lm_head", None)
    if head is not None:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else _embed_tokens(model)
        tied = getattr(model.config, "tie_word_embeddings", False) or getattr(model.config, "tie_embedding", False)
        if isinstance(head, Int8Weight) and tied:
            emb = Int8Embedding(head, dtype or embed.weight.dtype)
            _set_embed_tokens(model, emb)
            model.lm_head = emb.head()
        else:
            model.lm_head = make_linear(head)
    elif lm_head is not None and _plain(lm_head):
        model.lm_head = make_linear(source("lm_head", lm_head), packs)


Job = tuple[nn.Module, str, list[str], "str | None"]  # (owner, name prefix, projections, fused attribute)


def _projection_jobs(model: nn.Module) -> list[Job]:
    """The projections `install_cpu_linears` swaps, in model order: q/k/v into `qkv_weight` and
    w1/w3 into `w13_weight` (fused), the others one by one (attribute None); the LM head apart."""
    from .models.lfm2 import Lfm2Attention, Lfm2MLP, Lfm2ShortConv

    jobs: list[Job] = []
    for prefix, module in list(model.named_modules()):
        prefix = f"{prefix}." if prefix else ""
        if isinstance(module, Lfm2Attention):
            jobs += [(module, prefix, ["q_proj", "k_proj", "v_proj"], "qkv_weight"), (module, prefix, ["out_proj"], None)]
        elif isinstance(module, Lfm2ShortConv):
            jobs += [(module, prefix, ["in_proj"], None), (module, prefix, ["out_proj"], None)]
        elif isinstance(module, Lfm2MLP):
            jobs += [(module, prefix, ["w1", "w3"], "w13_weight"), (module, prefix, ["w2"], None)]
    return jobs


def _fusable(owner: nn.Module, names: list[str]) -> list[nn.Module] | None:
    mods = [getattr(owner, n) for n in names]
    return mods if all(_plain(m) for m in mods) else None


def _embed_tokens(model: nn.Module) -> nn.Module:
    inner = model.model
    return inner.embed_tokens if hasattr(inner, "embed_tokens") else inner.language_model.embed_tokens


def _set_embed_tokens(model: nn.Module, module: nn.Module) -> None:
    inner = model.model if hasattr(model.model, "embed_tokens") else model.model.language_model
    inner.embed_tokens = module


# ----------------------------------------------------------------------------- packed or plain (fp32 / bf16)
PackChoice = Union[bool, Literal["auto"]]
PACK_ENV = "FASTLFM_CPU_PACK"  # "auto" (default), "packed" / "1" or "plain" / "0": overrides pack="auto"
KernelKey = tuple[torch.dtype, tuple[int, int]]  # (weight dtype, (out, in))
# (packed seconds, plain seconds) per key; None: no trustworthy timing (kept packed, measured again next time)
Measure = Callable[[dict[KernelKey, list[torch.Tensor]]], dict[KernelKey, "tuple[float, float] | None"]]

SAMPLE_BYTES = 64 * 2**20  # weights timed per shape (at least one): together they overflow the caches
PACK_MARGIN = 0.98  # packed must be 2% faster: plain is the lighter choice (a tied head is not copied)
# A product slower than this (plus the call's overhead) was held up by other processes, not by its kernel.
MIN_PLAUSIBLE_BANDWIDTH = 5e9  # bytes per second (this 2-core host streams ~25 GB/s when quiet)
# Decisions measured while other processes kept more than this share of the machine's CPU time busy
# are used by this process only, not saved: a busy hour's choice (plain everywhere, on the 2-vCPU
# development machine) would otherwise stay for good where a quiet one picks packed, ~20% faster.
MAX_OTHERS_BUSY = 0.15
_decisions: dict[KernelKey, bool] = {}  # per process: a second engine does not measure again
# ... and per host, on disk: a later process (a CLI call, a cold start) reads them instead of measuring.
DECISIONS_FILE_ENV = "FASTLFM_CPU_KERNELS_FILE"  # default: $XDG_CACHE_HOME/fastlfm/cpu_kernels.json
_saved_loaded = False


def _decisions_file() -> Path:
    path = os.environ.get(DECISIONS_FILE_ENV)
    if path:
        return Path(path)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "fastlfm", "cpu_kernels.json")


def _host_key() -> str:
    """What the timings depend on: the CPU model, its core count, torch's threads and version."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor()}|cpus={os.cpu_count()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _entry(key: KernelKey) -> str:
    dtype, (n, k) = key
    return f"{str(dtype).removeprefix('torch.')} {n}x{k}"


def _read_saved() -> dict:
    try:
        return json.loads(_decisions_file().read_text())
    except (OSError, ValueError):
        return {}


def _load_saved() -> None:
    """This host's saved decisions into the per-process cache (once per process)."""
    global _saved_loaded
    if _saved_loaded:
        return
    _saved_loaded = True
    for entry, packed in _read_saved().get(_host_key(), {}).items():
        try:
            dtype_name, shape = entry.split(" ")
            n, k = map(int, shape.split("x"))
            dtype = getattr(torch, dtype_name)
        except (ValueError, AttributeError):
            continue  # written by another version: ignored
        if isinstance(packed, bool) and isinstance(dtype, torch.dtype):
            _decisions.setdefault((dtype, (n, k)), packed)


def _save(new: dict[KernelKey, bool]) -> None:
    """Add `new` decisions to this host's entry of the file (best effort: a read-only home is fine)."""
    path = _decisions_file()
    data = _read_saved()
    data.setdefault(_host_key(), {}).update({_entry(key): packed for key, packed in new.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def resolve_pack(pack: PackChoice) -> PackChoice:
    """`pack`, or with "auto" the `FASTLFM_CPU_PACK` environment variable's choice (for benchmarks)."""
    if pack != "auto":
        return bool(pack)
    env = os.environ.get(PACK_ENV, "auto").strip().lower()
    if env in ("", "auto"):
        return "auto"
    if env in ("1", "true", "packed"):
        return True
    if env in ("0", "false", "plain"):
        return False
    raise ValueError(f"{PACK_ENV}={env!r}: use auto, packed or plain")


def measure_float_kernels(samples: dict[KernelKey, list[torch.Tensor]], repeats: int = 5,
                          budget_s: float = 0.3) -> dict[KernelKey, tuple[float, float] | None]:
    """Seconds per batch-1 product, (packed oneDNN, plain F.linear), for each (dtype, shape).

    Each sample weight is run by both kernels back to back (which one first alternates), in
    `repeats` passes over all shapes (fewer once past `budget_s`; at least one), so that a
    product reads its weight from memory as a decode step does, not from a cache that repeating
    one weight would warm. On a shared host other processes slow many calls (2 threads on 2 busy
    cores), so the estimate is robust rather than a mean: plain = its fastest call, packed =
    plain x the median of the paired ratios packed / plain (a pair sees the same load). None for
    a shape whose fastest call of either kernel read its weight slower than `MIN_PLAUSIBLE_BANDWIDTH`
    (every call delayed: the comparison would be the scheduler's, not the kernels')."""
    kernels = {key: list(zip([PackedLinear(w) for w in ws], [PlainLinear(w) for w in ws]))
               for key, ws in samples.items()}
    inputs = {(dtype, shape): torch.randn(1, shape[1]).to(dtype) for dtype, shape in samples}
    for key, pairs in kernels.items():  # warm-up: oneDNN builds its primitive on the first call
        for m in pairs[0]:
            m(inputs[key])
    ratios: dict[KernelKey, list[float]] = {key: [] for key in samples}
    best = {key: [float("inf"), float("inf")] for key in samples}  # fastest call, packed / plain
    start, flip = time.perf_counter(), False
    for _ in range(repeats):
        for key, pairs in kernels.items():
            x = inputs[key]
            for pair in pairs:
                flip = not flip
                took = {}
                for which in ((0, 1) if flip else (1, 0)):
                    t = time.perf_counter()
                    pair[which](x)
                    took[which] = time.perf_counter() - t
                ratios[key].append(took[0] / took[1])
                best[key] = [min(best[key][i], took[i]) for i in (0, 1)]
        if time.perf_counter() - start > budget_s:
            break
    out: dict[KernelKey, tuple[float, float] | None] = {}
    for (dtype, (n, k)), (packed_best, plain_best) in best.items():
        plausible = max(packed_best, plain_best) < n * k * dtype.itemsize / MIN_PLAUSIBLE_BANDWIDTH + 200e-6
        key = (dtype, (n, k))
        out[key] = (plain_best * statistics.median(ratios[key]), plain_best) if plausible else None
    return out


def choose_float_kernels(samples: dict[KernelKey, list[torch.Tensor]],
                         measure: Measure | None = None) -> dict[KernelKey, bool]:
    """Whether each (dtype, shape) runs pre-packed (True) or with plain F.linear (False): measured
    once per process (`measure`, default `measure_float_kernels`, gets the keys not decided yet;
    tests pass fake timings). A shape without a trustworthy timing stays packed (the choice before
    measuring was added) and is not cached: the next model measures it again. Decisions are also
    saved per host (`_decisions_file`, keyed by CPU model, cores, torch threads and version) and read
    by later processes, unless other processes kept the CPU busy while they were measured
    (`MAX_OTHERS_BUSY`): then they serve this process only."""
    if measure is None:  # (fake timings in tests decide alone)
        _load_saved()
    todo = {key: ws for key, ws in samples.items() if key not in _decisions}
    got, new = {}, {}
    others_busy = None
    if todo:
        before = _cpu_times()
        for key, timing in (measure or measure_float_kernels)(todo).items():
            if timing is None:
                got[key] = True
            else:
                got[key] = _decisions[key] = new[key] = timing[0] < PACK_MARGIN * timing[1]
        others_busy = _others_busy_share(before, _cpu_times())
    if new and measure is None and (others_busy is None or others_busy <= MAX_OTHERS_BUSY):
        _save(new)
    return {key: _decisions[key] if key in _decisions else got.get(key, True) for key in samples}


def _cpu_times() -> tuple[float, float, float] | None:
    """(the machine's busy CPU seconds, all its CPU seconds, this process's CPU seconds) so far;
    None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz, time.process_time()


def _others_busy_share(before: tuple[float, float, float] | None,
                       after: tuple[float, float, float] | None) -> float | None:
    """The share of the machine's CPU time that other processes used between two `_cpu_times`."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others) / (after[1] - before[1])


def float_kernel_decisions() -> dict[KernelKey, bool]:
    """The (dtype, shape) -> packed decisions this process has measured so far."""
    return dict(_decisions)


def _float_samples(model: nn.Module, cap_bytes: int = SAMPLE_BYTES) -> dict[KernelKey, list[torch.Tensor]]:
    """The float weights `install_cpu_linears` would build (fused ones concatenated), grouped by
    (dtype, shape), up to `cap_bytes` per group (at least one weight each)."""
    samples: dict[KernelKey, list[torch.Tensor]] = {}

    def add(weights: list[torch.Tensor]) -> None:
        if weights[0].dtype not in (torch.float32, torch.bfloat16) or gemv_runs(weights[0]):
            return  # (fastlfm's kernel runs these: nothing to choose)
        n, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
        group = samples.setdefault((weights[0].dtype, (n, k)), [])
        if not group or (len(group) + 1) * n * k * weights[0].element_size() <= cap_bytes:
            group.append(concat_weights(weights) if len(weights) > 1 else weights[0].detach())

    for owner, _, names, attr in _projection_jobs(model):
        mods = _fusable(owner, names) if attr is not None else [getattr(owner, names[0])]
        if mods is not None and all(_plain(m) for m in mods):
            add([m.weight for m in mods])
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and _plain(lm_head):
        add([lm_head.weight])
    return samples


def prepared_for_cpu(model: nn.Module) -> bool:
    return getattr(model, "cpu_linears", None) is not None


@torch.no_grad()
def prepare_for_cpu(model: nn.Module, quantization: str | None = None, group_size: int = 32,
                    pack: PackChoice = "auto") -> nn.Module:
    """Make `model` (on the CPU) ready for fast inference, in place: fp32/bf16 projections
    pre-packed for oneDNN or run by plain F.linear, or weight-only int8 / int4 (`quantization`),
    with the embedding and LM head int8 when quantized. Idempotent; the model can no longer be
    trained or saved with `save_pretrained` afterwards (quantized checkpoints: `save_quantized`).

    `pack` (float models): "auto" (default) times a batch-1 product of each distinct (dtype,
    weight shape) with both kernels, once per process (+0.3-0.45 s for LFM2-350M), and packs
    the shapes where oneDNN's packed kernel is faster on this host; True packs all, False packs
    none. The `FASTLFM_CPU_PACK` environment variable (packed / plain / auto) overrides "auto"."""
    if quantization is not None and quantization not in QUANTIZATION_SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATION_SCHEMES)}")
    if quantization == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")
    if prepared_for_cpu(model):
        if quantization is not None and model.cpu_linears != quantization:
            raise ValueError(f"the model is already prepared as {model.cpu_linears!r}; load it again to "
                             f"quantize it as {quantization!r}")
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"prepare_for_cpu: the model is on {device}; quantization and weight packing are "
                         "CPU-only for now")
    head = None
    if quantization is not None:
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and _plain(lm_head):
            with naming("lm_head.weight"):  # int8 for the head (and the tied embedding) in both schemes
                head = quantize_int8(lm_head.weight)
    packs = None  # quantized: the float fallbacks stay packed, as before
    if quantization is None:
        pack = resolve_pack(pack)
        if pack == "auto":
            decisions = choose_float_kernels(_float_samples(model))
            # weights that fastlfm's kernel takes stay plain: it beats both of torch's for decode
            packs = lambda w: not gemv_runs(w) and decisions.get((w.dtype, tuple(w.shape)), True)  # noqa: E731
        else:
            packs = lambda w: pack  # noqa: E731
    install_cpu_linears(model, _float_source(quantization, group_size), head, packs=packs)
    model.cpu_linears = quantization or str(model.dtype).removeprefix("torch.")
    return model


@torch.no_grad()
def restore_float_linears(model: nn.Module) -> nn.Module:
    """Undo `prepare_for_cpu` on a float model: plain nn.Linear projections again (split out of the
    fused ones), with the exact weights (oneDNN's reorder is lossless), tied head re-tied, so the
    model can be trained and saved. A quantized model cannot be: its float weights are gone."""
    if not prepared_for_cpu(model):
        return model
    if model.cpu_linears in QUANTIZATION_SCHEMES:
        raise ValueError(f"this model's projections are quantized ({model.cpu_linears}); it cannot be trained or "
                         "saved with save_pretrained (quantized checkpoints: fastlfm.cpu_linear.save_quantized)")

    def linear(weight: torch.Tensor) -> nn.Linear:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        m.weight = nn.Parameter(weight.contiguous())
        return m

    for module in list(model.modules()):
        for attr, names in (("qkv_weight", ("q_proj", "k_proj", "v_proj")), ("w13_weight", ("w1", "w3"))):
            fused = getattr(module, attr, None)
            if isinstance(fused, (PackedLinear, PlainLinear)) and all(isinstance(getattr(module, n), FusedAway)
                                                                       for n in names):
                parts = _dense(fused).split([getattr(module, n).out_features for n in names])
                setattr(module, attr, None)
                for n, part in zip(names, parts):
                    setattr(module, n, linear(part.clone()))
        for name, child in list(module.named_children()):
            if isinstance(child, (PackedLinear, PlainLinear)):
                setattr(module, name, linear(_dense(child)))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    del model.cpu_linears
    return model


def _dense(linear: PackedLinear | PlainLinear) -> torch.Tensor:
    return linear.packed.to_dense() if isinstance(linear, PackedLinear) else linear.weight


# ----------------------------------------------------------------------------- saved checkpoints
def quantization_config(scheme: str, group_size: int) -> dict:
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size if scheme == "int4" else None}


def _quantized_tensors(name: str, w: QuantizedWeight) -> dict[str, torch.Tensor]:
    if isinstance(w, Int8Weight):
        return {f"{name}.qweight": w.q, f"{name}.scales": w.scale}
    q = w.q
    out = {f"{name}.qweight": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(),  # two per byte, low nibble first
           f"{name}.scales": w.scale}
    if w.zero is not None:
        out[f"{name}.zeros"] = w.zero
    return out


@torch.no_grad()
def save_quantized(model: nn.Module, folder: str | Path, scheme: str, group_size: int = 32) -> None:
    """Write a quantized checkpoint of a float model (not yet prepared): the HF folder layout with
    every projection as `<name>.qweight` + `.scales` (+ `.zeros` for min/max int4) and
    `quantization_config` in config.json. `load_model` reads it back without the float weights."""
    from safetensors.torch import save_file

    if prepared_for_cpu(model):
        raise ValueError("save_quantized needs the float model (this one's weights are already packed/quantized)")
    quantize(torch.zeros(1, 32), scheme, 32)  # validates the scheme name
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    head = getattr(model, "lm_head", None)
    projections = _lfm2_projections(model)
    for name, module in model.named_modules():
        if _plain(module) and (module in projections or module is head):
            with naming(f"{name}.weight"):
                w = quantize_int8(module.weight) if module is head else quantize(module.weight, scheme, group_size)
            tensors.update(_quantized_tensors(name, w))
            quantized.add(f"{name}.weight")
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    embed_name = next((n for n, p in model.named_parameters() if p is _embed_tokens(model).weight), None)
    for name, t in model.state_dict().items():
        if name in quantized or name in tied:
            continue
        if name == embed_name and "lm_head.weight" in quantized and getattr(model.config, "tie_word_embeddings", False):
            continue  # the tied embedding is the head's int8 table
        tensors[name] = t.detach().contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = quantization_config(scheme, group_size)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if getattr(model, "generation_config", None):
        (folder / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2))


def _lfm2_projections(model: nn.Module) -> set[nn.Module]:
    """The projections `install_cpu_linears` swaps: those of LFM2 attention, conv and MLP blocks
    (not, e.g., an LFM2-VL vision tower's)."""
    from .models.lfm2 import Lfm2Attention, Lfm2MLP, Lfm2ShortConv

    names = {Lfm2Attention: ("q_proj", "k_proj", "v_proj", "out_proj"), Lfm2ShortConv: ("in_proj", "out_proj"),
             Lfm2MLP: ("w1", "w3", "w2")}
    return {getattr(m, n) for m in model.modules() for kind, ns in names.items() if isinstance(m, kind) for n in ns}


def read_quantized_weights(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, QuantizedWeight]:
    """`<name>.qweight/.scales/.zeros` of a saved quantized checkpoint -> {module name: weight}.
    Removes the entries it consumed from `tensors`."""
    qc = config.get("quantization_config") or {}
    scheme, group_size = qc.get("scheme"), qc.get("group_size")
    out: dict[str, QuantizedWeight] = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        q, scales = tensors.pop(key), tensors.pop(f"{name}.scales", None)
        if scales is None:
            raise ValueError(f"quantized checkpoint: {name}.qweight has no {name}.scales")
        if q.dtype == torch.int8:
            out[name] = Int8Weight(q, scales.float())
            continue
        zeros = tensors.pop(f"{name}.zeros", None)  # (none: symmetric)
        if q.dtype != torch.uint8:
            raise ValueError(f"quantized checkpoint: {name}.qweight is {q.dtype}, neither int8 nor packed int4 (uint8)")
        unpacked = torch.stack([q & 15, q >> 4], -1).view(q.shape[0], -1)
        g = unpacked.shape[1] // scales.shape[1]
        if scheme == "int4" and group_size and g != group_size:
            raise ValueError(f"quantized checkpoint: {name} has groups of {g}, config says {group_size}")
        if zeros is not None and zeros.shape != scales.shape:
            raise ValueError(f"quantized checkpoint: {name}.zeros is {tuple(zeros.shape)}, "
                             f"{name}.scales {tuple(scales.shape)}")
        out[name] = Int4Weight(unpacked, scales.float(), zeros.float() if zeros is not None else None, g)
    return out


@torch.no_grad()
def build_quantized_model(cls, config, floats: dict[str, torch.Tensor], qweights: dict[str, QuantizedWeight],
                          head: Weight | None, dtype: torch.dtype, scheme: str) -> nn.Module:
    """A model of class `cls` built on the meta device and filled with quantized projections
    (`qweights`, by module name), `head` for the LM head (the tied embedding too, when int8) and
    float tensors for the rest (`floats`, by state-dict name; cast to `dtype`), on the CPU."""
    from .loading import CheckpointError, model_on_meta

    model = model_on_meta(cls, config)

    def source(name: str, linear: nn.Linear) -> Weight:
        if name in qweights:
            return qweights.pop(name)
        w = floats.pop(f"{name}.weight", None)
        if w is None and name == "lm_head":
            w = floats.get(f"{_embed_name(model)}.weight")
        if w is None:
            raise CheckpointError(f"tensor {name}.weight is missing from the checkpoint")
        return w.to(dtype)

    install_cpu_linears(model, source, head, dtype)
    if qweights:
        raise CheckpointError(f"quantized tensors the model does not have: {', '.join(sorted(qweights)[:10])}")
    expected = {k: v for k, v in model.state_dict().items() if v.is_meta}
    missing = [k for k in expected if k not in floats]
    unexpected = [k for k in floats if k not in expected]
    if missing or unexpected:
        raise CheckpointError("checkpoint does not fit the model: "
                              + (f"missing {', '.join(missing[:10])}" if missing else "")
                              + (f"; unexpected {', '.join(unexpected[:10])}" if unexpected else ""))
    for k, v in floats.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in floats.items()}, strict=False, assign=True)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device("cpu"))
    model.cpu_linears = scheme
    return model.eval()


def _embed_name(model: nn.Module) -> str:
    embed = _embed_tokens(model)
    return next(n for n, m in model.named_modules() if m is embed)


def load_quantized_checkpoint(cls, folder: Path, raw_config: dict, config, dtype: torch.dtype) -> nn.Module:
    """A checkpoint written by `save_quantized` (config.json has quantization_config)."""
    from .loading import safetensors_files
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        tensors.update(load_file(str(file)))
    qweights = read_quantized_weights(tensors, raw_config)
    head = qweights.pop("lm_head", None)
    model = build_quantized_model(cls, config, tensors, qweights, head, dtype,
                                  raw_config["quantization_config"]["scheme"])
    gen_path = folder / "generation_config.json"
    model.generation_config = GenerationConfig.from_dict(json.loads(gen_path.read_text())) if gen_path.is_file() \
        else None
    return model
