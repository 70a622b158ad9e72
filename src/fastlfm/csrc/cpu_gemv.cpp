// Matrix-vector products for CPU decode (a few rows of activations against a weight that is
// read once per step), at memory speed: AVX-512 with VNNI (int8 dot products) and BF16 (bf16
// pair dot products; fp32 with FMA). Built on first use by fastlfm.cpu_gemv (torch.utils.cpp_extension).
//
// Layout: int8 / int4 weights are interleaved in groups of 16 output rows so that one 64-byte
// load holds 16 rows x (4 int8 | 8 int4) consecutive inputs; each of the 16 accumulator lanes is
// one output row, the input is broadcast, and no horizontal sums are needed (bf16 runs on the
// plain row-major weight, which oneDNN also uses for prefill):
//   q8:   (N/16, K/4, 16, 4)  uint8  = int8 weight + 128
//   q4:   (N/16, K/8, 16, 4)  uint8  low nibble: inputs 8c..8c+3, high nibble: 8c+4..8c+7
// int8 / int4 products quantize the input row to int8 in blocks of 32 (scale = max|x| / 127,
// like llama.cpp's Q8_0 activations) and multiply with vpdpbusd (unsigned weight x signed
// input); the weight's offset is folded out with the block sums of the quantized input:
//   q8:  y[n] = s[n]   * sum_b xs_b * (dot_b(w + 128, xq) - 128 * sum_b(xq))
//   q4:  y[n] = sum_b xs_b * (a[n, g(b)] * dot_b(q, xq) + c[n, g(b)] * sum_b(xq)), w = a q + c, c = z - 8a
//        (symmetric int4, GGUF Q4_0's format: no zero z stored, c = -8a)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t ROWS = 16;   // output rows per interleaved group (one zmm of fp32 lanes)
constexpr int64_t BLOCK = 32;  // inputs per activation scale
constexpr int64_t PREFETCH = 4096;  // bytes ahead of the weight stream

struct QuantizedRow {  // one input row quantized to int8 in blocks of BLOCK
  std::vector<int8_t> q;
  std::vector<float> scale;  // per block
  std::vector<float> zero_term;  // per block: -128 * scale * sum(q) (q8) or scale * sum(q) (q4)
};

// (K a multiple of BLOCK.) The same values as a scalar loop of nearbyint(x * 127 / amax) per block:
// the conversion rounds to nearest even, as nearbyint does in the default rounding mode.
void quantize_row(const float* x, int64_t K, bool offset128, QuantizedRow& out) {
  static_assert(BLOCK == 32, "two zmm registers a block");
  const int64_t nb = K / BLOCK;
  out.q.resize(K);
  out.scale.resize(nb);
  out.zero_term.resize(nb);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * BLOCK;
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    // A NaN input makes the block's scale NaN: the outputs are NaN, not numbers.
    const bool nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float scale = nan ? std::nanf("") : amax / 127.f;
    const __m512 inv = _mm512_set1_ps(!nan && amax > 0.f ? 127.f / amax : 0.f);
    // (the codes of a NaN block are 0, as NaN * 0 would convert to INT_MIN)
    const __m512i q0 = nan ? _mm512_setzero_si512() : _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i q1 = nan ? _mm512_setzero_si512() : _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    out.scale[b] = scale;
    out.zero_term[b] = offset128 ? -128.f * scale * static_cast<float>(sum) : scale * static_cast<float>(sum);
  }
}

template <typename T>
inline float ld(const T* p, int64_t i) { return static_cast<float>(p[i]); }

// 16 values as fp32 lanes, and back; `round16` applies the dtype's rounding (bf16: nearest even).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }
template <typename T> inline __m512 round16(__m512 v);
template <> inline __m512 round16<float>(__m512 v) { return v; }
template <> inline __m512 round16<at::BFloat16>(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// exp of 16 fp32 lanes: 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts) and
// e^r by its degree-6 Taylor polynomial (|r| <= ln2 / 2: relative error ~1e-7, about one fp32 step).
// NaN stays NaN; below -88 the result is ~0, as expf's.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.f), x);  // (a NaN x is returned by max as it is)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The input rows as fp32 after the optional prologue the engine folds into a projection: SiLU(gate) *
// up of a (M, 2K) input = [gate | up], or LFM2's RMSNorm (statistics in fp32, the normalized row
// rounded to the input's dtype, then times the weight), with the roundings of the unfused ops; 16
// values at a time (K a multiple of 16).
template <typename T, typename N>
void prologue_rows_as(const T* x, int64_t M, int64_t width, int64_t K, const N* nw, float eps, bool silu_gate,
                      float* rows) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t m = 0; m < M; ++m) {
    float* r = rows + m * K;
    const T* xm = x + m * width;
    for (int64_t k = 0; k < K; k += 16) {
      if (silu_gate) {
        const __m512 g = load16(xm + k), u = load16(xm + K + k);
        const __m512 silu = round16<T>(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        _mm512_storeu_ps(r + k, round16<T>(_mm512_mul_ps(silu, u)));
      } else {
        _mm512_storeu_ps(r + k, load16(xm + k));
      }
    }
    if (nw != nullptr) {
      __m512 squares = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) squares = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(r + k), squares);
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(K) + eps));
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 normed = round16<T>(_mm512_mul_ps(_mm512_loadu_ps(r + k), inv));
        _mm512_storeu_ps(r + k, round16<T>(_mm512_mul_ps(load16(nw + k), normed)));
      }
    }
  }
}

void prologue_rows(const at::Tensor& x, int64_t K, const c10::optional<at::Tensor>& norm_weight, double eps,
                   bool silu_gate, std::vector<float>& rows) {
  const int64_t M = x.size(0), width = x.size(1);
  TORCH_CHECK(width == (silu_gate ? 2 * K : K), "cpu_gemv: input width ", width, " does not fit in_features ", K);
  TORCH_CHECK(K % 16 == 0, "cpu_gemv: in_features ", K, " is not a multiple of 16");
  // The norm weight is read in its own dtype (fp32 or bf16): a conversion to a new tensor per call
  // costs a dispatch and an allocation, twice a layer in a decode step.
  at::Tensor nw;
  if (norm_weight) {
    TORCH_CHECK(norm_weight->numel() == K, "cpu_gemv: norm weight has ", norm_weight->numel(), " values, not ", K);
    const bool direct = norm_weight->is_contiguous() &&
                        (norm_weight->scalar_type() == at::kFloat || norm_weight->scalar_type() == at::kBFloat16);
    nw = direct ? *norm_weight : norm_weight->to(at::kFloat).contiguous();
  }
  rows.resize(M * K);
  auto run = [&](const auto* xs) {
    const float e = static_cast<float>(eps);
    if (!norm_weight) {
      prologue_rows_as(xs, M, width, K, static_cast<const float*>(nullptr), e, silu_gate, rows.data());
    } else if (nw.scalar_type() == at::kFloat) {
      prologue_rows_as(xs, M, width, K, nw.data_ptr<float>(), e, silu_gate, rows.data());
    } else {
      prologue_rows_as(xs, M, width, K, nw.data_ptr<at::BFloat16>(), e, silu_gate, rows.data());
    }
  };
  if (x.scalar_type() == at::kBFloat16) run(x.data_ptr<at::BFloat16>());
  else run(x.data_ptr<float>());
}

