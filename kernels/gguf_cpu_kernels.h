// The GGUF row-dot kernels (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K weight blocks as the file stores them,
// activations quantized to int8 per 32 values), shared by gguf_cpu.cpp (the torch path's linears) and cpu_decode.cpp
// (the fused decode step's linears): one definition, so both give the same bits for a row.
//
// Everything here has internal linkage (an anonymous namespace): each extension keeps its own copy, so
// the dynamic linker never binds one .so's calls to the other's code, built with other flags. Both
// build with -ffp-contract=off: no FMA contraction of the scalar code, whichever extension runs it.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // values per activation block (and per weight block of Q4_0 / Q4_1 / Q8_0)
constexpr int64_t QK_K = 256;  // values per K-quant super-block
constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;  // gguf.GGMLQuantizationType
constexpr int Q4_K = 12, Q5_K = 13, Q6_K = 14;

constexpr bool is_kquant(int qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }

// A Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K weight's rows regrouped 16 at a time (gguf_cpu.pack_rows; layout at
// "Packed rows" below) have the type PACKED + its block type: the same bytes per row, another order.
constexpr int PACKED = 100;
constexpr int64_t PACK_ROWS = 16;
constexpr bool is_packed(int qtype) {
  return qtype == PACKED + Q4_0 || qtype == PACKED + Q4_1 || qtype == PACKED + Q8_0 || qtype == PACKED + Q4_K ||
         qtype == PACKED + Q5_K || qtype == PACKED + Q6_K;
}
constexpr int base_type(int qtype) { return is_packed(qtype) ? qtype - PACKED : qtype; }

// Whether the kernels take the activations + 128 (Acts::qu) as the unsigned operand: the VNNI kernels of
// the types with signed weights.
constexpr bool needs_unsigned_acts(int qtype) {
  return base_type(qtype) == Q8_0 || qtype == PACKED + Q6_K;
}

// Weight rows per unit of work (a thread's share of a linear is whole units): a tile's 2 rows, or a
// packed group's 16.
constexpr int64_t tile_rows(int qtype) { return is_packed(qtype) ? PACK_ROWS : 2; }

bool supported_type(int qtype) {
  return qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0 || is_kquant(qtype) || is_packed(qtype);
}

// Values per weight block of qtype (32, or 256 for the K-quants).
int64_t block_values(int qtype) { return is_kquant(base_type(qtype)) ? QK_K : QK; }

int64_t block_bytes(int qtype) {
  switch (base_type(qtype)) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
  }
  TORCH_CHECK(false, "gguf_cpu: unsupported block type ", qtype);
  return 0;
}

// Bytes of one weight row of k values (k a multiple of block_values(qtype)).
int64_t row_bytes_of(int qtype, int64_t k) { return k / block_values(qtype) * block_bytes(qtype); }

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 nibbles of a Q4 block in value order: low nibbles are values 0..15, high nibbles 16..31.
inline __m256i nibbles(const uint8_t* qs) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// sum over 32 lanes of u * s (u unsigned, s signed int8) as 8 float partial sums.
inline __m256 dot_us(__m256i u, __m256i s) {
  __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// ---- What a row computes, whichever kernel runs it (so a row's bits never depend on its batch) ----
// Blocks go in pairs (a zero block pads an odd count), 16 float lanes per pair: lanes 0..7 belong to
// block b = 2p, lanes 8..15 to block 2p + 1, lane l holding the int32 sum of the products of the
// block's values 4 (l % 8) .. 4 (l % 8) + 3. For weight row r and activation row i:
//   acc[l] = fma(dw_b * dx_b, float(dot[l]), acc[l])            over the pairs, in order
//   ex[l]  = fma(mw_b, s_x,b, ex[l])  with b = 16 c + l         over chunks c of 16 blocks (zero-padded)
//   y = R(acc) + R(ex)   (Q8_0: y = R(acc)),   R(v) = hsum(v[0..7] + v[8..15])
// with mw = m_w (Q4_1), -8 d_w (Q4_0). The AVX-512 VNNI kernel runs the 16 lanes as one register, the
// AVX2 kernel as two halves; the integer dot products are exact either way, so both give the same bits.

// The activation rows quantized and laid out for the kernels (zero-padded to whole pairs / chunks).
struct Acts {
  int64_t pairs, chunks;
  const int8_t* q;    // [m, pairs * 64]
  const uint8_t* qu;  // [m, pairs * 64]: q + 128 (Q8_0 on AVX-512: the unsigned operand)
  const float* xd;    // [m, pairs * 16]: d_x of block 2p in lanes 0..7, of block 2p + 1 in 8..15
  const float* sx;    // [m, chunks * 16]: s_x per block
};

void quantize_row(const float* x, int64_t k, int64_t pairs, int64_t chunks, int8_t* q, uint8_t* qu,
                  float* xd, float* sx) {
  const int64_t nb = k / QK;
  std::memset(q, 0, pairs * 2 * QK);
  std::memset(xd, 0, pairs * 16 * sizeof(float));
  std::memset(sx, 0, chunks * 16 * sizeof(float));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      q[b * QK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    for (int l = 0; l < 8; ++l) xd[b * 8 + l] = scale;  // pair b / 2, half b % 2
    sx[b] = scale * static_cast<float>(sum);
  }
  if (qu != nullptr)
    for (int64_t i = 0; i < pairs * 2 * QK; ++i) qu[i] = static_cast<uint8_t>(q[i] ^ 0x80);
}

template <int QT>
constexpr int64_t bb() {  // block_bytes(QT), at compile time
  return QT == Q8_0 ? 34 : QT == Q4_1 ? 20 : QT == Q4_0 ? 18 : QT == Q4_K ? 144 : QT == Q5_K ? 176 : 210;
}

template <int QT>
inline float mw_of(const uint8_t* blk) {
  return QT == Q4_1 ? f16(blk + 2) : -8.f * f16(blk);
}

const uint8_t kZeroBlock[64] = {};  // pads an odd block count: d = m = 0, all values 0

// Bytes ahead of each block pair to prefetch: the weights stream from memory once per step (a model's
// are far larger than the caches) and the hardware prefetcher alone kept a Q8_0 LM head at a third of
// the memory's read rate.
#ifndef GGUF_PREFETCH
#define GGUF_PREFETCH 2048
#endif
constexpr int64_t kPrefetch = GGUF_PREFETCH;

// ---- AVX2 (+ FMA + F16C): two 8-lane halves per pair; up to 2 activation rows at a time ----
// A tile's results: each (weight row r, activation row i) sum, plus, for the types with a per-block
// minimum (mins), that row's block mins mw dotted with the activation blocks' sums sx.
template <int NR, int NI>
inline void store_tile_avx2(const __m256 (&lo)[NR][NI], const __m256 (&hi)[NR][NI], const Acts& a,
                            int64_t i0, float* out, int64_t n, int64_t r0, const float* mw, int64_t ss,
                            bool mins) {
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) {
      float y = hsum(_mm256_add_ps(lo[r][i], hi[r][i]));
      if (mins) {
        __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps();
        const float* sx = a.sx + (i0 + i) * ss;
        for (int64_t c = 0; c < a.chunks; ++c) {
          e0 = _mm256_fmadd_ps(_mm256_loadu_ps(mw + r * ss + 16 * c), _mm256_loadu_ps(sx + 16 * c), e0);
          e1 = _mm256_fmadd_ps(_mm256_loadu_ps(mw + r * ss + 16 * c + 8),
                               _mm256_loadu_ps(sx + 16 * c + 8), e1);
        }
        y += hsum(_mm256_add_ps(e0, e1));
      }
      out[(i0 + i) * n + r0 + r] = y;
    }
}

