"""fastlfm's own CPU matrix-vector kernels (csrc/cpu_gemv.cpp), built on first use.

torch's CPU kernels leave batch-1 decode below memory speed: its bf16 products stream ~20 GB/s,
and its int8 / int4 weight-only kernels de-quantize every weight to floating point
(bench/cpu_kernels.py; BENCHMARKS.md, issue 19). These kernels multiply as llama.cpp does: the
input row is quantized to int8 in blocks of 32 and int8 / int4 weights are multiplied with
AVX-512 VNNI integer dot products; bf16 weights with AVX-512 BF16 pair dot products, fp32 ones with
FMA.

They need AVX-512 (F, BW, VNNI, BF16) and a C++ compiler: `torch.utils.cpp_extension` compiles
them once per host and torch version (~15 s, into ~/.cache/fastlfm/cpu_kernels) and later
processes load the built library directly (~10 ms). Elsewhere, or with `FASTLFM_CPU_GEMV=0`,
`available()` is False and fastlfm.cpu_linear uses torch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

ENV = "FASTLFM_CPU_GEMV"  # "0" turns the kernels off (torch's kernels then run every product)
BUILD_DIR_ENV = "FASTLFM_CPU_GEMV_DIR"  # where they are built (default ~/.cache/fastlfm/cpu_kernels)
ROWS = 16  # output rows per interleaved group (csrc/cpu_gemv.cpp)
BLOCK = 32  # inputs per activation scale
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "fma")
_SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.cpp"
# -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers (serial without it); at
# run time the library binds to the libgomp.so.1 that torch has already loaded. -ffp-contract=off:
# a product and a sum stay two roundings, as in the torch ops the small kernels stand in for.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
           "-mavx512vnni", "-mavx512bf16", "-mfma", "-mf16c"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided, "error": why not


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def available() -> bool:
    """Whether the kernels run here (built and loaded on the first call)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _build()
            if not _state["ok"]:
                log.info("fastlfm CPU kernels not used: %s", _state["error"])
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    return None if available() else str(_state["error"])


def _build_root() -> Path:
    """Where the kernels are built: $FASTLFM_CPU_GEMV_DIR, else the user's cache."""
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "fastlfm", "cpu_kernels")


