// Fused bf16 decode kernels for x86 CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later).
//
// The decode forward of a Llama-style model (Llama, Mistral, Qwen2, SmolLM2) for a batch of decode
// tokens runs in ONE OpenMP parallel region: threads split every GEMM by output blocks and every
// glue op by tokens/heads, with a barrier between stages. That removes the per-op dispatch, the
// allocations and the OpenMP fork/join that dominate small-batch decode through torch ops.
//
// Rounding follows the torch path (services/executor): every op that returns a bf16 tensor there
// rounds to bf16 here at the same point; accumulation is fp32.
//
// Weights use a VNNI-style layout packed once at load time (see kernels/cpu_decode.py, pack_weight):
// [ceil(N/16)][K/2][16][2] bf16, i.e. per block of 16 output rows, the K dimension in pairs, so one
// 64-byte load feeds one _mm512_dpbf16_ps for 16 outputs and a broadcast pair of the activation.
//
// A layer's linears may instead be a GGUF file's quantized blocks (Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K /
// Q6_K, as stored): they run gguf_cpu_kernels.h's row dots, the code kernels/gguf_cpu.cpp runs for the
// torch path, on the same values, so they give the torch path's bits for every row (see qgemm_part).
//
// Each stage is also exposed alone (its own parallel region) for the unit tests.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "gguf_cpu_kernels.h"

namespace {

using u16 = uint16_t;

inline float bf2f(u16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline u16 f2bf(float f) {  // round to nearest even, like c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return u16((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return u16(u >> 16);
}

inline float round_bf(float f) { return bf2f(f2bf(f)); }

inline __m512 load_bf(const u16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 load_bf_mask(const u16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __m256i cvt_bf(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline void store_bf(u16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, cvt_bf(v)); }

inline void store_bf_mask(u16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, cvt_bf(v)); }

inline __m512 round_bf_ps(__m512 v) {  // fp32 -> bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(cvt_bf(v)), 16));
}

// exp(x) for fp32 lanes (Cephes-style polynomial, ~1 ulp); -inf -> 0.
inline __m512 exp_ps(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f), lo = _mm512_set1_ps(-88.3762626647949f);
  x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

inline __mmask16 tail_mask(int64_t rem) { return rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1u); }

inline void split(int64_t n, int tid, int nt, int64_t& b, int64_t& e) {
  b = n * tid / nt;
  e = n * (tid + 1) / nt;
}

// ------------------------------------------------------------------------------------------------
// GEMM: out[M, N] (bf16, row stride ldo) = x[M, K] (bf16, row stride ldx) @ W^T + bias, W packed.

template <int MT, int NB>
inline void gemm_tile(const u16* x, int64_t ldx, const u16* w, int64_t K, int64_t nb0, const float* bias,
                      u16* out, int64_t ldo, int64_t N) {
  __m512 acc[MT][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t bstride = K * 16;
  const u16* w0 = w + nb0 * bstride;
  const int64_t kp = K / 2;
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      wv[j] = (__m512bh)_mm512_loadu_si512(w0 + j * bstride + p * 32);
      _mm_prefetch((const char*)(w0 + j * bstride + p * 32 + 512), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, 4);
      __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xb);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const int64_t n = (nb0 + j) * 16;
    const __mmask16 m = tail_mask(N - n);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < MT; ++i) store_bf_mask(out + i * ldo + n, _mm512_add_ps(acc[i][j], b), m);
  }
}

template <int MT>
inline void gemm_tile_nb(int nb, const u16* x, int64_t ldx, const u16* w, int64_t K, int64_t nb0,
                         const float* bias, u16* out, int64_t ldo, int64_t N) {
  switch (nb) {
    case 4: gemm_tile<MT, 4>(x, ldx, w, K, nb0, bias, out, ldo, N); break;
    case 3: gemm_tile<MT, 3>(x, ldx, w, K, nb0, bias, out, ldo, N); break;
    case 2: gemm_tile<MT, 2>(x, ldx, w, K, nb0, bias, out, ldo, N); break;
    default: gemm_tile<MT, 1>(x, ldx, w, K, nb0, bias, out, ldo, N); break;
  }
}

