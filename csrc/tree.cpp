// Native CPU kernel of tree_attention: attention straight out of the paged cache, no gather, no
// mask tensor, no framework call. The private op loramix::_tree_attention_cpu (registered like
// verify.cpp) and the op's direct CPU kernel (csrc/direct.h) both run it.
//
// Work is split into tasks of (request b, KV head h, a tile of 16 or 32 query rows); a query row
// is one (tree node i, query head of h's GQA group), so K and V are read once per tile for the
// whole group. A task keeps its rows transposed, Q^T [D][rows] and O^T [D][rows] in fp32, rows
// along the SIMD lanes (GNU vector extensions, 16 floats), and walks the request's keys in chunks
// of 32: its prefix positions [0, P_b), then its N tree nodes [P_b, P_b + N), each chunk converted
// to fp32 rows once for all the tile's rows. Per chunk: scores S^T[key][rows] = K Q^T (4 keys x
// the tile's rows in registers), the tree mask applied lane-wise from one mask word per row (a tree
// chunk starts at node 0, 32, 64, ..., so its 32 keys are one int32 word of the packed mask), an
// online softmax in base 2 (the scale times log2(e) folded into Q; exp2 by a degree-7 polynomial,
// relative error ~2e-7), and O^T = O^T * alpha + V^T P^T (8 columns of D x the tile's rows in
// registers). Keys no row of the tile sees are never read. fp32 throughout, one rounding to q's
// dtype at the end, as the plain-PyTorch path (PyTorch's fused SDPA over the gathered K / V).
//
// The vector code is compiled for AVX-512, AVX2 + FMA and the baseline x86-64, picked at load time
// (GCC's target_clones, Linux x86-64); other GNU-compatible targets get one build for the
// compiler's flags. Without GNU vector extensions (MSVC) this file registers nothing, and the op
// keeps its plain-PyTorch CPU kernel.
//
// With `check_meta`, the arguments' metadata is checked first (the Python validator's rules), so a
// CPU call skips the Python validator; with `check` (the op's value checks on), the lengths and
// the block ids each request uses are checked too. Status kInvalid makes the Python op run its own
// checks to name the offending argument.
//
// Fast path only: status kFallback comes back, and the Python kernel then does everything itself,
// when a length lies outside the table (value checks off) or when a non-finite value took part (in
// q, in a K / V row some row of a tile sees, in a score, or in the output): the Python kernel's careful path
// decides which rows it reaches. A finite result is what that path computes: masked keys get
// weight 0, a row that sees no key gets 0.

#if defined(__GNUC__)

#include "direct.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