// Writes 16 fp32 results (plus the residual's 16 values, if any) as the output's dtype.
inline void store_rows(__m512 y, const at::Tensor& out, const at::Tensor* residual, int64_t m, int64_t n0, int64_t N) {
  const int64_t valid = std::min<int64_t>(ROWS, N - n0);
  const __mmask16 mask = valid == ROWS ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  if (out.scalar_type() == at::kBFloat16) {
    auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + m * N + n0;
    if (residual) {
      auto* r = reinterpret_cast<const uint16_t*>(residual->data_ptr<at::BFloat16>()) + m * N + n0;
      __m256i rb = _mm256_maskz_loadu_epi16(mask, r);
      y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16)));
    }
    _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(y));
  } else {
    float* o = out.data_ptr<float>() + m * N + n0;
    if (residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, residual->data_ptr<float>() + m * N + n0));
    _mm512_mask_storeu_ps(o, mask, y);
  }
}

void check_common(const at::Tensor& x, const at::Tensor& out, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "cpu_gemv: the input must be (rows, in_features) fp32 or bf16, contiguous");
  TORCH_CHECK(out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "cpu_gemv: the output must be contiguous fp32 or bf16");
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == out.scalar_type() &&
                residual->is_contiguous(), "cpu_gemv: the residual must match the output");
  }
}

// The input rows after the prologue, quantized to int8 blocks, in the calling thread's buffers
// (the workers of the product read them through the returned pointer).
const QuantizedRow* quantized_rows(const at::Tensor& x, int64_t K, const c10::optional<at::Tensor>& norm_weight,
                                   double eps, bool silu_gate, bool offset128) {
  thread_local std::vector<float> xf;
  thread_local std::vector<QuantizedRow> xq;
  prologue_rows(x, K, norm_weight, eps, silu_gate, xf);
  xq.resize(x.size(0));
  for (int64_t m = 0; m < x.size(0); ++m) quantize_row(xf.data() + m * K, K, offset128, xq[m]);
  return xq.data();
}

// Rows 0..M-1 of the input in tiles of four (then one tile of the 1-3 left): tile(MT constant, m0).
template <typename Tile>
inline void over_tiles(int64_t M, Tile&& tile) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>(), m);
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>(), m); break;
    case 2: tile(std::integral_constant<int, 2>(), m); break;
    case 1: tile(std::integral_constant<int, 1>(), m); break;
    default: break;
  }
}

// One row group (16 outputs) of the q8 product for MT input rows at once: each weight load feeds
// MT dot products (prefill runs at the VNNI rate, not the load rate), two chains per row.
template <int MT>
inline void q8_tile(const uint8_t* Wg, int64_t nb, const QuantizedRow* XQ, __m512 s, const at::Tensor& out,
                    const at::Tensor* res, int64_t m0, int64_t n0, int64_t N) {
  const int32_t* xq4[MT];
  for (int j = 0; j < MT; ++j) xq4[j] = reinterpret_cast<const int32_t*>(XQ[m0 + j].q.data());
  __m512 acc[MT];
  float zero_term[MT];
  for (int j = 0; j < MT; ++j) acc[j] = _mm512_setzero_ps(), zero_term[j] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* Wb = Wg + b * BLOCK * ROWS;
#pragma GCC unroll 8
    for (int64_t l = 0; l < BLOCK * ROWS; l += 64) _mm_prefetch(reinterpret_cast<const char*>(Wb + PREFETCH + l), _MM_HINT_T0);
    __m512i d0[MT], d1[MT];
    for (int j = 0; j < MT; ++j) d0[j] = _mm512_setzero_si512(), d1[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t t = 0; t < BLOCK / 4; t += 2) {
      const __m512i w0 = _mm512_loadu_si512(Wb + t * 64), w1 = _mm512_loadu_si512(Wb + t * 64 + 64);
      for (int j = 0; j < MT; ++j) {
        const int32_t* xb = xq4[j] + b * BLOCK / 4;
        d0[j] = _mm512_dpbusd_epi32(d0[j], w0, _mm512_set1_epi32(xb[t]));
        d1[j] = _mm512_dpbusd_epi32(d1[j], w1, _mm512_set1_epi32(xb[t + 1]));
      }
    }
    for (int j = 0; j < MT; ++j) {
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0[j], d1[j])),
                               _mm512_set1_ps(XQ[m0 + j].scale[b]), acc[j]);
      zero_term[j] += XQ[m0 + j].zero_term[b];
    }
  }
  for (int j = 0; j < MT; ++j) {
    store_rows(_mm512_mul_ps(_mm512_add_ps(acc[j], _mm512_set1_ps(zero_term[j])), s), out, res, m0 + j, n0, N);
  }
}

// y = x W^T, W int8 per output row (scale s), in the q8 layout.
void gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out,
             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& norm_weight, double eps,
             bool silu_gate) {
  check_common(x, out, residual);
  const int64_t M = x.size(0), K = scale.numel() ? w.numel() / scale.numel() : 0, N = out.size(1);
  TORCH_CHECK(K % BLOCK == 0 && w.numel() == (N + ROWS - 1) / ROWS * ROWS * K, "gemv_q8: weight/input shape mismatch");
  const QuantizedRow* XQ = quantized_rows(x, K, norm_weight, eps, silu_gate, true);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const at::Tensor* res = residual ? &*residual : nullptr;
  const int64_t groups = (N + ROWS - 1) / ROWS, nb = K / BLOCK;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* Wg = W + g * ROWS * K;
      const __m512 s = _mm512_loadu_ps(S + g * ROWS);
      over_tiles(M, [&](auto mt, int64_t m0) {
        q8_tile<decltype(mt)::value>(Wg, nb, XQ, s, out, res, m0, g * ROWS, N);
      });
    }
  });
}

