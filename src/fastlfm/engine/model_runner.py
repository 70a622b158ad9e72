"""Runs one scheduled batch through the model: cache tensors, metadata, CUDA graphs, sampling."""

from __future__ import annotations

import logging
import math
import mmap
import warnings
from typing import Any

import torch

from ..models.lfm2 import fuse_projections
from ..ops import host_tensor, host_to_device
from ..sampling import argmax_rows
from .context import PagedContext, keep_eager_paths_out_of_compile
from .cpu_graph import NotReplayable, StepGraph
from .multimodal import has_image_rows, prefill_embeds
from .scheduler import ScheduledBatch
from .sequence import Sequence

log = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """The ladder of decode batch sizes captured as CUDA graphs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """The token counts of the single-prompt prefill graphs: 16, 24, 32, 48, 64, ... (powers of two and
    halfway steps, so a prompt pads by less than half) up to `max_tokens`."""
    sizes, t = set(), 16
    while t < max_tokens:
        sizes |= {t, t * 3 // 2}
        t *= 2
    return sorted({t for t in sizes if t < max_tokens} | {max_tokens})


class EagerReplay:
    """CPU stand-in for a captured step that is not recorded (a decode step cpu_graph.NotReplayable
    refused; prefill graphs, which only tests make on the CPU): `replay()` reruns the forward on the
    same static input buffers into the same output buffer, as a CUDA graph replay does."""

    def __init__(self, run, out: torch.Tensor):
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())


class ModelRunner:
    def __init__(self, model, *, block_size: int, num_blocks: int, num_conv_slots: int,
                 max_model_len: int, max_num_seqs: int, use_cuda_graphs: bool, use_triton: bool,
                 max_graph_batch_size: int = 256, compile: bool = False, max_vision_views: int = 32,
                 lazy_graphs: bool = False, num_conv_snapshots: int = 0, prefill_graph_tokens: int = 0,
                 cpu_graphs: bool = False, in_flight_ids: bool = True):
        self.model = model
        fuse_projections(model)  # q/k/v and w1/w3 as one GEMM each
        cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.use_triton = use_triton
        # Whether a step may take ids of the step still in flight (asynchronous scheduling): a decode graph
        # of a synchronous engine leaves out their selection (4 ops; ~60 us of a CPU step).
        self.in_flight_ids = in_flight_ids
        # MoE experts with the Triton path: "triton" (kernels/moe.py, every step) or "grouped_mm" (torch's
        # grouped GEMM, the model's own path; bench/gpu.py compares them on prefill).
        self.moe_backend = "triton"
        # Batch-1 decode steps run these weight shapes through the fused projection kernel: the
        # shapes tuned faster than cuBLAS + the kernels it replaces on this GPU model (kernels/linear.py).
        self.fused_linear_shapes: frozenset[tuple[int, int]] = frozenset()
        if use_triton:  # registers the custom ops (triton import) outside any torch.compile trace
            from .kernels import linear, ops  # noqa: F401
            self.fused_linear_shapes = linear.faster_shapes(self.device)
        self.max_vision_views = max_vision_views
        attn = [i for i in range(cfg.num_hidden_layers) if cfg.is_attention_layer(i)]
        conv = [i for i in range(cfg.num_hidden_layers) if not cfg.is_attention_layer(i)]
        self.attn_index = {layer: j for j, layer in enumerate(attn)}
        self.conv_index = {layer: j for j, layer in enumerate(conv)}
        Hkv, d = cfg.num_key_value_heads, cfg.head_dim
        # One extra block / slot at the end: the padding target for graph rows that are unused.
        self.padding_block, self.padding_slot = num_blocks, num_conv_slots
        shape = (num_blocks + 1, block_size, Hkv, d)
        # Zeros, not empty: masked-out positions still meet p=0 * v, and 0 * NaN would be NaN.
        self.kv_caches = [(zeros(shape, self.dtype, self.device), zeros(shape, self.dtype, self.device))
                          for _ in attn]
        K = cfg.conv_L_cache
        self.conv_states = zeros((len(conv), num_conv_slots + 1, K - 1, cfg.hidden_size), self.dtype, self.device)
        # Prefix caching: conv states at block ends of cached prefixes (block_manager.py), and one
        # scratch snapshot at the end: the target of a prefill graph's unused snapshot entries.
        self.scratch_snapshot = num_conv_snapshots
        self.conv_snapshots = zeros((len(conv), num_conv_snapshots + 1, K - 1, cfg.hidden_size), self.dtype,
                                    self.device) if num_conv_snapshots else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []  # the decode batch sizes that run as graphs (capture_graphs)
        self.prefill_graphs: dict[tuple[int, int], tuple] = {}  # (rows, tokens) -> (graph, its input buffer)
        self.prefill_sizes: list[int] = []  # the token counts of the prefill graphs (enable_prefill_graphs)
        self.prefill_rows: list[int] = []  # their row counts
        self._graph_pool = None
        # torch.compile (inductor) fuses the eager elementwise chains of the decode step
        # (RMSNorm, QK-norm + RoPE, gates, SiLU*mul); the CUDA graph then removes launch gaps.
        self.decode_forward = self._decode_forward
        if compile:
            from torch import _dynamo

            keep_eager_paths_out_of_compile()

            # One graph per decode step (the kernels are custom ops), compiled again for batch
            # sizes it cannot share: raised limits keep every ladder size compiled, none eager.
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, 1024)
            self.decode_forward = torch.compile(self._decode_forward, dynamic=True)
        if use_cuda_graphs:
            self.capture_graphs(min(max_num_seqs, max_graph_batch_size, num_conv_slots), lazy=lazy_graphs)
            if prefill_graph_tokens:
                self.enable_prefill_graphs(min(prefill_graph_tokens, max_model_len), lazy=lazy_graphs)
        elif cpu_graphs and self.device.type == "cpu":
            # Batch-1 decode steps replay a recorded step (cpu_graph.py): without the Python around its
            # ~90 kernel calls. Larger batches and prefills stay eager: their products, not Python, take the time.
            self.capture_graphs(1, lazy=True)

    # -- metadata ---------------------------------------------------------------------
    def _context(self, past, lens, block_tables, conv_slots, num_tokens, num_decode, max_chunk_len=None,
                 snapshots=None):
        return PagedContext(kv_caches=self.kv_caches, conv_states=self.conv_states, attn_index=self.attn_index,
                            conv_index=self.conv_index, past=past, lens=lens, block_tables=block_tables,
                            conv_slots=conv_slots, num_tokens=num_tokens, num_decode=num_decode,
                            max_chunk_len=max_chunk_len, use_triton=self.use_triton,
                            fused_linear_shapes=self.fused_linear_shapes,
                            moe_kernel=self.use_triton and self.moe_backend == "triton",
                            conv_snapshots=snapshots)

    def _to_device(self, data, dtype):
        return host_to_device(data, dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, in_flight: torch.Tensor | None = None
                ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Run the batch; return the rows that produce a token, their logits (rows, V) and, from a
        graph step, their greedy ids (rows,) (None from an eager step).

        `in_flight`: the sampled ids (device) of the step still in flight. A sequence whose
        newest token is one of them (`seq.in_flight_row`) gets it on the device, so this step
        can be launched before that step's ids reach the host."""
        seqs, counts = batch.seqs, batch.num_tokens
        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed_tokens + n == s.num_tokens]
        if batch.restores:  # admitted with a cached prefix: the conv state where it ends
            self._copy_conv(self.conv_states, self.conv_snapshots, batch.restores)
        # Snapshots at the end of a row's chunk are its slot's state after the step; those inside a
        # prefill chunk are taken by the forward (PagedContext.short_conv).
        at_end = [(seqs[row].conv_slot, snap) for row, pos, snap in batch.snapshots
                  if pos == seqs[row].num_computed_tokens + counts[row]]
        inside = [(row, pos, snap) for row, pos, snap in batch.snapshots
                  if pos != seqs[row].num_computed_tokens + counts[row]]
        if self.graph_sizes and batch.num_decode == len(seqs) and len(seqs) <= self.graph_sizes[-1] \
                and not has_image_rows(seqs, counts):
            logits, greedy_ids = self._run_graph(seqs, sample_rows, in_flight)
            if at_end:
                self._copy_conv(self.conv_snapshots, self.conv_states, [(snap, slot) for slot, snap in at_end])
            if len(sample_rows) < len(seqs):  # a 1-token prompt chunk rode along as a decode row
                keep = self._to_device(sample_rows, torch.long)
                logits, greedy_ids = logits.index_select(0, keep), greedy_ids.index_select(0, keep)
            return sample_rows, logits, greedy_ids
        ids: list[int] = []
        past, last_index = [], []
        for seq, n in zip(seqs, counts):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            past.append(start)
            last_index.append(len(ids) - 1)
        plan = self._snapshot_plan(inside, past, last_index, counts)
        if self.prefill_sizes and len(ids) <= self.prefill_sizes[-1] and len(seqs) < self.prefill_rows[-1] \
                and (plan is None or not plan[2]) and not has_image_rows(seqs, counts):
            # (not: a snapshot whose conv inputs start before its chunk, rare; or images)
            logits = self._run_prefill_graph(seqs, counts, ids, last_index, plan, sample_rows, in_flight)
            if logits is not None:  # None: the graph could not be captured
                if at_end:
                    self._copy_conv(self.conv_snapshots, self.conv_states, [(snap, slot) for slot, snap in at_end])
                if len(sample_rows) < len(seqs):
                    return sample_rows, logits.index_select(0, self._to_device(sample_rows, torch.long)), None
                return sample_rows, logits, None
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [self.padding_block] * (width - len(s.block_table)) for s in seqs]
        ctx = self._context(self._to_device(past, torch.long), self._to_device(counts, torch.long),
                            self._to_device(tables, torch.int32), self._to_device([s.conv_slot for s in seqs], torch.long),
                            len(ids), batch.num_decode, max(counts[batch.num_decode:], default=1),
                            self._snapshot_rows(plan))
        keep = self._to_device([last_index[i] for i in sample_rows], torch.long)
        input_ids = self._to_device(ids, torch.long)
        # A token in flight is always its sequence's newest one: the last of a sampling row's chunk.
        waiting = _in_flight_positions([(last_index[i], seqs[i]) for i in sample_rows])
        if waiting:
            dst, src = self._to_device(waiting, torch.long).unbind(1)
            _copy_in_flight_ids(input_ids, dst, src, in_flight)
        embeds = prefill_embeds(self.model, seqs, counts, input_ids[None], self.max_vision_views)
        if embeds is not None:  # LFM2-VL: image features at this step's `<image>` positions
            out = self.model(inputs_embeds=embeds, context=ctx, logits_to_keep=keep)
        else:
            out = self.model(input_ids=input_ids[None], context=ctx, logits_to_keep=keep)
        if at_end:
            self._copy_conv(self.conv_snapshots, self.conv_states, [(snap, slot) for slot, snap in at_end])
        return sample_rows, out.logits[0], None

    def _copy_conv(self, dst: torch.Tensor, src: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """dst[:, i] = src[:, j] for each (i, j), every conv layer at once (slots <-> snapshots)."""
        index = self._to_device([i for i, _ in pairs] + [j for _, j in pairs], torch.long)
        dst.index_copy_(1, index[:len(pairs)], src.index_select(1, index[len(pairs):]))

    def _snapshot_plan(self, inside: list[tuple[int, int, int]], past: list[int], last_index: list[int],
                       counts: list[int]) -> tuple[list[int], list[int], list[int], list[int]] | None:
        """For snapshots at block ends inside prefill chunks (None if there are none): their ids, and
        the K-1 conv inputs just before each position (the conv state there) as rows of the step's
        packed inputs; where a chunk started fewer than K-1 tokens before the position, the positions
        of those rows (dst) and the rows of the row states (S*(K-1)) the step started from (src)."""
        if not inside:
            return None
        keep = self.conv_states.shape[2]  # K-1
        rows, dst, src = [], [], []
        for row, pos, _ in inside:
            start, first = past[row], last_index[row] + 1 - counts[row]  # chunk start, its first packed index
            for p in range(pos - keep, pos):
                if p >= start:
                    rows.append(first + p - start)
                else:
                    dst.append(len(rows))
                    src.append(row * keep + keep - (start - p))
                    rows.append(0)
        return [snap for *_, snap in inside], rows, dst, src

    def _snapshot_rows(self, plan):
        """PagedContext's `conv_snapshots` for a plan of `_snapshot_plan`, on the device."""
        if plan is None:
            return None
        ids, rows, dst, src = plan
        before = self._to_device(dst + src, torch.long).split(len(dst)) if dst else None
        return self.conv_snapshots, self._to_device(ids, torch.long), self._to_device(rows, torch.long), before

    # -- CUDA graphs for decode ---------------------------------------------------------
    def _padded_size(self, bs: int) -> int | None:
        for size in self.graph_sizes:
            if size >= bs:
                return size
        return None

    @torch.inference_mode()
    def capture_graphs(self, max_bs: int, lazy: bool = False) -> None:
        """Decode graphs for the batch sizes of the ladder up to `max_bs`: all now, or (`lazy`) each
        one when a step first needs it, so an engine answers its first request after compiling
        and capturing batch 1 alone (a compile per new shape happens mid-run instead)."""
        self.graph_sizes = graph_batch_sizes(max_bs)
        dev = self.device
        # Each graph's inputs are the rows of one buffer, [ids | past | conv slots | in-flight row]
        # (`_run_graph`), so a step lands them with one host-to-device copy and no kernel.
        self.g_inputs: dict[int, torch.Tensor] = {}
        self.g_lens = torch.ones(max_bs, dtype=torch.long, device=dev)
        # Every graph leaves its rows' greedy ids here, where the next graph step finds the tokens
        # still in flight (ids sampled any other way are copied in first): room for the ids of any
        # step, also one of more rows than the largest graph (CPU graphs are batch 1 only).
        self.g_greedy = torch.zeros(max(max_bs, self.padding_slot), dtype=torch.long, device=dev)
        # Block tables live on the device, one row per conv slot (a sequence holds one slot
        # while it holds blocks); a step uploads only the blocks added since the last one
        # (`_table_uploaded`: per slot, the block list last seen there and how much of it is
        # up). The graph gathers its rows by slot; the padding slot's row is all padding.
        self.slot_tables = torch.full((self.padding_slot + 1, self.max_blocks_per_seq), self.padding_block,
                                      dtype=torch.int32, device=dev)
        self._table_uploaded: list[tuple[list[int], int] | None] = [None] * self.padding_slot
        self.g_logits: dict[int, torch.Tensor] = {}
        self.drop_graphs()  # (prefill graphs too: they read the block tables just made anew)
        if not lazy:
            for bs in reversed(self.graph_sizes):  # largest first: the smaller ones fit in its pool
                self._capture(bs)

    @torch.inference_mode()
    def _capture(self, bs: int):
        """Compile (if the step is compiled) and capture the decode graph of batch size `bs`. Its
        warm-up and capture write only the padding block and slot, and g_greedy, which may hold the
        ids of a step in flight: those are kept. Graphs share one memory pool; each graph's output
        stays referenced (g_logits), so no later capture reuses it."""
        dev = self.device
        inputs = torch.zeros((4, bs), dtype=torch.long, device=dev)
        inputs[2:].fill_(self.padding_slot)
        inputs[3].fill_(-1)
        self.g_inputs[bs] = inputs

        def run():
            ids, past, slots, in_flight_rows = inputs.unbind(0)
            tables = self.slot_tables.index_select(0, slots)
            return self.decode_forward(ids, past, self.g_lens[:bs], tables, slots,
                                       in_flight_rows if self.in_flight_ids else None, self.g_greedy)

        if dev.type != "cuda":  # the step's ops recorded once, replayed on the same static buffers
            in_flight = self.g_greedy.clone()
            try:
                graph = self._recorded_step(run)
                self.g_logits[bs] = graph.output
            except NotReplayable as e:  # e.g. an op of the step reads tensors on the host: rerun it instead
                log.warning("the batch-%d decode step is not recorded (%s): it runs the forward each time", bs, e)
                self.g_logits[bs] = run()
                graph = EagerReplay(run, self.g_logits[bs])
            self.g_greedy.copy_(in_flight)
            self.graphs[bs] = graph
            return graph
        torch.cuda.synchronize()  # the step in flight has written its ids
        in_flight = self.g_greedy.clone()
        graph, self.g_logits[bs] = self._record_graph(run)
        self.g_greedy.copy_(in_flight)
        torch.cuda.synchronize()
        self.graphs[bs] = graph
        return graph

    def _recorded_step(self, run) -> StepGraph:
        """`run` recorded (cpu_graph.StepGraph), then replayed once on the same inputs as a check: it must
        give the recorded logits bit for bit (the padding slot's conv state, which the run shifted, is put
        back first), else NotReplayable. Both runs write only the padding block and slot."""
        pad = self.conv_states[:, self.padding_slot].clone()
        graph = StepGraph(run)
        recorded = graph.output.clone()
        self.conv_states[:, self.padding_slot] = pad
        graph.replay()
        if not torch.equal(graph.output, recorded):
            raise NotReplayable("its replay did not give the recorded logits")
        return graph

    def _record_graph(self, run) -> tuple[torch.cuda.CUDAGraph, Any]:
        """`run` warmed up (compilation, Triton specialisations, cuBLAS handles) and captured as a CUDA
        graph in the runner's shared memory pool; returns the graph and what the captured run returned."""
        torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = run()
        self._graph_pool = graph.pool() if self._graph_pool is None else self._graph_pool
        return graph, out

    def _decode_forward(self, ids, past, lens, tables, slots, in_flight_rows=None, greedy_ids=None):
        """One token per row; returns the logits. The graph path passes `greedy_ids`, the ids of the
        last graph step: a row whose `in_flight_rows` entry is >= 0 takes its token from there, and
        this step's greedy ids go there. (Compiled, inductor splits the vocabulary-long argmax over
        many programs; torch's own argmax of one row is a single 17 us kernel on an H200.)"""
        if greedy_ids is not None and in_flight_rows is not None:
            ids = torch.where(in_flight_rows >= 0, greedy_ids[in_flight_rows.clamp(min=0)], ids)
        ctx = self._context(past, lens, tables, slots, ids.shape[0], ids.shape[0])
        logits = self.model(input_ids=ids[None], context=ctx).logits[0]
        if greedy_ids is not None:
            greedy_ids[:ids.shape[0]].copy_(argmax_rows(logits))
        return logits

    def drop_graphs(self) -> None:
        """Forget the captured steps, each captured again when next needed (they hold the weights and
        buffers they were captured with: after the model's weights were swapped, or new block tables).
        Their CUDA memory pool goes with them: a capture into a pool whose graphs are all gone fails."""
        self.graphs, self.prefill_graphs = {}, {}
        self._graph_pool = None

    def _run_graph(self, seqs, sample_rows: list[int], in_flight) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(seqs)
        bs = self._padded_size(n)
        graph = self.graphs.get(bs) or self._capture(bs)  # before the inputs land: a capture overwrites them
        pad = bs - n
        # One host-to-device copy straight into the graph's inputs: [ids | past | slots | the row of
        # each in-flight id in the step in flight, else -1]. An in-flight id goes up as 0; the graph
        # takes it from g_greedy on the device.
        meta = [max(s.token_ids[s.num_computed_tokens], 0) for s in seqs] + [0] * pad
        meta += [s.num_computed_tokens for s in seqs] + [0] * pad
        meta += [s.conv_slot for s in seqs] + [self.padding_slot] * pad
        rows = [-1] * bs
        for pos, row in _in_flight_positions([(i, seqs[i]) for i in sample_rows]):
            rows[pos] = row
        on_cuda = self.device.type == "cuda"
        self.g_inputs[bs].copy_(host_tensor(meta + rows, torch.long, pin=on_cuda).view(4, bs), non_blocking=on_cuda)
        waits = max(rows) >= 0
        if waits and not self.in_flight_ids:
            raise RuntimeError("a step takes an id still in flight, but the runner was made for synchronous steps")
        if in_flight is not None and waits and not _is_prefix_of(in_flight, self.g_greedy):
            self.g_greedy[:in_flight.shape[0]].copy_(in_flight)  # sampled, or from an eager step
        self._upload_new_table_cells(seqs)
        graph.replay()
        return self.g_logits[bs][:n], self.g_greedy[:n]

    def _upload_new_table_cells(self, seqs: list[Sequence]) -> None:
        """The blocks each sequence got since its table was last uploaded, into `slot_tables`."""
        cells, blocks = self._new_table_cells(seqs)
        if cells:
            staged = self._to_device(cells + blocks, torch.long)
            self.slot_tables.view(-1).index_copy_(0, staged[:len(cells)], staged[len(cells):].int())

    def _new_table_cells(self, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """Flat indices into `slot_tables` and the block ids to write there: the blocks each
        sequence got since its table was last uploaded. A sequence that is new in its slot
        (admitted, or re-admitted after preemption: a new block list) goes up whole."""
        cells, blocks = [], []
        width = self.max_blocks_per_seq
        for s in seqs:
            table, slot = s.block_table, s.conv_slot
            seen = self._table_uploaded[slot]
            start = seen[1] if seen is not None and seen[0] is table else 0
            if len(table) > start:
                cells.extend(range(slot * width + start, slot * width + len(table)))
                blocks.extend(table[start:])
                self._table_uploaded[slot] = (table, len(table))
        return cells, blocks


    # -- CUDA graphs for steps that prefill ------------------------------------------------
    # An eager step launches ~100 kernels per layer whatever its length: for a short prompt, or
    # a few new turns among running decodes, the host's launch time, not the GPU, sets the step's
    # time. A step of up to `prefill_sizes[-1]` tokens and fewer than `prefill_rows[-1]` rows (one
    # prompt chunk; or chunks and decodes mixed) instead replays a graph captured for the next sizes
    # up: its rows first, then padding rows (past 0, the padding slot and blocks; the first takes
    # the tokens left over, the others none), so every length in the packed context stays
    # consistent. Every row attends through the prefill kernel (a decode row is a chunk of one).
    # Eager ops, not compiled: the graph alone removes the launch cost.
    def enable_prefill_graphs(self, max_tokens: int, lazy: bool = True) -> None:
        """Graphs for steps of up to `max_tokens` tokens: each (rows, tokens) size captured when
        first needed (`lazy`), or all now (a server: no client waits on a capture). Needs the decode
        graphs' per-slot block tables (`capture_graphs` first)."""
        assert self.graph_sizes, "capture_graphs first: the step graphs share its device block tables"
        self.prefill_sizes = prefill_graph_sizes(max_tokens)
        top = self.graph_sizes[-1] + 1  # every decode row of a full batch, and a padding row
        self.prefill_rows = sorted({r for r in (2, 4, 8, 16, 32, 64, 128, 256, 512) if r < top} | {top})
        self.prefill_graphs = {}
        V = self.model.config.vocab_size
        self.p_logits = torch.zeros((self.prefill_rows[-1], V), dtype=self.dtype, device=self.device)
        # the sampled ids of the step in flight, copied here for the graph: as many as a step has rows at most
        self.p_in_flight = torch.zeros(self.padding_slot + 1, dtype=torch.long, device=self.device)
        if not lazy:  # every size a step can have (a row takes at least one token), largest first
            for rows in reversed(self.prefill_rows):
                for size in reversed(self.prefill_sizes):
                    if rows - 1 <= size and self.prefill_sizes and self._try_capture_prefill(rows, size) is None:
                        return

    def _try_capture_prefill(self, rows: int, size: int):
        """The captured graph, or None (and prefill graphs off) if CUDA could not capture the step."""
        try:
            return self._capture_prefill(rows, size)
        except RuntimeError as e:  # an op of the step that cannot be captured: stay eager, say why
            if self.device.type != "cuda":
                raise
            warnings.warn(f"prefill graphs turned off: capturing a step of {rows} rows, {size} tokens failed ({e})")
            self.prefill_sizes = []
            return None

    def _prefill_layout(self, rows: int, size: int) -> list[int]:
        """The parts of a prefill graph's input buffer: ids, their rows in the in-flight ids (-1: none),
        then per row past, lens, conv slot, index of its last token; snapshot ids, their conv rows."""
        snaps = size // self.block_size + rows  # block ends inside the chunks, at most
        return [size, size, rows, rows, rows, rows, snaps, snaps * self.conv_states.shape[2]]

    @torch.inference_mode()
    def _capture_prefill(self, rows: int, size: int):
        layout = self._prefill_layout(rows, size)
        # Captured on a step of padding rows only: it writes the padding block and slot, the scratch snapshot.
        inputs = host_tensor(self._prefill_meta(rows, size, [], [], [], [], [], [], None), torch.long).to(self.device)
        logits_out = self.p_logits[:rows]

        def run():
            ids, src, past, lens, slots, keep, snap_ids, snap_rows = inputs.split(layout)
            ids = torch.where(src >= 0, self.p_in_flight[src.clamp(min=0)], ids)
            snaps = None if self.conv_snapshots is None else (self.conv_snapshots, snap_ids, snap_rows, None)
            tables = self.slot_tables.index_select(0, slots)
            ctx = self._context(past, lens, tables, slots, size, 0, max_chunk_len=size, snapshots=snaps)
            return logits_out.copy_(self.model(input_ids=ids[None], context=ctx, logits_to_keep=keep).logits[0])

        if self.device.type == "cuda":
            graph, _ = self._record_graph(run)
            torch.cuda.synchronize()
        else:  # tests: the same static buffers, replayed eagerly
            graph = EagerReplay(run, logits_out)
        self.prefill_graphs[rows, size] = (graph, inputs)
        return graph, inputs

    def _prefill_meta(self, rows: int, size: int, ids: list[int], src: list[int], past: list[int], counts: list[int],
                      slots: list[int], last_index: list[int], plan) -> list[int]:
        """A prefill graph's inputs (`_prefill_layout`) for the step's rows, then padding rows."""
        n, pad = len(ids), rows - len(counts)
        snaps = size // self.block_size + rows
        snap_ids, snap_rows = (plan[0], plan[1]) if plan is not None else ([], [])
        return (ids + [0] * (size - n) + src + [-1] * (size - n)
                + past + [0] * pad + counts + [size - n] + [0] * (pad - 1)
                + slots + [self.padding_slot] * pad + last_index + [0] * pad
                + snap_ids + [self.scratch_snapshot] * (snaps - len(snap_ids))
                + snap_rows + [0] * (snaps * self.conv_states.shape[2] - len(snap_rows)))

    def _run_prefill_graph(self, seqs: list[Sequence], counts: list[int], ids: list[int], last_index: list[int],
                           plan, sample_rows: list[int], in_flight: torch.Tensor | None) -> torch.Tensor | None:
        """The step through a prefill graph; returns the logits (rows, V) of every row's last token
        (the caller keeps those of the rows that sample); None if the graph could not be captured."""
        size = next(t for t in self.prefill_sizes if t >= len(ids))
        rows = next(r for r in self.prefill_rows if r > len(seqs))
        graph, inputs = self.prefill_graphs.get((rows, size)) or self._try_capture_prefill(rows, size) or (None, None)
        if graph is None:
            return None
        src = [-1] * len(ids)  # per token: its row in the ids of the step in flight, if it is one of them
        waiting = _in_flight_positions([(last_index[i], seqs[i]) for i in sample_rows])
        for pos, row in waiting:
            src[pos] = row
        if waiting:
            assert in_flight is not None, "a sequence waits for a token of a step that is not in flight"
            self.p_in_flight[:in_flight.shape[0]].copy_(in_flight)
        meta = self._prefill_meta(rows, size, [max(t, 0) for t in ids], src, [s.num_computed_tokens for s in seqs],
                                  counts, [s.conv_slot for s in seqs], last_index, plan)
        on_cuda = self.device.type == "cuda"
        inputs.copy_(host_tensor(meta, torch.long, pin=on_cuda), non_blocking=on_cuda)
        self._upload_new_table_cells(seqs)
        graph.replay()
        return self.p_logits[:len(seqs)]


def _in_flight_positions(positions: list[tuple[int, Sequence]]) -> list[tuple[int, int]]:
    """(input position, row in the step in flight) of the sequences whose newest token is in flight."""
    return [(pos, s.in_flight_row) for pos, s in positions if s.in_flight_row is not None]


def _is_prefix_of(a: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `a` is buffer[:len(a)] itself (the same memory), not a copy."""
    return a.data_ptr() == buffer.data_ptr() and a.dim() == 1 and a.stride(0) == 1 and a.dtype == buffer.dtype


def _copy_in_flight_ids(input_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                        in_flight: torch.Tensor | None) -> None:
    """input_ids[dst] = in_flight[src], on the device: the step can be launched before the one in
    flight has sent its ids to the host."""
    assert in_flight is not None, "a sequence waits for a token of a step that is not in flight"
    input_ids.index_copy_(0, dst, in_flight.index_select(0, src))


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on the CPU, a large one is an anonymous memory mapping, whose pages the OS hands
    out zeroed on first touch: a cache pool costs no time at start (filling 256 MiB with zeros took
    ~0.08 s of a process's first token) and memory only as it fills."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < mmap.PAGESIZE * 256:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
