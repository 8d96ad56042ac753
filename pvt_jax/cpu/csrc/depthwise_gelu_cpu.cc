// GELU(3x3 depthwise conv + bias), the core of PVT v2's FFN, forward and backward, as XLA FFI
// handlers for CPU (float32, NHWC, zero padding 1). The input arrives without fc1's bias, which is
// added here as each pixel is read (saving a pass over the wide hidden map each way).
//
// Written by hand because XLA:CPU compiles the backward of this op poorly: as fused shifted
// multiply-adds, one B0 stage-1 map (16x56x56x256) takes ~85 ms backward against ~25 ms here,
// a 14x14x640 map 55 ms against 5 ms (the per-channel kernel gradient is a 9-way reduction over
// every pixel that XLA runs as several passes). Here each pass over the map does all of the work
// for a row while it is in cache: the backward recomputes the pre-activation, applies GELU's
// derivative, accumulates the kernel and bias gradients in registers and forms the input gradient
// from a three-row ring of the pre-activation gradient, reading x and the output gradient once.
// No library provides a fused depthwise conv + GELU backward for XLA:CPU (oneDNN is not compiled
// into jaxlib's CPU backend).
//
// Reductions are deterministic: fixed chunks of rows, each with its own partial sums, added in
// chunk order at the end, whatever thread ran them.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace pvt_jax {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// erf by the rational interpolant XLA:CPU uses for float32 (Eigen's), so this path and the XLA
// one round alike; clamped where float erf is +-1.
template <typename T>
inline T Erf(T x) {
  constexpr float kOneBelow = 3.832506856900711f;
  T xc = Clamp(x, -kOneBelow, kOneBelow);
  T x2 = xc * xc;
  T p = x2 * 0.00022905065861350646f + 0.0034082910107109506f;
  p = p * x2 + 0.050955695062380861f;
  p = p * x2 + 0.18520832239976145f;
  p = p * x2 + 1.128379143519084f;
  T q = x2 * -1.1791602954361697e-7f + 0.000023547966471313185f;
  q = q * x2 + 0.0010179625278914885f;
  q = q * x2 + 0.014070470171167667f;
  q = q * x2 + 0.11098505178285362f;
  q = q * x2 + 0.49746925110067538f;
  q = q * x2 + 1.0f;
  return xc * p / q;
}

template <typename T>
inline T Gelu(T v) {
  return 0.5f * v * (1.0f + Erf(v * kSqrtHalf));
}

template <typename T>
inline T GeluDerivative(T v) {
  return 0.5f * (1.0f + Erf(v * kSqrtHalf)) + v * kInvSqrt2Pi * ExpNonPositive(-0.5f * v * v);
}

// The three input rows around an output row; nullptr where the zero padding is.
struct Rows {
  const float* row[3];
};

inline Rows RowsAround(const float* map, int64_t H, int64_t W, int64_t C, int64_t h) {
  Rows r;
  for (int64_t i = 0; i < 3; ++i) {
    int64_t hh = h + i - 1;
    r.row[i] = (hh < 0 || hh >= H) ? nullptr : map + hh * W * C;
  }
  return r;
}

// Per channel: the input's bias (added to every pixel, not to the zero padding), the taps and
// the output's bias.
struct Weights {
  const float* input_bias;
  const float* taps;  // [3, 3, C]
  const float* bias;
};

// out[w, c:c+lanes] = bias + sum_ij (rows[i][w + j - 1, c:c+lanes] + input_bias[c:c+lanes])
// * taps[i, j, c:c+lanes].
template <typename T>
inline void StencilBlock(const Rows& rows, const Weights& k, int64_t W, int64_t C, int64_t w,
                         int64_t c, float* out) {
  using L = Lanes<T>;
  const T input_bias = L::Load(k.input_bias + c);
  T acc = L::Load(k.bias + c);
  for (int64_t i = 0; i < 3; ++i) {
    if (rows.row[i] == nullptr) continue;
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t ww = w + j - 1;
      if (ww < 0 || ww >= W) continue;
      const T tap = L::Load(k.taps + (i * 3 + j) * C + c);
      acc += (L::Load(rows.row[i] + ww * C + c) + input_bias) * tap;
    }
  }
  L::Store(out, acc);
}