// One row group of the q4 product for MT input rows at once (as q8_tile); ZERO: a zero per group
// follows each group's 16 scales (else symmetric).
template <int MT, bool ZERO>
inline void q4_tile(const uint8_t* Wg, const uint16_t* SZg, int64_t nb, int64_t per_group, const QuantizedRow* XQ,
                    const at::Tensor& out, const at::Tensor* res, int64_t m0, int64_t n0, int64_t N) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int32_t* xq4[MT];
  for (int j = 0; j < MT; ++j) xq4[j] = reinterpret_cast<const int32_t*>(XQ[m0 + j].q.data());
  __m512 acc[MT];
  for (int j = 0; j < MT; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* Wb = Wg + b * BLOCK * ROWS / 2;
#pragma GCC unroll 4
    for (int64_t l = 0; l < BLOCK * ROWS / 2; l += 64) _mm_prefetch(reinterpret_cast<const char*>(Wb + PREFETCH + l), _MM_HINT_T0);
    __m512i lo[MT], hi[MT];  // two chains per row (latency)
    for (int j = 0; j < MT; ++j) lo[j] = _mm512_setzero_si512(), hi[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t t = 0; t < BLOCK / 8; ++t) {
      const __m512i packed = _mm512_loadu_si512(Wb + t * 64);
      const __m512i wl = _mm512_and_si512(packed, low4), wh = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      for (int j = 0; j < MT; ++j) {
        const int32_t* xb = xq4[j] + b * BLOCK / 4;
        lo[j] = _mm512_dpbusd_epi32(lo[j], wl, _mm512_set1_epi32(xb[2 * t]));
        hi[j] = _mm512_dpbusd_epi32(hi[j], wh, _mm512_set1_epi32(xb[2 * t + 1]));
      }
    }
    const uint16_t* szb = SZg + (b / per_group) * (ZERO ? 2 : 1) * ROWS;
    const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szb)));
    const __m512 z = ZERO ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szb + ROWS)))
                          : _mm512_setzero_ps();
    const __m512 c = _mm512_fmadd_ps(a, _mm512_set1_ps(-8.f), z);  // w = a q + c = (q - 8) a + z
    for (int j = 0; j < MT; ++j) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[j], hi[j]));
      acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(dot, a), _mm512_set1_ps(XQ[m0 + j].scale[b]), acc[j]);
      acc[j] = _mm512_fmadd_ps(c, _mm512_set1_ps(XQ[m0 + j].zero_term[b]), acc[j]);
    }
  }
  for (int j = 0; j < MT; ++j) store_rows(acc[j], out, res, m0 + j, n0, N);
}

// y = x W^T, W int4 in groups of `group` inputs, in the q4 layout; `scale_zero`: (N/16, K/group, 2, 16)
// fp16 [scale a, zero z] per row group and input group (w = (q - 8) a + z: the zero is stored,
// not c = z - 8a, so fp16 holds both exactly), or (N/16, K/group, 1, 16): scales alone, z = 0
// (4.5 bits a weight instead of 5).
void gemv_q4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_zero, int64_t group, at::Tensor& out,
             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& norm_weight, double eps,
             bool silu_gate) {
  check_common(x, out, residual);
  TORCH_CHECK(scale_zero.scalar_type() == at::kHalf && scale_zero.dim() == 4 && scale_zero.is_contiguous() &&
              (scale_zero.size(2) == 1 || scale_zero.size(2) == 2) && scale_zero.size(3) == ROWS,
              "gemv_q4: scale_zero must be fp16 (N/16, K/group, 2 or 1, 16)");
  const bool zero = scale_zero.size(2) == 2;
  const int64_t M = x.size(0), K = scale_zero.size(1) * group, N = out.size(1);
  TORCH_CHECK(group % BLOCK == 0 && w.numel() == (N + ROWS - 1) / ROWS * ROWS * K / 2 &&
              scale_zero.size(0) == (N + ROWS - 1) / ROWS,
              "gemv_q4: weight/input shape mismatch");
  const QuantizedRow* XQ = quantized_rows(x, K, norm_weight, eps, silu_gate, false);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const uint16_t* SZ = reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::Half>());
  const at::Tensor* res = residual ? &*residual : nullptr;
  const int64_t groups = (N + ROWS - 1) / ROWS, nb = K / BLOCK, ng = K / group, per_group = group / BLOCK;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* Wg = W + g * ROWS * K / 2;
      const uint16_t* SZg = SZ + g * ng * scale_zero.size(2) * ROWS;
      over_tiles(M, [&](auto mt, int64_t m0) {
        if (zero) q4_tile<decltype(mt)::value, true>(Wg, SZg, nb, per_group, XQ, out, res, m0, g * ROWS, N);
        else q4_tile<decltype(mt)::value, false>(Wg, SZg, nb, per_group, XQ, out, res, m0, g * ROWS, N);
      });
    }
  });
}

// Dense weights, one k step of four rows: bf16 pairs through vdpbf16ps (32 inputs per load),
// fp32 through FMA (16 inputs per load).
template <typename WT> struct Dense;
template <> struct Dense<at::BFloat16> {
  using X = at::BFloat16;  // the input as the product takes it: rounded to bf16, like torch's bf16 linear
  static constexpr int64_t step = 32;
  static __m512 load_x(const X* x) { return _mm512_castsi512_ps(_mm512_loadu_si512(x)); }
  static __m512 dot(__m512 acc, const at::BFloat16* w, __m512 x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_castps_si512(x));
  }
};
template <> struct Dense<float> {
  using X = float;
  static constexpr int64_t step = 16;
  static __m512 load_x(const X* x) { return _mm512_loadu_ps(x); }
  static __m512 dot(__m512 acc, const float* w, __m512 x) { return _mm512_fmadd_ps(_mm512_loadu_ps(w), x, acc); }
};

// y = x W^T, W a plain row-major (N, K) fp32 or bf16 weight (the layout oneDNN also runs prefill
// on). The weight is read as one sequential stream, row after row (four accumulators along a
// row; each row's 16 lanes summed at its end), which the hardware prefetcher follows. An earlier
// version read four rows at once (four interleaved 2-4 KB streams, each row group prefetched one
// group ahead): on a Zen 4 host it streamed 12 GB/s on one core where a plain sum reads 30 GB/s;
// software prefetch 0.5-8 KB ahead of the one stream was no faster than none there.
template <typename WT, typename OT>
void gemv_dense_impl(const typename Dense<WT>::X* X, const WT* W, OT* out, const OT* R, int64_t M, int64_t N,
                     int64_t K) {
  using D = Dense<WT>;
  constexpr int64_t S = D::step;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const WT* w = W + n * K;
      for (int64_t m = 0; m < M; ++m) {  // later input rows re-read the weight row from L1
        const typename D::X* xm = X + m * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 4 * S <= K; k += 4 * S) {
          a0 = D::dot(a0, w + k, D::load_x(xm + k));
          a1 = D::dot(a1, w + k + S, D::load_x(xm + k + S));
          a2 = D::dot(a2, w + k + 2 * S, D::load_x(xm + k + 2 * S));
          a3 = D::dot(a3, w + k + 3 * S, D::load_x(xm + k + 3 * S));
        }
        for (; k < K; k += S) a0 = D::dot(a0, w + k, D::load_x(xm + k));
        float y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        if (R) y += static_cast<float>(R[m * N + n]);
        out[m * N + n] = static_cast<OT>(y);
      }
    }
  });
}

