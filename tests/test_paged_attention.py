"""The paged prefill attention reference (the CPU path and the Triton kernel's oracle) against
dense causal attention computed by hand in float64 on the unpaged K/V."""

import pytest
import torch

from fastlfm.engine.context import paged_prefill_attention_ref


def dense_causal_attention(q, k, v, past):
    """q: (n, Hq, d) at positions past .. past + n - 1; k, v: (past + n, Hkv, d). softmax(QK^T / sqrt(d))
    with query i seeing keys 0 .. past + i, each query head on KV head h // (Hq // Hkv)."""
    n, Hq, d = q.shape
    group = Hq // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), k) / d**0.5
    allowed = torch.arange(k.shape[0])[None, :] <= past + torch.arange(n)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def paged_case(rows, Hq, Hkv, d, block_size, seed):
    """Random unpaged K/V per row scattered into a shared cache through shuffled block ids, packed
    queries with a token between rows that belongs to none; returns the kernel arguments and the
    unpaged tensors."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(p + n) // block_size) for p, n in rows]
    num_blocks = sum(need) + 2
    k_cache = torch.randn(num_blocks, block_size, Hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, Hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, cu, dense = [], [0], []
    for (p, n), nb in zip(rows, need):
        ids, perm = perm[:nb], perm[nb:]
        k, v = torch.randn(p + n, Hkv, d, generator=g), torch.randn(p + n, Hkv, d, generator=g)
        for pos in range(p + n):
            k_cache[ids[pos // block_size], pos % block_size] = k[pos]
            v_cache[ids[pos // block_size], pos % block_size] = v[pos]
        tables.append(ids + [0] * (max(need) - nb))
        cu.append(cu[-1] + n + 1)
        dense.append((k, v))
    q = torch.randn(cu[-1], Hq, d, generator=g)
    args = (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor([p for p, _ in rows]),
            torch.tensor([n for _, n in rows]), torch.tensor(cu), q.shape[0])
    return args, dense


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_ref_matches_dense_causal_attention(Hq, Hkv, block_size):
    rows = ((0, 9), (21, 4), (16, 1), (3, 40), (0, 1))  # fresh and continuing rows, one-token rows
    args, dense = paged_case(rows, Hq, Hkv, 64, block_size, seed=Hq * block_size + Hkv)
    q, cu = args[0], args[6].tolist()
    out = paged_prefill_attention_ref(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    for (p, n), start, (k, v) in zip(rows, cu, dense):
        expected = dense_causal_attention(q[start:start + n], k, v, p)
        torch.testing.assert_close(out[start:start + n].double(), expected, atol=1e-5, rtol=1e-5)