// This thread's share of the output blocks.
void gemm_part(int tid, int nt, const u16* x, int64_t ldx, int64_t M, const u16* w, int64_t K, int64_t N,
               const float* bias, u16* out, int64_t ldo) {
  const int64_t nblocks = (N + 15) / 16;
  int64_t b0, b1;
  split(nblocks, tid, nt, b0, b1);
  for (int64_t nb = b0; nb < b1; nb += 4) {
    const int nbk = int(std::min<int64_t>(4, b1 - nb));
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m);
      const u16* xm = x + m * ldx;
      u16* om = out + m * ldo;
      switch (mt) {
        case 4: gemm_tile_nb<4>(nbk, xm, ldx, w, K, nb, bias, om, ldo, N); break;
        case 3: gemm_tile_nb<3>(nbk, xm, ldx, w, K, nb, bias, om, ldo, N); break;
        case 2: gemm_tile_nb<2>(nbk, xm, ldx, w, K, nb, bias, om, ldo, N); break;
        default: gemm_tile_nb<1>(nbk, xm, ldx, w, K, nb, bias, om, ldo, N); break;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// GGUF GEMM: out[M, N] (bf16, row stride ldo) = x[M, K] (bf16, row stride ldx) @ W^T + bias for W in a
// GGUF file's blocks (uint8 [N, row bytes]), as kernels/gguf_cpu.py's gguf_linear computes it on the
// torch path: x's float values quantized to int8 per 32 (quantize_row), the row dots (matmul_tiles), then
// bf16(y + bias) with the float32 bias. Every thread quantizes all M rows into its own buffers (a few
// microseconds for decode batches; sharing the work would cost a barrier, which on a loaded machine
// costs far more), then runs its share of the row dots (tiles of NR weight rows). A (weight row, token)
// result does not depend on the tiling or the token count (gguf_cpu_kernels.h), so neither on batch-mates.

struct QScratch {  // per thread: one linear's quantized activations, sized for the largest K
  int64_t q_ld, xd_ld, sx_ld, kmax;  // per-thread strides
  int8_t* q;    // [threads][M, pairs * 64]
  uint8_t* qu;  // [threads][M, pairs * 64] (Q8_0 on VNNI)
  float* xd;    // [threads][M, pairs * 16]
  float* sx;    // [threads][M, chunks * 16]
  float* xf;    // [threads, kmax]: a token's row in float
  float* y;     // [M, N] float32 results
};

struct QScratchBuf {
  int64_t q_ld, xd_ld, sx_ld, kmax;
  std::vector<int8_t> q;
  std::vector<uint8_t> qu;
  std::vector<float> xd, sx, xf, y;
  QScratchBuf(int64_t M, int64_t kmax_, int64_t nmax, int nt) : kmax(kmax_) {
    const int64_t nb = kmax / QK, pairs = (nb + 1) / 2, chunks = (nb + 15) / 16;
    q_ld = M * pairs * 64;
    xd_ld = M * pairs * 16;
    sx_ld = M * chunks * 16;
    q.resize(nt * q_ld);
    qu.resize(nt * q_ld);
    xd.resize(nt * xd_ld);
    sx.resize(nt * sx_ld);
    xf.resize(size_t(nt) * kmax);
    y.resize(M * nmax);
  }
  QScratch view() { return {q_ld, xd_ld, sx_ld, kmax, q.data(), qu.data(), xd.data(), sx.data(), xf.data(), y.data()}; }
};

void qgemm_part(int tid, int nt, const u16* x, int64_t ldx, int64_t M, const uint8_t* w, int qt, int64_t K,
                int64_t N, const float* bias, u16* out, int64_t ldo, const QScratch& s) {
  const bool vnni = has_vnni();
  const int64_t nb = K / QK, pairs = (nb + 1) / 2, chunks = (nb + 15) / 16;
  int8_t* q = s.q + tid * s.q_ld;
  uint8_t* qu = vnni && needs_unsigned_acts(qt) ? s.qu + tid * s.q_ld : nullptr;
  float *xd = s.xd + tid * s.xd_ld, *sx = s.sx + tid * s.sx_ld, *xf = s.xf + tid * s.kmax;
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t c = 0; c < K; ++c) xf[c] = bf2f(x[t * ldx + c]);
    quantize_row(xf, K, pairs, chunks, q + t * pairs * 64, qu ? qu + t * pairs * 64 : nullptr, xd + t * pairs * 16,
                 sx + t * chunks * 16);
  }
  const Acts acts{pairs, chunks, q, qu, xd, sx};
  int64_t b, e;
  const int64_t tr = tile_rows(qt);
  split((N + tr - 1) / tr, tid, nt, b, e);
  matmul_tiles_for(qt, vnni, w, row_bytes_of(qt, K), nb, acts, M, s.y, N, b, e);
  const int64_t r0 = b * tr, r1 = std::min(e * tr, N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t r = r0; r < r1; ++r) {
      float v = s.y[i * N + r];
      if (bias) v += bias[r];
      out[i * ldo + r] = f2bf(v);
    }
}

// ------------------------------------------------------------------------------------------------
// Residual add + RMSNorm, rounded as services/executor/layers/norm.py (and HF transformers) do:
//   res = bf16(x + res) (or res = x when first), inv = rsqrt(eps + mean(res^2)) in fp32,
//   out = bf16(res * inv), then out = bf16(out * weight) when a weight is given.

void add_rms_token(const u16* x, u16* res, bool add, int64_t H, float eps, const u16* weight, u16* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t c = 0; c < H; c += 16) {
    const __mmask16 m = tail_mask(H - c);
    __m512 r = load_bf_mask(x + c, m);
    if (add) {
      r = round_bf_ps(_mm512_add_ps(r, load_bf_mask(res + c, m)));
    }
    store_bf_mask(res + c, r, m);
    ss = _mm512_fmadd_ps(r, r, ss);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / float(H) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < H; c += 16) {
    const __mmask16 m = tail_mask(H - c);
    __m512 o = _mm512_mul_ps(load_bf_mask(res + c, m), vinv);
    if (weight) o = _mm512_mul_ps(round_bf_ps(o), load_bf_mask(weight + c, m));
    store_bf_mask(out + c, o, m);
  }
}

void add_rms_part(int tid, int nt, const u16* x, u16* res, bool add, int64_t M, int64_t H, float eps,
                  const u16* weight, u16* out) {
  for (int64_t t = tid; t < M; t += nt) add_rms_token(x + t * H, res + t * H, add, H, eps, weight, out + t * H);
}

// ------------------------------------------------------------------------------------------------
// Rotary (rotate-half layout, sin table pre-signed: rot(x) = bf16(bf16(x*cos) + [x2|x1]*sin)) on the
// q and k heads of qkv [M, (nh + 2 nkv) * D] in place, then k and v written into the caches
// [slots, nkv, D] at out_slots.