namespace loramix {
namespace {

using simd::kInf;
using simd::kLanes;
using simd::load_row;
using simd::splat;
using simd::store1;
using simd::vf;
using simd::vi;
using simd::vmax;
// Keys per chunk: one int32 word of the packed tree mask.
constexpr int64_t kChunk = 32;

// One call's arguments: data pointers, strides (bytes for the float tensors, elements for the
// index tensors), sizes.
struct Problem {
  const char* q;
  int64_t qs[4];
  const char* k;
  int64_t ks[4];
  const char* v;
  int64_t vs[4];
  const char* table;
  int64_t ts[2];
  bool table64;
  const int32_t* mask;
  int64_t ms[3];
  char* out;
  int64_t os[4];
  int64_t N, G, Hkv, D, bs, nb;
  const int64_t* base;  // [B]: position of tree node 0 (the prefix length)
  float scale;          // sm_scale * log2(e)
  int dtype;            // 0 fp32, 1 bf16, 2 fp16
  int64_t es;           // element size
};

// 2^x lane-wise, for x <= 0 (below -126, -inf included: 0).
LORAMIX_INLINE vf exp2v(vf x) {
  const vf xc = vmax(x, splat(-127.0f));
  const vf r = (xc + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const vf f = xc - r;                             // [-0.5, 0.5]
  vf p = splat(1.5252734e-5f);
  p = p * f + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const vi bits = (__builtin_convertvector(r, vi) + 127) << 23;
  vf two_r;
  std::memcpy(&two_r, &bits, sizeof two_r);
  return x < -126.0f ? vf{} : p * two_r;
}

// Scratch floats of one task (64-byte aligned blocks): Q^T, O^T (D x NR vectors each), S^T
// (kChunk x NR vectors), K and V chunk rows (kChunk x D floats each), one q row.
int64_t scratch_floats(int64_t D) {
  const int64_t nr = 2;
  return (2 * D * nr + kChunk * nr) * kLanes + 2 * kChunk * ((D + kLanes - 1) / kLanes * kLanes) +
         ((D + kLanes - 1) / kLanes * kLanes);
}

// One task: request b, KV head h, query rows [r0, r0 + nr) of the N * G (nr <= NR * 16). `DT` is
// the head dim when fixed at compile time (0: P.D). False when a non-finite value took part.
template <int NR, int64_t DT>
LORAMIX_INLINE bool attend(const Problem& P, int64_t b, int64_t h, int64_t r0, int64_t nr,
                           float* ws) {
  const int64_t D = DT ? DT : P.D;
  const int64_t Dp = (D + kLanes - 1) / kLanes * kLanes;  // K / V rows stay 64-byte aligned
  vf* Qt = reinterpret_cast<vf*>(ws);  // [D][NR]
  vf* Ot = Qt + D * NR;                // [D][NR]
  vf* St = Ot + D * NR;                // [kChunk][NR]
  float* Kf = reinterpret_cast<float*>(St + kChunk * NR);  // [kChunk][Dp]
  float* Vf = Kf + kChunk * Dp;                            // [kChunk][Dp]
  float* qrow = Vf + kChunk * Dp;                          // [Dp]
  const int64_t G = P.G, N = P.N, base = P.base[b];
  vf bad = vf{};
  for (int64_t x = 0; x < D * NR; ++x) Qt[x] = Ot[x] = vf{};
  int32_t node[NR * kLanes];  // each lane's tree node (-1: a lane past the tile)
  for (int64_t r = 0; r < NR * kLanes; ++r) node[r] = r < nr ? static_cast<int32_t>((r0 + r) / G) : -1;
  float* qt = reinterpret_cast<float*>(Qt);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = (r0 + r) / G, hq = h * G + (r0 + r) % G;
    load_row(qrow, P.q + b * P.qs[0] + i * P.qs[1] + hq * P.qs[2], D, P.qs[3], P.dtype, P.es);
    simd::add_nonfinite(qrow, D, bad);
    for (int64_t d = 0; d < D; ++d) qt[(d * NR + r / kLanes) * kLanes + r % kLanes] = qrow[d] * P.scale;
  }
  vf m[NR], l[NR];
  for (int n = 0; n < NR; ++n) {
    m[n] = splat(-kInf);
    l[n] = vf{};
  }
  const int64_t total = base + N;
  for (int64_t p0 = 0, c = 0; p0 < total; p0 += c) {
    const bool tree = p0 >= base;  // a chunk holds prefix keys or tree keys, never both
    c = tree ? std::min(kChunk, total - p0) : std::min(kChunk, base - p0);
    vi words[NR] = {};  // tree chunk: each lane's mask word (the chunk's 32 keys)
    uint32_t seen = ~uint32_t{0};
    if (tree) {
      const int64_t w = (p0 - base) / kChunk;
      seen = 0;
      for (int n = 0; n < NR; ++n) {
        for (int x = 0; x < kLanes; ++x) {
          const int32_t i = node[n * kLanes + x];
          words[n][x] = i >= 0 ? P.mask[b * P.ms[0] + i * P.ms[1] + w * P.ms[2]] : 0;
          seen |= static_cast<uint32_t>(words[n][x]);
        }
      }
      if (c < 32) seen &= (uint32_t{1} << c) - 1;
      if (seen == 0) continue;  // no row of the tile sees these keys
    }
    for (int64_t j = 0; j < c; ++j) {
      float* kr = Kf + j * Dp;
      float* vr = Vf + j * Dp;
      if (!((seen >> j) & 1u)) {  // a tree key no row sees: never read
        std::memset(kr, 0, D * sizeof(float));
        std::memset(vr, 0, D * sizeof(float));
        continue;
      }
      const int64_t pos = p0 + j;
      const int64_t e = b * P.ts[0] + (pos / P.bs) * P.ts[1];
      int64_t blk = P.table64 ? reinterpret_cast<const int64_t*>(P.table)[e]
                              : reinterpret_cast<const int32_t*>(P.table)[e];
      blk = std::min(std::max<int64_t>(blk, 0), P.nb - 1);  // (checked by the caller)
      const int64_t off = pos % P.bs;
      load_row(kr, P.k + blk * P.ks[0] + off * P.ks[1] + h * P.ks[2], D, P.ks[3], P.dtype, P.es);
      load_row(vr, P.v + blk * P.vs[0] + off * P.vs[1] + h * P.vs[2], D, P.vs[3], P.dtype, P.es);
      simd::add_nonfinite(kr, D, bad);
      simd::add_nonfinite(vr, D, bad);
    }
    // S^T[j] = K[j] . Q^T, four keys at a time.
    int64_t j = 0;
    for (; j + 4 <= c; j += 4) {
      vf a[4][NR] = {};
      const float *k0 = Kf + j * Dp, *k1 = k0 + Dp, *k2 = k1 + Dp, *k3 = k2 + Dp;
      for (int64_t d = 0; d < D; ++d) {
        for (int n = 0; n < NR; ++n) {
          const vf qv = Qt[d * NR + n];
          a[0][n] += k0[d] * qv;
          a[1][n] += k1[d] * qv;
          a[2][n] += k2[d] * qv;
          a[3][n] += k3[d] * qv;
        }
      }
      for (int jj = 0; jj < 4; ++jj) {
        for (int n = 0; n < NR; ++n) St[(j + jj) * NR + n] = a[jj][n];
      }
    }
    for (; j < c; ++j) {
      vf a[NR] = {};
      const float* k0 = Kf + j * Dp;
      for (int64_t d = 0; d < D; ++d) {
        for (int n = 0; n < NR; ++n) a[n] += k0[d] * Qt[d * NR + n];
      }
      for (int n = 0; n < NR; ++n) St[j * NR + n] = a[n];
    }
    // A score that overflowed (huge q, K or scale) must not pass as a finite result: the softmax
    // below would turn it into weight 0. (Keys no row sees were zeroed: their scores are finite.)
    for (int64_t jj = 0; jj < c; ++jj) {
      for (int n = 0; n < NR; ++n) bad += St[jj * NR + n] - St[jj * NR + n];
    }
    if (tree) {  // lane x sees tree key jj iff bit jj of its word
      for (int n = 0; n < NR; ++n) {
        for (int64_t jj = 0; jj < c; ++jj) {
          const vi see = (words[n] >> static_cast<int>(jj)) & 1;
          St[jj * NR + n] = see != 0 ? St[jj * NR + n] : splat(-kInf);
        }
      }
    }
    // Online softmax (base 2): running max m, sum l; P^T overwrites S^T.
    vf alpha[NR];
    for (int n = 0; n < NR; ++n) {
      vf cm = St[n];
      for (int64_t jj = 1; jj < c; ++jj) cm = vmax(cm, St[jj * NR + n]);
      const vf mn = vmax(m[n], cm);
      const vf ms = mn == -kInf ? vf{} : mn;  // a lane that has seen nothing yet: weights 0
      alpha[n] = exp2v(m[n] - ms);
      m[n] = mn;
      vf sum = vf{};
      for (int64_t jj = 0; jj < c; ++jj) {
        const vf p = exp2v(St[jj * NR + n] - ms);
        St[jj * NR + n] = p;
        sum += p;
      }
      l[n] = l[n] * alpha[n] + sum;
    }
    // O^T = O^T * alpha + V^T P^T, eight columns of D at a time.
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      const int64_t dn = std::min<int64_t>(8, D - d0);
      vf acc[8][NR];
      for (int dd = 0; dd < 8; ++dd) {
        for (int n = 0; n < NR; ++n) acc[dd][n] = dd < dn ? Ot[(d0 + dd) * NR + n] * alpha[n] : vf{};
      }
      if (dn == 8) {
        for (int64_t jj = 0; jj < c; ++jj) {
          const float* vr = Vf + jj * Dp + d0;
          for (int n = 0; n < NR; ++n) {
            const vf p = St[jj * NR + n];
            for (int dd = 0; dd < 8; ++dd) acc[dd][n] += vr[dd] * p;
          }
        }
      } else {
        for (int64_t jj = 0; jj < c; ++jj) {
          const float* vr = Vf + jj * Dp + d0;
          for (int n = 0; n < NR; ++n) {
            const vf p = St[jj * NR + n];
            for (int64_t dd = 0; dd < dn; ++dd) acc[dd][n] += vr[dd] * p;
          }
        }
      }
      for (int64_t dd = 0; dd < dn; ++dd) {
        for (int n = 0; n < NR; ++n) Ot[(d0 + dd) * NR + n] = acc[dd][n];
      }
    }
  }
  // out = O / l; a row that saw no key: 0.
  float inv[NR * kLanes];
  for (int n = 0; n < NR; ++n) {
    const vf li = l[n] > 0.0f ? 1.0f / l[n] : vf{};
    std::memcpy(inv + n * kLanes, &li, sizeof li);
  }
  const float* ot = reinterpret_cast<const float*>(Ot);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = (r0 + r) / G, hq = h * G + (r0 + r) % G;
    char* dst = P.out + b * P.os[0] + i * P.os[1] + hq * P.os[2];
    for (int64_t d = 0; d < D; ++d) {
      const float x = ot[(d * NR + r / kLanes) * kLanes + r % kLanes] * inv[r];
      bad[0] += x - x;
      store1(dst + d * P.os[3], x, P.dtype);
    }
  }
  return simd::hsum(bad) == 0.0f;
}

