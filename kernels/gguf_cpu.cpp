// y = x W^T for W in a GGUF file's quantized blocks, on x86 CPUs with AVX2 + FMA + F16C, and with
// AVX-512 VNNI where the CPU has it (checked at run time; the file builds with the AVX2 flags).
//
// The weight stays exactly as the file stores it: one row of W per output feature, each row a run of
// blocks of 32 values (Q4_0: f16 d, 16 bytes of nibbles; Q4_1: f16 d, f16 m, 16 bytes of nibbles;
// Q8_0: f16 d, 32 int8). The activation rows are quantized to int8 per 32-value block (scale d_x =
// max|x| / 127, and s_x = d_x * sum(q_x)), so each block's dot product is an int8 dot product:
//   Q8_0: d_w d_x sum(q_w q_x)
//   Q4_1: d_w d_x sum(q_w q_x) + m_w s_x            (w = d_w q_w + m_w, q_w in 0..15)
//   Q4_0: d_w d_x sum(q_w q_x) - 8 d_w s_x          (w = d_w (q_w - 8))
// The K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 values, K a multiple of 256) run each super-block
// as 8 such blocks of 32 with the sub-blocks' scales (gguf_cpu_kernels.h, "K-quants"):
//   Q4_K / Q5_K: (d sc_j) d_x sum(q_w q_x) - (dmin m_j) s_x   (per sub-block j of 32)
//   Q6_K:        sum over its two sub-blocks s of 16 of (d sc_s) d_x sum((q_w - 32) q_x)
// Output rows are split over torch's intra-op threads in tiles of 2 weight rows; each weight block pair
// is unpacked once for up to 16 activation rows on AVX-512 VNNI (a speculative verify step's K + 1 rows;
// a prefill's in chunks of 8), 2 on AVX2, so extra rows cost their int8 dot products, not the unpacking.
// A model's weights (every type above) are loaded packed instead (16 rows interleaved; type PACKED + the
// block type; gguf_cpu_kernels.h, "Packed rows"): split in groups of 16 rows, each group's block
// unpacked once for up to 8 activation rows (VNNI) or 2 (AVX2), one dot-product instruction per 4
// values of 16 rows and the float work once per block.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gguf_cpu_kernels.h"  // the row-dot kernels, shared with cpu_decode.cpp

namespace {

// out [M, N] = x W^T for x: [M, K] float32 contiguous and w: [N, K/32 * block bytes] uint8. With
// round_bf16 each output is rounded to bfloat16 (round to nearest even, as torch's .to(torch.bfloat16))
// and stored widened back to float32, tile by tile while the tile's results are in cache.
void matmul_into(const at::Tensor& x, const at::Tensor& w, int qt, bool vnni, bool round_bf16,
                 at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const int64_t nb = k / QK, row_bytes = w.size(1);
  const int64_t pairs = (nb + 1) / 2, chunks = (nb + 15) / 16;
  auto q = torch::empty({m, pairs * 64}, torch::kInt8);
  auto qu = torch::empty({vnni && needs_unsigned_acts(qt) ? m : 0, pairs * 64}, torch::kUInt8);
  auto xd = torch::empty({m, pairs * 16}, torch::kFloat);
  auto sx = torch::empty({m, chunks * 16}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  uint8_t* qup = qu.numel() ? qu.data_ptr<uint8_t>() : nullptr;
  float* xdp = xd.data_ptr<float>();
  float* sxp = sx.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      quantize_row(xp + i * k, k, pairs, chunks, qp + i * pairs * 64,
                   qup ? qup + i * pairs * 64 : nullptr, xdp + i * pairs * 16, sxp + i * chunks * 16);
  });
  const Acts acts{pairs, chunks, qp, qup, xdp, sxp};

  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // Enough rows per task that a thread's share is worth a wake-up, few enough that every thread works.
  const int64_t tr = tile_rows(qt), tiles = (n + tr - 1) / tr;
  const int64_t grain = std::max<int64_t>(8, 1024 / std::max<int64_t>(m, 1)) * NR / tr;
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    matmul_tiles_for(qt, vnni, wp, row_bytes, nb, acts, m, op, n, b, e);
    if (!round_bf16) return;
    const int64_t r0 = b * tr, r1 = std::min(e * tr, n);
    for (int64_t i = 0; i < m; ++i)
      for (float* o = op + i * n + r0; o < op + i * n + r1; ++o)
        *o = static_cast<float>(c10::BFloat16(*o));
  });
}