void rope_head(u16* x, const u16* cos, const u16* sin, int64_t D, u16* dst) {
  const int64_t half = D / 2;
  u16 tmp[512];
  if (half % 16 == 0) {
    for (int64_t c = 0; c < D; c += 16) {
      const __m512 xv = load_bf(x + c);
      const __m512 xr = load_bf(x + (c + half) % D);
      const __m512 t = round_bf_ps(_mm512_mul_ps(xv, load_bf(cos + c)));
      store_bf(tmp + c, _mm512_fmadd_ps(xr, load_bf(sin + c), t));
    }
  } else {
    for (int64_t c = 0; c < D; ++c) {
      const float t = round_bf(bf2f(x[c]) * bf2f(cos[c]));
      tmp[c] = f2bf(t + bf2f(x[(c + half) % D]) * bf2f(sin[c]));
    }
  }
  std::memcpy(dst, tmp, D * sizeof(u16));
}

void rope_store_part(int tid, int nt, u16* qkv, int64_t M, int64_t nh, int64_t nkv, int64_t D,
                     const int64_t* positions, const u16* cos_table, const u16* sin_table, const int64_t* out_slots,
                     u16* k_cache, u16* v_cache) {
  const int64_t heads = nh + nkv;
  const int64_t row = (nh + 2 * nkv) * D;
  int64_t b, e;
  split(M * heads, tid, nt, b, e);
  for (int64_t it = b; it < e; ++it) {
    const int64_t t = it / heads, h = it % heads;
    u16* x = qkv + t * row + h * D;
    const u16* cos = cos_table + positions[t] * D;
    const u16* sin = sin_table + positions[t] * D;
    if (h < nh) {
      rope_head(x, cos, sin, D, x);
    } else {
      const int64_t kh = h - nh;
      const int64_t dst = (out_slots[t] * nkv + kh) * D;
      rope_head(x, cos, sin, D, k_cache + dst);
      std::memcpy(v_cache + dst, qkv + t * row + (nh + nkv) * D + kh * D, D * sizeof(u16));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence, keys/values gathered through the sequence's slot
// list (table row t, first lens[t] entries). Scores, softmax and the weighted sum in fp32.

template <int DV>
void attend_head(const u16* q, const u16* k_cache, const u16* v_cache, const int64_t* slots, int64_t L,
                 int64_t kvh, int64_t nkv, float scale, float* scores, u16* out) {
  constexpr int64_t D = DV * 16;
  __m512 qv[DV];
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c) qv[c] = load_bf(q + c * 16);
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    const u16* k = k_cache + (slots[j] * nkv + kvh) * D;
    __m512 s = _mm512_mul_ps(qv[0], load_bf(k));
#pragma GCC unroll 16
    for (int c = 1; c < DV; ++c) s = _mm512_fmadd_ps(qv[c], load_bf(k + c * 16), s);
    const float v = _mm512_reduce_add_ps(s) * scale;
    scores[j] = v;
    mx = std::max(mx, v);
  }
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const __mmask16 m = tail_mask(L - j);
    const __m512 p = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), vmx));
    _mm512_mask_storeu_ps(scores + j, m, p);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, p));
  }
  __m512 acc[DV];
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    const u16* v = v_cache + (slots[j] * nkv + kvh) * D;
    const __m512 p = _mm512_set1_ps(scores[j]);
#pragma GCC unroll 16
    for (int c = 0; c < DV; ++c) acc[c] = _mm512_fmadd_ps(p, load_bf(v + c * 16), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
#pragma GCC unroll 16
  for (int c = 0; c < DV; ++c) store_bf(out + c * 16, _mm512_mul_ps(acc[c], inv));
}

using AttendFn = void (*)(const u16*, const u16*, const u16*, const int64_t*, int64_t, int64_t, int64_t, float,
                          float*, u16*);

AttendFn attend_fn(int64_t D) {
  switch (D) {
    case 32: return attend_head<2>;
    case 48: return attend_head<3>;
    case 64: return attend_head<4>;
    case 80: return attend_head<5>;
    case 96: return attend_head<6>;
    case 128: return attend_head<8>;
    case 160: return attend_head<10>;
    case 192: return attend_head<12>;
    case 256: return attend_head<16>;
    default: return nullptr;
  }
}

// q rows have stride q_ld; out [M, nh * D].
void attention_part(int tid, int nt, const u16* q, int64_t q_ld, int64_t M, int64_t nh, int64_t nkv, int64_t D,
                    const u16* k_cache, const u16* v_cache, const int64_t* table, int64_t table_ld,
                    const int64_t* lens, float scale, float* scores, u16* out) {
  const AttendFn fn = attend_fn(D);
  const int64_t group = nh / nkv;
  int64_t b, e;
  split(M * nh, tid, nt, b, e);
  for (int64_t it = b; it < e; ++it) {
    const int64_t t = it / nh, h = it % nh;
    fn(q + t * q_ld + h * D, k_cache, v_cache, table + t * table_ld, lens[t], h / group, nkv, scale, scores,
       out + (t * nh + h) * D);
  }
}

// ------------------------------------------------------------------------------------------------
// SiLU-and-mul over gu [M, 2I] = [gate | up]: out [M, I] = bf16(bf16(silu(gate)) * up).

void silu_mul_part(int tid, int nt, const u16* gu, int64_t M, int64_t I, u16* out) {
  const int64_t chunks = (I + 15) / 16;
  int64_t b, e;
  split(M * chunks, tid, nt, b, e);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t it = b; it < e; ++it) {
    const int64_t t = it / chunks, c = (it % chunks) * 16;
    const __mmask16 m = tail_mask(I - c);
    const __m512 g = load_bf_mask(gu + t * 2 * I + c, m);
    const __m512 u = load_bf_mask(gu + t * 2 * I + I + c, m);
    const __m512 s = round_bf_ps(_mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store_bf_mask(out + t * I + c, _mm512_mul_ps(s, u), m);
  }
}

// ------------------------------------------------------------------------------------------------