template <int NR>
LORAMIX_INLINE bool attend_d(const Problem& P, int64_t b, int64_t h, int64_t r0, int64_t nr,
                             float* ws) {
  switch (P.D) {  // the common head dims get fully unrolled column loops
    case 64:
      return attend<NR, 64>(P, b, h, r0, nr, ws);
    case 128:
      return attend<NR, 128>(P, b, h, r0, nr, ws);
    default:
      return attend<NR, 0>(P, b, h, r0, nr, ws);
  }
}

LORAMIX_SIMD_CLONES bool attend_task(const Problem& P, int64_t b, int64_t h, int64_t r0,
                                     int64_t nr, float* ws) {
  return nr > kLanes ? attend_d<2>(P, b, h, r0, nr, ws) : attend_d<1>(P, b, h, r0, nr, ws);
}

// Every task of the call, over the intra-op threads. False when some task saw a non-finite value.
bool run_problem(const Problem& P, int64_t B) {
  const int64_t R = P.N * P.G, tile = R > kLanes ? 2 * kLanes : kLanes;
  const int64_t tiles = (R + tile - 1) / tile, tasks = B * P.Hkv * tiles;
  std::atomic<bool> ok{true};
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread scratch, reused from call to call (no allocation, no page faults per call).
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>(scratch_floats(P.D) + kLanes);
    if (scratch.size() < need) scratch.resize(need);
    float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) &
                                         ~uintptr_t{63});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / tiles, r0 = (t % tiles) * tile;
      if (!attend_task(P, bh / P.Hkv, bh % P.Hkv, r0, std::min(tile, R - r0), ws)) ok = false;
    }
  });
  return ok;
}

