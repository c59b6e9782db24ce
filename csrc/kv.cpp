// Native CPU kernels for the paged KV cache: the private ops loramix::_kv_write_cpu and
// loramix::_compact_kv_cpu (compact_kv_ on [num_blocks, block_size, Hkv, D] caches and
// compact_kv_layers_ on [L, num_blocks, block_size, Hkv, D] caches), registered like verify.cpp.
//
// Why native: at decode sizes these ops move a handful of [Hkv, D] rows, and their vectorised
// PyTorch form (index arithmetic, masks, a nonzero, a gather and a scatter per cache) plus the
// value checks cost tens of small torch calls; here one walk over the indices checks and copies.
//
// Checks. With `check_meta`, the kernels check the arguments' metadata (the rules of the Python
// validators in loramix_kernels/ops/kv.py: ranks, dtypes, shapes, devices, no internal overlap of
// the caches, no shared memory with the inputs), so that a CPU call skips the Python validator;
// address ranges that meet (legal for the two halves of one allocation) are left to the Python
// checks (status kUnsure). With `check` set (the Python op passes `check_values`), every value
// the validator checks is checked too. All of it happens FIRST, before any write: on the first
// invalid argument the kernel returns kInvalid having written nothing, and the Python op then
// runs its own checks to name the offending argument. Without `check` (value checks switched off),
// invalid entries are skipped exactly as the Triton kernels skip them (kernels/kv.py): no input
// makes a kernel write outside the caches.
//
// Indices are int32 or int64 with any strides and are widened to int64 (never narrowed); the
// caches and K / V rows are read and written in place with their strides (any float dtype: rows
// are copied as bytes, k / v have the caches' dtype).

#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

namespace loramix {
namespace {

// Entry (i, j) of a 1-D or 2-D int32 / int64 tensor, read in place, widened to int64.
class IndexView {
 public:
  explicit IndexView(const at::Tensor& t)
      : p_(static_cast<const char*>(t.data_ptr())),
        s0_(t.dim() > 0 ? t.stride(0) : 0),
        s1_(t.dim() > 1 ? t.stride(1) : 0),
        i64_(t.scalar_type() == at::kLong) {}

  int64_t operator()(int64_t i, int64_t j = 0) const {
    const int64_t off = i * s0_ + j * s1_;
    return i64_ ? reinterpret_cast<const int64_t*>(p_)[off]
                : static_cast<int64_t>(reinterpret_cast<const int32_t*>(p_)[off]);
  }

 private:
  const char* p_;
  int64_t s0_, s1_;
  bool i64_;
};

// A [H, D] row layout: head and element strides in bytes.
struct RowLayout {
  int64_t sh, sd;
};

// Copy one [H, D] row of `es`-byte elements. memmove: a corrupt block table may map two positions
// to one physical row (then source and destination coincide).
inline void copy_row(char* dst, RowLayout dl, const char* src, RowLayout sl, int64_t H, int64_t D,
                     int64_t es) {
  const bool dense_d = dl.sd == es && sl.sd == es;
  if (dense_d && dl.sh == D * es && sl.sh == D * es) {
    std::memmove(dst, src, static_cast<size_t>(H * D * es));
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    char* d = dst + h * dl.sh;
    const char* s = src + h * sl.sh;
    if (dense_d) {
      std::memmove(d, s, static_cast<size_t>(D * es));
    } else {
      for (int64_t x = 0; x < D; ++x) std::memmove(d + x * dl.sd, s + x * sl.sd, es);
    }
  }
}

// Status of a call: done; or the metadata check could not decide (two tensors' address ranges
// meet, e.g. the two halves of one allocation: the Python checks decide exactly); or an argument
// the op's checks reject (nothing written; the Python op names it).
constexpr int64_t kDone = 0, kUnsure = 1, kInvalid = 2;

// [first, last] byte a non-empty tensor addresses.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = (t.size(d) - 1) * t.stride(d);
    (span < 0 ? lo : hi) += span;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t es = t.element_size();
  return {base + lo * es, base + (hi + 1) * es - 1};
}

// Whether in-place output `out` may share memory with any of `others` (address ranges meet).
bool ranges_meet(const at::Tensor& out, std::initializer_list<const at::Tensor*> others) {
  if (out.numel() == 0) return false;
  const auto r = byte_range(out);
  for (const at::Tensor* o : others) {
    if (o->numel() == 0) continue;
    const auto q = byte_range(*o);
    if (!(r.second < q.first || q.second < r.first)) return true;
  }
  return false;
}

bool writable(const at::Tensor& t) {
  return at::has_internal_overlap(t) != at::MemOverlap::Yes;
}

// The metadata rules of kv_write_ (ops/kv.py, validate_kv_write).
int64_t kv_write_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& slot_mapping) {
  if (k_cache.dim() != 4 || !is_float(k_cache) || v_cache.dim() != 4 || !is_float(v_cache) ||
      v_cache.sizes() != k_cache.sizes() || slot_mapping.dim() != 1 || !is_index(slot_mapping) ||
      k.dim() != 3 || v.dim() != 3 || k.scalar_type() != k_cache.scalar_type() ||
      v.scalar_type() != v_cache.scalar_type()) {
    return kInvalid;
  }
  const int64_t T = slot_mapping.size(0), H = k_cache.size(2), D = k_cache.size(3);
  for (const at::Tensor* t : {&k, &v}) {
    if (t->size(0) != T || t->size(1) != H || t->size(2) != D) return kInvalid;
  }
  for (const at::Tensor* t : {&v_cache, &k, &v, &slot_mapping}) {
    if (t->device() != k_cache.device()) return kInvalid;
  }
  if (!writable(k_cache) || !writable(v_cache)) return kInvalid;
  if (ranges_meet(k_cache, {&v_cache, &k, &v, &slot_mapping}) ||
      ranges_meet(v_cache, {&k, &v, &slot_mapping})) {
    return kUnsure;
  }
  return kDone;
}