// The shared checks of gguf_matmul and gguf_logits; returns whether the VNNI kernel runs.
bool check_matmul(const char* fn, const torch::Tensor& x, const torch::Tensor& w, int qt,
                  int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              fn, ": w must be a contiguous uint8 [N, row bytes]");
  const int64_t k = x.size(1);
  TORCH_CHECK(supported_type(qt), fn, ": GGUF block type ", qt, " has no kernel");
  TORCH_CHECK(k % block_values(qt) == 0, fn, ": K must be a multiple of ", block_values(qt));
  TORCH_CHECK(w.size(1) == row_bytes_of(qt, k), fn, ": row bytes do not match K");
  TORCH_CHECK(!is_packed(qt) || w.size(0) % PACK_ROWS == 0, fn, ": packed rows come in groups of 16");
  TORCH_CHECK(isa >= AUTO && isa <= AVX512_VNNI, fn, ": isa is 0 (auto), 1 or 2");
  TORCH_CHECK(isa != AVX512_VNNI || has_vnni(), fn, ": this CPU lacks AVX-512 VNNI");
  return isa == AVX512_VNNI || (isa == AUTO && has_vnni());
}

// x: [M, K] float32 contiguous; w: [N, K/32 * block bytes] uint8; returns float32 [M, N].
// isa: 0 the best this CPU runs, 1 AVX2, 2 AVX-512 VNNI (both give the same bits; for tests).
torch::Tensor gguf_matmul(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype,
                          int64_t isa) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "gguf_matmul: x must be float32");
  const int qt = static_cast<int>(qtype);
  const bool vnni = check_matmul("gguf_matmul", x, w, qt, isa);
  auto out = torch::empty({x.size(0), w.size(0)}, torch::kFloat);
  matmul_into(x, w, qt, vnni, false, out);
  return out;
}

// An LM head's logits in one call: x [M, K] bfloat16 (the final norm's rows) @ W^T as gguf_linear
// computes it for bf16 x (the float32 product rounded to bf16), widened to float32 as compute_logits
// returns them: the same bits as gguf_linear(x, w, qtype).float(), without its two conversion passes
// and their [M, N] temporaries.
torch::Tensor gguf_logits(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype,
                          int64_t isa) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "gguf_logits: x must be bfloat16");
  const int qt = static_cast<int>(qtype);
  const bool vnni = check_matmul("gguf_logits", x, w, qt, isa);
  auto out = torch::empty({x.size(0), w.size(0)}, torch::kFloat);
  matmul_into(x.to(torch::kFloat), w, qt, vnni, true, out);
  return out;
}

// A K-quant super-block's 256 values, with gguf.quants' formulas and roundings: (d sc) q - (dmin m)
// (Q4_K, Q5_K), (d sc) (q - 32) (Q6_K), d sc exact (unpack_k's scales and values).
template <int QT>
void dequantize_k(const uint8_t* blk, float* o) {
  KBlock u;
  unpack_k<QT>(blk, u);
  for (int v = 0; v < QK_K; ++v) {
    const int j = v / 32;  // unpack_k's q holds the values in order; dw is per lane of 4 values
    const float ds = u.dw[v / 4];
    if constexpr (QT == Q6_K)
      o[v] = ds * static_cast<float>(static_cast<int>(u.q[v]) - 32);
    else
      o[v] = ds * static_cast<float>(u.q[v]) + u.mw[j];
  }
}

// Block b of weight row r: where its bytes start, and, for a packed type, the row's lane in its group.
struct BlockAt {
  const uint8_t* p;
  int64_t lane;  // packed: r % 16 (the block's bytes are its group's); else -1
};

inline BlockAt block_at(const uint8_t* w, int qt, int64_t row_bytes, int64_t r, int64_t b) {
  const int64_t bb = block_bytes(qt);
  if (!is_packed(qt)) return {w + r * row_bytes + b * bb, -1};
  return {w + (r / PACK_ROWS) * PACK_ROWS * row_bytes + b * PACK_ROWS * bb, r % PACK_ROWS};
}

