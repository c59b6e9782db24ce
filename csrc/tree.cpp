// Native CPU fast path of tree_attention: the private op loramix::_tree_attention_cpu, registered
// like verify.cpp.
//
// The plain-PyTorch CPU kernel (loramix_kernels/ops/tree.py, tree_attention_cpu) builds cache
// positions, slots, the gathered K / V and the additive mask with about twenty small torch calls
// around one fused attention call; at decode sizes those calls cost more than the attention. Here
// one walk over the requests gathers each request's K / V rows ([its prefix | its N tree nodes],
// the prefix padded to the batch's longest with zero rows) and writes the additive mask (0 where
// a row sees a key, -inf elsewhere, from the tree bitmask), then PyTorch's fused CPU attention
// (at::scaled_dot_product_attention) runs once, as in the Python kernel: the GQA group folded
// into the query rows while N * G <= fold_max_rows (the Python kernel's _FOLD_MAX_ROWS), SDPA's
// own GQA for wider trees.
//
// With `check_meta`, the arguments' metadata is checked first (the Python validator's rules), so a
// CPU call skips the Python validator; with `check` (the op's value checks on), the lengths and
// the block ids each request uses are checked too, in the walk. Status kInvalid makes the Python
// op run its own checks to name the offending argument.
//
// Fast path only: status kFallback comes back, and the Python kernel then does everything itself, when
// a length lies outside the table (value checks off) or when the output is not finite -- a NaN /
// inf in a tree slot some row must not see, or a row that sees no key at all, which the Python
// kernel's careful path sanitises. A finite output is exactly what that path computes: masked
// keys get weight 0, and zero padding rows are never seen.

#include "checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

namespace loramix {
namespace {

int64_t index_at(const at::Tensor& t, const char* p, int64_t i, int64_t j = 0) {
  const int64_t off = i * t.stride(0) + (t.dim() > 1 ? j * t.stride(1) : 0);
  return t.scalar_type() == at::kLong ? reinterpret_cast<const int64_t*>(p)[off]
                                      : static_cast<int64_t>(reinterpret_cast<const int32_t*>(p)[off]);
}

template <typename T>
void fill_mask(T* m, const at::Tensor& tree_mask, const std::vector<int64_t>& base, int64_t B,
               int64_t N, int64_t rows, int64_t Lp) {
  const T zero = T(0.0f), ninf = T(-std::numeric_limits<float>::infinity());
  const int64_t L = Lp + N;
  const int32_t* tm = tree_mask.data_ptr<int32_t>();
  const int64_t tb = tree_mask.stride(0), tn = tree_mask.stride(1), tw = tree_mask.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < N; ++i) {
      T* row = m + ((b * N + i) * rows) * L;
      const int64_t seen = std::min(base[b], Lp);
      std::fill(row, row + seen, zero);
      std::fill(row + seen, row + Lp, ninf);
      const int32_t* bits = tm + b * tb + i * tn;
      for (int64_t j = 0; j < N; ++j) {
        const uint32_t w = static_cast<uint32_t>(bits[(j >> 5) * tw]);
        row[Lp + j] = (w >> (j & 31)) & 1u ? zero : ninf;
      }
      for (int64_t r = 1; r < rows; ++r) std::memcpy(row + r * L, row, L * sizeof(T));
    }
  }
}

// Per-thread scratch for the gathered K / V and the mask, reused from call to call: fresh
// allocations of this size come from the OS as new pages, and their page faults cost more than the
// attention at decode sizes (measured: 64 one-node rows over 170 positions, 3.1 ms of a 4.2 ms call).
// Held up to kScratchBytes per buffer; larger calls (long prefills) allocate as usual.
constexpr int64_t kScratchBytes = int64_t{32} << 20;

at::Tensor scratch(at::Tensor& slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t n = c10::multiply_integers(sizes);
  const int64_t bytes = n * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kScratchBytes) return at::empty(sizes, options);
  if (!slot.defined() || slot.numel() < n || slot.dtype() != options.dtype()) {
    slot = at::empty({std::max<int64_t>(n, 1)}, options);
  }
  return slot.narrow(0, 0, n).view(sizes);
}

