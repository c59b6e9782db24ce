// Native CPU kernel of route_topk: the private op loramix::_route_topk_cpu, registered like
// verify.cpp.
//
// The router of every LoRA-Mixer layer runs once per token batch; at decode (a handful of tokens,
// a few experts) the plain-PyTorch kernel (reference/routing.py, route_topk_keyed: softmax, an
// integer key per expert, topk, gather, renormalisation) is a dozen tiny torch calls. Here: the
// same fp32 softmax (at::softmax, the reference's own), then one pass per row keeping the k
// largest probabilities under the tie rule (the lower expert index wins; a NaN probability ranks
// below every real one, NaNs in index order), the gates read from the probabilities and, with
// `renormalize`, divided by their sum. fp16 / bf16 / fp32 logits; fp64 (gradcheck) stays in
// PyTorch.

#include "direct.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace loramix {
namespace {

// Selection key of a NaN probability (reference/routing.py, NAN_KEY): below every p >= 0.
constexpr float kNanKey = -0.5f;

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_topk_cpu(const at::Tensor& logits, int64_t k,
                                                              bool renormalize) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const at::Tensor probs = at::softmax(logits.to(at::kFloat), -1).contiguous();
  at::Tensor gates = at::empty({T, k}, probs.options());
  at::Tensor ids = at::empty({T, k}, probs.options().dtype(at::kInt));
  if (T == 0 || k == 0) return {gates, ids, probs};
  const float* p = probs.data_ptr<float>();
  float* g = gates.data_ptr<float>();
  int32_t* id = ids.data_ptr<int32_t>();
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<float> key(static_cast<size_t>(k));
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = p + t * E;
      int32_t* ri = id + t * k;
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e) {  // increasing index: an equal key goes after
        const float x = std::isnan(row[e]) ? kNanKey : row[e];
        if (n == k && !(x > key[k - 1])) continue;
        int64_t pos = n < k ? n : k - 1;
        while (pos > 0 && key[pos - 1] < x) {
          key[pos] = key[pos - 1];
          ri[pos] = ri[pos - 1];
          --pos;
        }
        key[pos] = x;
        ri[pos] = static_cast<int32_t>(e);
        if (n < k) ++n;
      }
      float* rg = g + t * k;
      for (int64_t j = 0; j < k; ++j) rg[j] = row[ri[j]];
      if (renormalize) {
        float s = 0.0f;
        for (int64_t j = 0; j < k; ++j) s += rg[j];
        for (int64_t j = 0; j < k; ++j) rg[j] /= s;
      }
    }
  });
  return {gates, ids, probs};
}

// Must match loramix_kernels/ops/routing.py, MAX_EXPERTS.
constexpr int64_t kMaxExperts = 1024;

using RouteSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool);

// The direct kernel of loramix::route_topk (csrc/direct.h): the Python validator's checks, then
// the kernel above; fp64 logits (gradcheck) and anything else go to the Python kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_topk_direct(const at::Tensor& logits,
                                                                 int64_t k, bool renormalize) {
  if (!direct::delegating().load(std::memory_order_relaxed) && direct::plain(logits, 2) &&
      is_float(logits) && logits.size(1) >= 1 && logits.size(1) <= kMaxExperts &&
      k >= 1 && k <= logits.size(1)) {
    return route_topk_cpu(logits, k, renormalize);
  }
  static const auto python = direct::python_kernel<RouteSig>("route_topk");
  return direct::delegate(python, logits, k, renormalize);
}

const direct::Add kDirect("route_topk", [](torch::Library& m) {
  m.impl("route_topk", &route_topk_direct);
});

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_route_topk_cpu(Tensor logits, int k, bool renormalize) -> "
        "(Tensor gates, Tensor expert_ids, Tensor probs)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_route_topk_cpu", &route_topk_cpu);
}

}  // namespace loramix