// One output row of the depthwise 3x3 conv: out[W, C].
inline void StencilRow(const Rows& rows, const Weights& k, int64_t W, int64_t C, float* out) {
  for (int64_t w = 0; w < W; ++w) {
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) StencilBlock<Vec>(rows, k, W, C, w, c, out + w * C + c);
    for (; c < C; ++c) StencilBlock<float>(rows, k, W, C, w, c, out + w * C + c);
  }
}

// acc[i, j, c:c+lanes] += sum_w (x_rows[i][w + j - 1, c:c+lanes] + input_bias[c:c+lanes])
// * g[w, c:c+lanes] (the kernel gradient from one output row) and acc[9, c:c+lanes] +=
// sum_w g[w, c:c+lanes] (the bias's), the ten sums held in registers along the row.
template <typename T>
inline void TapGradientBlock(const Rows& x_rows, const float* input_bias, const float* g,
                             int64_t W, int64_t C, int64_t c, float* acc) {
  using L = Lanes<T>;
  const T ib = L::Load(input_bias + c);
  T sums[10];
  for (int64_t t = 0; t < 10; ++t) sums[t] = L::Load(acc + t * C + c);
  for (int64_t w = 0; w < W; ++w) {
    const T gw = L::Load(g + w * C + c);
    sums[9] += gw;
    for (int64_t i = 0; i < 3; ++i) {
      if (x_rows.row[i] == nullptr) continue;
      for (int64_t j = 0; j < 3; ++j) {
        const int64_t ww = w + j - 1;
        if (ww < 0 || ww >= W) continue;
        sums[i * 3 + j] += (L::Load(x_rows.row[i] + ww * C + c) + ib) * gw;
      }
    }
  }
  for (int64_t t = 0; t < 10; ++t) L::Store(acc + t * C + c, sums[t]);
}

inline void TapGradientRow(const Rows& x_rows, const float* input_bias, const float* g,
                           int64_t W, int64_t C, float* acc) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) TapGradientBlock<Vec>(x_rows, input_bias, g, W, C, c, acc);
  for (; c < C; ++c) TapGradientBlock<float>(x_rows, input_bias, g, W, C, c, acc);
}