int64_t kv_write_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& slot_mapping, bool check,
                     bool check_meta) {
  if (check_meta) {
    const int64_t status = kv_write_meta(k_cache, v_cache, k, v, slot_mapping);
    if (status != kDone) return status;
  }
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), H = k_cache.size(2),
                D = k_cache.size(3);
  const int64_t T = slot_mapping.size(0), cap = nb * bs;
  const IndexView slot(slot_mapping);
  if (check && T > 0) {
    std::vector<int64_t> used;
    used.reserve(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = slot(t);
      if (s < -1 || s >= cap) return kInvalid;
      if (s >= 0) used.push_back(s);
    }
    std::sort(used.begin(), used.end());
    if (std::adjacent_find(used.begin(), used.end()) != used.end()) return kInvalid;
  }
  if (T == 0 || H == 0 || D == 0) return kDone;
  const int64_t es = k_cache.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const RowLayout kcl{k_cache.stride(2) * es, k_cache.stride(3) * es};
  const RowLayout vcl{v_cache.stride(2) * es, v_cache.stride(3) * es};
  const RowLayout kl{k.stride(1) * es, k.stride(2) * es};
  const RowLayout vl{v.stride(1) * es, v.stride(2) * es};
  const int64_t kcb = k_cache.stride(0) * es, kcs = k_cache.stride(1) * es;
  const int64_t vcb = v_cache.stride(0) * es, vcs = v_cache.stride(1) * es;
  const int64_t kt = k.stride(0) * es, vt = v.stride(0) * es;
  // Slots are distinct (checked, or the caller's promise): tokens never share a destination row.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * D));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot(t);
      if (s < 0 || s >= cap) continue;  // -1: padding; out of range: skipped as on CUDA
      const int64_t blk = s / bs, off = s % bs;
      copy_row(kc + blk * kcb + off * kcs, kcl, kp + t * kt, kl, H, D, es);
      copy_row(vc + blk * vcb + off * vcs, vcl, vp + t * vt, vl, H, D, es);
    }
  });
  return kDone;
}

struct Move {
  int64_t src_blk, src_off, dst_blk, dst_off;
};

// The row moves of compact_kv_ for every request (a node moved onto itself left out), in
// increasing j per request. With `check`: false on the first value the Python validator rejects
// (accept_len outside [0, N), seq_lens outside [N, cap], a path entry outside [0, N) or not
// strictly increasing, a block id used by the path or its destinations outside [0, num_blocks)).
// Without: the Triton kernel's sanitising rules (kernels/kv.py, _compact_kv_moves).
bool compact_moves(const at::Tensor& block_table, const at::Tensor& seq_lens,
                   const at::Tensor& accept_index, const at::Tensor& accept_len, int64_t nb,
                   int64_t bs, bool check, std::vector<Move>& moves) {
  const int64_t B = accept_index.size(0), N = accept_index.size(1);
  const int64_t mb = block_table.size(1), cap = mb * bs;
  const IndexView acc(accept_index), len(accept_len), seq(seq_lens), table(block_table);
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = len(b);
    const int64_t S = seq(b);
    if (check && (n < 0 || n >= N || S < N || S > cap)) return false;
    const int64_t base = S - N;
    n = std::min(n, N - 1);
    if (base < 0) n = -1;
    int64_t prev = -1;
    for (int64_t j = 0; j <= n; ++j) {
      const int64_t a = acc(b, j);
      if (check) {
        if (a < 0 || a >= N || a <= prev) return false;
      }
      const bool ok = a > prev && a >= j && a < N;
      if (ok) prev = a;
      const int64_t src = base + std::min(std::max<int64_t>(a, 0), N - 1), dst = base + j;
      const int64_t sl = src / bs, dl = dst / bs;
      if (sl >= mb || dl >= mb) continue;  // (never with check: S <= cap)
      const int64_t sblk = table(b, sl), dblk = table(b, dl);
      const bool blocks_ok = sblk >= 0 && sblk < nb && dblk >= 0 && dblk < nb;
      if (check && !blocks_ok) return false;
      if (!ok || a == j || !blocks_ok) continue;
      moves.push_back(Move{sblk, src % bs, dblk, dst % bs});
    }
  }
  return true;
}