template <int QT, int NR, int NI>
void tile_avx2(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0,
               float* out, int64_t n, int64_t r0, float* mw) {
  constexpr int64_t BB = bb<QT>(), OFF = QT == Q4_1 ? 4 : 2;
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16;
  __m256 lo[NR][NI], hi[NR][NI];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) lo[r][i] = hi[r][i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < a.pairs; ++p) {
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = w + r * row_bytes + 2 * p * BB;
      const uint8_t* b1 = 2 * p + 1 < nb ? b0 + BB : kZeroBlock;
      __m256i w0, w1;
      if constexpr (QT == Q8_0) {
        w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
        w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
      } else {
        w0 = nibbles(b0 + OFF);
        w1 = nibbles(b1 + OFF);
        mw[r * ss + 2 * p] = mw_of<QT>(b0);
        mw[r * ss + 2 * p + 1] = mw_of<QT>(b1);
      }
      const __m256 d0 = _mm256_set1_ps(f16(b0)), d1 = _mm256_set1_ps(f16(b1));
      for (int i = 0; i < NI; ++i) {
        const int8_t* q = a.q + (i0 + i) * qs + p * 64;
        const float* xd = a.xd + (i0 + i) * xs + p * 16;
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
        __m256 f0, f1;
        if constexpr (QT == Q8_0) {
          f0 = dot_us(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(q0, w0));
          f1 = dot_us(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(q1, w1));
        } else {
          f0 = dot_us(w0, q0);
          f1 = dot_us(w1, q1);
        }
        lo[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(d0, _mm256_loadu_ps(xd)), f0, lo[r][i]);
        hi[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(d1, _mm256_loadu_ps(xd + 8)), f1, hi[r][i]);
      }
    }
  }
  store_tile_avx2<NR, NI>(lo, hi, a, i0, out, n, r0, mw, ss, QT != Q8_0);
}

// ---- K-quants (Q4_K, Q5_K, Q6_K): super-blocks of 256 values, run as 8 blocks of 32 ----
// Each 32-value sub-block is a block of the scheme above (the same activation blocks, lanes and integer
// sums, the same order of operations per lane), with the weight's scale per lane instead of per block:
//   Q4_K / Q5_K: w = d sc_j q - dmin m_j (q in 0..15 / 0..31; sub-block j of 32, 6-bit sc_j, m_j):
//                dw = d sc_j on the sub-block's 8 lanes, and mw = -(dmin m_j) per block as Q4_1's m
//   Q6_K:        w = d sc_s (q - 32) (q in 0..63; sub-block s of 16, int8 sc_s): dw = d sc_s on the 4
//                lanes of its 16 values; each lane's integer sum is of (q - 32) q_x, so there is no mw
// d sc (an f16 times a 6-bit or 8-bit integer) is exact in float32, as gguf.quants computes it. The
// kernels unpack each block pair in registers (k_scales, k_pair) once for all the activation rows of a
// tile; the C++ dequantize unpacks a whole super-block to memory (unpack_k).
struct KBlock {
  alignas(64) uint8_t q[QK_K];  // pair j (sub-blocks 2j, 2j + 1 of 32): bytes 64 j .. 64 j + 63, in order
  alignas(64) float dw[64];     // pair j's 16 lane scales at 16 j
  float mw[8];                  // Q4_K / Q5_K: -(dmin m) per sub-block of 32
};

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes (j < 4: the low 6 bits of
// bytes j and j + 4; j >= 4: a nibble of byte j + 4 and the top 2 bits of bytes j - 4 and j).
inline void scale_min_k4(const uint8_t* sc, int j, int& scale, int& min) {
  if (j < 4) {
    scale = sc[j] & 63;
    min = sc[j + 4] & 63;
  } else {
    scale = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
    min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <int QT>
inline void unpack_k(const uint8_t* blk, KBlock& u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == Q6_K) {
    // ql [128], qh [64], int8 scales [16], f16 d. Per half h of 128 values, sub-blocks of 32 t = 0..3:
    // low 4 bits from ql[64 h + 32 (t % 2) + l] (t < 2: low nibble, else high), high 2 bits from
    // qh[32 h + l] bits 2t, 2t + 1.
    const __m256i two = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = load32(blk + 64 * h), b = load32(blk + 64 * h + 32);
      const __m256i hb = load32(blk + 128 + 32 * h);
      __m256i v[4];
      v[0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), two));
      v[1] = _mm256_or_si256(_mm256_and_si256(b, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), two));
      v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(hb, two));
      v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                             _mm256_and_si256(_mm256_srli_epi16(hb, 2), two));
      for (int t = 0; t < 4; ++t)
        _mm256_store_si256(reinterpret_cast<__m256i*>(u.q + 32 * (4 * h + t)), v[t]);
    }
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = f16(blk + 208);
    for (int s = 0; s < 16; ++s) {
      const float ds = d * static_cast<float>(sc[s]);
      for (int l = 0; l < 4; ++l) u.dw[4 * s + l] = ds;
    }
  } else {
    // f16 d, f16 dmin, 12 bytes of scales and mins, (Q5_K: 32 bytes qh, bit j of byte l the high bit of
    // value l of sub-block j), 128 bytes qs: bytes 32 i .. 32 i + 31 hold sub-block 2i in their low
    // nibbles and 2i + 1 in their high nibbles.
    const float d = f16(blk), dmin = f16(blk + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(blk + 4, j, sc, m);
      const float ds = d * static_cast<float>(sc);
      for (int l = 0; l < 8; ++l) u.dw[8 * j + l] = ds;
      u.mw[j] = -(dmin * static_cast<float>(m));
    }
    const uint8_t* qs = blk + (QT == Q5_K ? 48 : 16);
    __m256i hb = _mm256_setzero_si256();
    if constexpr (QT == Q5_K) hb = load32(blk + 16);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    for (int i = 0; i < 4; ++i) {
      const __m256i v = load32(qs + 32 * i);
      __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      if constexpr (QT == Q5_K) {
        const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * i)));
        const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * i + 1)));
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b0), b0), bit4));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b1), b1), bit4));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(u.q + 64 * i), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(u.q + 64 * i + 32), hi);
    }
  }
}

// The kernels' unpacking, in registers (unpack_k above is the dequantize's, through memory):
// k_scales: a super-block's d sc as floats (ds: Q4_K / Q5_K 8, one per sub-block of 32; Q6_K 16, one per
// sub-block of 16) and, Q4_K / Q5_K, its 8 mw = -(dmin m) (stored at mw); -(dmin m) = (-dmin) m exactly.
template <int QT>
inline void k_scales(const uint8_t* blk, float* ds, float* mw) {
  if constexpr (QT == Q6_K) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    const __m256 d = _mm256_set1_ps(f16(blk + 208));
    _mm256_storeu_ps(ds, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_storeu_ps(ds + 8,
                     _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
  } else {
    // The 12 bytes as 3 words s0, s1, s2 (byte j of each in lane j): sc 0..3 = s0 & 63, m 0..3 = s1 & 63;
    // sc 4..7 = the low nibbles of s2 | s0's top 2 bits as bits 4, 5; m 4..7 = s2's high nibbles | s1's.
    uint32_t s[3];
    std::memcpy(s, blk + 4, 12);
    const uint64_t sc = uint64_t(s[0] & 0x3F3F3F3Fu) |
                        uint64_t((s[2] & 0x0F0F0F0Fu) | ((s[0] >> 2) & 0x30303030u)) << 32;
    const uint64_t m = uint64_t(s[1] & 0x3F3F3F3Fu) |
                       uint64_t(((s[2] >> 4) & 0x0F0F0F0Fu) | ((s[1] >> 2) & 0x30303030u)) << 32;
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(sc))));
    const __m256 mf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(m))));
    _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(f16(blk)), scf));
    _mm256_storeu_ps(mw, _mm256_mul_ps(_mm256_set1_ps(-f16(blk + 2)), mf));
  }
}

