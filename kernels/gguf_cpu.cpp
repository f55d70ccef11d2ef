// y = x W^T for W in a GGUF file's quantized blocks, on x86 CPUs with AVX2 + FMA + F16C.
//
// The weight stays as the file stores it: one row of W per output feature, each row a run of blocks
// of 32 values (Q4_0: f16 d, 16 bytes of nibbles; Q4_1: f16 d, f16 m, 16 bytes of nibbles; Q8_0:
// f16 d, 32 int8), w = d q + m (Q4_0: m = -8 d; Q8_0: m = 0). A block's q are widened to float32
// in registers and multiplied with the float32 activations: y = sum over blocks b of
// d (q . x_b) + m sum(x_b), a continuous function of x, as with the dequantized weight. (Quantizing
// the activations to int8, as llama.cpp does, is faster but not continuous: a 1-ulp change of x, as
// batched attention gives, can cross a rounding boundary and move y by a whole quantization step;
// through 30 layers that changed greedy tokens with the batch a request ran in.)
//
// Output rows are split over torch's intra-op threads in tiles of TILE rows; with several
// activation rows (prefill) a tile's blocks are widened once into a scratch that stays in L1 while
// every activation row reads it. Either way each output is the same chain of operations over the same
// values, so a row's result is bitwise the same in any batch and any thread split.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // values per block for every type here
constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;  // gguf.GGMLQuantizationType

constexpr int64_t block_bytes_of(int qtype) {
  return qtype == Q8_0 ? 34 : (qtype == Q4_1 ? 20 : 18);
}

int64_t block_bytes(int qtype) {
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0,
              "gguf_cpu: unsupported block type ", qtype);
  return block_bytes_of(qtype);
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

// One block of a row: its 32 q as float32 (4 vectors of 8, in value order), d and m.
struct Block {
  __m256 q[4];
  float d, m;
};

template <int QT>
inline void read_block(const uint8_t* blk, Block& out) {
  out.d = f16(blk);
  if constexpr (QT == Q8_0) {
    out.m = 0.f;
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * j));
      out.q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
  } else {
    out.m = QT == Q4_1 ? f16(blk + 2) : -8.f * out.d;
    // Byte i holds value i (low nibble) and value i + 16 (high nibble).
    const uint8_t* qs = blk + (QT == Q4_1 ? 4 : 2);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    const __m256i nib = _mm256_set1_epi32(0x0F);
    out.q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, nib));
    out.q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, nib));
    out.q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    out.q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
  }
}

// A block's values as gguf.quants.dequantize computes them: d q + m; Q4_0 d (q - 8).
template <int QT>
inline void block_values(const uint8_t* blk, float* out) {
  Block b;
  read_block<QT>(blk, b);
  const __m256 d = _mm256_set1_ps(b.d);
  for (int j = 0; j < 4; ++j) {
    __m256 v;
    if constexpr (QT == Q8_0) {
      v = _mm256_mul_ps(b.q[j], d);
    } else if constexpr (QT == Q4_1) {
      v = _mm256_add_ps(_mm256_mul_ps(d, b.q[j]), _mm256_set1_ps(b.m));
    } else {
      v = _mm256_mul_ps(d, _mm256_sub_ps(b.q[j], _mm256_set1_ps(8.f)));
    }
    _mm256_storeu_ps(out + 8 * j, v);
  }
}

// An activation row: its values and, per block, their sum (for the m term).
struct XRow {
  const float* x;
  const float* sums;
};

void block_sums(const float* x, int64_t nb, float* sums) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    const __m256 lo = _mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8));
    const __m256 hi = _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24));
    sums[b] = hsum(_mm256_add_ps(lo, hi));
  }
}