// sums[c] += sum_w row[w, c]: the input bias's gradient from one row of the input gradient.
inline void AddColumnSums(const float* row, int64_t W, int64_t C, float* sums) {
  for (int64_t w = 0; w < W; ++w) {
    const float* pixel = row + w * C;
    MapInPlace(sums, C, [pixel](auto v, int64_t c) {
      return v + Lanes<decltype(v)>::Load(pixel + c);
    });
  }
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& taps,
                       ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::F32>& input_bias) {
  auto d = x.dimensions();
  auto is_vector = [&](ffi::Buffer<ffi::F32>& v) {
    return v.dimensions().size() == 1 && v.dimensions()[0] == d[3];
  };
  if (d.size() != 4 || taps.dimensions().size() != 3 || taps.dimensions()[0] != 3 ||
      taps.dimensions()[1] != 3 || taps.dimensions()[2] != d[3] || !is_vector(bias) ||
      !is_vector(input_bias)) {
    return ffi::Error::InvalidArgument(
        "depthwise_gelu: expected x [B, H, W, C], taps [3, 3, C], bias and input_bias [C]");
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseGeluForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> taps, ffi::Buffer<ffi::F32> bias,
                                ffi::Buffer<ffi::F32> input_bias, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error error = CheckShapes(x, taps, bias, input_bias); error.failure()) return error;
  auto d = x.dimensions();
  const int64_t B = d[0], H = d[1], W = d[2], C = d[3];
  if (B * H * W * C == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const Weights weights{input_bias.typed_data(), taps.typed_data(), bias.typed_data()};
  auto row_body = [&](int64_t row) {
    const int64_t b = row / H, h = row % H;
    float* out = yp + row * W * C;
    StencilRow(RowsAround(xp + b * H * W * C, H, W, C, h), weights, W, C, out);
    MapInPlace(out, W * C, [](auto v, int64_t) { return Gelu(v); });
  };
  ParallelFor(pool, B * H, row_body);
  return ffi::Error::Success();
}

ffi::Error DepthwiseGeluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> taps, ffi::Buffer<ffi::F32> bias,
                                 ffi::Buffer<ffi::F32> input_bias, ffi::Buffer<ffi::F32> g,
                                 ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dtaps,
                                 ffi::ResultBuffer<ffi::F32> dbias,
                                 ffi::ResultBuffer<ffi::F32> dinput_bias) {
  if (ffi::Error error = CheckShapes(x, taps, bias, input_bias); error.failure()) return error;
  auto d = x.dimensions();
  const int64_t B = d[0], H = d[1], W = d[2], C = d[3];
  const float* tp = taps.typed_data();
  float *dtp = dtaps->typed_data(), *dbp = dbias->typed_data(), *dip = dinput_bias->typed_data();
  std::fill(dtp, dtp + 9 * C, 0.0f);
  std::fill(dbp, dbp + C, 0.0f);
  std::fill(dip, dip + C, 0.0f);
  if (B * H * W == 0) return ffi::Error::Success();  // no pixels: the weight gradients are zero
  // The input gradient is the same stencil over the pre-activation gradient, taps flipped.
  std::vector<float> flipped(9 * C), zeros(C, 0.0f);
  for (int64_t t = 0; t < 9; ++t) std::copy(tp + t * C, tp + (t + 1) * C, &flipped[(8 - t) * C]);
  const Weights weights{input_bias.typed_data(), tp, bias.typed_data()};
  const Weights flipped_weights{zeros.data(), flipped.data(), zeros.data()};
  // Chunks of rows per image (each recomputing one halo row on either side), split only when
  // there are fewer than kWorkItems images.
  const int64_t splits = std::min<int64_t>(H, (kWorkItems + B - 1) / B);
  const int64_t rows_per_chunk = (H + splits - 1) / splits;
  const int64_t chunks_per_image = (H + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunks = B * chunks_per_image;
  // Per chunk: the 9 tap gradients, the bias's, the input bias's.
  std::vector<float> partial(chunks * 11 * C, 0.0f);
  auto chunk_body = [&](int64_t chunk) {
    const int64_t b = chunk / chunks_per_image;
    const int64_t r0 = (chunk % chunks_per_image) * rows_per_chunk;
    const int64_t r1 = std::min(H, r0 + rows_per_chunk);
    const float* xb = x.typed_data() + b * H * W * C;
    const float* gb = g.typed_data() + b * H * W * C;
    float* dxb = dx->typed_data() + b * H * W * C;
    float* acc = partial.data() + chunk * 11 * C;
    // Pre-activation gradient rows h-1, h, h+1 live in ring[h % 3].
    std::vector<float> ring(3 * W * C);
    auto ring_rows = [&](int64_t h) {
      Rows r;
      for (int64_t i = 0; i < 3; ++i) {
        int64_t hh = h + i - 1;
        r.row[i] = (hh < 0 || hh >= H) ? nullptr : ring.data() + (hh % 3) * W * C;
      }
      return r;
    };
    auto input_gradient_row = [&](int64_t h) {
      float* row = dxb + h * W * C;
      StencilRow(ring_rows(h), flipped_weights, W, C, row);
      AddColumnSums(row, W, C, acc + 10 * C);
    };
    const int64_t first = std::max<int64_t>(r0 - 1, 0), last = std::min(r1 + 1, H);
    for (int64_t h = first; h < last; ++h) {
      float* grad_pre = ring.data() + (h % 3) * W * C;
      const Rows x_rows = RowsAround(xb, H, W, C, h);
      StencilRow(x_rows, weights, W, C, grad_pre);
      const float* g_row = gb + h * W * C;
      MapInPlace(grad_pre, W * C, [g_row](auto v, int64_t k) {
        return Lanes<decltype(v)>::Load(g_row + k) * GeluDerivative(v);
      });
      if (h >= r0 && h < r1) TapGradientRow(x_rows, weights.input_bias, grad_pre, W, C, acc);
      if (h - 1 >= r0 && h - 1 < r1) input_gradient_row(h - 1);
    }
    if (r1 == H) input_gradient_row(H - 1);  // the bottom row has no row below to wait for
  };
  ParallelFor(pool, chunks, chunk_body);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* acc = partial.data() + chunk * 11 * C;
    for (int64_t k = 0; k < 9 * C; ++k) dtp[k] += acc[k];
    for (int64_t c = 0; c < C; ++c) dbp[c] += acc[9 * C + c];
    for (int64_t c = 0; c < C; ++c) dip[c] += acc[10 * C + c];
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pvt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtDepthwiseGeluForward, pvt_jax::DepthwiseGeluForward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // taps [3, 3, C]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // bias [C]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // input_bias [C]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtDepthwiseGeluBackward, pvt_jax::DepthwiseGeluBackward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // taps
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // bias
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // input_bias
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // output gradient
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dx
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dtaps
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dbias
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // dinput_bias
