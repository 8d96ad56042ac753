// softmax(q k^T / sqrt(D)) v, PVT v2's attention core, forward and backward, as XLA FFI handlers
// for CPU (float32). q [B, N, H, D] comes straight from the q projection and kv [B, M, 2, H, D]
// from the kv projection, so no head transposes or k/v slices are materialised.
//
// Written by hand because the keys are few (M = 49 for the spatially reduced stages at 224^2)
// and XLA:CPU runs the two batched products and the softmax as separate passes over the
// [B, H, N, M] logits: 2-3x slower than PyTorch's fused CPU attention, forward and backward.
// This is 1.7-2.8x faster than XLA forward and 1.3-2.3x backward on PVT v2's stage shapes.
// Here queries go in blocks of four that share every load of keys and values, each finished while
// it is in registers: logits, softmax, output; the backward recomputes the probabilities
// (flash-attention style, nothing stored) and forms dq directly, accumulating dk and dv per
// chunk of queries.
//
// Deterministic: each chunk of queries has its own dk/dv partial sums, added in chunk order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace pvt_jax {
namespace {

constexpr int64_t kQueries = 4;  // queries per block (sharing loads of keys and values)

struct Shape {
  int64_t B, N, H, D, M, padded_m;

  int64_t RowOffset(int64_t b, int64_t n, int64_t h) const { return ((b * N + n) * H + h) * D; }
  int64_t KvOffset(int64_t b, int64_t m, int64_t which, int64_t h) const {
    return (((b * M + m) * 2 + which) * H + h) * D;
  }
};

ffi::Error GetShape(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& kv, Shape* s) {
  auto qd = q.dimensions();
  auto kd = kv.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || kd[0] != qd[0] || kd[2] != 2 || kd[3] != qd[2] ||
      kd[4] != qd[3] || qd[3] % kLanes != 0 || kd[1] < 1) {
    return ffi::Error::InvalidArgument(
        "attention: expected q [B, N, H, D] and kv [B, M, 2, H, D], D a multiple of 16");
  }
  *s = Shape{qd[0], qd[1], qd[2], qd[3], kd[1], (kd[1] + kLanes - 1) / kLanes * kLanes};
  return ffi::Error::Success();
}

bool Empty(const Shape& s) { return s.B * s.N * s.H == 0; }

// Work items: (image, head, block of queries), blocks only when images x heads < kWorkItems.
struct Chunks {
  int64_t per_head, rows, count;

  explicit Chunks(const Shape& s) {
    per_head = std::min<int64_t>(s.N, (kWorkItems + s.B * s.H - 1) / (s.B * s.H));
    rows = (s.N + per_head - 1) / per_head;
    per_head = (s.N + rows - 1) / rows;
    count = s.B * s.H * per_head;
  }
};

// Keys (or values) of one image and head, transposed to [D, padded_m] with zero padding: a
// query's M logits are then D vector multiply-adds over whole registers.
void Transpose(const float* kv, const Shape& s, int64_t b, int64_t h, int64_t which,
               float* out) {
  std::fill(out, out + s.D * s.padded_m, 0.0f);
  for (int64_t m = 0; m < s.M; ++m) {
    const float* row = kv + s.KvOffset(b, m, which, h);
    for (int64_t d = 0; d < s.D; ++d) out[d * s.padded_m + m] = row[d];
  }
}

// Calls f.template operator()<n>() for n in 1..4 (a compile-time count of vectors, so that
// accumulators stay in registers).
template <typename F>
void WithVectors(int64_t n, F&& f) {
  switch (n) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;
  }
}

// Queries are handled in blocks of kQueries, which share every load of keys or values. A block
// past the last query repeats that query (its results go to scratch and are dropped).
struct Block {
  const float* q[kQueries];  // query rows (or output-gradient rows)
  float* out[kQueries];      // where each query's D outputs go
};

// out[i, 0:padded_m] = sum_d rows[i][d] * scale * transposed[d, :] for the kQueries rows, up to
// four vectors of keys at a time: kQueries x 4 independent multiply-add chains in registers.
void RowsTimesTransposed(const float* const* rows, float scale, const float* transposed,
                         const Shape& s, float* out) {
  using L = Lanes<Vec>;
  for (int64_t j0 = 0; j0 < s.padded_m; j0 += 4 * kLanes) {
    WithVectors((s.padded_m - j0) / kLanes, [&]<int64_t n>() {
      Vec acc[kQueries][n] = {};
      for (int64_t d = 0; d < s.D; ++d) {
        const float* t = transposed + d * s.padded_m + j0;
        Vec keys[n];
        for (int64_t j = 0; j < n; ++j) keys[j] = L::Load(t + j * kLanes);
        for (int64_t i = 0; i < kQueries; ++i) {
          const float rd = rows[i][d] * scale;
          for (int64_t j = 0; j < n; ++j) acc[i][j] += rd * keys[j];
        }
      }
      for (int64_t i = 0; i < kQueries; ++i)
        for (int64_t j = 0; j < n; ++j) L::Store(out + i * s.padded_m + j0 + j * kLanes, acc[i][j]);
    });
  }
}

