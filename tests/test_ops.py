"""The shared numerical building blocks against independent oracles (hand computations and
F.conv1d in float64)."""

import pytest
import torch
import torch.nn.functional as F

from fastlfm.ops import causal_conv, host_to_device


def conv1d_reference(v, weight, bias, state):
    """Depthwise causal conv by F.conv1d in float64 over (state ++ v)."""
    K = weight.shape[-1]
    x = v.double().transpose(1, 2)
    past = torch.zeros(*x.shape[:2], K - 1, dtype=torch.float64) if state is None else state.double()
    x = torch.cat((past, x), dim=-1)
    out = F.conv1d(x, weight.double(), None if bias is None else bias.double(), groups=weight.shape[0])
    return out.transpose(1, 2), x[..., -(K - 1):]


def test_unit_impulse_gives_taps_in_order():
    """Spec §10.2: an impulse at t0 gives w2 at t0, w1 at t0+1, w0 at t0+2 (last tap = current token)."""
    w = torch.tensor([[[0.5, -2.0, 3.0]]])
    v = torch.zeros(1, 6, 1)
    v[0, 1, 0] = 1.0
    out, state = causal_conv(v, w, None, None)
    assert out[0, :, 0].tolist() == [0.0, 3.0, -2.0, 0.5, 0.0, 0.0]
    assert state.shape == (1, 1, 2) and state.flatten().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,with_state,with_bias", [(1, True, False), (7, True, True), (5, False, False), (1, False, True)])
def test_matches_conv1d_in_float64(dtype, T, with_state, with_bias):
    g = torch.Generator().manual_seed(T)
    B, D, K = 3, 40, 3
    v = torch.randn(B, T, D, generator=g).to(dtype)
    weight = torch.randn(D, 1, K, generator=g).to(dtype)
    bias = torch.randn(D, generator=g).to(dtype) if with_bias else None
    state = torch.randn(B, D, K - 1, generator=g).to(dtype) if with_state else None
    out, new_state = causal_conv(v, weight, bias, state)
    ref, ref_state = conv1d_reference(v, weight, bias, state)
    assert out.dtype == dtype and new_state.shape == (B, D, K - 1) and new_state.is_contiguous()
    # accumulated in fp32, rounded once: within one rounding of the exact result
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert ((out.double() - ref).abs() <= tol * ref.abs().clamp_min(1.0)).all()
    assert torch.equal(new_state.double(), ref_state)


@pytest.mark.parametrize("values", [[3, -1, 2**40, 0], [], [[1, 2], [3, 4]], [True, False]])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_host_to_device_equals_torch_tensor(values, dtype):
    # The flat-int fast path (array + frombuffer) and the general path agree with torch.tensor.
    if dtype == torch.int32 and values and values[0] == 3:
        values = [3, -1, 2**31 - 1, 0]
    got = host_to_device(values, dtype, "cpu")
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)
