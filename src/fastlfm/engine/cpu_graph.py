"""A recorded step: the CPU's analogue of a CUDA graph.

A batch-1 decode step on the CPU is ~90 calls into the kernel library plus as many small torch ops,
and ~2 ms of it (20-30% of a quantized 350M step) is Python around them: the model's modules, the
forward context, argument checks (BENCHMARKS.md, issue 19). A CUDA graph removes that on the GPU by
recording the step's kernels on static buffers once and replaying them. `StepGraph` does the same on
the CPU: it runs the step once under a dispatch mode that records every op with its arguments, then
replays the ops alone, each writing into the tensor it produced when recorded:

- an op that writes its arguments (in-place, `out=`, the kernel library's products) runs again as
  recorded;
- a view (a split, a select, a reshape or `to` that returned its input's memory) is not replayed:
  its tensor aliases memory that the replay refills in place;
- `empty` is not replayed: the ops after it overwrite all of it;
- any other op runs again and its result lands in the recorded output (through the op's `out=`
  overload when it has one, else a copy).

As with a CUDA graph, the step must read its inputs from tensors whose memory stays put (the model
runner's static buffers) and must not read a tensor's values on the host: an op that does
(`.item()`, `int(t)`, data-dependent output shapes) makes recording fail with `NotReplayable`,
and the caller runs the step without a graph. (`.tolist()` and `.numpy()` read memory without the
dispatcher, unseen: the forward's paths must not use them; the engine's tests compare replayed
steps with eager ones.) Slots and lengths reach the kernel library's batch-1 ops as one-element
tensors that the ops read themselves (engine/context.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..loading import collection_paused

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                aten.new_empty.default, aten.new_empty_strided.default}


def _reads_host(func, args) -> bool:
    """Whether the op reads tensor values on the host: a scalar out (`.item()`), or an output shape
    that depends on the values (except indexing by integer tensors, whose shape does not)."""
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is aten.index.Tensor:
        return any(i is not None and (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])
    return True


class NotReplayable(RuntimeError):
    """The step did something a replay could not repeat (it read a tensor on the host)."""


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # (True makes torch import torch._dynamo, ~1 s, on the first recorded op)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func, args):
            raise NotReplayable(f"the step reads tensor values on the host ({func}): a replay would repeat "
                                "the values of the recording")
        out = func(*args, **kwargs)
        if not all(o is None or isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):
            raise NotReplayable(f"{func} returned a value to the host")
        self.calls.append((func, args, kwargs, out))
        return out


def _writes(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _memory(t: torch.Tensor) -> int:
    """Which memory a tensor uses (its storage; a oneDNN-packed weight has none to look at)."""
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return id(t)


@functools.lru_cache(maxsize=None)
def _out_overload(func) -> tuple[Any, tuple[str, ...]] | None:
    """(overload, names of its output arguments) of `func`'s `out=` form: the overload of the same op
    whose other arguments are func's, in name and type; None if it has none."""
    wanted = [(a.name, str(a.type)) for a in func._schema.arguments]
    packet = func.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        arguments = candidate._schema.arguments
        outs = tuple(a.name for a in arguments if a.is_out)
        inputs = [(a.name, str(a.type)) for a in arguments if not a.is_out]
        if outs and inputs == wanted and len(outs) == len(func._schema.returns):
            return candidate, outs
    return None


def _replay_call(func, args: tuple, kwargs: dict, out) -> Callable[[], object] | None:
    """A callable that repeats one recorded op into its recorded outputs, or None to skip it.

    An output that shares memory with an input (a view, or the tensor an in-place op returns) needs
    nothing; a fresh one must receive the op's new result."""
    outs = _tensors(out)
    inputs = {_memory(t) for t in _tensors((args, kwargs))}
    fresh = [i for i, o in enumerate(outs) if _memory(o) not in inputs]
    if not fresh:  # in-place or out=: run it again; a view: nothing to do
        return functools.partial(func, *args, **kwargs) if _writes(func) else None
    if func in _ALLOCATIONS:  # the ops after it overwrite all of it
        return None
    found = None if _writes(func) or len(fresh) < len(outs) else _out_overload(func)
    if found is not None:
        overload, names = found
        return functools.partial(overload, *args, **kwargs, **dict(zip(names, outs)))
    return _RunAndCopy(func, args, kwargs, [(i, outs[i]) for i in fresh])


class _RunAndCopy:
    """Repeats an op without an `out=` form and copies its fresh outputs into the recorded ones."""

    def __init__(self, func, args: tuple, kwargs: dict, targets: list[tuple[int, torch.Tensor]]):
        self.func, self.args, self.kwargs, self.targets = func, args, kwargs, targets

    def __call__(self) -> None:  # (per replayed step: no pytree walk, the ops return a tensor or a tuple)
        result = self.func(*self.args, **self.kwargs)
        result = result if isinstance(result, (tuple, list)) else (result,)
        for i, dst in self.targets:
            dst.copy_(result[i])


class StepGraph:
    """`run()` recorded once (it runs while recording; its return value is `output`), then repeated
    by `replay()` on the same tensors. Raises NotReplayable if `run` cannot be replayed."""

    def __init__(self, run: Callable[[], Any]):
        # Recording makes a few thousand objects, enough to start a full collection (~80 ms on a 350M
        # process) inside the step; most of them are kept, so there is little for it to find.
        with collection_paused():
            with _Recorder() as recorder:
                self.output = run()
            self.num_recorded = len(recorder.calls)
            self.program = [c for c in (_replay_call(*call) for call in recorder.calls) if c is not None]

    def replay(self) -> None:
        for call in self.program:
            call()