inline const u16* bp(const at::Tensor& t) { return reinterpret_cast<const u16*>(t.data_ptr()); }
inline u16* bpm(const at::Tensor& t) { return reinterpret_cast<u16*>(t.data_ptr()); }
inline const float* fp_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU bfloat16 tensor");
}

void check_packed(const at::Tensor& w, int64_t N, int64_t K, const char* name) {
  check_bf16(w, name);
  TORCH_CHECK(w.dim() == 4 && w.size(0) == (N + 15) / 16 && w.size(1) == K / 2 && w.size(2) == 16 && w.size(3) == 2,
              name, ": expected a packed weight of [", (N + 15) / 16, ", ", K / 2, ", 16, 2]");
}

void check_gguf(const at::Tensor& w, int64_t qtype, int64_t N, int64_t K, const char* name) {
  TORCH_CHECK(supported_type(int(qtype)), name, ": GGUF block type ", qtype,
              " has no kernel (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K do)");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() && w.dim() == 2, name,
              " must be a contiguous CPU uint8 [N, row bytes] tensor");
  const int64_t bv = block_values(int(qtype));
  TORCH_CHECK(K % bv == 0, name, ": K must be a multiple of ", bv);
  TORCH_CHECK(w.size(0) == N && w.size(1) == row_bytes_of(int(qtype), K), name, ": expected [", N, ", ",
              row_bytes_of(int(qtype), K), "] GGUF blocks");
  TORCH_CHECK(!is_packed(int(qtype)) || N % PACK_ROWS == 0, name, ": packed rows come in groups of 16");
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// Steps of more than this many tokens give each thread a slice of the tokens (DecodeModel::run), every
// thread reading all the weights, with no barrier. Smaller steps split every stage instead (below), or,
// with the split off, run on one thread. (OpenMP's barriers between stages, each a futex sleep and wake-up
// of ~50 us with OMP_WAIT_POLICY=PASSIVE as `radixserve executor` runs, made two threads slower than one:
// 13.0 ms per bs1 step against 11.3 on the 2-core EPYC VM.) scripts/bench_gguf_cpu.py --profile breaks a
// step down.
constexpr int64_t kOneThreadRows = 4;

// Unless RADIXSERVE_CPU_DECODE_SPLIT_STAGES=0: steps of up to kOneThreadRows tokens, and steps whose token
// split would idle a thread (splits_stages), split every stage over the threads instead (each GEMM by
// output rows, rotary / attention by heads) and meet at a SpinBarrier between stages (9 per layer): a
// waiting thread spins a microsecond or two, then yields its core between checks, so a barrier costs about
// a microsecond when the threads arrive together (as balanced stages do) and never sleeps in the kernel as
// OpenMP's does. bs1 on the 2-core EPYC VM (scripts/bench_gguf_cpu.py --profile, no services): 6.82 ms
// per step against 8.78 on one thread; through the stack 1.10x.
std::atomic<bool> g_split_stages{[] {
  const char* v = std::getenv("RADIXSERVE_CPU_DECODE_SPLIT_STAGES");
  return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0));
}()};

int forward_threads(int64_t M) { return M <= kOneThreadRows && !g_split_stages ? 1 : num_threads(); }

// Whether a step of M tokens on nt threads splits its stages: small steps, and any step whose token split
// (bounds) would leave a thread without tokens (a verify step of one sequence, whose tokens read each
// other's K/V, stays on one thread there).
bool splits_stages(int64_t M, int nt, const std::vector<int64_t>& bounds) {
  if (!g_split_stages || nt < 2) return false;
  if (M <= kOneThreadRows) return true;
  for (int t = 0; t < nt; ++t)
    if (bounds[t + 1] == bounds[t]) return true;
  return false;
}

// Tests and benchmarks: set whether small steps split stages; returns the previous setting.
bool set_split_stages(bool on) { return g_split_stages.exchange(on); }

// A barrier for the threads of one parallel region: the last to arrive opens the next phase; the others
// spin on it (pause), then yield the core between checks once they have spun kSpins times.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    for (int spin = 0; phase_.load(std::memory_order_acquire) == phase; ++spin) {
      if (spin < kSpins)
        _mm_pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  // ~1-2 us of pause: balanced stages arrive within that; past it the services' processes get the
  // core (through the stack at bs1, 2000 spins measured 0.9-1.0x of one thread, 50 spins 1.10x).
  static constexpr int kSpins = 50;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> phase_{0};
  const int n_;
};

// --- standalone ops (tests) ---------------------------------------------------------------------

at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, int64_t N, const std::optional<at::Tensor>& bias) {
  check_bf16(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0, "K must be even");
  check_packed(w, N, K, "w");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "bias must be float32 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  const float* b = fp_or_null(bias);
#pragma omp parallel num_threads(num_threads())
  gemm_part(omp_get_thread_num(), omp_get_num_threads(), bp(x), K, M, bp(w), K, N, b, bpm(out), N);
  return out;
}