// k_pair: the unsigned values of pair j (sub-blocks 2j, 2j + 1 of 32) of a super-block, in value order.
template <int QT>
inline void k_pair(const uint8_t* blk, int j, __m256i& w0, __m256i& w1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == Q6_K) {
    const int h = j >> 1;
    const __m256i a = load32(blk + 64 * h), b = load32(blk + 64 * h + 32);
    const __m256i hb = load32(blk + 128 + 32 * h), two = _mm256_set1_epi8(0x30);
    if (j & 1) {  // sub-blocks t = 2, 3 of the half: high nibbles, qh bits 4..7
      w0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(hb, two));
      w1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                           _mm256_and_si256(_mm256_srli_epi16(hb, 2), two));
    } else {  // t = 0, 1: low nibbles, qh bits 0..3
      w0 = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), two));
      w1 = _mm256_or_si256(_mm256_and_si256(b, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), two));
    }
  } else {
    const __m256i v = load32(blk + (QT == Q5_K ? 48 : 16) + 32 * j);
    w0 = _mm256_and_si256(v, low4);
    w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if constexpr (QT == Q5_K) {
      const __m256i hb = load32(blk + 16), bit4 = _mm256_set1_epi8(0x10);
      const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j)));
      const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j + 1)));
      w0 = _mm256_or_si256(w0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b0), b0), bit4));
      w1 = _mm256_or_si256(w1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, b1), b1), bit4));
    }
  }
}

// Super-block sb of a tile's NR weight rows: prefetch ahead and decode the sub-block scales into ds[r]
// and the mins into the row's mw (k_scales).
template <int QT, int NR>
inline void k_tile_scales(const uint8_t* w, int64_t row_bytes, int64_t sb, float (*ds)[16], float* mw,
                          int64_t ss) {
  constexpr int64_t BB = bb<QT>();
  for (int r = 0; r < NR; ++r) {
    const uint8_t* blk = w + r * row_bytes + sb * BB;
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 128), _MM_HINT_T0);
    k_scales<QT>(blk, ds[r], mw + r * ss + 8 * sb);
  }
}

// The K-quant tile on AVX2: two 8-lane halves per pair, as tile_avx2; each weight pair unpacked once
// (in registers) for the tile's NI activation rows.
template <int QT, int NR, int NI>
void tile_avx2_k(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0,
                 float* out, int64_t n, int64_t r0, float* mw) {
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16, nsb = nb / 8;
  constexpr int64_t BB = bb<QT>();
  alignas(32) float ds[NR][16];
  __m256 lo[NR][NI], hi[NR][NI];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) lo[r][i] = hi[r][i] = _mm256_setzero_ps();
  const __m256i k32 = _mm256_set1_epi8(32);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    k_tile_scales<QT, NR>(w, row_bytes, sb, ds, mw, ss);
    for (int j = 0; j < 4; ++j) {
      const int64_t p = 4 * sb + j;
      __m256i w0[NR], w1[NR];
      __m256 d0[NR], d1[NR];
      for (int r = 0; r < NR; ++r) {
        k_pair<QT>(w + r * row_bytes + sb * BB, j, w0[r], w1[r]);
        if constexpr (QT == Q6_K) {  // lanes 0..3, 4..7 of each half: sub-blocks 4j .. 4j + 3 of 16
          d0[r] = _mm256_set_m128(_mm_set1_ps(ds[r][4 * j + 1]), _mm_set1_ps(ds[r][4 * j]));
          d1[r] = _mm256_set_m128(_mm_set1_ps(ds[r][4 * j + 3]), _mm_set1_ps(ds[r][4 * j + 2]));
          w0[r] = _mm256_sub_epi8(w0[r], k32);  // q - 32, signed
          w1[r] = _mm256_sub_epi8(w1[r], k32);
        } else {
          d0[r] = _mm256_set1_ps(ds[r][2 * j]);
          d1[r] = _mm256_set1_ps(ds[r][2 * j + 1]);
        }
      }
      for (int i = 0; i < NI; ++i) {
        const int8_t* q = a.q + (i0 + i) * qs + p * 64;
        const float* xd = a.xd + (i0 + i) * xs + p * 16;
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
        const __m256 x0 = _mm256_loadu_ps(xd), x1 = _mm256_loadu_ps(xd + 8);
        for (int r = 0; r < NR; ++r) {
          __m256 f0, f1;
          if constexpr (QT == Q6_K) {  // (q - 32) q_x as Q8_0's signed products
            f0 = dot_us(_mm256_sign_epi8(w0[r], w0[r]), _mm256_sign_epi8(q0, w0[r]));
            f1 = dot_us(_mm256_sign_epi8(w1[r], w1[r]), _mm256_sign_epi8(q1, w1[r]));
          } else {
            f0 = dot_us(w0[r], q0);
            f1 = dot_us(w1[r], q1);
          }
          lo[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(d0[r], x0), f0, lo[r][i]);
          hi[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(d1[r], x1), f1, hi[r][i]);
        }
      }
    }
  }
  store_tile_avx2<NR, NI>(lo, hi, a, i0, out, n, r0, mw, ss, QT != Q6_K);
}

// ---- AVX-512 VNNI: one 16-lane register per pair, each weight pair unpacked once for up to 16 rows ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

inline float hsum16(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(lo, hi));
}

// The K-quant tile on AVX-512 VNNI: one 16-lane register per pair, as tile_vnni (the same bits as
// tile_avx2_k). Q6_K: dpbusd of the unsigned q (0..63) started at -32 times each lane's activation sum.
// store_tile_avx2 for 16-lane accumulators.
template <int NR, int NI>
inline void store_tile_vnni(const __m512 (&acc)[NR][NI], const Acts& a, int64_t i0, float* out,
                            int64_t n, int64_t r0, const float* mw, int64_t ss, bool mins) {
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) {
      float y = hsum16(acc[r][i]);
      if (mins) {
        __m512 e = _mm512_setzero_ps();
        const float* sx = a.sx + (i0 + i) * ss;
        for (int64_t c = 0; c < a.chunks; ++c)
          e = _mm512_fmadd_ps(_mm512_loadu_ps(mw + r * ss + 16 * c), _mm512_loadu_ps(sx + 16 * c), e);
        y += hsum16(e);
      }
      out[(i0 + i) * n + r0 + r] = y;
    }
}

template <int QT, int NR, int NI>
void tile_vnni_k(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0,
                 float* out, int64_t n, int64_t r0, float* mw) {
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16, nsb = nb / 8;
  constexpr int64_t BB = bb<QT>();
  alignas(64) float ds[NR][16];
  __m512 acc[NR][NI];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m512i k32 = _mm512_set1_epi8(32);
  // Lane l's scale index within the pair: Q6_K sub-block of 16 l / 4, else sub-block of 32 l / 8.
  const __m512i lane_scale = QT == Q6_K
                                 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    k_tile_scales<QT, NR>(w, row_bytes, sb, ds, mw, ss);
    for (int j = 0; j < 4; ++j) {
      const int64_t p = 4 * sb + j;
      const __m512i idx = _mm512_add_epi32(lane_scale, _mm512_set1_epi32(QT == Q6_K ? 4 * j : 2 * j));
      __m512i wv[NR];
      __m512 dw[NR];
      for (int r = 0; r < NR; ++r) {
        __m256i w0, w1;
        k_pair<QT>(w + r * row_bytes + sb * BB, j, w0, w1);
        wv[r] = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
        dw[r] = _mm512_permutexvar_ps(idx, _mm512_load_ps(ds[r]));
      }
      for (int i = 0; i < NI; ++i) {
        const __m512 xd = _mm512_loadu_ps(a.xd + (i0 + i) * xs + p * 16);
        const __m512i qx = _mm512_loadu_si512(a.q + (i0 + i) * qs + p * 64);
        __m512i base = _mm512_setzero_si512();
        if constexpr (QT == Q6_K)
          base = _mm512_sub_epi32(base, _mm512_dpbusd_epi32(_mm512_setzero_si512(), k32, qx));
        for (int r = 0; r < NR; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(base, wv[r], qx);
          acc[r][i] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], xd), _mm512_cvtepi32_ps(dot), acc[r][i]);
        }
      }
    }
  }
  store_tile_vnni<NR, NI>(acc, a, i0, out, n, r0, mw, ss, QT != Q6_K);
}