// A Q4_0 / Q4_1 / Q8_0 block's 32 values, file layout or packed: d q (Q8_0), d q + m (Q4_1), d q - 8 d
// (Q4_0).
void dequantize_block(BlockAt at, int qt, float* o) {
  const int base = base_type(qt);
  if (at.lane < 0) {
    const uint8_t* blk = at.p;
    const float d = f16(blk);
    if (base == Q8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
      for (int i = 0; i < QK; ++i) o[i] = d * q[i];
      return;
    }
    const float m = base == Q4_1 ? f16(blk + 2) : -8.f * d;
    const uint8_t* qs = blk + (base == Q4_1 ? 4 : 2);
    for (int i = 0; i < QK / 2; ++i) {
      o[i] = d * (qs[i] & 0x0F) + m;
      o[i + QK / 2] = d * (qs[i] >> 4) + m;
    }
    return;
  }
  // Packed (gguf_cpu_kernels.h, "Packed rows"): the lane's d, m and 4-byte runs of values.
  const int64_t j = at.lane;
  const float d = f16(at.p + 2 * j);
  if (base == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(at.p + 32);
    for (int v = 0; v < QK; ++v) o[v] = d * q[64 * (v / 4) + 4 * j + v % 4];
    return;
  }
  const float m = base == Q4_1 ? f16(at.p + 32 + 2 * j) : -8.f * d;
  const uint8_t* nib = at.p + (base == Q4_1 ? 64 : 32);
  for (int v = 0; v < QK; ++v) {
    const uint8_t byte = nib[64 * (v / 8) + 4 * j + v % 4];
    o[v] = d * ((v % 8) < 4 ? byte & 0x0F : byte >> 4) + m;
  }
}

// A packed Q4_K / Q5_K super-block's bytes of one row (its lane), back in the file's order (144 / 176
// bytes: d, dmin, the 12 scale bytes, Q5_K's 32 bytes of high bits, the 128 bytes of nibbles).
template <int QT>
void file_block_k(BlockAt at, uint8_t* fb) {
  const uint8_t* g = at.p;
  const int64_t j = at.lane;
  std::memcpy(fb, g + 2 * j, 2);            // d
  std::memcpy(fb + 2, g + 32 + 2 * j, 2);   // dmin
  for (int t = 0; t < 12; ++t) fb[4 + t] = g[64 + 16 * t + j];
  uint8_t* qh = fb + 16;  // Q5_K: bit `sub` of byte l is value l of sub-block `sub`'s high bit
  uint8_t* qs = fb + (QT == Q5_K ? 48 : 16);  // bytes 32 i + l: value l of sub-block 2i (low nibble), 2i + 1
  std::memset(fb + 16, 0, QT == Q5_K ? 160 : 128);
  for (int sub = 0; sub < 8; ++sub)
    for (int v = 0; v < QK; ++v) {
      const int c = v / 8, t = v % 4;
      const bool first = (v % 8) < 4;
      const uint8_t byte = g[256 + 256 * sub + 64 * c + 4 * j + t];
      const int q = first ? byte & 0x0F : byte >> 4;
      qs[32 * (sub / 2) + v] |= static_cast<uint8_t>(sub % 2 ? q << 4 : q);
      if constexpr (QT == Q5_K) {
        const uint8_t hb = g[256 + 2048 + 64 * sub + 4 * j + t];
        qh[v] |= static_cast<uint8_t>(((hb >> (2 * c + (first ? 0 : 1))) & 1) << sub);
      }
    }
}

// A packed Q6_K super-block's bytes of one row (its lane), back in the file's order (210 bytes).
void file_block_q6_k(BlockAt at, uint8_t* fb) {
  const uint8_t* g = at.p;
  const int64_t j = at.lane;
  std::memset(fb, 0, 192);                                        // ql [128], qh [64]
  for (int s = 0; s < 16; ++s) fb[192 + s] = g[32 + 16 * s + j];  // int8 scales
  std::memcpy(fb + 208, g + 2 * j, 2);                            // d
  for (int value = 0; value < QK_K; ++value) {
    const int blk = value / 32, v = value % 32, c = v / 8, t = v % 4;
    const bool first = (v % 8) < 4;  // value 8c + t (else 8c + 4 + t) of the block
    const uint8_t low = g[288 + 256 * blk + 64 * c + 4 * j + t];
    const uint8_t high = g[288 + 2048 + 128 * blk + 64 * (c / 2) + 4 * j + t];
    const int q_low = first ? low & 0x0F : low >> 4;
    const int q_high = (high >> (4 * (c % 2) + (first ? 0 : 2))) & 3;
    // the file's places: half h of 128 values, quarter k of 32, l within it
    const int h = value / 128, k = (value % 128) / 32, l = value % 32;
    fb[64 * h + 32 * (k % 2) + l] |= static_cast<uint8_t>(k < 2 ? q_low : q_low << 4);
    fb[128 + 32 * h + l] |= static_cast<uint8_t>(q_high << (2 * k));
  }
}