at::Tensor gguf_gemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                     const std::optional<at::Tensor>& bias) {
  check_bf16(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_gguf(w, qtype, N, K, "w");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "bias must be float32 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  const float* b = fp_or_null(bias);
  const int nt = num_threads();
  QScratchBuf buf(M, K, N, nt);
  const QScratch s = buf.view();
#pragma omp parallel num_threads(nt)
  qgemm_part(omp_get_thread_num(), omp_get_num_threads(), bp(x), K, M, w.data_ptr<uint8_t>(), int(qtype), K, N, b,
             bpm(out), N, s);
  return out;
}

std::vector<at::Tensor> add_rms(const at::Tensor& x, const std::optional<at::Tensor>& residual, double eps,
                                const std::optional<at::Tensor>& weight) {
  check_bf16(x, "x");
  const int64_t M = x.size(0), H = x.size(1);
  at::Tensor res = residual ? residual->clone() : at::empty_like(x);
  at::Tensor out = at::empty_like(x);
  const u16* w = weight ? bp(*weight) : nullptr;
  const bool add = residual.has_value();
#pragma omp parallel num_threads(num_threads())
  add_rms_part(omp_get_thread_num(), omp_get_num_threads(), bp(x), bpm(res), add, M, H, float(eps), w, bpm(out));
  return {out, res};
}

void rope_store(const at::Tensor& qkv, int64_t nh, int64_t nkv, const at::Tensor& positions,
                const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& out_slots,
                const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_bf16(qkv, "qkv");
  const int64_t D = k_cache.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 512, "unsupported head_dim");
#pragma omp parallel num_threads(num_threads())
  rope_store_part(omp_get_thread_num(), omp_get_num_threads(), bpm(qkv), qkv.size(0), nh, nkv, D,
                  positions.data_ptr<int64_t>(), bp(cos_table), bp(sin_table), out_slots.data_ptr<int64_t>(),
                  bpm(k_cache), bpm(v_cache));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& table, const at::Tensor& lens, double scale) {
  // q [M, nh, D], caches [slots, nkv, D], table [M, max_len] int64, lens [M] int64.
  check_bf16(q, "q");
  const int64_t M = q.size(0), nh = q.size(1), D = q.size(2), nkv = k_cache.size(1);
  TORCH_CHECK(attend_fn(D) != nullptr, "unsupported head_dim ", D);
  TORCH_CHECK(nh % nkv == 0, "heads must be a multiple of kv heads");
  at::Tensor out = at::empty({M, nh * D}, q.options());
  const int nt = num_threads();
  std::vector<float> scores(size_t(nt) * std::max<int64_t>(table.size(1), 1) + 16);
  const int64_t ld = std::max<int64_t>(table.size(1), 1);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    attention_part(tid, omp_get_num_threads(), bp(q), nh * D, M, nh, nkv, D, bp(k_cache), bp(v_cache),
                   table.data_ptr<int64_t>(), table.size(1), lens.data_ptr<int64_t>(), float(scale),
                   scores.data() + tid * ld, bpm(out));
  }
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_bf16(gu, "gu");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({M, I}, gu.options());
#pragma omp parallel num_threads(num_threads())
  silu_mul_part(omp_get_thread_num(), omp_get_num_threads(), bp(gu), M, I, bpm(out));
  return out;
}

// --- the fused decode forward -------------------------------------------------------------------

struct Linear {
  at::Tensor w;                 // packed bf16 (qtype < 0), or GGUF blocks uint8 [N, row bytes]
  int qtype;                    // -1, or the GGUF block type
  std::optional<at::Tensor> b;  // float32 [N]
  // GGUF: the runs of rows in output order, each of one block type (w / qtype are the first; a Q4_K_M
  // qkv is Q4_K q|k rows, then Q6_K v rows). Each run computes its own output columns.
  std::vector<at::Tensor> runs = {};
  std::vector<int> run_types = {};
};

struct Layer {
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;
  at::Tensor input_norm, post_attention_norm;  // RMSNorm weights, bf16 [H]
};

// This thread's part of x[M, K] @ W^T (+ bias) -> out[M, N] (row strides K and N).
inline void linear_part(int tid, int nt, const Linear& L, const u16* x, int64_t M, int64_t K, int64_t N, u16* out,
                        const QScratch& s) {
  if (L.qtype < 0) {
    gemm_part(tid, nt, x, K, M, bp(L.w), K, N, fp_or_null(L.b), out, N);
    return;
  }
  // Run by run, each run's float32 results in its own part of s.y (M * N values in all): threads that
  // split a linear's rows may be in different runs at once.
  const float* bias = fp_or_null(L.b);
  int64_t r0 = 0;
  for (size_t p = 0; p < L.runs.size(); ++p) {
    const int64_t n = L.runs[p].size(0);
    QScratch run_s = s;
    run_s.y = s.y + M * r0;
    qgemm_part(tid, nt, x, K, M, L.runs[p].data_ptr<uint8_t>(), L.run_types[p], K, n, bias ? bias + r0 : nullptr,
               out + r0, N, run_s);
    r0 += n;
  }
}

// The forward's stages, for DecodeModel::profile.
enum Stage { kNorm, kQkv, kRope, kAttention, kO, kGateUp, kSilu, kDown, kStages };
const char* const kStageNames[kStages] = {"norm", "qkv", "rope_store", "attention", "o", "gate_up", "silu_mul", "down"};

// Times the forward's stages for DecodeModel::profile: given a times array, each stage's end adds this
// thread's time since the previous one (its own work on its tokens) to its row, and thread 0's also to
// the last row (the stages run without barriers, so thread 0's time stands for the stage's wall time; the
// threads meet once, at the end of the parallel region).
class StageClock {
 public:
  StageClock(double* times, int tid, int rows) : times_(times), tid_(tid), rows_(rows) {
    if (times_) last_ = omp_get_wtime();
  }
  void end(Stage s) {
    if (!times_) return;
    const double now = omp_get_wtime();
    times_[tid_ * kStages + s] += now - last_;
    if (tid_ == 0) times_[rows_ * kStages + s] += now - last_;
    last_ = now;
  }

 private:
  double* times_;
  int tid_, rows_;
  double last_ = 0.0;
};

