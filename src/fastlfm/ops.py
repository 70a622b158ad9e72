"""Small numerical building blocks shared by the model, training and the engine.

Each function is the reference (eager PyTorch) version; the engine may swap in a fused
kernel with the same contract on CUDA.
"""

from __future__ import annotations

import array

import torch
import torch.nn.functional as F


_ARRAY_CODES = {torch.long: "q", torch.int32: "i"}


def host_tensor(values, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """A CPU tensor of Python values, in pinned memory when `pin` (the source of a non-blocking
    host-to-device copy: a copy from pageable memory would wait for the GPU work in flight, and
    the engine launches the next step before reading the last one)."""
    if dtype in _ARRAY_CODES and isinstance(values, list) and (not values or isinstance(values[0], int)):
        # A flat list of ints (the engine's per-step metadata): array + frombuffer is ~3x faster
        # than torch.tensor(list), which inspects every element.
        t = torch.frombuffer(array.array(_ARRAY_CODES[dtype], values), dtype=dtype) if values \
            else torch.empty(0, dtype=dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if pin else t


def host_to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of Python values on `device`, without a host sync on CUDA (`host_tensor`)."""
    on_cuda = torch.device(device).type == "cuda"
    return host_tensor(values, dtype, pin=on_cuda).to(device, non_blocking=on_cuda)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: statistics in fp32, result cast back, then `* weight` (no 1+w)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (..., head_dim) for integer positions; built in fp32, cast to `dtype`."""
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (B, T, H, d); cos/sin: (B, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def causal_conv(
    v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time for a batch of aligned rows.

    v: (B, T, D) conv input; weight: (D, 1, K), last tap = current token;
    state: (B, D, K-1) the previous K-1 inputs (oldest first) or None for zeros.
    Returns the conv output (B, T, D) and the new state (B, D, K-1).

    K multiply-adds over shifted views, accumulated in fp32 and rounded once (as a conv
    kernel does). Not F.conv1d: without native bf16, PyTorch's CPU conv runs a depthwise
    bf16 conv as one slow call per channel (most of a bf16 decode step on AVX2 machines).
    """
    B, T, D = v.shape
    K = weight.shape[-1]
    past = v.new_zeros(B, K - 1, D) if state is None else state.transpose(1, 2).to(v.dtype)
    x = torch.cat((past, v), dim=1)  # (B, K-1+T, D)
    w = weight.view(D, K).float()
    out = x[:, K - 1:].float() * w[:, K - 1]
    for tap in range(K - 1):
        out += x[:, tap:tap + T].float() * w[:, tap]
    if bias is not None:
        out += bias.float()
    return out.to(v.dtype), x[:, T:].transpose(1, 2).contiguous()  # a copy: a view would keep x alive


def packed_causal_conv(
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    pos_in_chunk: torch.Tensor,
    seq_of_token: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv over sequences packed back to back, with no leak across boundaries.

    v: (N, D) packed conv inputs; cu_seqlens: (S+1,) chunk boundaries; pos_in_chunk and
    seq_of_token: (N,) each token's offset in its chunk and its chunk index;
    state: (S, D, K-1) each sequence's previous K-1 inputs, or None for zeros (a fresh start).
    Returns (N, D) outputs and the (S, D, K-1) states after the chunk.
    """
    N, D = v.shape
    K = weight.shape[-1]
    w = weight.view(D, K).to(v.dtype)
    out = v * w[:, K - 1]
    for lag in range(1, K):  # tap K-1-lag looks `lag` tokens back
        shifted = F.pad(v, (0, 0, lag, 0))[:N]
        inside = (pos_in_chunk >= lag)[:, None]
        if state is None:
            prev = torch.where(inside, shifted, torch.zeros_like(shifted))
        else:
            slot = (K - 1 + pos_in_chunk - lag).clamp(min=0, max=K - 2)  # in-chunk rows: masked below
            from_state = state[seq_of_token, :, slot].to(v.dtype)
            prev = torch.where(inside, shifted, from_state)
        out = out + prev * w[:, K - 1 - lag]
    if bias is not None:
        out = out + bias.to(v.dtype)

    # New state: the last K-1 inputs of (old state ++ chunk) for every sequence.
    S = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    offs = lens - (K - 1) + torch.arange(K - 1, device=v.device)  # (S, K-1), relative to chunk start
    from_chunk = v[(cu_seqlens[:-1, None] + offs).clamp(min=0, max=max(N - 1, 0))]  # (S, K-1, D)
    if state is None:
        old = torch.zeros_like(from_chunk)
    else:
        idx = (K - 1 + offs).clamp(min=0, max=K - 2)
        old = state.gather(2, idx[:, None, :].expand(S, D, K - 1)).transpose(1, 2).to(v.dtype)
    new_state = torch.where((offs >= 0)[..., None], from_chunk, old).transpose(1, 2)
    return out, new_state


# ----------------------------------------------------------------------------- MoE routing and experts
def moe_route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
              normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LFM2-MoE's router: x (T, D) -> chosen expert ids (T, k) int64 and their weights (T, k) in x's dtype.

    Sigmoid scores of x W_gate^T; the expert bias only chooses the experts (top-k of score + bias), the
    unbiased scores weight them (normalized over the k if `normalize`), times `scale`. In float32
    throughout: in bf16, experts whose scores differ by less than bf16's resolution (~0.004 near 0.5,
    common among 32-64 experts) would be chosen by rounding, and two implementations that round
    differently would choose differently (transformers rounds the logits and scores to the model dtype;
    in float32 the two agree)."""
    scores = F.linear(x.float(), gate_weight.float()).sigmoid()
    choice = scores if expert_bias is None else scores + expert_bias.float()
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
    return experts, (weights * scale).to(x.dtype)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of `expert_ids` (T, k) in expert order, found on the device (no host
    sync): `order` (T*k,) lists pair indices (token * k + slot) expert by expert, and `ends` (E,) int32
    is where each expert's run ends in that order (an expert no token chose has an empty run)."""
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(flat[order], experts, right=True)
    return order, ends.to(torch.int32)


def _can_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped GEMM: in torch >= 2.10, forward only (its CPU backward fails in 2.13), on CPU in any
    float dtype (not under torch.compile, whose meta kernel takes bf16 only), on CUDA in bf16."""
    if not hasattr(F, "grouped_mm") or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return x.device.type == "cuda" and x.dtype == torch.bfloat16


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x (P, K) sorted by expert, each times its expert's weight (E, N, K) transposed: (P, N).
    `ends` (E,) int32: where each expert's rows end (`sort_by_expert`). One grouped GEMM where torch
    has one for the case (`_can_grouped_mm`), else `grouped_linear_per_expert`."""
    if _can_grouped_mm(x, weight):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)
    return grouped_linear_per_expert(x, weight, ends)


def grouped_linear_per_expert(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` as one GEMM per expert over offsets read to the host: the path for autograd
    (training), CUDA fp32/fp16 and torch < 2.10. Inference on CPU and in bf16 on CUDA never takes it."""
    out, start = [], 0
    for e, end in enumerate(ends.tolist()):
        out.append(x[start:end] @ weight[e].t())
        start = end
    return torch.cat(out)


def moe_swiglu_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                       gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """For each token and each of its k chosen experts: weight * down[e] (SiLU(g) * u), [g | u] = gate_up[e] x.

    x (T, D); expert_ids, expert_weights (T, k); gate_up (E, 2I, D) = [w1; w3] per expert; down (E, D, I).
    Returns (T, k, D); the MoE layer's output is its sum over k (left to the caller, so that a compiled
    step fuses it with the residual add). The T*k (token, expert) pairs are sorted by expert on the
    device, each projection is one grouped GEMM over all experts, and the weighted rows go back to their
    pairs. Rounds where transformers' per-expert loop does (each GEMM, SiLU, * up, * weight).
    """
    T, k = expert_ids.shape
    order, ends = sort_by_expert(expert_ids, gate_up.shape[0])
    h = grouped_linear(x[order // k], gate_up, ends)  # (T*k, 2I), pairs in expert order
    gate, up = h.chunk(2, dim=-1)
    y = grouped_linear(F.silu(gate) * up, down, ends)  # (T*k, D)
    y = y * expert_weights.reshape(-1)[order, None].to(y.dtype)
    return torch.empty_like(y).index_copy_(0, order, y).view(T, k, -1)  # back in (token, slot) order