// Rows ids (or all rows when ids is null) of w: [N, row bytes] uint8 -> float32 [count, K] (for prefill:
// one dequantize, then a float GEMM; and an embedding lookup's rows).
torch::Tensor dequantize_rows(const torch::Tensor& w, int64_t qtype, int64_t k, const int64_t* ids,
                              int64_t count) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "gguf_dequantize: w must be a contiguous uint8 [N, row bytes]");
  const int qt = static_cast<int>(qtype);
  TORCH_CHECK(supported_type(qt), "gguf_dequantize: GGUF block type ", qt, " has no kernel");
  const int64_t n = w.size(0), bv = block_values(qt), nb = k / bv, bb = block_bytes(qt),
                row_bytes = w.size(1);
  TORCH_CHECK(k % bv == 0 && row_bytes == nb * bb, "gguf_dequantize: row bytes do not match K");
  TORCH_CHECK(!is_packed(qt) || n % PACK_ROWS == 0, "gguf_dequantize: packed rows come in groups of 16");
  for (int64_t i = 0; ids != nullptr && i < count; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "gguf_dequantize: row ", ids[i], " is out of range");
  auto out = torch::empty({count, k}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = ids != nullptr ? ids[i] : i;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = wp + r * row_bytes + b * bb;
        float* o = op + i * k + b * bv;
        if (qt == Q4_K) {
          dequantize_k<Q4_K>(blk, o);
        } else if (qt == PACKED + Q4_K) {
          uint8_t fb[144];
          file_block_k<Q4_K>(block_at(wp, qt, row_bytes, r, b), fb);
          dequantize_k<Q4_K>(fb, o);
        } else if (qt == PACKED + Q5_K) {
          uint8_t fb[176];
          file_block_k<Q5_K>(block_at(wp, qt, row_bytes, r, b), fb);
          dequantize_k<Q5_K>(fb, o);
        } else if (qt == PACKED + Q6_K) {
          uint8_t fb[210];
          file_block_q6_k(block_at(wp, qt, row_bytes, r, b), fb);
          dequantize_k<Q6_K>(fb, o);
        } else if (qt == Q5_K) {
          dequantize_k<Q5_K>(blk, o);
        } else if (qt == Q6_K) {
          dequantize_k<Q6_K>(blk, o);
        } else {
          dequantize_block(block_at(wp, qt, row_bytes, r, b), qt, o);
        }
      }
    }
  });
  return out;
}

torch::Tensor gguf_dequantize(const torch::Tensor& w, int64_t qtype, int64_t k) {
  return dequantize_rows(w, qtype, k, nullptr, w.size(0));
}

torch::Tensor gguf_dequantize_rows(const torch::Tensor& w, int64_t qtype, int64_t k, const torch::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong, "gguf_dequantize_rows: ids must be int64 [count]");
  const auto flat = ids.contiguous();
  return dequantize_rows(w, qtype, k, flat.data_ptr<int64_t>(), flat.size(0));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks [N, row bytes] -> float32 [N, K]");
  mod.def("gguf_dequantize_rows", &gguf_dequantize_rows, "rows ids of GGUF blocks [N, row bytes] -> float32 [len(ids), K]");
  mod.def("gguf_matmul", &gguf_matmul, "x [M,K] f32 @ GGUF blocks [N, row bytes]^T -> [M,N] f32",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("isa") = 0);
  // Without the GIL: the executor's event loop (the next step's request, this one's reply) runs meanwhile.
  mod.def("gguf_logits", &gguf_logits,
          "x [M,K] bf16 @ GGUF blocks [N, row bytes]^T -> [M,N] f32 holding bf16 values (an LM head)",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("isa") = 0,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("has_vnni", &has_vnni, "whether this CPU runs the AVX-512 VNNI kernel");
}