template <int QT, int NR, int NI>
void tile_vnni(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0,
               float* out, int64_t n, int64_t r0, float* mw) {
  constexpr int64_t BB = bb<QT>(), OFF = QT == Q4_1 ? 4 : 2;
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16;
  __m512 acc[NR][NI];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NI; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < a.pairs; ++p) {
    __m512i wv[NR], corr[NR];
    __m512 dw[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = w + r * row_bytes + 2 * p * BB;
      const uint8_t* b1 = 2 * p + 1 < nb ? b0 + BB : kZeroBlock;
      _mm_prefetch(reinterpret_cast<const char*>(b0 + kPrefetch), _MM_HINT_T0);
      uint16_t h0, h1;
      std::memcpy(&h0, b0, 2);
      std::memcpy(&h1, b1, 2);
      dw[r] = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(h1), _mm_set1_epi16(h0)));
      if constexpr (QT == Q8_0) {
        wv[r] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2)), 1);
        // sum (q + 128) w - 128 sum w = sum q w: start each lane's dot at -128 times its w sum.
        corr[r] = _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), wv[r]));
      } else {
        const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + OFF));
        const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + OFF));
        const __m512i both = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set_m128i(_mm_srli_epi16(v0, 4), v0)),
            _mm256_set_m128i(_mm_srli_epi16(v1, 4), v1), 1);
        wv[r] = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
        mw[r * ss + 2 * p] = mw_of<QT>(b0);
        mw[r * ss + 2 * p + 1] = mw_of<QT>(b1);
      }
    }
    for (int i = 0; i < NI; ++i) {
      const __m512 xd = _mm512_loadu_ps(a.xd + (i0 + i) * xs + p * 16);
      __m512i qx;
      if constexpr (QT == Q8_0)
        qx = _mm512_loadu_si512(a.qu + (i0 + i) * qs + p * 64);
      else
        qx = _mm512_loadu_si512(a.q + (i0 + i) * qs + p * 64);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = QT == Q8_0 ? _mm512_dpbusd_epi32(corr[r], qx, wv[r])
                                       : _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], qx);
        acc[r][i] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], xd), _mm512_cvtepi32_ps(dot), acc[r][i]);
      }
    }
  }
  store_tile_vnni<NR, NI>(acc, a, i0, out, n, r0, mw, ss, QT != Q8_0);
}

// One activation row (a decode step's): NR1 weight rows per tile, the same operations per (weight row,
// activation row) as tile_vnni (so the same bits), with fewer instructions per block pair: a Q4 pair is
// one masked 64-byte load whose words are permuted into the nibble lanes and the d / m lanes (instead of
// two loads, shifts and inserts for the nibbles and scalar f16 loads for d and m). Q8_0 reads a row's d
// halves per chunk of 16 blocks up front (scalar loads, one conversion, a permute per pair): that touches
// each of the tile's rows across its length at once, so their cache misses overlap; an LM head row
// (49152 x 576) streamed from memory 1.7x faster than with the d halves read pair by pair.
constexpr int64_t NR1 = 4;

inline __m512i pair_words(int64_t lo, int64_t hi) {  // word index lo + i in quarters 0, 1; hi + i in 2, 3
  alignas(64) int16_t idx[32];
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < 8; ++i) idx[q * 8 + i] = static_cast<int16_t>((q < 2 ? lo : hi) + i);
  return _mm512_load_si512(idx);
}

template <int QT, int R>
void tile_vnni_row(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, float* out,
                   int64_t r0, float* mw) {
  constexpr int64_t BB = bb<QT>(), OFF = QT == Q4_1 ? 4 : 2;
  const int64_t ss = a.chunks * 16;
  // Q4: the nibble words of block 0 (quarters 0, 1) and block 1 (2, 3); d of block 0 in words 0..7 and
  // of block 1 in 8..15; m (Q4_1) or d (Q4_0) of blocks 0, 1 in words 0, 1.
  const __m512i nib_idx = pair_words(OFF / 2, (BB + OFF) / 2);
  // and, by the same permute, m (Q4_1) or d (Q4_0) of blocks 0, 1 in words 16, 17: stored as halves (mh,
  // the mw buffer's bytes), converted 16 at a time for the m s_x sums (the same floats as mw_of).
  const int m_word = QT == Q4_1 ? 1 : 0;
  const __m512i dm_idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                                          BB / 2 + m_word, m_word,                  //
                                          BB / 2, BB / 2, BB / 2, BB / 2, BB / 2, BB / 2, BB / 2, BB / 2,
                                          0, 0, 0, 0, 0, 0, 0, 0);
  uint16_t* mh = reinterpret_cast<uint16_t*>(mw);  // [R, ss] halves; zero past the row's blocks
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 dv[R];  // Q8_0: a row's d per block of the current chunk of 16
  for (int64_t p = 0; p < a.pairs; ++p) {
    const __m512 xd = _mm512_loadu_ps(a.xd + p * 16);
    const bool full = 2 * p + 1 < nb;
    if constexpr (QT == Q8_0) {
      if (p % 8 == 0) {  // a new chunk: its blocks' d halves, gathered by scalar loads, converted once
        const int64_t b0 = 2 * p, b1 = std::min(nb, b0 + 16);
        for (int r = 0; r < R; ++r) {
          alignas(32) uint16_t dh[16] = {};
          const uint8_t* row = w + (r0 + r) * row_bytes;
          for (int64_t b = b0; b < b1; ++b) std::memcpy(&dh[b - b0], row + b * BB, 2);
          dv[r] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(dh)));
        }
      }
      const __m512i lanes = _mm512_add_epi32(
          _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
          _mm512_set1_epi32(int(2 * (p % 8))));
      // The roles of tile_vnni swapped: the weight is the unsigned operand (w + 128, one xor) and the
      // activation the signed one, so the correction, -128 times each lane's activation sum, is the
      // pair's alone (computed once for the tile's rows): sum (w + 128) q - 128 sum q = sum q w, the
      // same integers.
      const __m512i qx = _mm512_loadu_si512(a.q + p * 64);
      const __m512i flip = _mm512_set1_epi8(-128);
      const __m512i corr = _mm512_sub_epi32(
          _mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, qx));
      for (int r = 0; r < R; ++r) {
        const uint8_t* b0 = w + (r0 + r) * row_bytes + 2 * p * BB;
        const uint8_t* b1 = full ? b0 + BB : kZeroBlock;
        _mm_prefetch(reinterpret_cast<const char*>(b0 + kPrefetch), _MM_HINT_T0);
        const __m512i wv = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2)), 1);
        const __m512 dw = _mm512_permutexvar_ps(lanes, dv[r]);
        const __m512i dot = _mm512_dpbusd_epi32(corr, _mm512_xor_si512(wv, flip), qx);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, xd), _mm512_cvtepi32_ps(dot), acc[r]);
      }
    } else {
      const __m512i qx = _mm512_loadu_si512(a.q + p * 64);
      const __mmask64 bytes = full ? (__mmask64(1) << (2 * BB)) - 1 : (__mmask64(1) << BB) - 1;
      for (int r = 0; r < R; ++r) {
        const uint8_t* b0 = w + (r0 + r) * row_bytes + 2 * p * BB;
        _mm_prefetch(reinterpret_cast<const char*>(b0 + kPrefetch), _MM_HINT_T0);
        const __m512i raw = _mm512_maskz_loadu_epi8(bytes, b0);  // a missing block 1 reads as zeros
        __m512i wv = _mm512_permutexvar_epi16(nib_idx, raw);
        wv = _mm512_and_si512(_mm512_mask_srli_epi16(wv, 0xFF00FF00u, wv, 4), low4);
        const __m512i dm = _mm512_permutexvar_epi16(dm_idx, raw);
        const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
        const int m_halves = _mm_cvtsi128_si32(_mm512_extracti32x4_epi32(dm, 2));
        std::memcpy(mh + r * ss + 2 * p, &m_halves, 4);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, qx);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, xd), _mm512_cvtepi32_ps(dot), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float y = hsum16(acc[r]);
    if constexpr (QT != Q8_0) {
      __m512 e = _mm512_setzero_ps();
      for (int64_t c = 0; c < a.chunks; ++c) {
        __m512 m16 = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mh + r * ss + 16 * c)));
        if constexpr (QT == Q4_0) m16 = _mm512_mul_ps(m16, _mm512_set1_ps(-8.f));  // mw_of: -8 d, exact
        e = _mm512_fmadd_ps(m16, _mm512_loadu_ps(a.sx + 16 * c), e);
      }
      y += hsum16(e);
    }
    out[r0 + r] = y;
  }
}