struct Scratch {
  at::Tensor k, v, mask;
};

// Status of the fast path: the output is the answer; or the Python kernel must run instead; or
// (with `check`) a value the op's checks reject -- the Python op then names it.
constexpr int64_t kOk = 0, kFallback = 1, kInvalid = 2;

// The metadata rules of tree_attention (ops/tree.py, validate_tree_attention; sm_scale is checked
// in Python): ranks, dtypes, shapes and devices.
bool metadata_ok(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_table, const at::Tensor& seq_lens,
                 const at::Tensor& tree_mask) {
  if (q.dim() != 4 || !is_float(q) || q.size(1) < 1 || q.size(3) < 1) return false;
  if (k_cache.dim() != 4 || k_cache.scalar_type() != q.scalar_type() || k_cache.size(3) != q.size(3) ||
      k_cache.size(0) < 1 || k_cache.size(1) < 1 || k_cache.size(2) < 1 ||
      q.size(2) % k_cache.size(2) != 0) {
    return false;
  }
  if (v_cache.dim() != 4 || v_cache.scalar_type() != q.scalar_type() ||
      v_cache.sizes() != k_cache.sizes()) {
    return false;
  }
  const int64_t B = q.size(0), N = q.size(1);
  if (block_table.dim() != 2 || !is_index(block_table) || block_table.size(0) != B ||
      block_table.size(1) < 1 || seq_lens.dim() != 1 || !is_index(seq_lens) ||
      seq_lens.size(0) != B || tree_mask.dim() != 3 || tree_mask.scalar_type() != at::kInt ||
      tree_mask.size(0) != B || tree_mask.size(1) != N || tree_mask.size(2) != (N + 31) / 32) {
    return false;
  }
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_table, &seq_lens, &tree_mask}) {
    if (t->device() != q.device()) return false;
  }
  return true;
}

