// Native CPU kernel of lm_head_topk: the private op loramix::_lm_head_topk_cpu, registered like
// verify.cpp.
//
// Per vocabulary chunk (the same chunk sizes as loramix_kernels/reference/lm_head.py, so the
// [M, V] logits are never held at once): one fp32 GEMM (at::mm, hidden @ weight_chunk.T, the
// product the plain-PyTorch path computes), then one pass over each row that keeps the row's k
// best (value descending, index ascending: the lower index wins a tie; NaN ranks as -inf) in a
// sorted array. The plain-PyTorch path needs a topk, a NaN pass, a tie check over the logits and a
// stable re-sort of tied rows; here the tie rule is part of the one pass. For small k (the
// early-exit candidates of Mirror-SD: a handful); the Python op uses the PyTorch path above
// kMaxK.

#include "direct.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace loramix {
namespace {

// Must match loramix_kernels/reference/lm_head.py (CHUNK_ELEMS, UPCAST_ELEMS).
constexpr int64_t kChunkElems = int64_t{1} << 23;
constexpr int64_t kUpcastElems = int64_t{1} << 21;

// Insert (x, idx) into the row's sorted top list (vals / ids, `n` entries, capacity k). Indices
// arrive in increasing order, so a value equal to one already kept goes after it.
inline void keep(float* vals, int64_t* ids, int64_t& n, int64_t k, float x, int64_t idx) {
  if (n == k && !(x > vals[k - 1])) return;
  int64_t p = n < k ? n : k - 1;  // the slot that frees up
  while (p > 0 && vals[p - 1] < x) {
    vals[p] = vals[p - 1];
    ids[p] = ids[p - 1];
    --p;
  }
  vals[p] = x;
  ids[p] = idx;
  if (n < k) ++n;
}

std::tuple<at::Tensor, at::Tensor> lm_head_topk_cpu(const at::Tensor& hidden,
                                                    const at::Tensor& weight, int64_t k) {
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  at::Tensor values = at::empty({M, k}, hidden.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({M, k}, hidden.options().dtype(at::kLong));
  if (M == 0 || k == 0) return {values, indices};
  const at::Tensor h = hidden.to(at::kFloat);
  int64_t chunk = kChunkElems / std::max<int64_t>(M, 1);
  if (weight.scalar_type() != at::kFloat) {
    chunk = std::min(chunk, kUpcastElems / std::max<int64_t>(H, 1));
  }
  chunk = std::max(chunk, k);
  float* tv = values.data_ptr<float>();
  int64_t* ti = indices.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(M), 0);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t v0 = 0; v0 < V; v0 += chunk) {
    const int64_t c = std::min(chunk, V - v0);
    at::Tensor w = c == V ? weight : weight.narrow(0, v0, c);  // a view costs a microsecond
    if (w.scalar_type() != at::kFloat) w = w.to(at::kFloat);
    const at::Tensor logits = at::mm(h, w.t()).contiguous();
    const float* lp = logits.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1));
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = lp + r * c;
        float* vals = tv + r * k;
        int64_t* ids = ti + r * k;
        int64_t n = count[r];
        int64_t j = 0;
        for (; j < c && n < k; ++j) {  // filling up: every value is kept
          const float x = row[j];
          keep(vals, ids, n, k, std::isnan(x) ? kNegInf : x, v0 + j);
        }
        float thr = vals[k - 1];  // (once full) a value must beat the k-th; NaN never does
        for (; j < c; ++j) {
          if (row[j] > thr) {
            keep(vals, ids, n, k, row[j], v0 + j);
            thr = vals[k - 1];
          }
        }
        count[r] = n;
      }
    });
  }
  return {values, indices};
}

// Largest k of this kernel (a sorted insertion per row, O(V k) worst case); must match
// loramix_kernels/ops/lm_head.py, NATIVE_MAX_K.
constexpr int64_t kMaxK = 64;

using TopkSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t);

// The direct kernel of loramix::lm_head_topk (csrc/direct.h): the Python validator's checks, then
// the kernel above; anything else goes to the Python kernel.
std::tuple<at::Tensor, at::Tensor> lm_head_topk_direct(const at::Tensor& hidden,
                                                       const at::Tensor& weight, int64_t k) {
  if (!direct::delegating().load(std::memory_order_relaxed) && direct::plain(hidden, 2) &&
      direct::plain(weight, 2) && is_float(hidden) &&
      weight.scalar_type() == hidden.scalar_type() && weight.size(1) == hidden.size(1) &&
      k >= 1 && k <= weight.size(0) && k <= kMaxK) {
    return lm_head_topk_cpu(hidden, weight, k);
  }
  static const auto python = direct::python_kernel<TopkSig>("lm_head_topk");
  return direct::delegate(python, hidden, weight, k);
}

const direct::Add kDirect("lm_head_topk", [](torch::Library& m) {
  m.impl("lm_head_topk", &lm_head_topk_direct);
});

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_lm_head_topk_cpu(Tensor hidden, Tensor weight, int k) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_lm_head_topk_cpu", &lm_head_topk_cpu);
}

}  // namespace loramix