// Whether the step's tokens [0, s) and [s, M) are independent: no token of either reads a K/V slot that a
// token of the other writes this step. (A verify step's tokens of one sequence read each other's slots.)
// A slot written this step sits at one of the M positions before a reader's own, so only the last M entries
// of each reader's table row are checked.
bool independent_at(int64_t s, int64_t M, const int64_t* slots, const int64_t* table, int64_t ld,
                    const int64_t* lens) {
  for (int64_t t = 0; t < M; ++t) {
    const int64_t w0 = t < s ? s : 0, w1 = t < s ? M : s;  // the other side's writers
    for (int64_t j = std::max<int64_t>(0, lens[t] - M); j < lens[t]; ++j)
      for (int64_t w = w0; w < w1; ++w)
        if (table[t * ld + j] == slots[w]) return false;
  }
  return true;
}

// The threads' token ranges: bounds[i] .. bounds[i + 1] for thread i, as even as the step's
// dependencies allow (each bound moves to the nearest independent split point; none: the tokens stay
// with one thread).
std::vector<int64_t> token_bounds(int nt, int64_t M, const int64_t* slots, const int64_t* table, int64_t ld,
                                  const int64_t* lens) {
  std::vector<int64_t> bounds(nt + 1, M);
  bounds[0] = 0;
  for (int i = 1; i < nt; ++i) {
    const int64_t target = M * i / nt, lo = bounds[i - 1];
    bounds[i] = M;
    for (int64_t d = 0; d <= M; ++d) {
      if (target - d > lo && independent_at(target - d, M, slots, table, ld, lens)) {
        bounds[i] = target - d;
        break;
      }
      if (target + d < M && target + d > lo && independent_at(target + d, M, slots, table, ld, lens)) {
        bounds[i] = target + d;
        break;
      }
    }
  }
  return bounds;
}

std::vector<int64_t> token_bounds_of(int64_t threads, const at::Tensor& out_slots, const at::Tensor& table,
                                     const at::Tensor& lens) {
  TORCH_CHECK(threads >= 1 && out_slots.scalar_type() == at::kLong && table.scalar_type() == at::kLong &&
                  lens.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 2 &&
                  out_slots.numel() == table.size(0) && lens.numel() == table.size(0),
              "token_bounds: threads >= 1, int64 out_slots [M], table [M, max_len] and lens [M]");
  const at::Tensor s = out_slots.contiguous(), l = lens.contiguous();
  TORCH_CHECK(l.numel() == 0 || (l.min().item<int64_t>() >= 0 && l.max().item<int64_t>() <= table.size(1)),
              "token_bounds: lens must lie in 0..max_len");
  return token_bounds(int(threads), table.size(0), s.data_ptr<int64_t>(), table.data_ptr<int64_t>(), table.size(1),
                      l.data_ptr<int64_t>());
}

class DecodeModel {
 public:
  DecodeModel(int64_t hidden, int64_t nh, int64_t nkv, int64_t head_dim, int64_t inter, double eps, double scale,
              at::Tensor cos_table, at::Tensor sin_table, at::Tensor final_norm)
      : H_(hidden), nh_(nh), nkv_(nkv), D_(head_dim), I_(inter), eps_(float(eps)), scale_(float(scale)),
        cos_(std::move(cos_table)), sin_(std::move(sin_table)), final_norm_(std::move(final_norm)) {
    TORCH_CHECK(attend_fn(D_) != nullptr, "unsupported head_dim ", D_);
    TORCH_CHECK(nh_ % nkv_ == 0, "heads must be a multiple of kv heads");
    TORCH_CHECK(H_ % 2 == 0 && I_ % 2 == 0, "hidden and intermediate sizes must be even");
    check_bf16(cos_, "cos_table");
    check_bf16(sin_, "sin_table");
    check_bf16(final_norm_, "final_norm");
  }

  void add_layer(at::Tensor qkv, std::optional<at::Tensor> qkv_b, at::Tensor o, std::optional<at::Tensor> o_b,
                 at::Tensor gate_up, std::optional<at::Tensor> gate_up_b, at::Tensor down,
                 std::optional<at::Tensor> down_b, at::Tensor k_cache, at::Tensor v_cache,
                 at::Tensor input_norm, at::Tensor post_attention_norm) {
    check_packed(qkv, (nh_ + 2 * nkv_) * D_, H_, "qkv");
    check_packed(o, H_, nh_ * D_, "o");
    check_packed(gate_up, 2 * I_, H_, "gate_up");
    check_packed(down, H_, I_, "down");
    push_layer({qkv, -1, qkv_b}, {o, -1, o_b}, {gate_up, -1, gate_up_b}, {down, -1, down_b}, k_cache, v_cache,
               input_norm, post_attention_norm);
  }

  // A layer whose linears are a GGUF file's blocks: each linear one or more runs of rows in output order,
  // uint8 [n, row bytes] of block type *_qtype[i] each (their n summing to the linear's N).
  void add_gguf_layer(std::vector<at::Tensor> qkv, std::vector<int64_t> qkv_qtype, std::optional<at::Tensor> qkv_b,
                      std::vector<at::Tensor> o, std::vector<int64_t> o_qtype, std::optional<at::Tensor> o_b,
                      std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_qtype,
                      std::optional<at::Tensor> gate_up_b, std::vector<at::Tensor> down, std::vector<int64_t> down_qtype,
                      std::optional<at::Tensor> down_b, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor input_norm, at::Tensor post_attention_norm) {
    push_layer(gguf_linear(qkv, qkv_qtype, qkv_b, (nh_ + 2 * nkv_) * D_, H_, "qkv"),
               gguf_linear(o, o_qtype, o_b, H_, nh_ * D_, "o"),
               gguf_linear(gate_up, gate_up_qtype, gate_up_b, 2 * I_, H_, "gate_up"),
               gguf_linear(down, down_qtype, down_b, H_, I_, "down"), k_cache, v_cache, input_norm,
               post_attention_norm);
    has_gguf_ = true;
  }