void gemv_dense(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const c10::optional<at::Tensor>& residual,
                const c10::optional<at::Tensor>& norm_weight, double eps, bool silu_gate) {
  check_common(x, out, residual);
  const int64_t M = x.size(0), K = w.size(1), N = out.size(1);
  const bool bf16_weight = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(K % (bf16_weight ? 32 : 16) == 0 && w.dim() == 2 && w.size(0) == N && w.is_contiguous() &&
              (bf16_weight || w.scalar_type() == at::kFloat), "gemv_dense: weight/input shape mismatch");
  thread_local std::vector<float> xf;
  prologue_rows(x, K, norm_weight, eps, silu_gate, xf);
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  auto run = [&](auto w_tag, auto o_tag, const auto* X) {
    using WT = decltype(w_tag);
    using OT = decltype(o_tag);
    gemv_dense_impl<WT, OT>(X, w.data_ptr<WT>(), out.data_ptr<OT>(), residual ? residual->data_ptr<OT>() : nullptr,
                            M, N, K);
  };
  if (bf16_weight) {
    thread_local std::vector<at::BFloat16> xb;
    xb.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xb[i] = static_cast<at::BFloat16>(xf[i]);
    if (bf16_out) run(at::BFloat16(), at::BFloat16(), xb.data());
    else run(at::BFloat16(), 0.f, xb.data());
  } else {
    if (bf16_out) run(0.f, at::BFloat16(), xf.data());
    else run(0.f, 0.f, xf.data());
  }
}

// The index of each row's largest value, the first one on ties and the first NaN if any (as
// torch.argmax): torch's CPU argmax is a scalar loop, 0.2-0.4 ms for one row of LFM2's 65,536
// logits (fp32 / bf16).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "argmax_rows: (rows, n) fp32 or bf16 rows");
  const int64_t M = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  for (int64_t m = 0; m < M; ++m) {
    const float* rf = bf16 ? nullptr : x.data_ptr<float>() + m * V;
    const uint16_t* rb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * V : nullptr;
    auto at = [&](int64_t i) {
      return bf16 ? static_cast<float>(c10::bit_cast<at::BFloat16>(rb[i])) : rf[i];
    };
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k + 16 <= V; k += 16) {
      const __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + k))), 16))
                            : _mm512_loadu_ps(rf + k);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_max_ps(best, v);
    }
    float top = _mm512_reduce_max_ps(best);
    bool any_nan = nan != 0;
    for (int64_t i = k; i < V; ++i) {
      const float v = at(i);
      any_nan |= v != v;
      top = std::max(top, v);
    }
    int64_t idx = 0;
    for (int64_t i = 0; i < V; ++i) {  // the first position of the maximum (or NaN)
      const float v = at(i);
      if (any_nan ? v != v : v == top) { idx = i; break; }
    }
    out.data_ptr<int64_t>()[m] = idx;
  }
  return out;
}

// Rows of an int8 embedding table kept in the q8 product layout (N/16, K/4, 16, 4) of q + 128 with one
// fp32 scale a row (the tied LM head's table): out = T(q) * T(scale), rounded as torch's ops on the
// dtype T round it (q exact in T). One call for the lookup instead of ~8 torch ops.
at::Tensor embedding_q8(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& ids, int64_t n,
                        at::ScalarType dtype) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 && packed.is_contiguous() &&
              packed.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              n <= packed.size(0) * 16 && scale.numel() >= n, "embedding_q8: a q8 table and its row scales");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "embedding_q8: int64 / int32 ids");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "embedding_q8: fp32 or bf16 rows");
  const int64_t K = packed.size(1) * 4, T = ids.numel();
  const at::Tensor flat = ids.to(at::kLong).contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const uint8_t* table = packed.data_ptr<uint8_t>();
  auto run = [&](auto tag) {
    using OT = decltype(tag);
    OT* o = out.data_ptr<OT>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = flat.data_ptr<int64_t>()[t];
      TORCH_CHECK(id >= 0 && id < n, "embedding_q8: token id ", id, " outside the vocabulary of ", n);
      const float s = static_cast<float>(static_cast<OT>(scale.data_ptr<float>()[id]));
      const uint8_t* group = table + (id / 16) * K * 16 + (id % 16) * 4;  // column c of row id at c / 4 * 64
      for (int64_t c = 0; c < K; ++c) {
        const float q = static_cast<float>(static_cast<int>(group[c / 4 * 64 + c % 4]) - 128);
        o[t * K + c] = static_cast<OT>(q * s);
      }
    }
  };
  if (dtype == at::kBFloat16) run(at::BFloat16());
  else run(0.f);
  return out;
}

// ----------------------------------------------------------------------------- batch-1 decode, the rest
// The small ops around the products of one decoded token, as single calls: each replaces 10-40
// torch ops whose dispatch costs more than their arithmetic (0.2-0.45 ms per layer). They round
// to the activations' dtype after each operation exactly where the unfused torch ops do.

// LFM2's conv block after in_proj, one token: bcx = [B | C | x] (3D), y = C * conv(B * x) over the
// slot's state (K-1, D; zeroed first when `reset`), which then shifts in B * x.
template <typename T, typename S>
void conv_step_impl(const T* bcx, const T* w, const T* bias, S* state, T* y, int64_t D, int64_t K, bool reset) {
  auto r = [](float v) { return static_cast<float>(static_cast<T>(v)); };  // the dtype's rounding
  if (reset) std::fill(state, state + (K - 1) * D, static_cast<S>(0.f));
  auto one = [&](int64_t i) {
    const float bx = r(ld(bcx, i) * ld(bcx, 2 * D + i));
    float out = r(bx * ld(w, i * K + K - 1));
    for (int64_t lag = 1; lag < K; ++lag) {
      const float s = r(static_cast<float>(state[(K - 1 - lag) * D + i]));
      out = r(out + r(s * ld(w, i * K + K - 1 - lag)));
    }
    if (bias) out = r(out + ld(bias, i));
    for (int64_t j = 0; j + 1 < K - 1; ++j) state[j * D + i] = state[(j + 1) * D + i];
    state[(K - 2) * D + i] = static_cast<S>(bx);
    y[i] = static_cast<T>(r(ld(bcx, D + i) * out));
  };
  int64_t i = 0;
  if (K == 3) {  // LFM2's conv: 16 channels at a time (the taps of a channel are K apart in w)
    for (; i + 16 <= D; i += 16) {
      float wt[3][16];
      for (int64_t c = 0; c < 16; ++c)
        for (int64_t t = 0; t < 3; ++t) wt[t][c] = ld(w, (i + c) * 3 + t);
      const __m512 bx = round16<T>(_mm512_mul_ps(load16(bcx + i), load16(bcx + 2 * D + i)));
      __m512 out = round16<T>(_mm512_mul_ps(bx, _mm512_loadu_ps(wt[2])));
      const __m512 s1 = round16<T>(load16(state + D + i)), s0 = round16<T>(load16(state + i));
      out = round16<T>(_mm512_add_ps(out, round16<T>(_mm512_mul_ps(s1, _mm512_loadu_ps(wt[1])))));
      out = round16<T>(_mm512_add_ps(out, round16<T>(_mm512_mul_ps(s0, _mm512_loadu_ps(wt[0])))));
      if (bias) out = round16<T>(_mm512_add_ps(out, load16(bias + i)));
      store16(state + i, load16(state + D + i));
      store16(state + D + i, round16<S>(bx));
      store16(y + i, round16<T>(_mm512_mul_ps(load16(bcx + D + i), out)));
    }
  }
  for (; i < D; ++i) one(i);
}