// Rows [r0, r1) against the one activation row, NR1 at a time.
template <int QT>
void rows_vnni_1(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, float* out,
                 int64_t r0, int64_t r1, float* mw) {
  int64_t r = r0;
  for (; r + NR1 <= r1; r += NR1) tile_vnni_row<QT, NR1>(w, row_bytes, nb, a, out, r, mw);
  switch (r1 - r) {
    case 3: tile_vnni_row<QT, 3>(w, row_bytes, nb, a, out, r, mw); break;
    case 2: tile_vnni_row<QT, 2>(w, row_bytes, nb, a, out, r, mw); break;
    case 1: tile_vnni_row<QT, 1>(w, row_bytes, nb, a, out, r, mw); break;
    default: break;
  }
}

#pragma GCC pop_options

enum Isa { AUTO = 0, AVX2 = 1, AVX512_VNNI = 2 };

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
}

constexpr int64_t NR = 2;  // weight rows per tile

// One tile of the block type's kernel for the ISA (the K-quants have their own).
template <int QT, int ISA, int NRV, int NI>
inline void tile(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0, float* out,
                 int64_t n, int64_t r0, float* mw) {
  if constexpr (ISA == AVX512_VNNI) {
    if constexpr (is_kquant(QT))
      tile_vnni_k<QT, NRV, NI>(w, row_bytes, nb, a, i0, out, n, r0, mw);
    else
      tile_vnni<QT, NRV, NI>(w, row_bytes, nb, a, i0, out, n, r0, mw);
  } else {
    if constexpr (is_kquant(QT))
      tile_avx2_k<QT, NRV, NI>(w, row_bytes, nb, a, i0, out, n, r0, mw);
    else
      tile_avx2<QT, NRV, NI>(w, row_bytes, nb, a, i0, out, n, r0, mw);
  }
}

// The next chunk of activation rows from i0 against NRV weight rows from r0; returns its row count.
template <int QT, int ISA, int NRV>
int64_t run_chunk(const uint8_t* wr, int64_t row_bytes, int64_t nb, const Acts& a, int64_t i0,
                  int64_t left, float* out, int64_t n, int64_t r0, float* mw) {
  if constexpr (ISA == AVX512_VNNI) {
    switch (std::min<int64_t>(left, 8)) {
      case 8: tile<QT, AVX512_VNNI, NRV, 8>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 8;
      case 7: tile<QT, AVX512_VNNI, NRV, 7>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 7;
      case 6: tile<QT, AVX512_VNNI, NRV, 6>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 6;
      case 5: tile<QT, AVX512_VNNI, NRV, 5>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 5;
      case 4: tile<QT, AVX512_VNNI, NRV, 4>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 4;
      case 3: tile<QT, AVX512_VNNI, NRV, 3>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 3;
      case 2: tile<QT, AVX512_VNNI, NRV, 2>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 2;
      default: tile<QT, AVX512_VNNI, NRV, 1>(wr, row_bytes, nb, a, i0, out, n, r0, mw); return 1;
    }
  } else {
    if (left >= 2) {
      tile<QT, AVX2, NRV, 2>(wr, row_bytes, nb, a, i0, out, n, r0, mw);
      return 2;
    }
    tile<QT, AVX2, NRV, 1>(wr, row_bytes, nb, a, i0, out, n, r0, mw);
    return 1;
  }
}

// 9 to 16 activation rows (a verify step with 8 to 15 drafts) against one weight row: one chunk, so
// the weight is unpacked once for all of them (two chunks of up to 8 would unpack it twice).
template <int QT>
void run_wide(const uint8_t* wr, int64_t row_bytes, int64_t nb, const Acts& a, int64_t left,
              float* out, int64_t n, int64_t r0, float* mw) {
  switch (left) {
    case 16: tile<QT, AVX512_VNNI, 1, 16>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 15: tile<QT, AVX512_VNNI, 1, 15>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 14: tile<QT, AVX512_VNNI, 1, 14>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 13: tile<QT, AVX512_VNNI, 1, 13>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 12: tile<QT, AVX512_VNNI, 1, 12>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 11: tile<QT, AVX512_VNNI, 1, 11>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    case 10: tile<QT, AVX512_VNNI, 1, 10>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
    default: tile<QT, AVX512_VNNI, 1, 9>(wr, row_bytes, nb, a, 0, out, n, r0, mw); break;
  }
}