// compact_kv_ (4-D caches) and compact_kv_layers_ (5-D caches: the same moves in every layer).
// The metadata rules of compact_kv_ / compact_kv_layers_ (ops/kv.py, _check_compact).
int64_t compact_meta(const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& seq_lens,
                     const at::Tensor& accept_index, const at::Tensor& accept_len, bool layered) {
  const int64_t ndim = layered ? 5 : 4;
  if (k_cache.dim() != ndim || !is_float(k_cache) || v_cache.dim() != ndim || !is_float(v_cache) ||
      v_cache.sizes() != k_cache.sizes() || accept_index.dim() != 2 || !is_index(accept_index) ||
      accept_index.size(1) < 1 || accept_len.dim() != 1 || !is_index(accept_len) ||
      block_table.dim() != 2 || !is_index(block_table) || seq_lens.dim() != 1 ||
      !is_index(seq_lens)) {
    return kInvalid;
  }
  const int64_t B = accept_index.size(0);
  if (accept_len.size(0) != B || block_table.size(0) != B || block_table.size(1) < 1 ||
      seq_lens.size(0) != B) {
    return kInvalid;
  }
  for (const at::Tensor* t : {&v_cache, &block_table, &seq_lens, &accept_index, &accept_len}) {
    if (t->device() != k_cache.device()) return kInvalid;
  }
  if (!writable(k_cache) || !writable(v_cache)) return kInvalid;
  if (ranges_meet(k_cache, {&v_cache, &block_table, &seq_lens, &accept_index, &accept_len}) ||
      ranges_meet(v_cache, {&block_table, &seq_lens, &accept_index, &accept_len})) {
    return kUnsure;
  }
  return kDone;
}

int64_t compact_kv_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& accept_index,
                       const at::Tensor& accept_len, bool check, bool check_meta, bool layers) {
  if (check_meta) {
    const int64_t status = compact_meta(k_cache, v_cache, block_table, seq_lens, accept_index,
                                        accept_len, layers);
    if (status != kDone) return status;
  }
  const bool layered = k_cache.dim() == 5;
  const int64_t o = layered ? 1 : 0;
  const int64_t L = layered ? k_cache.size(0) : 1;
  const int64_t nb = k_cache.size(o), bs = k_cache.size(o + 1), H = k_cache.size(o + 2),
                D = k_cache.size(o + 3);
  std::vector<Move> moves;
  if (!compact_moves(block_table, seq_lens, accept_index, accept_len, nb, bs, check, moves)) {
    return kInvalid;
  }
  if (moves.empty() || L == 0 || H == 0 || D == 0) return kDone;
  const int64_t es = k_cache.element_size();
  for (at::Tensor* cache : {&k_cache, &v_cache}) {
    char* base = static_cast<char*>(cache->data_ptr());
    const int64_t sl = layered ? cache->stride(0) * es : 0;
    const int64_t sb = cache->stride(o) * es, ss = cache->stride(o + 1) * es;
    const RowLayout rl{cache->stride(o + 2) * es, cache->stride(o + 3) * es};
    // Layers never share rows; within a layer the moves run in order (a request's path is
    // strictly increasing, so no move reads a row an earlier move of it wrote).
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        char* layer = base + l * sl;
        for (const Move& m : moves) {
          copy_row(layer + m.dst_blk * sb + m.dst_off * ss, rl,
                   layer + m.src_blk * sb + m.src_off * ss, rl, H, D, es);
        }
      }
    });
  }
  return kDone;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_kv_write_cpu(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
        "Tensor slot_mapping, bool check, bool check_meta) -> int");
  m.def("_compact_kv_cpu(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor accept_index, Tensor accept_len, bool check, bool check_meta, "
        "bool layers) -> int");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_kv_write_cpu", &kv_write_cpu);
  m.impl("_compact_kv_cpu", &compact_kv_cpu);
}

}  // namespace loramix