// The value of a one-element integer tensor (a slot, a length): read inside the op, not on the
// caller's side, so that a recorded step (engine/cpu_graph.py) reads the current one at each replay.
int64_t index_value(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu() && (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt),
              op, ": ", name, " must be a one-element int32 / int64 CPU tensor");
  return t.scalar_type() == at::kLong ? *t.data_ptr<int64_t>() : *t.data_ptr<int32_t>();
}

// states: one conv layer's pool (slots, K-1, D); the row's slot and its cached tokens `past` (a new
// sequence, past 0, starts from zeros) as one-element tensors.
at::Tensor conv_step(const at::Tensor& bcx, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     at::Tensor& states, const at::Tensor& slot_t, const at::Tensor& past_t) {
  TORCH_CHECK(states.dim() == 3 && states.is_contiguous(), "conv_step: states (slots, K-1, D), contiguous");
  const int64_t D = states.size(-1), K = weight.size(-1);
  const int64_t slot = index_value(slot_t, "conv_step", "slot"), past = index_value(past_t, "conv_step", "past");
  TORCH_CHECK(slot >= 0 && slot < states.size(0), "conv_step: slot ", slot, " outside the pool of ", states.size(0));
  TORCH_CHECK(bcx.numel() == 3 * D && bcx.is_contiguous() && weight.numel() == D * K && weight.is_contiguous() &&
              states.size(1) == K - 1 && K >= 2,
              "conv_step: shapes do not fit (bcx 3D, weight (D, 1, K), states (slots, K-1, D))");
  TORCH_CHECK(weight.scalar_type() == bcx.scalar_type() && (!bias || (bias->scalar_type() == bcx.scalar_type() &&
              bias->numel() == D && bias->is_contiguous())), "conv_step: weight and bias in the input's dtype");
  at::Tensor y = at::empty({D}, bcx.options());
  auto run = [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    conv_step_impl<T, S>(bcx.data_ptr<T>(), weight.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr,
                         states.data_ptr<S>() + slot * (K - 1) * D, y.data_ptr<T>(), D, K, past == 0);
  };
  const bool tb = bcx.scalar_type() == at::kBFloat16, sb = states.scalar_type() == at::kBFloat16;
  TORCH_CHECK((tb || bcx.scalar_type() == at::kFloat) && (sb || states.scalar_type() == at::kFloat),
              "conv_step: fp32 or bf16 tensors");
  if (tb && sb) run(at::BFloat16(), at::BFloat16());
  else if (tb) run(at::BFloat16(), 0.f);
  else if (sb) run(0.f, at::BFloat16());
  else run(0.f, 0.f);
  return y;
}

// Per-head RMSNorm (LFM2's: statistics in fp32, rounded, times the weight) then rotate-half RoPE of
// one token's q (H, d) and k (Hkv, d); cos / sin (d) in the activations' dtype.
template <typename T>
void norm_rope_heads(const T* x, const T* w, const T* cos, const T* sin, T* out, int64_t H, int64_t d, float eps) {
  auto r = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  std::vector<float> n(d);
  const int64_t half = d / 2;
  for (int64_t h = 0; h < H; ++h) {
    const T* xh = x + h * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += ld(xh, i) * ld(xh, i);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) n[i] = r(ld(w, i) * r(ld(xh, i) * inv));
    for (int64_t i = 0; i < d; ++i) {
      const float rot = i < half ? -n[i + half] : n[i - half];
      out[h * d + i] = static_cast<T>(r(r(n[i] * ld(cos, i)) + r(rot * ld(sin, i))));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, double eps, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1) && q.size(1) % 2 == 0,
              "qk_norm_rope: q (H, d) and k (Hkv, d)");
  const int64_t d = q.size(1);
  for (const at::Tensor* t : {&q_weight, &k_weight, &cos, &sin}) {
    TORCH_CHECK(t->numel() == d && t->scalar_type() == q.scalar_type(), "qk_norm_rope: weights / cos / sin of d values");
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "qk_norm_rope: fp32 or bf16");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), qw = q_weight.contiguous(), kw = k_weight.contiguous(),
                   cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = at::empty_like(qc), ko = at::empty_like(kc);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    norm_rope_heads<T>(qc.data_ptr<T>(), qw.data_ptr<T>(), cc.data_ptr<T>(), sc.data_ptr<T>(), qo.data_ptr<T>(),
                       q.size(0), d, static_cast<float>(eps));
    norm_rope_heads<T>(kc.data_ptr<T>(), kw.data_ptr<T>(), cc.data_ptr<T>(), sc.data_ptr<T>(), ko.data_ptr<T>(),
                       k.size(0), d, static_cast<float>(eps));
  };
  if (q.scalar_type() == at::kBFloat16) run(at::BFloat16());
  else run(0.f);
  return {qo, ko};
}