int64_t index_at(const at::Tensor& t, const char* p, int64_t i, int64_t j = 0) {
  const int64_t off = i * t.stride(0) + (t.dim() > 1 ? j * t.stride(1) : 0);
  return t.scalar_type() == at::kLong ? reinterpret_cast<const int64_t*>(p)[off]
                                      : static_cast<int64_t>(reinterpret_cast<const int32_t*>(p)[off]);
}

// Status of the fast path: the output is the answer; or the Python kernel must run instead; or
// (with `check`) a value the op's checks reject -- the Python op then names it.
constexpr int64_t kOk = 0, kFallback = 1, kInvalid = 2;

// The metadata rules of tree_attention (ops/tree.py, validate_tree_attention; sm_scale is checked
// by the callers): ranks, dtypes, shapes and devices.
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
    if (t->device() != q.device() || t->layout() != at::kStrided) return false;
  }
  return true;
}

std::tuple<at::Tensor, int64_t> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache,
                                                   const at::Tensor& block_table,
                                                   const at::Tensor& seq_lens,
                                                   const at::Tensor& tree_mask, double scale,
                                                   bool check, bool check_meta) {
  if (check_meta && !metadata_ok(q, k_cache, v_cache, block_table, seq_lens, tree_mask)) {
    return {at::empty({0}, q.options()), kInvalid};
  }
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t cap = block_table.size(1) * bs;
  at::Tensor out = at::empty({B, N, Hq, D}, q.options());
  const char* seq = static_cast<const char*>(seq_lens.data_ptr());
  const char* table = static_cast<const char*>(block_table.data_ptr());
  if (check) {  // the op's value checks (ops/tree.py, _check_tree_attention_values), in one walk
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
  std::vector<int64_t> base(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = index_at(seq_lens, seq, b);
    if (S < N || S > cap) return {out, kFallback};  // (compared before subtracting: no overflow)
    base[b] = S - N;
  }
  Problem P{};
  const int64_t es = q.element_size();
  P.q = static_cast<const char*>(q.data_ptr());
  P.k = static_cast<const char*>(k_cache.data_ptr());
  P.v = static_cast<const char*>(v_cache.data_ptr());
  P.out = static_cast<char*>(out.data_ptr());
  for (int d = 0; d < 4; ++d) {
    P.qs[d] = q.stride(d) * es;
    P.ks[d] = k_cache.stride(d) * es;
    P.vs[d] = v_cache.stride(d) * es;
    P.os[d] = out.stride(d) * es;
  }
  P.table = table;
  P.ts[0] = block_table.stride(0);
  P.ts[1] = block_table.stride(1);
  P.table64 = block_table.scalar_type() == at::kLong;
  P.mask = tree_mask.data_ptr<int32_t>();
  for (int d = 0; d < 3; ++d) P.ms[d] = tree_mask.stride(d);
  P.N = N;
  P.G = Hq / Hkv;
  P.Hkv = Hkv;
  P.D = D;
  P.bs = bs;
  P.nb = nb;
  P.base = base.data();
  P.scale = static_cast<float>(scale * 1.4426950408889634);  // log2(e): exp2 in the softmax
  P.dtype = q.scalar_type() == at::kBFloat16 ? 1 : q.scalar_type() == at::kHalf ? 2 : 0;
  P.es = es;
  return {out, run_problem(P, B) ? kOk : kFallback};
}

using TreeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           std::optional<double>);

