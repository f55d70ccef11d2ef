// y = x W^T for W in a GGUF file's quantized blocks, on x86 CPUs with AVX2 + FMA + F16C.
//
// The weight stays exactly as the file stores it: one row of W per output feature, each row a run of
// blocks of 32 values (Q4_0: f16 d, 16 bytes of nibbles; Q4_1: f16 d, f16 m, 16 bytes of nibbles;
// Q8_0: f16 d, 32 int8). The activation rows are quantized to int8 per 32-value block (scale d_x =
// max|x| / 127, and s_x = d_x * sum(q_x)), so each block's dot product is an int8 dot product:
//   Q8_0: d_w d_x sum(q_w q_x)
//   Q4_1: d_w d_x sum(q_w q_x) + m_w s_x            (w = d_w q_w + m_w, q_w in 0..15)
//   Q4_0: d_w d_x sum(q_w q_x) - 8 d_w s_x          (w = d_w (q_w - 8))
// Output rows are split over torch's intra-op threads; with several activation rows (prefill) each
// weight row is read once for all of them while it sits in L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // values per block for every type here
constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;  // gguf.GGMLQuantizationType

int64_t block_bytes(int qtype) {
  switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
  }
  TORCH_CHECK(false, "gguf_cpu: unsupported block type ", qtype);
  return 0;
}

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

// One activation row quantized: q[K] int8, per block d and s.
struct QRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
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
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

// R weight rows (each row_bytes apart) against one activation row: R independent accumulator chains
// share each activation block load (one chain alone is bound by the FMA latency).
template <int QT, int R>
inline void rows_dot(const uint8_t* w, int64_t row_bytes, const QRow& x, int64_t nb, float* out) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : (QT == Q4_1 ? 20 : 18);
  __m256 acc[R];
  float extra[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    extra[r] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * QK));
    const float dx = x.d[b], sx = x.s[b];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * BB;
      const float dw = f16(blk);
      if constexpr (QT == Q8_0) {
        const __m256i qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        const __m256 p = dot_us(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), p, acc[r]);
      } else if constexpr (QT == Q4_1) {
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), dot_us(nibbles(blk + 4), qx), acc[r]);
        extra[r] += f16(blk + 2) * sx;
      } else {  // Q4_0
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), dot_us(nibbles(blk + 2), qx), acc[r]);
        extra[r] -= 8.f * dw * sx;
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + extra[r];
}

constexpr int64_t TILE = 4;  // weight rows per tile

// Tiles [begin, end) of TILE weight rows. A row always falls in the same tile, whatever the number of
// activation rows or threads, so its result is bitwise the same in any batch.
template <int QT>
void matmul_tiles(const uint8_t* w, int64_t row_bytes, const QRow* xs, int64_t m, int64_t nb,
                  float* out, int64_t n, int64_t begin, int64_t end) {
  float tile[TILE];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = t * TILE;
    const uint8_t* wr = w + r * row_bytes;
    if (r + TILE <= n) {  // the tile stays in L1 across the activation rows
      for (int64_t i = 0; i < m; ++i) {
        rows_dot<QT, TILE>(wr, row_bytes, xs[i], nb, tile);
        for (int j = 0; j < TILE; ++j) out[i * n + r + j] = tile[j];
      }
    } else {
      for (int64_t j = r; j < n; ++j)
        for (int64_t i = 0; i < m; ++i)
          rows_dot<QT, 1>(w + j * row_bytes, row_bytes, xs[i], nb, out + i * n + j);
    }
  }
}

// x: [M, K] float32 contiguous; w: [N, K/32 * block bytes] uint8; returns float32 [M, N].
torch::Tensor gguf_matmul(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "gguf_matmul: x must be a contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "gguf_matmul: w must be a contiguous uint8 [N, row bytes]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const int qt = static_cast<int>(qtype);
  TORCH_CHECK(k % QK == 0, "gguf_matmul: K must be a multiple of 32");
  const int64_t nb = k / QK, row_bytes = w.size(1);
  TORCH_CHECK(row_bytes == nb * block_bytes(qt), "gguf_matmul: row bytes do not match K");

  auto q = torch::empty({m, k}, torch::kInt8);
  auto ds = torch::empty({2, m, nb}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = ds.data_ptr<float>();
  float* sp = dp + m * nb;
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) quantize_row(xp + i * k, k, qp + i * k, dp + i * nb, sp + i * nb);
  });
  std::vector<QRow> xs(m);
  for (int64_t i = 0; i < m; ++i) xs[i] = {qp + i * k, dp + i * nb, sp + i * nb};

  auto out = torch::empty({m, n}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // Enough rows per task that a thread's share is worth a wake-up, few enough that every thread works.
  const int64_t tiles = (n + TILE - 1) / TILE;
  const int64_t grain = std::max<int64_t>(4, 512 / std::max<int64_t>(m, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    switch (qt) {
      case Q8_0: matmul_tiles<Q8_0>(wp, row_bytes, xs.data(), m, nb, op, n, b, e); break;
      case Q4_1: matmul_tiles<Q4_1>(wp, row_bytes, xs.data(), m, nb, op, n, b, e); break;
      default: matmul_tiles<Q4_0>(wp, row_bytes, xs.data(), m, nb, op, n, b, e); break;
    }
  });
  return out;
}

// w: [N, row bytes] uint8 -> float32 [N, K] (for prefill: one dequantize, then a float GEMM).
torch::Tensor gguf_dequantize(const torch::Tensor& w, int64_t qtype, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "gguf_dequantize: w must be a contiguous uint8 [N, row bytes]");
  const int qt = static_cast<int>(qtype);
  const int64_t n = w.size(0), nb = k / QK, bb = block_bytes(qt), row_bytes = w.size(1);
  TORCH_CHECK(k % QK == 0 && row_bytes == nb * bb, "gguf_dequantize: row bytes do not match K");
  auto out = torch::empty({n, k}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = wp + r * row_bytes + b * bb;
        float* o = op + r * k + b * QK;
        const float d = f16(blk);
        if (qt == Q8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int i = 0; i < QK; ++i) o[i] = d * q[i];
        } else {
          const float base = qt == Q4_1 ? f16(blk + 2) : -8.f * d;
          const uint8_t* qs = blk + (qt == Q4_1 ? 4 : 2);
          for (int i = 0; i < QK / 2; ++i) {
            o[i] = d * (qs[i] & 0x0F) + base;
            o[i + QK / 2] = d * (qs[i] >> 4) + base;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks [N, row bytes] -> float32 [N, K]");
  mod.def("gguf_matmul", &gguf_matmul, "x [M,K] f32 @ GGUF blocks [N, row bytes]^T -> [M,N] f32");
}