// One token's attention over its sequence in the paged cache: k / v (Hkv, d) are written at `slot`,
// then out = softmax(q K^T / sqrt(d)) V over the n cached positions (blocks from `table`), each
// group of H / Hkv query heads on its kv head; fp32 inside, the output rounded once. The threads
// split the kv heads; each walks the cache position by position (its heads' K, then V, rows are
// adjacent in memory), so the cache is read once, as a stream the prefetcher follows, whatever
// the group size. (A head-major walk read each position's 128 bytes at a 1 KB stride, per query
// head: with the cache out of the CPU's caches after a step's weights, 3-5x slower.)
template <typename T>
void paged_decode_one(const T* q, const T* k, const T* v, T* kc, T* vc, const int64_t* table, int64_t n,
                      int64_t slot, int64_t H, int64_t Hkv, int64_t d, int64_t block_size, T* out) {
  const int64_t row = Hkv * d;  // one position of one block
  std::copy(k, k + row, kc + slot * row);
  std::copy(v, v + row, vc + slot * row);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t group = H / Hkv, stride = (n + 15) / 16 * 16;  // scores of one head
  const bool vec = d % 16 == 0 && d <= 256;
  // visit(p, offset of position p's row in the cache) over the n positions, block by block
  auto over_positions = [&](auto&& visit) {
    for (int64_t b = 0, p = 0; p < n; ++b) {
      const int64_t first = table[b] * block_size, count = std::min(block_size, n - p);
      for (int64_t j = 0; j < count; ++j, ++p) visit(p, (first + j) * row);
    }
  };
  at::parallel_for(0, Hkv, 1, [&](int64_t kv0, int64_t kv1) {
    const int64_t h0 = kv0 * group, heads = (kv1 - kv0) * group;  // query heads h0 .. h0 + heads - 1
    std::vector<float> score(heads * stride), qf(heads * d), acc(heads * d, 0.f), top(heads, -INFINITY);
    for (int64_t i = 0; i < heads * d; ++i) qf[i] = ld(q, h0 * d + i) * scale;
    over_positions([&](int64_t p, int64_t at) {
      for (int64_t j = 0; j < heads; ++j) {
        const T* kp = kc + at + (h0 + j) / group * d;
        const float* qj = &qf[j * d];
        float dot = 0.f;
        if (vec) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t i = 0; i < d; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qj + i), load16(kp + i), a);
          dot = _mm512_reduce_add_ps(a);
        } else {
          for (int64_t i = 0; i < d; ++i) dot += qj[i] * ld(kp, i);
        }
        score[j * stride + p] = dot;
        top[j] = std::max(top[j], dot);
      }
    });
    std::vector<float> total(heads);
    for (int64_t j = 0; j < heads; ++j) {
      float* s = &score[j * stride];
      __m512 sums = _mm512_setzero_ps();
      for (int64_t p = 0; p < n; p += 16) {
        const __mmask16 live = n - p >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - p)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + p), _mm512_set1_ps(top[j])));
        _mm512_mask_storeu_ps(s + p, live, e);
        sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(live, e));
      }
      total[j] = _mm512_reduce_add_ps(sums);
    }
    over_positions([&](int64_t p, int64_t at) {
      for (int64_t j = 0; j < heads; ++j) {
        const T* vp = vc + at + (h0 + j) / group * d;
        float* aj = &acc[j * d];
        const float e = score[j * stride + p];
        if (vec) {
          const __m512 ev = _mm512_set1_ps(e);
          for (int64_t i = 0; i < d; i += 16) _mm512_storeu_ps(aj + i, _mm512_fmadd_ps(ev, load16(vp + i), _mm512_loadu_ps(aj + i)));
        } else {
          for (int64_t i = 0; i < d; ++i) aj[i] += e * ld(vp, i);
        }
      }
    });
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t i = 0; i < d; ++i) out[(h0 + j) * d + i] = static_cast<T>(acc[j * d + i] / total[j]);
  });
}

// With `q_weight` (and k_weight, eps, cos, sin): q and k are first per-head RMSNorm-ed and RoPE-d as
// qk_norm_rope does (the same function: the same values), in one call with the attention.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                  at::Tensor& v_cache, const at::Tensor& table, const at::Tensor& past_t,
                                  const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight,
                                  double eps, const c10::optional<at::Tensor>& cos,
                                  const c10::optional<at::Tensor>& sin) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.sizes() == k.sizes() && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == k.size(0) && k_cache.size(3) == k.size(1) &&
              q.size(1) == k.size(1) && q.size(0) % k.size(0) == 0,
              "paged_decode_attention: q (H, d), k / v (Hkv, d), caches (blocks, block_size, Hkv, d)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
              q.scalar_type() == k_cache.scalar_type() && k.scalar_type() == q.scalar_type() &&
              v.scalar_type() == q.scalar_type(), "paged_decode_attention: contiguous caches, one dtype");
  const int64_t block_size = k_cache.size(1);
  // The token is number past + 1 of its sequence, at position `past` (its block: table[past / block_size]).
  const int64_t past = index_value(past_t, "paged_decode_attention", "past"), n = past + 1;
  TORCH_CHECK(past >= 0 && table.dim() == 1 && table.size(0) * block_size >= n,
              "paged_decode_attention: position ", past, " outside the block table");
  TORCH_CHECK(table.scalar_type() == at::kInt || table.scalar_type() == at::kLong,
              "paged_decode_attention: an int32 / int64 block table");
  const at::Tensor qc = q.contiguous(), kk = k.contiguous(), vv = v.contiguous();
  std::vector<int64_t> blocks((n + block_size - 1) / block_size);
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
    const int64_t at = b * table.stride(0);
    blocks[b] = table.scalar_type() == at::kInt ? table.data_ptr<int32_t>()[at] : table.data_ptr<int64_t>()[at];
    TORCH_CHECK(blocks[b] >= 0 && blocks[b] < k_cache.size(0), "paged_decode_attention: block ", blocks[b],
                " outside the cache");
  }
  const int64_t slot = blocks[past / block_size] * block_size + past % block_size;
  const bool norm_rope = q_weight.has_value();
  if (norm_rope) {
    for (const c10::optional<at::Tensor>* t : {&q_weight, &k_weight, &cos, &sin}) {
      TORCH_CHECK(t->has_value() && (*t)->numel() == q.size(1) && (*t)->is_contiguous() &&
                  (*t)->scalar_type() == q.scalar_type(),
                  "paged_decode_attention: q / k norm weights, cos and sin of d values in q's dtype, or none");
    }
  }
  at::Tensor out = at::empty_like(qc);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* qp = qc.data_ptr<T>();
    const T* kp = kk.data_ptr<T>();
    std::vector<T> qn, kn;
    if (norm_rope) {
      const int64_t d = q.size(1);
      qn.resize(qc.numel()), kn.resize(kk.numel());
      norm_rope_heads<T>(qp, q_weight->data_ptr<T>(), cos->data_ptr<T>(), sin->data_ptr<T>(), qn.data(), q.size(0), d,
                         static_cast<float>(eps));
      norm_rope_heads<T>(kp, k_weight->data_ptr<T>(), cos->data_ptr<T>(), sin->data_ptr<T>(), kn.data(), k.size(0), d,
                         static_cast<float>(eps));
      qp = qn.data(), kp = kn.data();
    }
    paged_decode_one<T>(qp, kp, vv.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), blocks.data(), n, slot,
                        q.size(0), k.size(0), q.size(1), block_size, out.data_ptr<T>());
  };
  if (q.scalar_type() == at::kBFloat16) run(at::BFloat16());
  else if (q.scalar_type() == at::kFloat) run(0.f);
  else TORCH_CHECK(false, "paged_decode_attention: fp32 or bf16");
  return out;
}

// ----------------------------------------------------------------------------- weights at load time
// Quantizing and re-laying out a model's weights at load: the same values as fastlfm.cpu_linear's
// torch code (quantize_int4 / quantize_int8, pack_int4 / pack_int8), in one pass over each row
// instead of a dozen tensor ops with whole-weight temporaries and strided copies (350M int4: ~2 s
// of a load).

