// x^T g over all rows: the weight gradient of a dense layer (or of a conv as a patch matrix),
// an XLA FFI handler for CPU (float32). x [M, K], g [M, N] -> [K, N], N a multiple of 16.
//
// Written by hand because XLA:CPU has no good form of this product for PVT v2's shapes: many rows
// (M = 50,176 pixels in a B0 stage-1 batch of 16) and few columns. Its dot transposes one operand
// first and then runs at 43-125 GFLOP/s on the stage-1 FFN shapes here, where PyTorch's BLAS
// reaches 80-190 and this kernel 110-210 (repeated runs on a noisy 2-core machine). No operand needs transposing: for each row m, x[m, k0:k0+6] is contiguous
// (broadcast) and so is g[m, n0:n0+64] (four vectors), so a 6 x 64 tile of the result is 24
// independent multiply-add chains in registers while rows stream past, in blocks that stay in
// the L2 cache.
//
// Deterministic: rows are split into a fixed number of parts (by M, not by threads), each with
// its own partial result, added in order.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace pvt_jax {
namespace {

constexpr int64_t kTileRows = 6;             // rows of the result per tile (elements of x)
constexpr int64_t kBandColumns = 256;        // result columns per work item
constexpr int64_t kBlockBytes = 512 << 10;   // x and g rows per block: about half an L2 cache
constexpr int64_t kRowsPerPart = 256;        // a part of the rows has at least this many,
constexpr int64_t kMaxParts = 8;             // there are at most this many,
constexpr int64_t kPartialBytes = 8 << 20;   // and their partial results fit in this

struct Operands {
  const float* x;
  const float* g;
  int64_t K, N;
};

// out[k0:k0+R, n0:n0+16V] += sum_{m in [m0, m1)} x[m, k0:k0+R]^T g[m, n0:n0+16V].
template <int64_t R, int64_t V>
void Tile(const Operands& o, int64_t m0, int64_t m1, int64_t k0, int64_t n0, float* out) {
  using L = Lanes<Vec>;
  Vec acc[R][V];
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < V; ++j) acc[i][j] = L::Load(out + (k0 + i) * o.N + n0 + j * kLanes);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = o.x + m * o.K + k0;
    const float* gr = o.g + m * o.N + n0;
    Vec gv[V];
    for (int64_t j = 0; j < V; ++j) gv[j] = L::Load(gr + j * kLanes);
    for (int64_t i = 0; i < R; ++i) {
      const float xv = xr[i];
      for (int64_t j = 0; j < V; ++j) acc[i][j] += xv * gv[j];
    }
  }
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < V; ++j) L::Store(out + (k0 + i) * o.N + n0 + j * kLanes, acc[i][j]);
}

// Tile<rows, vectors> for run-time counts (rows <= kTileRows, vectors <= 4).
template <int64_t R = kTileRows>
void TileOf(int64_t rows, int64_t vectors, const Operands& o, int64_t m0, int64_t m1, int64_t k0,
            int64_t n0, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return TileOf<R - 1>(rows, vectors, o, m0, m1, k0, n0, out);
  }
  switch (vectors) {
    case 1: return Tile<R, 1>(o, m0, m1, k0, n0, out);
    case 2: return Tile<R, 2>(o, m0, m1, k0, n0, out);
    case 3: return Tile<R, 3>(o, m0, m1, k0, n0, out);
    default: return Tile<R, 4>(o, m0, m1, k0, n0, out);
  }
}

ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || xd[0] != gd[0] || gd[1] % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        "weight_gradient: expected x [M, K] and g [M, N], N a multiple of 16");
  }
  const int64_t M = xd[0], K = xd[1], N = gd[1];
  const Operands o{x.typed_data(), g.typed_data(), K, N};
  // Work items: (part of the rows, band of result columns). Fewer parts for large results keep
  // the partial results (and their final sum) small; bands then keep the threads busy.
  const int64_t parts = std::clamp<int64_t>(
      std::min(M / kRowsPerPart, kPartialBytes / (4 * K * N)), 1, kMaxParts);
  const int64_t bands = (N + kBandColumns - 1) / kBandColumns;
  const int64_t block = std::max<int64_t>(16, kBlockBytes / (4 * (K + kBandColumns)));
  std::vector<float> partial(parts * K * N, 0.0f);
  auto item_body = [&](int64_t item) {
    const int64_t part = item / bands, band = item % bands;
    const int64_t begin = M * part / parts, end = M * (part + 1) / parts;
    const int64_t n_end = std::min(N, (band + 1) * kBandColumns);
    float* result = partial.data() + part * K * N;
    for (int64_t m0 = begin; m0 < end; m0 += block) {
      const int64_t m1 = std::min(end, m0 + block);
      for (int64_t k0 = 0; k0 < K; k0 += kTileRows)
        for (int64_t n0 = band * kBandColumns; n0 < n_end; n0 += 4 * kLanes)
          TileOf(std::min(kTileRows, K - k0), (n_end - n0) / kLanes, o, m0, m1, k0, n0, result);
    }
  };
  ParallelFor(pool, parts * bands, item_body);
  float* result = out->typed_data();
  std::copy(partial.begin(), partial.begin() + K * N, result);
  for (int64_t part = 1; part < parts; ++part) {
    const float* p = partial.data() + part * K * N;
    MapInPlace(result, K * N,
               [p](auto v, int64_t i) { return v + Lanes<decltype(v)>::Load(p + i); });
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pvt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtWeightGradient, pvt_jax::WeightGradient,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [M, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // g [M, N]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // x^T g [K, N]