std::tuple<at::Tensor, int64_t> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache,
                                                const at::Tensor& block_table,
                                                const at::Tensor& seq_lens,
                                                const at::Tensor& tree_mask, double scale,
                                                int64_t fold_max_rows, bool check,
                                                bool check_meta) {
  // Below autograd: nothing here records a graph (tree_attention has no gradient), so no graph
  // can keep the per-thread scratch below alive past this call.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (check_meta && !metadata_ok(q, k_cache, v_cache, block_table, seq_lens, tree_mask)) {
    return {at::empty({0}, q.options()), kInvalid};
  }
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t cap = block_table.size(1) * bs, G = Hq / Hkv;
  at::Tensor out = at::empty({B, N, Hq, D}, q.options());
  if (check) {  // the op's value checks (ops/tree.py, _check_tree_attention_values), in one walk
    const char* seq = static_cast<const char*>(seq_lens.data_ptr());
    const char* table = static_cast<const char*>(block_table.data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      const int64_t S = index_at(seq_lens, seq, b);
      if (S < N || S > cap) return {out, kInvalid};
      for (int64_t m = 0; m < (S + bs - 1) / bs; ++m) {
        const int64_t blk = index_at(block_table, table, b, m);
        if (blk < 0 || blk >= nb) return {out, kInvalid};
      }
    }
  }
  if (out.numel() == 0) return {out, kOk};
  const char* seq = static_cast<const char*>(seq_lens.data_ptr());
  const char* table = static_cast<const char*>(block_table.data_ptr());
  std::vector<int64_t> base(static_cast<size_t>(B));
  int64_t Lp = 0;
  for (int64_t b = 0; b < B; ++b) {
    base[b] = index_at(seq_lens, seq, b) - N;
    if (base[b] < 0 || base[b] + N > cap) return {out, kFallback};
    Lp = std::max(Lp, base[b]);
  }
  const int64_t L = Lp + N;
  // Gathered K / V [B, L, Hkv, D]: row p < Lp is prefix position p (zero past the request's own
  // prefix), row Lp + i is tree node i at position base + i.
  thread_local Scratch ws;
  at::Tensor kg = scratch(ws.k, {B, L, Hkv, D}, q.options());
  at::Tensor vg = scratch(ws.v, {B, L, Hkv, D}, q.options());
  const int64_t es = q.element_size(), row_bytes = Hkv * D * es;
  char* kd = static_cast<char*>(kg.data_ptr());
  char* vd = static_cast<char*>(vg.data_ptr());
  const char* kc = static_cast<const char*>(k_cache.data_ptr());
  const char* vc = static_cast<const char*>(v_cache.data_ptr());
  const int64_t ks[4] = {k_cache.stride(0) * es, k_cache.stride(1) * es, k_cache.stride(2) * es,
                         k_cache.stride(3) * es};
  const int64_t vs[4] = {v_cache.stride(0) * es, v_cache.stride(1) * es, v_cache.stride(2) * es,
                         v_cache.stride(3) * es};
  const bool dense = ks[3] == es && ks[2] == D * es && vs[3] == es && vs[2] == D * es;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = 0; p < L; ++p) {
        char* kr = kd + (b * L + p) * row_bytes;
        char* vr = vd + (b * L + p) * row_bytes;
        const int64_t pos = p < Lp ? p : base[b] + (p - Lp);
        if (p < Lp && p >= base[b]) {  // past this request's prefix: never seen, zero
          std::memset(kr, 0, row_bytes);
          std::memset(vr, 0, row_bytes);
          continue;
        }
        // An out-of-range block id (value checks off) is clamped, as in the Python kernel.
        const int64_t blk = std::min(std::max<int64_t>(index_at(block_table, table, b, pos / bs), 0),
                                     nb - 1);
        const int64_t off = pos % bs;
        const char* ksrc = kc + blk * ks[0] + off * ks[1];
        const char* vsrc = vc + blk * vs[0] + off * vs[1];
        if (dense) {
          std::memcpy(kr, ksrc, row_bytes);
          std::memcpy(vr, vsrc, row_bytes);
          continue;
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          for (int64_t x = 0; x < D; ++x) {
            std::memcpy(kr + (h * D + x) * es, ksrc + h * ks[2] + x * ks[3], es);
            std::memcpy(vr + (h * D + x) * es, vsrc + h * vs[2] + x * vs[3], es);
          }
        }
      }
    }
  });
  const bool fold = N * G <= fold_max_rows;
  const int64_t rows = fold ? G : 1;
  at::Tensor mask = scratch(ws.mask, {B, N, rows, L}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_mask", [&] {
    fill_mask<scalar_t>(mask.data_ptr<scalar_t>(), tree_mask, base, B, N, rows, Lp);
  });
  const at::Tensor kt = kg.transpose(1, 2), vt = vg.transpose(1, 2);
  if (fold) {
    const at::Tensor qf = q.reshape({B, N, Hkv, G, D}).permute({0, 2, 1, 3, 4}).reshape({B, Hkv, N * G, D});
    const at::Tensor o = at::scaled_dot_product_attention(qf, kt, vt, mask.view({B, 1, N * G, L}), 0.0,
                                                          false, scale);
    out.view({B, N, Hkv, G, D}).copy_(o.view({B, Hkv, N, G, D}).permute({0, 2, 1, 3, 4}));
  } else {
    const at::Tensor o = at::scaled_dot_product_attention(q.transpose(1, 2), kt, vt,
                                                          mask.view({B, 1, N, L}), 0.0, false, scale,
                                                          G > 1);
    out.copy_(o.transpose(1, 2));
  }
  const bool finite = at::isfinite(out).all().item<bool>();
  return {out, finite ? kOk : kFallback};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_tree_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor tree_mask, float scale, int fold_max_rows, bool check, "
        "bool check_meta) -> (Tensor out, int status)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_tree_attention_cpu", &tree_attention_cpu);
}

}  // namespace loramix