// The direct kernel of loramix::tree_attention (csrc/direct.h): the checks above with every value
// check on, then the kernel; a call it does not answer (an argument to reject or to clamp, a
// non-finite value) goes to the Python kernel, which names the argument or runs its careful path.
at::Tensor tree_attention_direct(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_table,
                                 const at::Tensor& seq_lens, const at::Tensor& tree_mask,
                                 std::optional<double> sm_scale) {
  if (!direct::delegating().load(std::memory_order_relaxed) && direct::plain(q, 4) &&
      (!sm_scale.has_value() || std::isfinite(*sm_scale))) {
    const double scale = sm_scale.has_value() ? *sm_scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
    auto [out, status] = tree_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, tree_mask,
                                            scale, true, true);
    if (status == kOk) return out;
  }
  static const auto python = direct::python_kernel<TreeSig>("tree_attention");
  return direct::delegate(python, q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale);
}

const direct::Add kDirect("tree_attention", [](torch::Library& m) {
  m.impl("tree_attention", &tree_attention_direct);
});

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_tree_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor tree_mask, float scale, bool check, bool check_meta) -> "
        "(Tensor out, int status)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_tree_attention_cpu", &tree_attention_cpu);
}

}  // namespace loramix

#endif  // defined(__GNUC__)