// ---- Packed rows: Q4_0 / Q4_1 / Q8_0 and K-quant rows interleaved 16 at a time (type PACKED + the type) ----
// The file's N rows (N a multiple of 16) regrouped by gguf_cpu.pack_rows: group G (rows 16 G .. 16 G + 15)
// holds its 16 rows' bytes (16 row bytes), block after block, so that a 32-bit lane holds 4 values of one
// row that meet the same 4 activation bytes: one dot-product instruction with those bytes broadcast
// serves 16 rows, and a block's 8 such steps sum its integer dot product per row, one row per lane,
// before any float operation (the file's order needs 3 float operations per 8 values of a row, this one
// 3 per 32). Block b of a group (16 block bytes):
//   d: 16 f16 (row j's at bytes 2 j);  Q4_1: then m, 16 f16;
//   Q4:   4 chunks of 64 bytes: chunk c, row j, byte t < 4 (byte 4 j + t) = value 8c + t | value 8c + 4 + t << 4
//   Q8_0: 8 chunks of 64 bytes: chunk c, row j, byte t = value 4c + t
// The K-quants, per super-block of 256 values, its 8 blocks of 32 after a header:
//   Q4_K (16 x 144 bytes): d, 16 f16; dmin, 16 f16; the 12 scale bytes, byte t of row j at 64 + 16 t + j
//     (scale_min_k4's bytes, one 16-byte vector per t); then each block of 32 as a Q4 block's 4 chunks.
//     Block j has d_w = d sc_j and m_w = -(dmin m_j) (exact in float32, as gguf.quants computes them).
//   Q5_K (16 x 176 bytes): as Q4_K (the low 4 bits), then each block's high bits, 64 bytes a block: byte
//     4 j + t holds that of value 8c + t at bit 2c, of value 8c + 4 + t at bit 2c + 1.
//   Q6_K (16 x 210 bytes): d, 16 f16; the 16 int8 scales, scale s of row j at 32 + 16 s + j; the 8 blocks'
//     low 4 bits as Q4 chunks (2048 bytes); then their high 2 bits, 128 bytes a block: byte 4 j + t of
//     its 64-byte half c / 2 holds those of value 8c + t at bits 4 (c % 2), of value 8c + 4 + t at
//     bits 4 (c % 2) + 2. Values 0..15 of a block have d_w = d sc_2j, 16..31 d sc_2j+1; w = d_w (q - 32).
// What (weight row r, activation row i) computes, in block order:
//   acc = fma(d_w * d_x, float(sum q_w q_x), acc);  then, but for Q8_0 and Q6_K, acc = fma(m_w, s_x, acc)
//   (Q4_0: m_w = -8 d_w)
//   Q6_K: the same over values 0..15 and then 16..31 with their d_w and q_w = q - 32, and no m_w
// y = acc: the same operations per lane on AVX2 and AVX-512, in any batch, so the same bits.
template <int QT>
struct Packed {
  static constexpr int64_t GB = PACK_ROWS * bb<QT>();  // bytes of a group's block (K: super-block)
  static constexpr bool kquant = is_kquant(QT);
  static constexpr bool split = QT == Q6_K;  // two scales per block of 32 (sub-blocks of 16)
  static constexpr bool signed_w = QT == Q8_0 || QT == Q6_K;  // the weight's values are signed
  static constexpr bool mins = QT != Q8_0 && QT != Q6_K;
  // Block b's first byte: its d (and the K-quants' super-block header: where the scales are read).
  static const uint8_t* block(const uint8_t* grp, int64_t b) { return grp + (kquant ? b / 8 : b) * GB; }
  // Block b's 4 chunks of (low) 4-bit values, or Q8_0's 8 chunks of bytes.
  static const uint8_t* values(const uint8_t* grp, int64_t b) {
    if constexpr (QT == Q4_K || QT == Q5_K) return block(grp, b) + 256 + 256 * (b % 8);
    if constexpr (QT == Q6_K) return block(grp, b) + 288 + 256 * (b % 8);
    return block(grp, b) + (QT == Q4_1 ? 64 : 32);
  }
  static const uint8_t* high_bits(const uint8_t* grp, int64_t b) {  // Q5_K, Q6_K
    return QT == Q5_K ? block(grp, b) + 256 + 2048 + 64 * (b % 8) : block(grp, b) + 288 + 2048 + 128 * (b % 8);
  }
};

inline int32_t load4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The K-quants' scales of a group's super-block for its 16 rows, as floats, for both kernels (so both
// read the same floats). Q4_K: ds[j] = d sc_j, mw[j] = -(dmin m_j) per block j of 32 (scale_min_k4 on
// 16 rows at once: byte t of the 16 rows is one 16-byte vector). Q6_K: ds[s] = d sc_s per sub-block of 16.
template <int QT>
inline void packed_k_scales(const uint8_t* sblk, float (*ds)[16], float (*mw)[16]) {
  const auto store = [&](float* dst, __m128i bytes, int64_t d_offset, float sign, bool is_signed) {
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sblk + d_offset + 16 * h)));
      const __m128i half = h ? _mm_srli_si128(bytes, 8) : bytes;
      const __m256 v = _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(half) : _mm256_cvtepu8_epi32(half));
      __m256 r = _mm256_mul_ps(d, v);
      if (sign < 0) r = _mm256_mul_ps(r, _mm256_set1_ps(-1.f));
      _mm256_store_ps(dst + 8 * h, r);
    }
  };
  if constexpr (QT == Q6_K) {
    for (int s = 0; s < 16; ++s)
      store(ds[s], _mm_loadu_si128(reinterpret_cast<const __m128i*>(sblk + 32 + 16 * s)), 0, 1.f, true);
    return;
  }
  __m128i b[12];
  for (int t = 0; t < 12; ++t) b[t] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sblk + 64 + 16 * t));
  const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
  const auto top2 = [&](__m128i v) {  // bits 6, 7 of each byte as bits 4, 5
    return _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(v, 6), m3), 4);
  };
  for (int j = 0; j < 8; ++j) {
    __m128i sc, mn;
    if (j < 4) {
      sc = _mm_and_si128(b[j], m63);
      mn = _mm_and_si128(b[j + 4], m63);
    } else {
      sc = _mm_or_si128(_mm_and_si128(b[j + 4], m15), top2(b[j - 4]));
      mn = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(b[j + 4], 4), m15), top2(b[j]));
    }
    store(ds[j], sc, 0, 1.f, false);
    store(mw[j], mn, 32, -1.f, false);
  }
}

// A block's 8 weight vectors on AVX2, half h (rows 8h..8h+7): Q4 chunk c's values 8c..8c+3 at 2c and
// 8c+4..8c+7 at 2c + 1, so vector k meets activation bytes 4k..4k+3; Q8_0 chunk c at c. Q6_K: the low
// nibbles with their 2 high bits (moved to bits 4, 5; byte-local after the mask), minus 32 (signed).
// (packed_weights_vnni: the same on 64-byte vectors.)
template <int QT>
inline void packed_weights_avx2(const uint8_t* vals, const uint8_t* high, int h, __m256i (&wv)[8]) {
  if constexpr (QT == Q8_0) {
    for (int c = 0; c < 8; ++c) wv[c] = load32(vals + 64 * c + 32 * h);
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), m = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
  for (int c = 0; c < 4; ++c) {
    const __m256i x = load32(vals + 64 * c + 32 * h);
    wv[2 * c] = _mm256_and_si256(x, low4);
    wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
    if constexpr (QT == Q5_K) {  // bit 2c (2c + 1) of each byte to bit 4
      const __m256i hb = load32(high + 32 * h), b4 = _mm256_set1_epi8(0x10);
      const __m256i lo = c < 2 ? _mm256_slli_epi16(hb, 4 - 2 * c) : _mm256_srli_epi16(hb, 2 * c - 4);
      const __m256i hi = c < 2 ? _mm256_slli_epi16(hb, 3 - 2 * c) : _mm256_srli_epi16(hb, 2 * c - 3);
      wv[2 * c] = _mm256_or_si256(wv[2 * c], _mm256_and_si256(lo, b4));
      wv[2 * c + 1] = _mm256_or_si256(wv[2 * c + 1], _mm256_and_si256(hi, b4));
    }
    if constexpr (QT == Q6_K) {
      const __m256i hb = load32(high + 64 * (c / 2) + 32 * h);
      const __m256i lo = c % 2 ? _mm256_and_si256(hb, m) : _mm256_and_si256(_mm256_slli_epi16(hb, 4), m);
      const __m256i hi = c % 2 ? _mm256_and_si256(_mm256_srli_epi16(hb, 2), m)
                               : _mm256_and_si256(_mm256_slli_epi16(hb, 2), m);
      wv[2 * c] = _mm256_sub_epi8(_mm256_or_si256(wv[2 * c], lo), k32);
      wv[2 * c + 1] = _mm256_sub_epi8(_mm256_or_si256(wv[2 * c + 1], hi), k32);
    }
  }
}