  static Linear gguf_linear(const std::vector<at::Tensor>& runs, const std::vector<int64_t>& types,
                            std::optional<at::Tensor> b, int64_t N, int64_t K, const char* name) {
    TORCH_CHECK(!runs.empty() && runs.size() == types.size(), name, ": one block type per run of rows");
    Linear L{runs[0], int(types[0]), b};
    int64_t n = 0;
    for (size_t p = 0; p < runs.size(); ++p) {
      check_gguf(runs[p], types[p], runs[p].dim() == 2 ? runs[p].size(0) : -1, K, name);
      n += runs[p].size(0);
      L.runs.push_back(runs[p]);
      L.run_types.push_back(int(types[p]));
    }
    TORCH_CHECK(n == N, name, ": the runs hold ", n, " rows, expected ", N);
    return L;
  }

  void push_layer(Linear qkv, Linear o, Linear gate_up, Linear down, at::Tensor k_cache, at::Tensor v_cache,
                  at::Tensor input_norm, at::Tensor post_attention_norm) {
    const int64_t n[4] = {(nh_ + 2 * nkv_) * D_, H_, 2 * I_, H_};
    const Linear* lin[4] = {&qkv, &o, &gate_up, &down};
    for (int i = 0; i < 4; ++i)
      if (lin[i]->b) {
        TORCH_CHECK(lin[i]->b->scalar_type() == at::kFloat && lin[i]->b->is_contiguous() && lin[i]->b->numel() == n[i],
                    "biases must be contiguous float32 [N]");
      }
    check_bf16(k_cache, "k_cache");
    check_bf16(v_cache, "v_cache");
    check_bf16(input_norm, "input_norm");
    check_bf16(post_attention_norm, "post_attention_norm");
    TORCH_CHECK(input_norm.numel() == H_ && post_attention_norm.numel() == H_, "norm weight size mismatch");
    TORCH_CHECK(k_cache.size(1) == nkv_ && k_cache.size(2) == D_ && v_cache.sizes() == k_cache.sizes(),
                "cache shape mismatch");
    layers_.push_back({qkv, o, gate_up, down, k_cache, v_cache, input_norm, post_attention_norm});
  }

