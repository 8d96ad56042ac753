// Shared by the CPU kernels: 16-lane float vectors, a vectorisable exp, and a parallel loop on
// XLA's intra-op threads.

#ifndef PVT_JAX_MODELS_KERNELS_CPU_COMMON_H_
#define PVT_JAX_MODELS_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace pvt_jax {

namespace ffi = xla::ffi;

// 16 floats in one value: one AVX-512 register, two AVX ones, four NEON ones. GCC/Clang vector
// types rather than intrinsics keep this portable and vectorised whatever the auto-vectoriser
// decides; lengths that are not a multiple of 16 finish with T = float.
using Vec = float __attribute__((vector_size(64)));
using IntVec = int32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static float Load(const float* p) { return *p; }
  static void Store(float* p, float v) { *p = v; }
  static float Pow2(float n) {  // 2^n for integral n in [-126, 127]
    return __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  }
};

template <>
struct Lanes<Vec> {
  static Vec Load(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
  static Vec Pow2(Vec n) {
    return __builtin_bit_cast(Vec, (__builtin_convertvector(n, IntVec) + 127) << 23);
  }
};

template <typename T>
inline T Clamp(T x, float lo, float hi) {
  T l = x < lo ? lo : x;
  return l > hi ? hi : l;
}

// exp(y) for y <= 0 (libm's expf is scalar): y = n ln2 + r with |r| <= ln2 / 2, exp(r) by its
// Taylor series to r^7 (relative error < 1e-8), 2^n from the exponent bits.
template <typename T>
inline T ExpNonPositive(T y) {
  y = Clamp(y, -87.0f, 0.0f);  // 2^n stays a normal float
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds
  T n = (y * 1.4426950408889634f + kRound) - kRound;
  T r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
  T p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * Lanes<T>::Pow2(n);
}

// op over the 16 lanes of v in four halving steps (a chain of 15 scalar ops is latency-bound).
template <typename Op>
inline float Reduce(Vec v, Op op) {
  using Half = float __attribute__((vector_size(32)));
  using Quarter = float __attribute__((vector_size(16)));
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const Half h = op(lo, hi);
  Quarter l4, h4;
  std::memcpy(&l4, &h, sizeof(l4));
  std::memcpy(&h4, reinterpret_cast<const char*>(&h) + sizeof(l4), sizeof(h4));
  const Quarter q = op(l4, h4);
  return op(op(q[0], q[1]), op(q[2], q[3]));
}

inline float HorizontalSum(Vec v) {
  return Reduce(v, [](auto a, auto b) { return a + b; });
}

inline float HorizontalMax(Vec v) {
  return Reduce(v, [](auto a, auto b) { return a > b ? a : b; });
}

// f(T) over n contiguous floats in place: whole vectors, then the remainder one by one.
template <typename F>
inline void MapInPlace(float* data, int64_t n, F f) {
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    Lanes<Vec>::Store(data + k, f(Lanes<Vec>::Load(data + k), k));
  for (; k < n; ++k) data[k] = f(data[k], k);
}

// Work items a kernel splits a small batch into, when it must split images (or heads) to keep
// threads busy. Fixed, not sized by the thread pool: where the items hold partial sums, their
// number sets the order of the final additions, so the bits must not depend on the core count
// (a run resumed on another machine gives the same numbers). 32 keeps up to ~16 threads busy.
constexpr int64_t kWorkItems = 32;

// Runs body(i) for i in [0, n) on XLA's intra-op threads and the calling one. Workers claim
// indices from a shared counter, so a task the pool starts late finds nothing left and returns;
// the caller waits only for claimed indices, never for a queued task (no deadlock when the
// caller is itself a pool thread).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  F* fn = &body;
  auto work = [state, fn, n] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fn)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace pvt_jax

#endif  // PVT_JAX_MODELS_KERNELS_CPU_COMMON_H_