// fp32 row n of a (N, K) fp32 / bf16 weight into `row`
inline void row_as_float(const at::Tensor& w, int64_t n, float* row) {
  const int64_t K = w.size(1);
  if (w.scalar_type() == at::kFloat) {
    std::copy(w.data_ptr<float>() + n * K, w.data_ptr<float>() + (n + 1) * K, row);
  } else {
    const at::BFloat16* r = w.data_ptr<at::BFloat16>() + n * K;
    for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(r[k]);
  }
}

void check_float_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              name, ": a contiguous (N, K) fp32 or bf16 weight");
}

inline float to_bf16_value(float v) { return static_cast<float>(static_cast<at::BFloat16>(v)); }

// A weight with NaN or inf would quantize to finite garbage (the clamps turn NaN into a code):
// the quantizers refuse it, naming the first row they saw with one.
inline bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

inline void check_finite_rows(const std::atomic<int64_t>& bad, const char* op) {
  TORCH_CHECK(bad.load() < 0, op, ": row ", bad.load(), " holds a non-finite value (NaN or inf)");
}

// Symmetric int4, GGUF Q4_0's scheme: per group, m = the first value of largest magnitude, scale =
// bf16(m / -8) (1e-12 for an all-zero group), code = clamp(round-half-even(w / scale + 8), 0, 15).
std::tuple<at::Tensor, at::Tensor> quantize_int4_symmetric(const at::Tensor& w, int64_t group) {
  check_float_weight(w, "quantize_int4_symmetric");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(group > 0 && K % group == 0, "quantize_int4_symmetric: group ", group, " does not divide ", K);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({N, K / group}, w.options().dtype(at::kFloat));
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      row_as_float(w, n, row.data());
      if (!all_finite(row.data(), K)) bad = n;
      uint8_t* qn = q.data_ptr<uint8_t>() + n * K;
      for (int64_t g = 0; g < K / group; ++g) {
        const float* x = row.data() + g * group;
        float m = 0.f, amax = 0.f;
        if (group % 16 == 0) {  // the largest magnitude, then its first position
          __m512 top = _mm512_setzero_ps();
          for (int64_t i = 0; i < group; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
          amax = _mm512_reduce_max_ps(top);
          for (int64_t i = 0; i < group && amax > 0.f; i += 16) {
            const __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + i)), _mm512_set1_ps(amax), _CMP_EQ_OQ);
            if (at) { m = x[i + __builtin_ctz(at)]; break; }
          }
        } else {
          for (int64_t i = 0; i < group; ++i) {
            if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), m = x[i];
          }
        }
        float s = to_bf16_value(m / -8.f);
        if (std::fabs(s) < 1e-12f) s = 1e-12f;
        scale.data_ptr<float>()[n * (K / group) + g] = s;
        int64_t i = 0;
        if (group % 16 == 0) {  // (a true division, as the scalar loop's: the same codes)
          for (; i < group; i += 16) {
            __m512 c = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(s)), _mm512_set1_ps(8.f));
            c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c = _mm512_min_ps(_mm512_set1_ps(15.f), _mm512_max_ps(_mm512_setzero_ps(), c));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qn + g * group + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(c)));
          }
        }
        for (; i < group; ++i) {
          const float c = std::nearbyint(x[i] / s + 8.f);
          qn[g * group + i] = static_cast<uint8_t>(std::min(15.f, std::max(0.f, c)));
        }
      }
    }
  });
  check_finite_rows(bad, "quantize_int4_symmetric");
  return {q, scale};
}

// int8 per output row: scale = bf16(max |w| / 127) (at least 1e-12 / 127), code = clamp(round(w / scale), -127, 127).
inline float quantize_row_int8(const float* row, int64_t K, int8_t* q) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float s = to_bf16_value(std::max(amax, 1e-12f) / 127.f);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / s))));
  return s;
}

// Rows quantized to int8 (quantize_row_int8) from the fp32 rows `fill(n, row)` writes; a row with a
// non-finite value is refused.
template <typename Fill>
std::tuple<at::Tensor, at::Tensor> int8_rows(int64_t N, int64_t K, const at::TensorOptions& options, const char* op,
                                             Fill&& fill) {
  at::Tensor q = at::empty({N, K}, options.dtype(at::kChar));
  at::Tensor scale = at::empty({N}, options.dtype(at::kFloat));
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      fill(n, row.data());
      if (!all_finite(row.data(), K)) bad = n;
      scale.data_ptr<float>()[n] = quantize_row_int8(row.data(), K, q.data_ptr<int8_t>() + n * K);
    }
  });
  check_finite_rows(bad, op);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_rows(const at::Tensor& w) {
  check_float_weight(w, "quantize_int8_rows");
  return int8_rows(w.size(0), w.size(1), w.options(), "quantize_int8_rows",
                   [&](int64_t n, float* row) { row_as_float(w, n, row); });
}

// GGUF block-quantized rows as int8 per output row: each row de-quantized to fp32 as the format
// defines (the `gguf` package's dequantize gives the same values: the test's oracle), then
// quantized again as quantize_int8_rows does, without the whole fp32 weight in memory (a 1.2B
// model's Q6_K embedding: 2.4 s through numpy). `ggml_type`: 8 = Q8_0, 14 = Q6_K.
inline float fp16_value(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::bit_cast<at::Half>(bits));
}

// Q8_0, 34 bytes for 32 values: fp16 d, then 32 int8 q; value = d * q.
void dequantize_q8_0_block(const uint8_t* b, float* y) {
  const float d = fp16_value(b);
  for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
}

// Q6_K, 210 bytes for 256 values: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d;
// in each half of 128 values, value c * 32 + l (c = 0..3) takes the low (c < 2) or high nibble of
// ql[c % 2 * 32 + l] and bits 2c..2c+1 of qh[l]; value = (d * scales[v / 16]) * (q - 32).
void dequantize_q6_k_block(const uint8_t* b, float* y) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16_value(b + 208);
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, y += 128)
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        const int low = c < 2 ? ql[(c % 2) * 32 + l] & 0xF : ql[(c % 2) * 32 + l] >> 4;
        const int q = (low | (((qh[l] >> (2 * c)) & 3) << 4)) - 32;
        y[c * 32 + l] = (d * static_cast<float>(sc[(c * 32 + l) / 16])) * static_cast<float>(q);
      }
}

std::tuple<at::Tensor, at::Tensor> gguf_blocks_to_int8_rows(const at::Tensor& blocks, int64_t ggml_type) {
  TORCH_CHECK(ggml_type == 8 || ggml_type == 14, "gguf_blocks_to_int8_rows: GGML type ", ggml_type,
              " (Q8_0 = 8 and Q6_K = 14 only)");
  const int64_t block_bytes = ggml_type == 8 ? 34 : 210, per_block = ggml_type == 8 ? 32 : 256;
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
              blocks.size(1) % block_bytes == 0, "gguf_blocks_to_int8_rows: (rows, blocks x ", block_bytes, " bytes) uint8");
  const int64_t nb = blocks.size(1) / block_bytes;
  return int8_rows(blocks.size(0), nb * per_block, blocks.options(), "gguf_blocks_to_int8_rows",
                   [&](int64_t n, float* row) {
                     const uint8_t* b = blocks.data_ptr<uint8_t>() + n * nb * block_bytes;
                     for (int64_t j = 0; j < nb; ++j, b += block_bytes, row += per_block) {
                       if (ggml_type == 8) dequantize_q8_0_block(b, row);
                       else dequantize_q6_k_block(b, row);
                     }
                   });
}

