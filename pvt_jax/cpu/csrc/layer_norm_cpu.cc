// LayerNorm over the last axis, forward and backward, as XLA FFI handlers for CPU (float32).
//
// Written by hand because XLA:CPU splits PVT v2's LayerNorms (few channels, many pixels) into
// several passes over the map: in a B0 training step at 224px the ~30 LayerNorms took ~100 ms,
// 13% of the step, where one pass each way suffices. Here each pixel's C values stay in
// registers/L1 while its statistics, output and gradients are formed: the forward reads x once
// and writes y; the backward recomputes the statistics from x, reads the output gradient and
// writes the input gradient, accumulating the scale and bias gradients on the way.
//
// Statistics are two-pass per pixel (mean, then the mean squared deviation), as PyTorch
// computes them. Reductions over pixels are deterministic: fixed chunks of rows, each with its
// own partial sums, added in chunk order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace pvt_jax {
namespace {

// Rows per chunk of the backward's partial sums: fixed, so the sums do not depend on threads.
constexpr int64_t kRowsPerChunk = 256;

// sum_c f(c) over a row of C values, f taking and returning T = Vec or float.
template <typename F>
inline float RowSum(int64_t C, F f) {
  Vec acc = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) acc += f(Vec{}, c);
  float total = HorizontalSum(acc);
  for (; c < C; ++c) total += f(0.0f, c);
  return total;
}

// out[c] = f(c) over a row, vectors then the remainder.
template <typename F>
inline void RowMap(int64_t C, float* out, F f) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) Lanes<Vec>::Store(out + c, f(Vec{}, c));
  for (; c < C; ++c) out[c] = f(0.0f, c);
}

template <typename T>
inline T Load(const float* p, T) {
  return Lanes<T>::Load(p);
}

struct Moments {
  float mean, rstd;
};

inline Moments RowMoments(const float* x, int64_t C, float eps) {
  const float mean = RowSum(C, [&](auto t, int64_t c) { return Load(x + c, t); }) / C;
  const float var = RowSum(C, [&](auto t, int64_t c) {
                      auto d = Load(x + c, t) - mean;
                      return d * d;
                    }) / C;
  return {mean, 1.0f / std::sqrt(var + eps)};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& scale) {
  auto d = x.dimensions();
  if (d.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != d[1]) {
    return ffi::Error::InvalidArgument("layer_norm: expected x [rows, C] and scale/bias [C]");
  }
  return ffi::Error::Success();
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, float eps,
                            ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error error = CheckShapes(x, scale); error.failure()) return error;
  const int64_t rows = x.dimensions()[0], C = x.dimensions()[1];
  if (rows * C == 0) return ffi::Error::Success();
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float* yp = y->typed_data();
  auto chunk_body = [&](int64_t chunk) {
    const int64_t r1 = std::min(rows, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < r1; ++r) {
      const float* xr = xp + r * C;
      const Moments m = RowMoments(xr, C, eps);
      RowMap(C, yp + r * C, [&](auto t, int64_t c) {
        return (Load(xr + c, t) - m.mean) * m.rstd * Load(sp + c, t) + Load(bp + c, t);
      });
    }
  };
  ParallelFor(pool, (rows + kRowsPerChunk - 1) / kRowsPerChunk, chunk_body);
  return ffi::Error::Success();
}

// With xhat = (x - mean) rstd and gs = g scale:
//   dx = rstd (gs - mean_c(gs) - xhat mean_c(gs xhat)),  dscale = sum_rows g xhat,  dbias = sum g.
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> g, float eps,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  if (ffi::Error error = CheckShapes(x, scale); error.failure()) return error;
  const int64_t rows = x.dimensions()[0], C = x.dimensions()[1];
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *gp = g.typed_data();
  std::vector<float> partial(chunks * 2 * C, 0.0f);  // per chunk: scale's gradient, bias's
  auto chunk_body = [&](int64_t chunk) {
    float* acc_scale = partial.data() + chunk * 2 * C;
    float* acc_bias = acc_scale + C;
    std::vector<float> xhat(C), gs(C);  // this row's normalised x and g * scale
    const int64_t r1 = std::min(rows, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < r1; ++r) {
      const float *xr = xp + r * C, *gr = gp + r * C;
      const Moments m = RowMoments(xr, C, eps);
      float *xh = xhat.data(), *gsr = gs.data();
      RowMap(C, xh, [&](auto t, int64_t c) { return (Load(xr + c, t) - m.mean) * m.rstd; });
      RowMap(C, gsr, [&](auto t, int64_t c) { return Load(gr + c, t) * Load(sp + c, t); });
      const float mean_gs = RowSum(C, [&](auto t, int64_t c) { return Load(gsr + c, t); }) / C;
      const float mean_gs_xhat =
          RowSum(C, [&](auto t, int64_t c) { return Load(gsr + c, t) * Load(xh + c, t); }) / C;
      RowMap(C, dx->typed_data() + r * C, [&](auto t, int64_t c) {
        return m.rstd * (Load(gsr + c, t) - mean_gs - Load(xh + c, t) * mean_gs_xhat);
      });
      RowMap(C, acc_scale, [&](auto t, int64_t c) {
        return Load(acc_scale + c, t) + Load(gr + c, t) * Load(xh + c, t);
      });
      RowMap(C, acc_bias,
             [&](auto t, int64_t c) { return Load(acc_bias + c, t) + Load(gr + c, t); });
    }
  };
  ParallelFor(pool, chunks, chunk_body);
  float *dsp = dscale->typed_data(), *dbp = dbias->typed_data();
  std::fill(dsp, dsp + C, 0.0f);
  std::fill(dbp, dbp + C, 0.0f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* acc = partial.data() + chunk * 2 * C;
    for (int64_t c = 0; c < C; ++c) dsp[c] += acc[c];
    for (int64_t c = 0; c < C; ++c) dbp[c] += acc[C + c];
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pvt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtLayerNormForward, pvt_jax::LayerNormForward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [rows, C]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // scale [C]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // bias [C]
                                  .Attr<float>("eps")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // y [rows, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtLayerNormBackward, pvt_jax::LayerNormBackward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // scale
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // output gradient
                                  .Attr<float>("eps")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dx
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dscale
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // dbias