// Logits of one query -> probabilities in place (exactly zero on the padding).
void Softmax(const Shape& s, float* p) {
  using L = Lanes<Vec>;
  std::fill(p + s.M, p + s.padded_m, p[0]);  // neutral for the maximum
  Vec peaks = L::Load(p);
  for (int64_t j = kLanes; j < s.padded_m; j += kLanes) {
    const Vec v = L::Load(p + j);
    peaks = v > peaks ? v : peaks;
  }
  const float peak = HorizontalMax(peaks);
  MapInPlace(p, s.padded_m, [peak](auto v, int64_t) { return ExpNonPositive(v - peak); });
  std::fill(p + s.M, p + s.padded_m, 0.0f);
  Vec totals = {};
  for (int64_t j = 0; j < s.padded_m; j += kLanes) totals += L::Load(p + j);
  const float total = HorizontalSum(totals);
  const float inverse = 1.0f / total;
  MapInPlace(p, s.padded_m, [inverse](auto v, int64_t) { return v * inverse; });
}

// outs[i][0:D] = sum_m weights[i, m] * kv[m, which, :] for the kQueries rows of weights
// [kQueries, padded_m], up to four vectors of channels at a time.
void WeightedRows(const float* weights, const float* kv, const Shape& s, int64_t b, int64_t h,
                  int64_t which, float* const* outs) {
  using L = Lanes<Vec>;
  const int64_t stride = 2 * s.H * s.D;  // from one key's row to the next
  const float* first = kv + s.KvOffset(b, 0, which, h);
  for (int64_t c0 = 0; c0 < s.D; c0 += 4 * kLanes) {
    WithVectors((s.D - c0) / kLanes, [&]<int64_t n>() {
      Vec acc[kQueries][n] = {};
      for (int64_t m = 0; m < s.M; ++m) {
        const float* row = first + m * stride + c0;
        Vec v[n];
        for (int64_t j = 0; j < n; ++j) v[j] = L::Load(row + j * kLanes);
        for (int64_t i = 0; i < kQueries; ++i) {
          const float w = weights[i * s.padded_m + m];
          for (int64_t j = 0; j < n; ++j) acc[i][j] += w * v[j];
        }
      }
      for (int64_t i = 0; i < kQueries; ++i)
        for (int64_t j = 0; j < n; ++j) L::Store(outs[i] + c0 + j * kLanes, acc[i][j]);
    });
  }
}