// GGUF Q4_0 rows (18 bytes for 32 values: fp16 d, then 16 bytes holding value j in the low nibble
// and value j + 16 in the high one) as int4 codes 0..15 (N, K) and their scales d (N, K / 32): w =
// (q - 8) * d, fastlfm's symmetric int4 exactly.
std::tuple<at::Tensor, at::Tensor> q4_0_codes(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
              blocks.size(1) % 18 == 0, "q4_0_codes: (rows, blocks x 18 bytes) uint8");
  const int64_t N = blocks.size(0), nb = blocks.size(1) / 18;
  at::Tensor q = at::empty({N, nb * 32}, blocks.options());
  at::Tensor scale = at::empty({N, nb}, blocks.options().dtype(at::kFloat));
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* b = blocks.data_ptr<uint8_t>() + n * nb * 18;
      uint8_t* qn = q.data_ptr<uint8_t>() + n * nb * 32;
      for (int64_t j = 0; j < nb; ++j, b += 18, qn += 32) {
        scale.data_ptr<float>()[n * nb + j] = fp16_value(b);
        for (int i = 0; i < 16; ++i) qn[i] = b[2 + i] & 0xF, qn[16 + i] = b[2 + i] >> 4;
      }
    }
  });
  return {q, scale};
}

// (N, K) codes into the kernels' layouts (see the top of this file), written into `out` (which
// the caller allocates, e.g. on huge pages): `word(row, c)` gives the 4 bytes of row group column
// c for a row (nullptr: a padding row past N); both layouts are (N/16, K/step, 16, 4).
template <typename Word>
void pack_layout(const at::Tensor& q, at::Tensor& out, int64_t step, Word&& word, const char* name) {
  const int64_t N = q.size(0), K = q.size(1), groups = (N + ROWS - 1) / ROWS;
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && K % step == 0, name, ": (N, K) codes, K a multiple of ", step);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kByte && out.numel() == groups * ROWS * K / step * 4,
              name, ": out must hold (N/16, K/", step, ", 16, 4) bytes");
  const uint8_t* src = static_cast<const uint8_t*>(q.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t c = 0; c < K / step; ++c)
        for (int64_t r = 0; r < ROWS; ++r) {
          const int64_t n = g * ROWS + r;
          const uint32_t w = word(n < N ? src + n * K : nullptr, c);
          std::memcpy(dst + ((g * (K / step) + c) * ROWS + r) * 4, &w, 4);
        }
  });
}

void pack_q4_into(const at::Tensor& q, at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "pack_q4_into: uint8 codes 0..15");
  pack_layout(q, out, 8, [](const uint8_t* row, int64_t c) {
    uint32_t lo = 0, hi = 0;  // 4 codes each; < 16, so a shift moves no bit into the next byte
    if (row) std::memcpy(&lo, row + 8 * c, 4), std::memcpy(&hi, row + 8 * c + 4, 4);
    return lo | (hi << 4);
  }, "pack_q4_into");
}

void pack_q8_into(const at::Tensor& q, at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "pack_q8_into: int8 codes");
  pack_layout(q, out, 4, [](const uint8_t* row, int64_t c) {
    uint32_t w = 0;  // 4 codes; + 128 on an int8 flips its top bit (padding rows: 0 + 128)
    if (row) std::memcpy(&w, row + 4 * c, 4);
    return w ^ 0x80808080u;
  }, "pack_q8_into");
}

}  // namespace

TORCH_LIBRARY(fastlfm_cpu, lib) {
  // prologue: silu_gate (x = [gate | up]) then RMSNorm with norm_weight (if given), see prologue_rows
  lib.def("gemv_q8(Tensor x, Tensor w, Tensor scale, Tensor(a!) out, Tensor? residual, Tensor? norm_weight, "
          "float eps, bool silu_gate) -> ()");
  lib.def("gemv_q4(Tensor x, Tensor w, Tensor scale_zero, int group, Tensor(a!) out, Tensor? residual, "
          "Tensor? norm_weight, float eps, bool silu_gate) -> ()");
  lib.def("gemv_dense(Tensor x, Tensor w, Tensor(a!) out, Tensor? residual, Tensor? norm_weight, float eps, "
          "bool silu_gate) -> ()");
  lib.def("argmax_rows(Tensor x) -> Tensor");
  lib.def("embedding_q8(Tensor packed, Tensor scale, Tensor ids, int n, ScalarType dtype) -> Tensor");
  lib.def("conv_step(Tensor bcx, Tensor weight, Tensor? bias, Tensor(a!) states, Tensor slot, Tensor past) -> Tensor");
  lib.def("qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, Tensor cos, Tensor sin) "
          "-> (Tensor, Tensor)");
  lib.def("paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor table, Tensor past, Tensor? q_weight=None, Tensor? k_weight=None, float eps=0., Tensor? cos=None, "
          "Tensor? sin=None) -> Tensor");
  lib.def("quantize_int4_symmetric(Tensor w, int group) -> (Tensor, Tensor)");
  lib.def("quantize_int8_rows(Tensor w) -> (Tensor, Tensor)");
  lib.def("gguf_blocks_to_int8_rows(Tensor blocks, int ggml_type) -> (Tensor, Tensor)");
  lib.def("q4_0_codes(Tensor blocks) -> (Tensor, Tensor)");
  lib.def("pack_q4_into(Tensor q, Tensor(a!) out) -> ()");
  lib.def("pack_q8_into(Tensor q, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastlfm_cpu, CPU, lib) {
  lib.impl("gemv_q8", &gemv_q8);
  lib.impl("gemv_q4", &gemv_q4);
  lib.impl("gemv_dense", &gemv_dense);
  lib.impl("argmax_rows", &argmax_rows);
  lib.impl("embedding_q8", &embedding_q8);
  lib.impl("conv_step", &conv_step);
  lib.impl("qk_norm_rope", &qk_norm_rope);
  lib.impl("paged_decode_attention", &paged_decode_attention);
  lib.impl("quantize_int4_symmetric", &quantize_int4_symmetric);
  lib.impl("quantize_int8_rows", &quantize_int8_rows);
  lib.impl("gguf_blocks_to_int8_rows", &gguf_blocks_to_int8_rows);
  lib.impl("q4_0_codes", &q4_0_codes);
  lib.impl("pack_q4_into", &pack_q4_into);
  lib.impl("pack_q8_into", &pack_q8_into);
}