// Activation rows i0 .. i0 + NI - 1 against the 16 rows of the group at grp: two 8-lane halves (rows
// 0..7, 8..15); out[i, c0 .. c0 + 15]. Signed weights (Q8_0, Q6_K): |w| times q with w's sign (|w| <=
// 128 fits the unsigned operand; pair sums <= 32512).
template <int QT, int NI>
void packed_tile_avx2(const uint8_t* grp, int64_t nb, const Acts& a, int64_t i0, float* out, int64_t n,
                      int64_t c0) {
  using P = Packed<QT>;
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][NI];
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < NI; ++i) acc[h][i] = _mm256_setzero_ps();
  alignas(64) float kds[16][16], kmw[8][16];  // the K-quants: the current super-block's scales
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = P::block(grp, b);
    if (P::kquant && b % 8 == 0) packed_k_scales<QT>(blk, kds, kmw);
    for (int h = 0; h < 2; ++h) {
      __m256 dw0, dw1, mw = _mm256_setzero_ps();
      if constexpr (P::split) {
        dw0 = _mm256_load_ps(kds[2 * (b % 8)] + 8 * h);
        dw1 = _mm256_load_ps(kds[2 * (b % 8) + 1] + 8 * h);
      } else if constexpr (P::kquant) {
        dw0 = dw1 = _mm256_load_ps(kds[b % 8] + 8 * h);
        mw = _mm256_load_ps(kmw[b % 8] + 8 * h);
      } else {
        dw0 = dw1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * h)));
      }
      if constexpr (QT == Q4_1)
        mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * h)));
      if constexpr (QT == Q4_0) mw = _mm256_mul_ps(dw0, _mm256_set1_ps(-8.f));
      __m256i wv[8];
      packed_weights_avx2<QT>(P::values(grp, b), P::high_bits(grp, b), h, wv);
      for (int i = 0; i < NI; ++i) {
        const int64_t row = i0 + i;
        const int8_t* qx = a.q + row * qs + b * QK;
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int c = 0; c < 8; ++c) {
          const __m256i q4 = _mm256_set1_epi32(load4(qx + 4 * c));
          const __m256i p = P::signed_w ? _mm256_maddubs_epi16(_mm256_sign_epi8(wv[c], wv[c]),
                                                               _mm256_sign_epi8(q4, wv[c]))
                                        : _mm256_maddubs_epi16(wv[c], q4);
          const int part = P::split && c >= 4;
          dot[part] = _mm256_add_epi32(dot[part], _mm256_madd_epi16(p, ones));
        }
        const __m256 dx = _mm256_set1_ps(a.xd[row * xs + b * 8]);
        acc[h][i] = _mm256_fmadd_ps(_mm256_mul_ps(dw0, dx), _mm256_cvtepi32_ps(dot[0]), acc[h][i]);
        if constexpr (P::split)
          acc[h][i] = _mm256_fmadd_ps(_mm256_mul_ps(dw1, dx), _mm256_cvtepi32_ps(dot[1]), acc[h][i]);
        if constexpr (P::mins)
          acc[h][i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.sx[row * ss + b]), acc[h][i]);
      }
    }
  }
  for (int i = 0; i < NI; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (i0 + i) * n + c0 + 8 * h, acc[h][i]);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

template <int QT>
inline void packed_weights_vnni(const uint8_t* vals, const uint8_t* high, __m512i (&wv)[8]) {
  if constexpr (QT == Q8_0) {
    for (int c = 0; c < 8; ++c) wv[c] = _mm512_loadu_si512(vals + 64 * c);
    return;
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F), m = _mm512_set1_epi8(0x30), k32 = _mm512_set1_epi8(32);
  for (int c = 0; c < 4; ++c) {
    const __m512i x = _mm512_loadu_si512(vals + 64 * c);
    wv[2 * c] = _mm512_and_si512(x, low4);
    wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
    if constexpr (QT == Q5_K) {  // bit 2c (2c + 1) of each byte to bit 4
      const __m512i hb = _mm512_loadu_si512(high), b4 = _mm512_set1_epi8(0x10);
      const __m512i lo = c < 2 ? _mm512_slli_epi16(hb, 4 - 2 * c) : _mm512_srli_epi16(hb, 2 * c - 4);
      const __m512i hi = c < 2 ? _mm512_slli_epi16(hb, 3 - 2 * c) : _mm512_srli_epi16(hb, 2 * c - 3);
      wv[2 * c] = _mm512_or_si512(wv[2 * c], _mm512_and_si512(lo, b4));
      wv[2 * c + 1] = _mm512_or_si512(wv[2 * c + 1], _mm512_and_si512(hi, b4));
    }
    if constexpr (QT == Q6_K) {
      const __m512i hb = _mm512_loadu_si512(high + 64 * (c / 2));
      const __m512i lo = c % 2 ? _mm512_and_si512(hb, m) : _mm512_and_si512(_mm512_slli_epi16(hb, 4), m);
      const __m512i hi = c % 2 ? _mm512_and_si512(_mm512_srli_epi16(hb, 2), m)
                               : _mm512_and_si512(_mm512_slli_epi16(hb, 2), m);
      wv[2 * c] = _mm512_sub_epi8(_mm512_or_si512(wv[2 * c], lo), k32);
      wv[2 * c + 1] = _mm512_sub_epi8(_mm512_or_si512(wv[2 * c + 1], hi), k32);
    }
  }
}

// packed_tile_avx2 with 16 lanes: one register per group. Unsigned weights (Q4): the weight is the
// unsigned operand and the activation's 4 bytes the broadcast signed one. Signed weights (Q8_0, Q6_K):
// the activation + 128 (a.qu) is the unsigned operand, and each row's dot starts at -128 times its
// weight sum over the same values (computed once per block for all NI rows): sum (q + 128) w - 128 sum w
// = sum q w, the same integers.
template <int QT, int NI>
void packed_tile_vnni(const uint8_t* grp, int64_t nb, const Acts& a, int64_t i0, float* out, int64_t n,
                      int64_t c0, bool prefetch) {
  using P = Packed<QT>;
  const int64_t qs = a.pairs * 64, xs = a.pairs * 16, ss = a.chunks * 16;
  __m512 acc[NI];
  for (int i = 0; i < NI; ++i) acc[i] = _mm512_setzero_ps();
  alignas(64) float kds[16][16], kmw[8][16];  // the K-quants: the current super-block's scales
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = P::block(grp, b);
    if (!P::kquant || b % 8 == 0) {
      if (prefetch)
        for (int64_t l = 0; l < P::GB; l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + l), _MM_HINT_T0);
      if (P::kquant) packed_k_scales<QT>(blk, kds, kmw);
    }
    __m512 dw0, dw1, mw = _mm512_setzero_ps();
    if constexpr (P::split) {
      dw0 = _mm512_load_ps(kds[2 * (b % 8)]);
      dw1 = _mm512_load_ps(kds[2 * (b % 8) + 1]);
    } else if constexpr (P::kquant) {
      dw0 = dw1 = _mm512_load_ps(kds[b % 8]);
      mw = _mm512_load_ps(kmw[b % 8]);
    } else {
      dw0 = dw1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    }
    if constexpr (QT == Q4_1)
      mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
    if constexpr (QT == Q4_0) mw = _mm512_mul_ps(dw0, _mm512_set1_ps(-8.f));
    __m512i wv[8], corr[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    packed_weights_vnni<QT>(P::values(grp, b), P::high_bits(grp, b), wv);
    if constexpr (P::signed_w) {
      for (int c = 0; c < 8; ++c) {  // 128 (unsigned) times w, per part
        const int part = P::split && c >= 4;
        corr[part] = _mm512_dpbusd_epi32(corr[part], _mm512_set1_epi8(-128), wv[c]);
      }
      for (int part = 0; part < 2; ++part) corr[part] = _mm512_sub_epi32(_mm512_setzero_si512(), corr[part]);
    }
    for (int i = 0; i < NI; ++i) {
      const int64_t row = i0 + i;
      __m512i dot[2] = {corr[0], corr[1]};
      for (int c = 0; c < 8; ++c) {
        const int part = P::split && c >= 4;
        if constexpr (P::signed_w)
          dot[part] = _mm512_dpbusd_epi32(dot[part], _mm512_set1_epi32(load4(a.qu + row * qs + b * QK + 4 * c)), wv[c]);
        else
          dot[part] = _mm512_dpbusd_epi32(dot[part], wv[c], _mm512_set1_epi32(load4(a.q + row * qs + b * QK + 4 * c)));
      }
      const __m512 dx = _mm512_set1_ps(a.xd[row * xs + b * 8]);
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(dw0, dx), _mm512_cvtepi32_ps(dot[0]), acc[i]);
      if constexpr (P::split) acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(dw1, dx), _mm512_cvtepi32_ps(dot[1]), acc[i]);
      if constexpr (P::mins) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.sx[row * ss + b]), acc[i]);
    }
  }
  for (int i = 0; i < NI; ++i) _mm512_storeu_ps(out + (i0 + i) * n + c0, acc[i]);
}

