"""Runs one scheduled batch through the model: cache tensors, metadata, CUDA graphs, sampling."""

from __future__ import annotations

import torch

from .context import PagedContext
from .multimodal import has_image_rows, prefill_embeds
from .scheduler import ScheduledBatch


def graph_batch_sizes(max_bs: int) -> list[int]:
    """The ladder of decode batch sizes captured as CUDA graphs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class ModelRunner:
    def __init__(self, model, *, block_size: int, num_blocks: int, num_conv_slots: int,
                 max_model_len: int, max_num_seqs: int, use_cuda_graphs: bool, use_triton: bool,
                 max_graph_batch_size: int = 256, compile: bool = False, max_vision_views: int = 32):
        self.model = model
        cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.use_triton = use_triton
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
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in attn]
        K = cfg.conv_L_cache
        self.conv_states = torch.zeros((len(conv), num_conv_slots + 1, K - 1, cfg.hidden_size),
                                       dtype=self.dtype, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # torch.compile (inductor) fuses the eager elementwise chains of the decode step
        # (RMSNorm, QK-norm + RoPE, gates, SiLU*mul); the CUDA graph then removes launch gaps.
        self.decode_forward = self._decode_forward
        if compile:
            from torch import _dynamo

            # Each layer resumes after its (uncompiled) mixing call with its own layer_idx.
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, 1024)
            self.decode_forward = torch.compile(self._decode_forward, dynamic=True)
        if use_cuda_graphs:
            self.capture_graphs(min(max_num_seqs, max_graph_batch_size, num_conv_slots))

    # -- metadata ---------------------------------------------------------------------
    def _context(self, past, lens, block_tables, conv_slots, num_tokens, num_decode, host_chunks=()):
        return PagedContext(kv_caches=self.kv_caches, conv_states=self.conv_states, attn_index=self.attn_index,
                            conv_index=self.conv_index, past=past, lens=lens, block_tables=block_tables,
                            conv_slots=conv_slots, num_tokens=num_tokens, num_decode=num_decode,
                            host_chunks=host_chunks, use_triton=self.use_triton)

    def _to_device(self, data, dtype):
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor | None]:
        """Run the batch; return the rows that produce a token and their logits (rows, V)."""
        seqs, counts = batch.seqs, batch.num_tokens
        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed_tokens + n == s.num_tokens]
        if self.graphs and batch.num_decode == len(seqs) and len(seqs) <= self.graph_sizes[-1] \
                and not has_image_rows(seqs, counts):
            logits = self._run_graph(seqs)
            return sample_rows, logits if len(sample_rows) == len(seqs) else logits[sample_rows]
        ids: list[int] = []
        past, host_chunks, last_index = [], [], []
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            start = seq.num_computed_tokens
            if i >= batch.num_decode:
                host_chunks.append((len(ids), n, start))
            ids.extend(seq.token_ids[start:start + n])
            past.append(start)
            last_index.append(len(ids) - 1)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [self.padding_block] * (width - len(s.block_table)) for s in seqs]
        ctx = self._context(self._to_device(past, torch.long), self._to_device(counts, torch.long),
                            self._to_device(tables, torch.int32), self._to_device([s.conv_slot for s in seqs], torch.long),
                            len(ids), batch.num_decode, host_chunks)
        keep = self._to_device([last_index[i] for i in sample_rows], torch.long)
        input_ids = self._to_device(ids, torch.long)[None]
        embeds = prefill_embeds(self.model, seqs, counts, input_ids, self.max_vision_views)
        if embeds is not None:  # LFM2-VL: image features at this step's `<image>` positions
            out = self.model(inputs_embeds=embeds, context=ctx, logits_to_keep=keep)
        else:
            out = self.model(input_ids=input_ids, context=ctx, logits_to_keep=keep)
        return sample_rows, out.logits[0]

    # -- CUDA graphs for decode ---------------------------------------------------------
    def _padded_size(self, bs: int) -> int | None:
        for size in self.graph_sizes:
            if size >= bs:
                return size
        return None

    @torch.inference_mode()
    def capture_graphs(self, max_bs: int) -> None:
        self.graph_sizes = graph_batch_sizes(max_bs)
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_past = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.long, device=dev)
        self.g_tables = torch.full((max_bs, self.max_blocks_per_seq), self.padding_block, dtype=torch.int32, device=dev)
        self.g_slots = torch.full((max_bs,), self.padding_slot, dtype=torch.long, device=dev)
        self.g_logits: dict[int, torch.Tensor] = {}
        pool = None
        graphs = {}
        for bs in reversed(self.graph_sizes):
            def run():
                return self.decode_forward(self.g_ids[:bs], self.g_past[:bs], self.g_lens[:bs],
                                           self.g_tables[:bs], self.g_slots[:bs])
            run()  # warm-up (Triton compilation, cuBLAS handles) outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.g_logits[bs] = run()
            pool = g.pool() if pool is None else pool
            graphs[bs] = g
        torch.cuda.synchronize()
        self.graphs = graphs
        # Rows written during capture went to the padding block/slot only; nothing to undo.

    def _decode_forward(self, ids, past, lens, tables, slots):
        ctx = self._context(past, lens, tables, slots, ids.shape[0], ids.shape[0])
        return self.model(input_ids=ids[None], context=ctx).logits[0]

    def _run_graph(self, seqs) -> torch.Tensor:
        n = len(seqs)
        bs = self._padded_size(n)
        # Only the block-table columns in use are refreshed: the kernel reads no further.
        width = max(len(s.block_table) for s in seqs)
        pad = bs - n
        ids = [s.token_ids[s.num_computed_tokens] for s in seqs] + [0] * pad
        past = [s.num_computed_tokens for s in seqs] + [0] * pad
        tables = [s.block_table + [self.padding_block] * (width - len(s.block_table)) for s in seqs]
        tables += [[self.padding_block] * width] * pad
        slots = [s.conv_slot for s in seqs] + [self.padding_slot] * pad
        self.g_ids[:bs].copy_(self._to_device(ids, torch.long), non_blocking=True)
        self.g_past[:bs].copy_(self._to_device(past, torch.long), non_blocking=True)
        self.g_tables[:bs, :width].copy_(self._to_device(tables, torch.int32), non_blocking=True)
        self.g_slots[:bs].copy_(self._to_device(slots, torch.long), non_blocking=True)
        self.graphs[bs].replay()
        return self.g_logits[bs][:n]
