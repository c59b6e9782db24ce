// Native value check of the probability rows verify_sampling reads: the private op
//   loramix::_prob_rows_check(Tensor probs, Tensor used, float tol) -> (int status, float sum)
// over the rows probs[b, i] with used[b, i] (probs [B, N, V] fp32 / fp16 / bf16, any strides; used
// [B, N] bool): status 0 when every such row is finite, >= 0 and sums to 1 within `tol`; else the
// first failing rule in the Python check's order (loramix_kernels/ops/verify.py, _check_prob_rows):
// 1 a NaN / inf entry, 2 a negative entry, 3 a sum off by more than `tol` (`sum`: the row sum
// farthest from 1). One pass over the rows, SIMD (csrc/simd.h), rows over the intra-op threads;
// the PyTorch check indexes the rows out and makes four passes over them (at V = 4096 it cost
// twice the walk itself).

#if defined(__GNUC__)

#include "simd.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

namespace loramix {
namespace {

using simd::kLanes;
using simd::vf;

struct RowCheck {
  bool nonfinite = false, negative = false;
  double worst_sum = 1.0;  // the row sum farthest from 1 so far

  // Fold in another row's (or set of rows') result.
  void merge(const RowCheck& o) {
    nonfinite = nonfinite || o.nonfinite;
    negative = negative || o.negative;
    if (std::abs(o.worst_sum - 1.0) > std::abs(worst_sum - 1.0) || std::isnan(o.worst_sum)) {
      worst_sum = o.worst_sum;
    }
  }
};

// Elements converted per step (fp16 / bf16 / strided rows go through a float buffer).
constexpr int64_t kStep = 1024;

// One row: its sum (fp32 lanes per step, steps summed in double), whether an entry is NaN / inf,
// whether one is negative.
LORAMIX_SIMD_CLONES RowCheck check_row(const char* row, int64_t V, int64_t stride, int dtype,
                                       int64_t es, float* buf) {
  vf z{}, mn{};
  double s = 0.0;
  bool neg = false;
  for (int64_t v0 = 0; v0 < V; v0 += kStep) {
    const int64_t n = std::min(kStep, V - v0);
    const float* x;
    if (dtype == simd::kF32 && stride == es) {
      x = reinterpret_cast<const float*>(row + v0 * es);
    } else {
      simd::load_row(buf, row + v0 * stride, n, stride, dtype, es);
      x = buf;
    }
    vf acc{};
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes) {
      vf v;
      std::memcpy(&v, x + d, sizeof v);
      acc += v;
      z += v - v;
      mn = simd::vmin(mn, v);
    }
    float tail = 0.0f;
    for (; d < n; ++d) {
      tail += x[d];
      z[0] += x[d] - x[d];
      neg = neg || x[d] < 0.0f;
    }
    s += static_cast<double>(simd::hsum(acc)) + tail;
  }
  RowCheck r;
  r.nonfinite = !(simd::hsum(z) == 0.0f);
  r.negative = neg || simd::hmin(mn) < 0.0f;
  r.worst_sum = s;
  return r;
}

std::tuple<int64_t, double> prob_rows_check(const at::Tensor& probs, const at::Tensor& used,
                                            double tol) {
  TORCH_CHECK(probs.dim() == 3 && used.dim() == 2 && used.scalar_type() == at::kBool &&
                  used.size(0) == probs.size(0) && used.size(1) == probs.size(1),
              "_prob_rows_check: probs [B, N, V] and used [B, N] bool");
  const auto st = probs.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "_prob_rows_check: probs must be float32, float16 or bfloat16");
  const int64_t B = probs.size(0), N = probs.size(1), V = probs.size(2), es = probs.element_size();
  const int dtype = st == at::kBFloat16 ? simd::kBF16 : st == at::kHalf ? simd::kF16 : simd::kF32;
  const char* base = static_cast<const char*>(probs.data_ptr());
  const int64_t sb = probs.stride(0) * es, sn = probs.stride(1) * es, sv = probs.stride(2) * es;
  const bool* u = used.data_ptr<bool>();
  const int64_t ub = used.stride(0), un = used.stride(1);
  RowCheck all;
  std::mutex mutex;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(static_cast<size_t>(std::min(kStep, V)));
    RowCheck mine;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / N, i = t % N;
      if (u[b * ub + i * un]) mine.merge(check_row(base + b * sb + i * sn, V, sv, dtype, es, buf.data()));
    }
    std::lock_guard<std::mutex> lock(mutex);
    all.merge(mine);
  });
  if (all.nonfinite) return {1, all.worst_sum};
  if (all.negative) return {2, all.worst_sum};
  if (!(std::abs(all.worst_sum - 1.0) <= tol)) return {3, all.worst_sum};
  return {0, all.worst_sum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_prob_rows_check(Tensor probs, Tensor used, float tol) -> (int status, float sum)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_prob_rows_check", &prob_rows_check);
}

}  // namespace loramix

#endif  // defined(__GNUC__)