  // x [M, H] bf16 (the token embeddings), positions/out_slots [M] int64, table [M, max_len] int64 padded,
  // lens [M] int64. Returns the final-normed hidden states [M, H].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& out_slots,
                     const at::Tensor& table, const at::Tensor& lens) {
    return run(x, positions, out_slots, table, lens, nullptr);
  }

  // forward, timed by stage (scripts/bench_gguf_cpu.py --profile): returns the hidden states and a float64
  // [threads + 1, kStages] tensor of seconds summed over the layers: row t < threads is thread t's time in
  // each stage until it reached the stage's closing barrier (its own work), the last row each stage's
  // wall time up to the barrier's release (its slowest thread plus the barrier).
  std::vector<at::Tensor> profile(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& out_slots,
                                  const at::Tensor& table, const at::Tensor& lens) {
    const int nt = forward_threads(x.size(0));
    at::Tensor times = at::zeros({nt + 1, kStages}, at::kDouble);
    at::Tensor h = run(x, positions, out_slots, table, lens, times.data_ptr<double>());
    return {h, times};
  }

 private:
  at::Tensor run(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& out_slots,
                 const at::Tensor& table, const at::Tensor& lens, double* times) {
    check_bf16(x, "x");
    TORCH_CHECK(positions.scalar_type() == at::kLong && out_slots.scalar_type() == at::kLong &&
                    table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
                "index tensors must be int64");
    TORCH_CHECK(table.is_contiguous() && positions.is_contiguous() && out_slots.is_contiguous() && lens.is_contiguous());
    const int64_t M = x.size(0);
    TORCH_CHECK(x.size(1) == H_ && positions.numel() == M && out_slots.numel() == M && lens.numel() == M &&
                table.size(0) == M);
    const int64_t H = H_, D = D_, nh = nh_, nkv = nkv_, I = I_;
    const int64_t nqkv = (nh + 2 * nkv) * D;
    auto opts = x.options();
    at::Tensor res = at::empty({M, H}, opts), h = at::empty({M, H}, opts), tmp = at::empty({M, H}, opts);
    at::Tensor qkv = at::empty({M, nqkv}, opts), attn = at::empty({M, nh * D}, opts);
    at::Tensor gu = at::empty({M, 2 * I}, opts), act = at::empty({M, I}, opts);
    const int nt = forward_threads(M);
    const int64_t ld = std::max<int64_t>(table.size(1), 1);
    std::vector<float> scores(size_t(nt) * ld + 16);
    const int64_t kmax = std::max({H, nh * D, I}), nmax = std::max({nqkv, H, 2 * I});
    QScratchBuf qbuf(has_gguf_ ? M : 0, has_gguf_ ? kmax : 0, nmax, has_gguf_ ? nt : 0);
    const QScratch qs = qbuf.view();
    const u16 *xp = bp(x), *cos = bp(cos_), *sin = bp(sin_), *fnorm = bp(final_norm_);
    u16 *resp = bpm(res), *hp = bpm(h), *tmpp = bpm(tmp), *qkvp = bpm(qkv), *attnp = bpm(attn), *gup = bpm(gu),
        *actp = bpm(act);
    const int64_t *pos = positions.data_ptr<int64_t>(), *slots = out_slots.data_ptr<int64_t>(),
                  *tab = table.data_ptr<int64_t>(), *ln = lens.data_ptr<int64_t>();
    const float eps = eps_, scale = scale_;
    const int64_t nlayers = int64_t(layers_.size());
    const Layer* layers = layers_.data();
    // The layers for `part` of `parts` threads on tokens [t0, t0 + m): each stage split over the parts and
    // the barrier between stages (parts = 1: one thread alone on its tokens; its barrier never waits).
    auto run_layers = [&](int part, int parts, SpinBarrier& barrier, StageClock& clock, int64_t t0, int64_t m,
                          const QScratch& q, float* sc) {
      const bool first = part == 0;  // the norms (per token, cheap) run on the first part alone
      const u16* x0 = xp + t0 * H;
      u16 *res0 = resp + t0 * H, *h0 = hp + t0 * H, *tmp0 = tmpp + t0 * H, *qkv0 = qkvp + t0 * nqkv,
          *attn0 = attnp + t0 * nh * D, *gu0 = gup + t0 * 2 * I, *act0 = actp + t0 * I;
      const int64_t *pos0 = pos + t0, *slots0 = slots + t0, *tab0 = tab + t0 * table.size(1), *ln0 = ln + t0;
      for (int64_t l = 0; l < nlayers; ++l) {
        const Layer& L = layers[l];
        if (first) add_rms_part(0, 1, l == 0 ? x0 : tmp0, res0, l > 0, m, H, eps, bp(L.input_norm), h0);
        clock.end(kNorm);
        barrier.wait();
        linear_part(part, parts, L.qkv, h0, m, H, nqkv, qkv0, q);
        clock.end(kQkv);
        barrier.wait();
        rope_store_part(part, parts, qkv0, m, nh, nkv, D, pos0, cos, sin, slots0, bpm(L.k_cache), bpm(L.v_cache));
        clock.end(kRope);
        barrier.wait();
        attention_part(part, parts, qkv0, nqkv, m, nh, nkv, D, bp(L.k_cache), bp(L.v_cache), tab0, table.size(1),
                       ln0, scale, sc, attn0);
        clock.end(kAttention);
        barrier.wait();
        linear_part(part, parts, L.o, attn0, m, nh * D, H, tmp0, q);
        clock.end(kO);
        barrier.wait();
        if (first) add_rms_part(0, 1, tmp0, res0, true, m, H, eps, bp(L.post_attention_norm), h0);
        clock.end(kNorm);
        barrier.wait();
        linear_part(part, parts, L.gate_up, h0, m, H, 2 * I, gu0, q);
        clock.end(kGateUp);
        barrier.wait();
        silu_mul_part(part, parts, gu0, m, I, act0);
        clock.end(kSilu);
        barrier.wait();
        linear_part(part, parts, L.down, act0, m, I, H, tmp0, q);
        clock.end(kDown);
        barrier.wait();
      }
      if (first) add_rms_part(0, 1, nlayers == 0 ? x0 : tmp0, res0, nlayers > 0, m, H, eps, fnorm, h0);
      clock.end(kNorm);
    };
    const std::vector<int64_t> bounds = token_bounds(nt, M, slots, tab, table.size(1), ln);
    if (splits_stages(M, nt, bounds)) {  // every thread on every token, each stage split over the threads
      SpinBarrier barrier(nt);
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num();
        StageClock clock(times, tid, nt);
        run_layers(tid, omp_get_num_threads(), barrier, clock, 0, M, qs, scores.data() + tid * ld);
      }
      return h;
    }
    // Each thread runs every stage on its own tokens (a slice of the step), all weights against them:
    // no barrier between stages, and a token's bits do not depend on its batch-mates
    // (gguf_cpu_kernels.h), so neither on the slicing.
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      const int64_t t0 = bounds[tid], m = bounds[tid + 1] - t0;
      StageClock clock(times, tid, nt);
      SpinBarrier alone(1);
      // This thread's quantization buffers, and its tokens' rows of the float32 results.
      const QScratch q{qs.q_ld, qs.xd_ld, qs.sx_ld, qs.kmax, qs.q + tid * qs.q_ld, qs.qu + tid * qs.q_ld,
                       qs.xd + tid * qs.xd_ld, qs.sx + tid * qs.sx_ld, qs.xf + tid * qs.kmax,
                       qs.y ? qs.y + t0 * nmax : nullptr};
      if (m > 0) run_layers(0, 1, alone, clock, t0, m, q, scores.data() + tid * ld);
    }
    return h;
  }

  int64_t H_, nh_, nkv_, D_, I_;
  float eps_, scale_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
  bool has_gguf_ = false;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "bf16 x @ W^T (+bias) with a packed W", py::arg("x"), py::arg("w"), py::arg("n"),
        py::arg("bias") = py::none());
  m.def("gguf_gemm", &gguf_gemm, "bf16 x @ W^T (+bias) for W in GGUF blocks, as the torch path's gguf_linear",
        py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("bias") = py::none());
  m.def("add_rms", &add_rms, py::arg("x"), py::arg("residual") = py::none(), py::arg("eps") = 1e-6,
        py::arg("weight") = py::none());
  m.def("rope_store", &rope_store);
  m.def("decode_attention", &decode_attention);
  m.def("silu_mul", &silu_mul);
  m.def("set_split_stages", &set_split_stages,
        "whether steps of up to 4 tokens split each stage over the threads (else one thread); returns the previous",
        py::arg("on"));
  m.def("token_bounds", &token_bounds_of, "the fused forward's token range per thread (tests)", py::arg("threads"),
        py::arg("out_slots"), py::arg("table"), py::arg("lens"));
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("add_gguf_layer", &DecodeModel::add_gguf_layer)
      .def("forward", &DecodeModel::forward, py::call_guard<py::gil_scoped_release>())
      .def("profile", &DecodeModel::profile, py::call_guard<py::gil_scoped_release>());
  m.attr("STAGES") = std::vector<std::string>(kStageNames, kStageNames + kStages);
}