// The block of queries starting at n: row pointers into `rows` (q or g) and output pointers into
// `out`, the rows past `end` repeating the last one and writing to `scratch`.
Block BlockAt(const float* rows, float* out, float* scratch, const Shape& s, int64_t b,
              int64_t h, int64_t n, int64_t end) {
  Block block;
  for (int64_t i = 0; i < kQueries; ++i) {
    const int64_t offset = s.RowOffset(b, std::min(n + i, end - 1), h);
    block.q[i] = rows + offset;
    block.out[i] = n + i < end ? out + offset : scratch;
  }
  return block;
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> kv, ffi::ResultBuffer<ffi::F32> out) {
  Shape s;
  if (ffi::Error error = GetShape(q, kv, &s); error.failure()) return error;
  if (Empty(s)) return ffi::Error::Success();
  const Chunks chunks(s);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  auto chunk_body = [&](int64_t chunk) {
    const int64_t b = chunk / (s.H * chunks.per_head), h = chunk / chunks.per_head % s.H;
    const int64_t n0 = chunk % chunks.per_head * chunks.rows;
    const int64_t end = std::min(s.N, n0 + chunks.rows);
    std::vector<float> keys(s.D * s.padded_m), p(kQueries * s.padded_m), scratch(s.D);
    Transpose(kv.typed_data(), s, b, h, 0, keys.data());
    for (int64_t n = n0; n < end; n += kQueries) {
      const Block block =
          BlockAt(q.typed_data(), out->typed_data(), scratch.data(), s, b, h, n, end);
      RowsTimesTransposed(block.q, scale, keys.data(), s, p.data());
      for (int64_t i = 0; i < kQueries; ++i) Softmax(s, p.data() + i * s.padded_m);
      WeightedRows(p.data(), kv.typed_data(), s, b, h, 1, block.out);
    }
  };
  ParallelFor(pool, chunks.count, chunk_body);
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> kv, ffi::Buffer<ffi::F32> g,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dkv) {
  using L = Lanes<Vec>;
  Shape s;
  if (ffi::Error error = GetShape(q, kv, &s); error.failure()) return error;
  if (Empty(s)) {  // no queries: dk and dv are zero
    std::fill(dkv->typed_data(), dkv->typed_data() + dkv->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const Chunks chunks(s);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  std::vector<float> partial(chunks.count * s.M * 2 * s.D, 0.0f);  // per chunk: dk, dv [M, 2, D]
  auto chunk_body = [&](int64_t chunk) {
    const int64_t b = chunk / (s.H * chunks.per_head), h = chunk / chunks.per_head % s.H;
    const int64_t n0 = chunk % chunks.per_head * chunks.rows;
    std::vector<float> keys(s.D * s.padded_m), values(s.D * s.padded_m);
    std::vector<float> p(kQueries * s.padded_m), ds(kQueries * s.padded_m), scratch(s.D);
    Transpose(kv.typed_data(), s, b, h, 0, keys.data());
    Transpose(kv.typed_data(), s, b, h, 1, values.data());
    float* acc = partial.data() + chunk * s.M * 2 * s.D;
    const int64_t end = std::min(s.N, n0 + chunks.rows);
    for (int64_t n = n0; n < end; n += kQueries) {
      const int64_t count = std::min(kQueries, end - n);
      const Block queries = BlockAt(q.typed_data(), dq->typed_data(), scratch.data(), s, b, h, n,
                                    end);
      const Block grads = BlockAt(g.typed_data(), dq->typed_data(), scratch.data(), s, b, h, n,
                                  end);
      RowsTimesTransposed(queries.q, scale, keys.data(), s, p.data());
      RowsTimesTransposed(grads.q, 1.0f, values.data(), s, ds.data());  // dL/dp = g v^T
      for (int64_t i = 0; i < kQueries; ++i) {
        float* pi = p.data() + i * s.padded_m;
        float* dsi = ds.data() + i * s.padded_m;
        Softmax(s, pi);
        Vec deltas = {};  // sum_m p dL/dp: softmax's Jacobian applied to dL/dp
        for (int64_t j = 0; j < s.padded_m; j += kLanes)
          deltas += L::Load(pi + j) * L::Load(dsi + j);
        const float delta = HorizontalSum(deltas);
        MapInPlace(dsi, s.padded_m, [&](auto v, int64_t k) {  // dL/dlogits (0 on padding)
          return Lanes<decltype(v)>::Load(pi + k) * (v - delta) * scale;
        });
      }
      WeightedRows(ds.data(), kv.typed_data(), s, b, h, 0, queries.out);  // dq
      // dk[m] += sum_i ds_i[m] q_i and dv[m] += sum_i p_i[m] g_i: each partial sum is loaded and
      // stored once per block of queries.
      for (int64_t m = 0; m < s.M; ++m) {
        float* dk = acc + m * 2 * s.D;
        float* dv = dk + s.D;
        for (int64_t c = 0; c < s.D; c += kLanes) {
          Vec k_sum = L::Load(dk + c), v_sum = L::Load(dv + c);
          for (int64_t i = 0; i < count; ++i) {
            const int64_t row = s.RowOffset(b, n + i, h) + c;
            k_sum += ds[i * s.padded_m + m] * L::Load(q.typed_data() + row);
            v_sum += p[i * s.padded_m + m] * L::Load(g.typed_data() + row);
          }
          L::Store(dk + c, k_sum);
          L::Store(dv + c, v_sum);
        }
      }
    }
  };
  ParallelFor(pool, chunks.count, chunk_body);
  float* out = dkv->typed_data();
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t m = 0; m < s.M; ++m) {
        for (int64_t which = 0; which < 2; ++which) {
          float* dst = out + s.KvOffset(b, m, which, h);
          std::fill(dst, dst + s.D, 0.0f);
          for (int64_t k = 0; k < chunks.per_head; ++k) {
            const int64_t chunk = (b * s.H + h) * chunks.per_head + k;
            const float* src = partial.data() + (chunk * s.M + m) * 2 * s.D + which * s.D;
            for (int64_t c = 0; c < s.D; ++c) dst[c] += src[c];
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pvt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtAttentionForward, pvt_jax::AttentionForward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // q [B, N, H, D]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // kv [B, M, 2, H, D]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // out [B, N, H, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvtAttentionBackward, pvt_jax::AttentionBackward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // q
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // kv
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // output gradient
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // dq
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());  // dkv