// R weight rows against one activation row: y_r = sum over blocks of d (q . x_b) + m s_b.
// block(r, b, out) reads block b of row r; every row has its own accumulator chains, so R does not
// change a row's result.
template <int R, class ReadBlock>
inline void rows_dot(const XRow& x, int64_t nb, ReadBlock block, float* out) {
  __m256 acc[R][2];
  float extra[R];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    extra[r] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x.x + b * QK;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
    const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
    const float s = x.sums[b];
    for (int r = 0; r < R; ++r) {
      const Block& w = block(r, b);
      const __m256 p0 = _mm256_fmadd_ps(w.q[1], x1, _mm256_mul_ps(w.q[0], x0));
      const __m256 p1 = _mm256_fmadd_ps(w.q[3], x3, _mm256_mul_ps(w.q[2], x2));
      const __m256 d = _mm256_set1_ps(w.d);
      acc[r][0] = _mm256_fmadd_ps(d, p0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(d, p1, acc[r][1]);
      extra[r] += w.m * s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + extra[r];
}

// Rows [0, rows) of w (row_bytes apart) dequantized to float32 [rows, K].
template <int QT>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t nb, float* out) {
  constexpr int64_t BB = block_bytes_of(QT);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b)
      block_values<QT>(w + r * row_bytes + b * BB, out + (r * nb + b) * QK);
}

constexpr int64_t TILE = 4;  // weight rows per tile

// One activation row against a tile's `rows` weight rows; reader(first) reads the blocks of the
// tile's rows from `first` on.
template <class Reader>
inline void tile_dot(const XRow& x, int64_t nb, int64_t rows, Reader reader, float* out) {
  if (rows == TILE) {
    rows_dot<TILE>(x, nb, reader(0), out);
  } else {
    for (int64_t j = 0; j < rows; ++j) rows_dot<1>(x, nb, reader(j), out + j);
  }
}

// Tiles [begin, end) of TILE weight rows against the m activation rows xs.
template <int QT>
void matmul_tiles(const uint8_t* w, int64_t row_bytes, const XRow* xs, int64_t m, int64_t nb,
                  float* out, int64_t n, int64_t begin, int64_t end) {
  constexpr int64_t BB = block_bytes_of(QT);
  // With several activation rows a tile's blocks are read once into `cache` and every row takes
  // them from there: the same values, so the same result as from the file's rows.
  std::vector<Block> cache(m > 1 ? TILE * nb : 0);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r0 = t * TILE, rows = std::min(TILE, n - r0);
    const uint8_t* wt = w + r0 * row_bytes;
    if (m == 1) {
      tile_dot(xs[0], nb, rows, [&](int64_t first) {
        return [=](int r, int64_t b) {
          Block blk;
          read_block<QT>(wt + (first + r) * row_bytes + b * BB, blk);
          return blk;
        };
      }, out + r0);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b)
        read_block<QT>(wt + r * row_bytes + b * BB, cache[r * nb + b]);
    const Block* cached = cache.data();
    for (int64_t i = 0; i < m; ++i) {
      tile_dot(xs[i], nb, rows, [=](int64_t first) {
        return [=](int r, int64_t b) -> const Block& { return cached[(first + r) * nb + b]; };
      }, out + i * n + r0);
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

  const float* xp = x.data_ptr<float>();
  std::vector<float> sums(m * nb);
  std::vector<XRow> xs(m);
  for (int64_t i = 0; i < m; ++i) {
    block_sums(xp + i * k, nb, sums.data() + i * nb);
    xs[i] = {xp + i * k, sums.data() + i * nb};
  }
  auto out = torch::empty({m, n}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // Enough rows per task that a thread's share is worth a wake-up, few enough that all work.
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

// w: [N, row bytes] uint8 -> float32 [N, K], gguf.quants.dequantize's values.
torch::Tensor gguf_dequantize(const torch::Tensor& w, int64_t qtype, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "gguf_dequantize: w must be a contiguous uint8 [N, row bytes]");
  const int qt = static_cast<int>(qtype);
  const int64_t n = w.size(0), nb = k / QK, row_bytes = w.size(1);
  TORCH_CHECK(k % QK == 0 && row_bytes == nb * block_bytes(qt),
              "gguf_dequantize: row bytes do not match K");
  auto out = torch::empty({n, k}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    const uint8_t* wb = wp + begin * row_bytes;
    float* ob = op + begin * k;
    switch (qt) {
      case Q8_0: dequantize_rows<Q8_0>(wb, row_bytes, end - begin, nb, ob); break;
      case Q4_1: dequantize_rows<Q4_1>(wb, row_bytes, end - begin, nb, ob); break;
      default: dequantize_rows<Q4_0>(wb, row_bytes, end - begin, nb, ob); break;
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks [N, row bytes] -> float32 [N, K]");
  mod.def("gguf_matmul", &gguf_matmul, "x [M,K] f32 @ GGUF blocks [N, row bytes]^T -> [M,N] f32");
}