#pragma GCC pop_options

// Groups [begin, end) of a packed weight against all m activation rows, up to 8 (VNNI) / 2 (AVX2) rows
// per pass over a group (a group's blocks stay in cache for the next pass).
template <int QT, int ISA>
void matmul_packed(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t m, float* out,
                   int64_t n, int64_t begin, int64_t end) {
  for (int64_t g = begin; g < end; ++g) {
    const uint8_t* grp = w + g * PACK_ROWS * row_bytes;
    const int64_t c0 = g * PACK_ROWS;
    for (int64_t i0 = 0; i0 < m;) {
      const int64_t left = m - i0;
      if constexpr (ISA == AVX512_VNNI) {
        const bool pf = i0 == 0;
        switch (std::min<int64_t>(left, 8)) {
          case 8: packed_tile_vnni<QT, 8>(grp, nb, a, i0, out, n, c0, pf); break;
          case 7: packed_tile_vnni<QT, 7>(grp, nb, a, i0, out, n, c0, pf); break;
          case 6: packed_tile_vnni<QT, 6>(grp, nb, a, i0, out, n, c0, pf); break;
          case 5: packed_tile_vnni<QT, 5>(grp, nb, a, i0, out, n, c0, pf); break;
          case 4: packed_tile_vnni<QT, 4>(grp, nb, a, i0, out, n, c0, pf); break;
          case 3: packed_tile_vnni<QT, 3>(grp, nb, a, i0, out, n, c0, pf); break;
          case 2: packed_tile_vnni<QT, 2>(grp, nb, a, i0, out, n, c0, pf); break;
          default: packed_tile_vnni<QT, 1>(grp, nb, a, i0, out, n, c0, pf); break;
        }
        i0 += std::min<int64_t>(left, 8);
      } else {
        if (left >= 2) {
          packed_tile_avx2<QT, 2>(grp, nb, a, i0, out, n, c0);
          i0 += 2;
        } else {
          packed_tile_avx2<QT, 1>(grp, nb, a, i0, out, n, c0);
          i0 += 1;
        }
      }
    }
  }
}

// Weight-row tiles per staged group: kStageTiles tiles' results for all m activation rows go to a small
// buffer first, then to out row by row. Written straight to out, a weight row's m results land in m
// lines n floats apart; with n a multiple of 1024 (gate|up's 3072, an LM head's 49152) those lines share
// their L1 and L2 sets, so they evicted each other between consecutive weight rows: an LM head's 16 rows
// ran at half their in-cache rate.
constexpr int64_t kStageTiles = 32;

// Weight-row tiles [begin, end) against all m activation rows: 9 to 16 rows in one chunk per weight row
// (VNNI), else chunks of up to 8 (VNNI) / 2 (AVX2) rows against both rows of a tile. Every (weight row,
// activation row) pair has its own accumulators and runs the same operations whatever its tile or
// chunk, so the result is bitwise the same in any batch.
template <int QT, int ISA>
void matmul_tiles(const uint8_t* w, int64_t row_bytes, int64_t nb, const Acts& a, int64_t m,
                  float* out, int64_t n, int64_t begin, int64_t end) {
  std::vector<float> mw(NR1 * a.chunks * 16, 0.f);  // per weight row: mw per block, zero-padded
  if constexpr (!is_kquant(QT)) {  // (the K-quants run one row as the tiles below)
    if (ISA == AVX512_VNNI && m == 1) {
      rows_vnni_1<QT>(w, row_bytes, nb, a, out, begin * NR, std::min(end * NR, n), mw.data());
      return;
    }
  }
  constexpr int64_t ls = kStageTiles * NR;  // the stage's row stride
  std::vector<float> stage(m * ls);
  for (int64_t g = begin; g < end; g += kStageTiles) {
    const int64_t g0 = g * NR, g1 = std::min(g + kStageTiles, end) * NR;
    for (int64_t t = g; t < std::min(g + kStageTiles, end); ++t) {
      const int64_t r0 = t * NR;
      const uint8_t* wr = w + r0 * row_bytes;
      if (ISA == AVX512_VNNI && m > 8 && m <= 16) {
        for (int64_t r = r0; r < std::min(r0 + NR, n); ++r)
          run_wide<QT>(w + r * row_bytes, row_bytes, nb, a, m, stage.data(), ls, r - g0, mw.data());
        continue;
      }
      for (int64_t i0 = 0; i0 < m;) {
        i0 += r0 + NR <= n
                  ? run_chunk<QT, ISA, NR>(wr, row_bytes, nb, a, i0, m - i0, stage.data(), ls, r0 - g0,
                                           mw.data())
                  : run_chunk<QT, ISA, 1>(wr, row_bytes, nb, a, i0, m - i0, stage.data(), ls, r0 - g0,
                                          mw.data());
      }
    }
    const int64_t rows = std::min(g1, n) - g0;
    for (int64_t i = 0; i < m; ++i)
      std::memcpy(out + i * n + g0, stage.data() + i * ls, rows * sizeof(float));
  }
}

// matmul_tiles (matmul_packed for a packed type: begin, end count groups of 16 rows, not tiles) for a
// block type and ISA chosen at run time (vnni: the AVX-512 VNNI kernel).
inline void matmul_tiles_for(int qt, bool vnni, const uint8_t* w, int64_t row_bytes, int64_t nb,
                             const Acts& a, int64_t m, float* out, int64_t n, int64_t begin,
                             int64_t end) {
  const auto run = [&](auto isa_tag) {
    constexpr int I = decltype(isa_tag)::value;
    switch (qt) {
      case PACKED + Q8_0: matmul_packed<Q8_0, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case PACKED + Q4_1: matmul_packed<Q4_1, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case PACKED + Q4_0: matmul_packed<Q4_0, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case PACKED + Q4_K: matmul_packed<Q4_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case PACKED + Q5_K: matmul_packed<Q5_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case PACKED + Q6_K: matmul_packed<Q6_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case Q8_0: matmul_tiles<Q8_0, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case Q4_1: matmul_tiles<Q4_1, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case Q4_K: matmul_tiles<Q4_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case Q5_K: matmul_tiles<Q5_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      case Q6_K: matmul_tiles<Q6_K, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
      default: matmul_tiles<Q4_0, I>(w, row_bytes, nb, a, m, out, n, begin, end); break;
    }
  };
  if (vnni)
    run(std::integral_constant<int, AVX512_VNNI>());
  else
    run(std::integral_constant<int, AVX2>());
}

}  // namespace