def _build() -> tuple[bool, str | None]:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off"):
        return False, f"{ENV}={os.environ[ENV]}"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    # The name carries a hash of the source, the flags and torch's version: an edited kernel or
    # another torch gets its own build, never a stale one.
    key = _SOURCE.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode() + torch.__version__.encode()
    name = f"fastlfm_cpu_gemv_{hashlib.sha1(key).hexdigest()[:12]}"
    folder = _build_root() / name
    library = folder / f"{name}.so"
    if library.is_file() and not (folder / "lock").exists():  # built before: load it (~10 ms)
        try:
            torch.ops.load_library(str(library))
            return True, None
        except OSError:
            pass  # damaged: build it again below
    from torch.utils import cpp_extension  # (imports setuptools: only when building)

    path = os.environ.get("PATH", "")
    try:
        import ninja  # the PyPI package (a dependency): its binary, even where the venv is not on PATH

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass  # a ninja on PATH, if any
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("fastlfm: compiling its CPU kernels (once per host and torch version, ~15 s)")
        cpp_extension.load(name, [str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                           build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"building {_SOURCE.name} failed: {first}"
    finally:
        os.environ["PATH"] = path
    return True, None


# ----------------------------------------------------------------------------- weight layouts
HUGE_PAGES_ENV = "FASTLFM_HUGE_PAGES"  # "0": the kernels' weights on ordinary 4 KB pages
HUGE_PAGE = 2**21


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a weight the kernels stream, in anonymous memory advised as
    transparent huge pages (2 MB), where the OS allows it (Linux; THP "madvise" or "always"). A decode
    step reads every weight once: with 4 KB pages the hardware prefetchers stop at each page boundary
    and every page costs a TLB miss. Used for the int8 / int4 layouts (BENCHMARKS.md session 12, a
    2-core Zen 4 host: 350M decode +12% int8, +7% int4; quantizing at load 0.3-0.5 s longer, as the
    kernel zeroes or compacts memory for each huge page). Below 2 MB: torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get(HUGE_PAGES_ENV, "1") == "0":
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP off: ordinary pages, still correct
        pass
    raw = torch.frombuffer(area, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE  # THP backs 2 MB-aligned ranges only
    return raw[start:start + nbytes].view(dtype).view(shape)


MADV_COLLAPSE = 25  # Linux 6.1+: move a range onto huge pages in place (the same addresses and bytes)


def collapse_onto_huge_pages(tensors: list[torch.Tensor]) -> int:
    """Ask the kernel to move the whole 2 MB pages inside these CPU tensors' memory onto transparent
    huge pages in place (madvise MADV_COLLAPSE: addresses and contents stay as they are, so recorded
    steps keep their pointers; readers meanwhile wait at most for a page's copy). For the float
    weights, which load on ordinary pages because faulting fresh huge pages at load cost the cold
    start 0.15-0.6 s (a step reads them all: ~5-10% faster decode on huge pages, BENCHMARKS.md
    issue 19). Blocks for up to ~1 s a GB (the engine runs it on a thread: cpu_linear.HugePageMove);
    ctypes releases the GIL meanwhile. Returns the bytes the kernel took; 0 where it does not do this (not Linux,
    an older kernel, THP off, FASTLFM_HUGE_PAGES=0)."""
    if not huge_pages_usable():
        return 0
    done = 0
    for t in tensors:
        start, end = _whole_pages(t, HUGE_PAGE)
        # A refusal leaves the pages as they were: EINVAL where the kernel has no MADV_COLLAPSE or THP
        # is off, and for a writable file mapping (a bf16 checkpoint's tensors read in place);
        # EAGAIN / ENOMEM when no huge page is free.
        if end > start and _madvise()(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
    return done


def _whole_pages(t: torch.Tensor, page: int) -> tuple[int, int]:
    """[start, end) of the whole pages of `page` bytes inside t's memory (end <= start: none)."""
    return -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise(addr, length, advice) through ctypes (which releases the GIL during the call)."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def huge_pages_usable() -> bool:
    """Whether weights may go on transparent huge pages here (Linux with THP not "never", and not
    FASTLFM_HUGE_PAGES=0)."""
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def file_backed(tensors: list[torch.Tensor]) -> list[bool]:
    """For each CPU tensor, whether its first byte lies in a mapping of a file (/proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # inode, path
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    return [any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in tensors]


def release_file_pages(tensors: list[torch.Tensor]) -> None:
    """Drop the whole pages inside these tensors' file-backed memory from the process (MADV_DONTNEED):
    for an unwritten private file mapping a later read maps the file's bytes again."""
    for t, in_file in zip(tensors, file_backed(tensors)):
        start, end = _whole_pages(t, mmap.PAGESIZE)
        if in_file and end > start:  # (anonymous memory would read back as zeros)
            _madvise()(start, end - start, mmap.MADV_DONTNEED)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t with zero rows appended up to a multiple of ROWS."""
    pad = -t.shape[0] % ROWS
    return t if not pad else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) int8 and (N,) scales -> the q8 layout (N/16, K/4, 16, 4) of `q + 128` as uint8 and
    fp32 scales padded to a multiple of 16 rows."""
    n, k = q.shape
    shape = (-(-n // ROWS), k // 4, ROWS, 4)
    packed = empty_on_huge_pages(shape, torch.uint8)
    if available():  # (one pass, not a strided copy)
        torch.ops.fastlfm_cpu.pack_q8_into(q.contiguous(), packed)
    else:
        u = (_pad_rows(q).to(torch.int16) + 128).to(torch.uint8)
        packed.copy_(u.view(-1, ROWS, k // 4, 4).transpose(1, 2))
    return packed, _pad_rows(scale.float()).contiguous()


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) codes 0..15 with w = (q - 8) * scale (+ zero) per group -> the q4 layout
    (N/16, K/8, 16, 4) uint8 (low nibble: inputs 8c..8c+3, high: 8c+4..8c+7) and the per group
    [scale, zero] (N/16, K/group, 2, 16), or [scale] (N/16, K/group, 1, 16) for zero None, as fp16
    (exact for fastlfm's bf16-rounded scales and for GGUF's fp16 ones)."""
    n, k = q.shape
    packed = empty_on_huge_pages((-(-n // ROWS), k // 8, ROWS, 4), torch.uint8)
    if available():  # (one pass, not strided tensor ops)
        torch.ops.fastlfm_cpu.pack_q4_into(q.contiguous(), packed)
    else:
        qp = _pad_rows(q).view(-1, ROWS, k // 8, 2, 4).permute(0, 2, 1, 3, 4)
        torch.bitwise_or(qp[..., 0, :], qp[..., 1, :] << 4, out=packed)
    parts = [scale] if zero is None else [scale, zero]
    scale_zero = torch.stack([_pad_rows(t.float()) for t in parts], 0)
    return packed, scale_zero.view(len(parts), -1, ROWS, k // group_size).permute(1, 3, 0, 2).to(
        torch.float16).contiguous()


def supports(n: int, k: int, group_size: int | None = None) -> bool:
    """Shapes the kernels take: inputs a multiple of the activation block (and of the int4 group,
    itself a multiple of the block)."""
    if k % BLOCK:
        return False
    return group_size is None or (group_size % BLOCK == 0 and k % group_size == 0)


# ----------------------------------------------------------------------------- products
# Each product takes (rows, in_features) fp32 / bf16 inputs, or (rows, 2 in_features) with
# `silu_gate` (SiLU(gate) * up of [gate | up]), optionally RMSNorm-ed first (`norm` = (weight, eps));
# it returns residual + x W^T in `out_dtype` (the residual's dtype when one is given).
Norm = Optional[tuple[torch.Tensor, float]]


def _call(op, x: torch.Tensor, weights: tuple, n: int, out_dtype: torch.dtype, residual: torch.Tensor | None,
          norm: Norm, silu_gate: bool) -> torch.Tensor:
    """op(x, *weights, out, residual, norm weight, eps, silu_gate): the ops' common signature."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    out = torch.empty(x.shape[0], n, dtype=residual.dtype if residual is not None else out_dtype)
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    op(x.contiguous(), *weights, out, residual, norm_weight, eps, silu_gate)
    return out


def gemv_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, out_dtype: torch.dtype,
              residual: torch.Tensor | None = None, norm: Norm = None, silu_gate: bool = False) -> torch.Tensor:
    return _call(torch.ops.fastlfm_cpu.gemv_q8, x, (packed, scale), n, out_dtype, residual, norm, silu_gate)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, n: int,
              out_dtype: torch.dtype, residual: torch.Tensor | None = None, norm: Norm = None,
              silu_gate: bool = False) -> torch.Tensor:
    return _call(torch.ops.fastlfm_cpu.gemv_q4, x, (packed, scale_zero, group_size), n, out_dtype, residual, norm,
                 silu_gate)


def gemv_dense(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, residual: torch.Tensor | None = None,
               norm: Norm = None, silu_gate: bool = False) -> torch.Tensor:
    """A plain (N, K) fp32 or bf16 weight (bf16: the input rounded to bf16 first, as torch's bf16
    linear does)."""
    return _call(torch.ops.fastlfm_cpu.gemv_dense, x, (weight,), weight.shape[0], out_dtype, residual, norm,
                 silu_gate)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of (rows, n) fp32 / bf16 rows: the first maximum, or the first NaN (as torch)."""
    return torch.ops.fastlfm_cpu.argmax_rows(x.contiguous())


# The small ops of a batch-1 decode step (engine/context.py), one call each; see csrc/cpu_gemv.cpp.
# Slots and lengths are one-element tensors that the ops read themselves, so that a recorded step
# (engine/cpu_graph.py) sees the current ones at every replay.
def conv_step(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, states: torch.Tensor,
              slot: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """LFM2's conv block after in_proj for one token: bcx = [B | C | x] (3D,), weight (D, 1, K), and
    one conv layer's states (slots, K-1, D), of which the row's `slot` is updated in place (zeroed
    first for a new sequence: `past` 0 cached tokens); returns C * conv(B * x) (D,)."""
    return torch.ops.fastlfm_cpu.conv_step(bcx.contiguous(), weight.contiguous(), bias, states, slot, past)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm then rotate-half RoPE of one token's q (H, d) and k (Hkv, d)."""
    return torch.ops.fastlfm_cpu.qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, table: torch.Tensor, past: torch.Tensor,
                           qk_norm_rope: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor] | None = None
                           ) -> torch.Tensor:
    """One new token after `past` cached ones, its blocks `table` (a row of block ids): write its
    k / v (Hkv, d) at position `past` of the paged caches, then return its attention output (H, d)
    over the past + 1 positions. `qk_norm_rope` = (q norm weight, k norm weight, eps, cos, sin):
    q and k go through `qk_norm_rope` first, in the same call."""
    extra = qk_norm_rope if qk_norm_rope is not None else (None, None, 0.0, None, None)
    return torch.ops.fastlfm_cpu.paged_decode_attention(q, k, v, k_cache, v_cache, table, past, *extra)
