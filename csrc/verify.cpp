// Native CPU kernels for multi-token acceptance: the private ops loramix::_verify_greedy_cpu and
// loramix::_verify_sampling_cpu, with the argument lists of the public verify_greedy /
// verify_sampling schemas.
//
// Registration follows pytorch/extension-cpp: the schemas are defined with
// TORCH_LIBRARY_FRAGMENT (the loramix namespace is also a fragment in Python,
// loramix_kernels/ops/_registry.py) and the CPU kernels attached with TORCH_LIBRARY_IMPL. There is
// no pybind11 module: PyInit__C below only makes `import loramix_kernels._C` load this library,
// whose static initialisers register the ops.
//
// The per-request tree walks are sequential and data dependent, which vectorised torch can only
// express as N masked steps over the whole batch; here each request walks its own tree (one
// at::parallel_for over the batch). The algorithm and the random stream are the ones specified in
// loramix_kernels/reference/verify.py (Philox4x32-10 counters, uniform conversions, the scalar
// residual state (c, S), the exponential race), so this path, the reference and the Triton kernel
// agree on the same (seed, offset) up to rare fp32 rounding ties.
//
// Inputs are read in place: int32 or int64 indices and fp16 / bf16 / fp32 probabilities, with any
// strides (no contiguous / dtype copies). The Python op validates the arguments once before
// calling here (loramix_kernels/ops/verify.py); these kernels check only what memory safety needs
// and sanitise values the way the Triton kernels do (a parent outside [0, i) is padding, a token
// outside [0, V) is never accepted and never an address), comparing in int64 (never narrowing).

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

extern "C" {
// `import loramix_kernels._C` needs a module init function; the module itself is empty (the ops
// are registered by the static initialisers of TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace loramix {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
// Set in the race's counter word c0 (acceptance counters are node indices, below 2^31).
constexpr uint32_t kRaceCounterBit = 0x80000000u;
// Acceptance uniform U = (r >> 8) * 2^-24: the top 24 bits of a Philox word; every multiple of
// 2^-24 in [0, 1) is exact in fp32 (24-bit significand), so U < 1 with no rounding.
constexpr float kAcceptUlp = 5.9604644775390625e-08f;  // 2^-24
// Race uniform U = ((r >> 9) + 0.5) * 2^-23: the top 23 bits plus half a step, exact in fp32 and
// strictly inside (0, 1), so E = -log(U) is finite and > 0.
constexpr float kRaceUlp = 1.1920928955078125e-07f;  // 2^-23

// at::parallel_for grain sizes: the fewest requests one task handles, so that a task's work
// (tens of microseconds) stays well above the per-task scheduling cost (~1-5 us).
// Greedy: a request is a few hundred integer compares (~0.1-0.5 us), so 256 requests per task.
constexpr int64_t kGreedyGrain = 256;
// Sampling: a request's cost is dominated by its final race over V entries (one Philox call per
// four entries, one log per entry: ~5 ns per entry), so a task gets ~16k entries' worth of
// requests (16384 / V of them, at least one: ~80 us).
constexpr int64_t kSamplingGrainEntries = 16384;

struct Words4 {
  uint32_t w[4];
};

inline Words4 philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2,
                            uint32_t c3) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// The Philox key and counter words of (seed, offset), both taken mod 2^64 (reference/verify.py's
// rng_words): key = seed, (c2, c3) = offset (high, low word).
struct Rng {
  uint32_t k0, k1, c2, c3;

  Rng(int64_t seed, int64_t offset) {
    const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
    k0 = static_cast<uint32_t>(s);
    k1 = static_cast<uint32_t>(s >> 32);
    c2 = static_cast<uint32_t>(o >> 32);
    c3 = static_cast<uint32_t>(o);
  }

  // U in [0, 1) for the acceptance test of child `node` of request `b`.
  float accept(int64_t b, int64_t node) const {
    const uint32_t r = philox4x32_10(k0, k1, static_cast<uint32_t>(node), static_cast<uint32_t>(b),
                                     c2, c3).w[0];
    return static_cast<float>(r >> 8) * kAcceptUlp;
  }
};

inline float race_exponential(uint32_t r) {
  const float u = (static_cast<float>(r >> 9) + 0.5f) * kRaceUlp;
  return -std::log(u);
}

// A 2-D int32 / int64 tensor read in place: element (b, i) widened to int64.
struct IndexRows {
  const void* data;
  bool wide;
  int64_t sb, si;

  explicit IndexRows(const at::Tensor& t)
      : data(t.data_ptr()), wide(t.scalar_type() == at::kLong), sb(t.stride(0)), si(t.stride(1)) {}

  int64_t operator()(int64_t b, int64_t i) const {
    const int64_t k = b * sb + i * si;
    return wide ? static_cast<const int64_t*>(data)[k]
                : static_cast<int64_t>(static_cast<const int32_t*>(data)[k]);
  }
};

void check_index_tensor(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must have ", dim, " dimensions");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", arg,
              " must be int32 or int64");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor");
}

// The walk's outputs: accept_index [B, N] int32 (-1 filled), accept_len [B] int32,
// next_token [B] int64, all contiguous (the fake kernels allocate the same).
std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_outputs(const at::Tensor& like, int64_t B,
                                                            int64_t N) {
  return {at::full({B, N}, -1, like.options().dtype(at::kInt)),
          at::zeros({B}, like.options().dtype(at::kInt)),
          at::zeros({B}, like.options().dtype(at::kLong))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& tokens,
                                                                 const at::Tensor& parents,
                                                                 const at::Tensor& target_ids) {
  constexpr const char* op = "_verify_greedy_cpu";
  check_index_tensor(op, "tokens", tokens, 2);
  check_index_tensor(op, "parents", parents, 2);
  check_index_tensor(op, "target_ids", target_ids, 2);
  TORCH_CHECK(parents.sizes() == tokens.sizes() && target_ids.sizes() == tokens.sizes(), op,
              ": tokens, parents, target_ids must share shape [B, N]");
  const int64_t B = tokens.size(0), N = tokens.size(1);
  auto [acc, acc_len, next] = alloc_outputs(tokens, B, N);
  if (N == 0 || B == 0) return {acc, acc_len, next};
  const IndexRows tok(tokens), par(parents), tgt(target_ids);
  int32_t* acc_p = acc.data_ptr<int32_t>();
  int32_t* len_p = acc_len.data_ptr<int32_t>();
  int64_t* next_p = next.data_ptr<int64_t>();
  at::parallel_for(0, B, kGreedyGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int32_t* ac = acc_p + b * N;
      int64_t u = 0, n = 0;
      ac[0] = 0;
      for (;;) {
        const int64_t want = tgt(b, u);
        int64_t child = -1;
        for (int64_t i = u + 1; i < N; ++i) {
          // par(b, i) == u with u in [0, i) is exactly "a sanitised parent equal to u"
          if (par(b, i) == u && tok(b, i) == want) {
            child = i;
            break;
          }
        }
        if (child < 0) break;
        ac[++n] = static_cast<int32_t>(child);
        u = child;
      }
      len_p[b] = static_cast<int32_t>(n);
      next_p[b] = tgt(b, u);
    }
  });
  return {acc, acc_len, next};
}

namespace {

// The sampling walk for one probability dtype pair (PT for target_probs, QT for draft_probs).
template <typename PT, typename QT>
void sampling_walk(const IndexRows& tok_rows, const IndexRows& par_rows, const at::Tensor& p,
                   const QT* Q, const int64_t* q_strides, const Rng& rng, int32_t* acc_p,
                   int32_t* len_p, int64_t* next_p) {
  const int64_t B = p.size(0), N = p.size(1), V = p.size(2);
  const PT* P = p.data_ptr<PT>();
  const int64_t psb = p.stride(0), psn = p.stride(1), psv = p.stride(2);
  const bool has_q = Q != nullptr;
  const int64_t qsb = has_q ? q_strides[0] : 0, qsn = has_q ? q_strides[1] : 0,
                qsv = has_q ? q_strides[2] : 0;
  const int64_t grain = std::max<int64_t>(1, kSamplingGrainEntries / std::max<int64_t>(V, 1));

  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> removed(has_q ? 0 : V, 0);
    for (int64_t b = lo; b < hi; ++b) {
      auto parent = [&](int64_t i) -> int64_t {  // sanitised: outside [0, i) is padding
        const int64_t v = par_rows(b, i);
        return (v >= 0 && v < i) ? v : -1;
      };
      auto token = [&](int64_t i) -> int64_t {  // outside [0, V): never accepted, never read
        const int64_t t = tok_rows(b, i);
        return (t >= 0 && t < V) ? t : -1;
      };
      const PT* pb = P + b * psb;
      const QT* qb = has_q ? Q + b * qsb : nullptr;
      auto p_at = [&](int64_t u, int64_t v) { return static_cast<float>(pb[u * psn + v * psv]); };
      auto q_at = [&](int64_t u, int64_t v) { return static_cast<float>(qb[u * qsn + v * qsv]); };
      int32_t* ac = acc_p + b * N;
      int64_t u = 0, j = 0, n = 0;
      float c = 0.f, S = 1.f;
      ac[0] = 0;
      for (;;) {
        int64_t nxt = -1;
        for (int64_t i = j + 1; i < N; ++i) {
          if (parent(i) == u) {
            nxt = i;
            break;
          }
        }
        if (nxt < 0) break;
        const int64_t x = token(nxt);
        const float px = x >= 0 ? p_at(u, x) : 0.f;
        const float U = rng.accept(b, nxt);
        bool ok;
        float w;
        if (has_q) {
          const float qx = x >= 0 ? q_at(u, x) : 0.f;
          const float cq = c * qx;
          w = std::max(px - cq, 0.f);
          ok = x >= 0 && (U * qx) * S < w;
        } else {
          bool dup = false;
          for (int64_t i = u + 1; i < nxt && !dup; ++i) dup = parent(i) == u && token(i) == x;
          w = dup ? 0.f : px;
          ok = x >= 0 && U * S < w;
        }
        j = nxt;
        if (ok) {
          ac[++n] = static_cast<int32_t>(nxt);
          u = nxt;
          c = 0.f;
          S = 1.f;
        } else if (has_q) {
          const float c_new = c + S;
          bool more = false;
          for (int64_t i = nxt + 1; i < N && !more; ++i) more = parent(i) == u;
          if (more) {
            double s = 0.0;
            for (int64_t v = 0; v < V; ++v) {
              const float cq = c_new * q_at(u, v);
              s += std::max(p_at(u, v) - cq, 0.f);
            }
            S = static_cast<float>(s);
          }
          c = c_new;
        } else {
          S = std::max(S - w, 0.f);
        }
      }
      // Final race at u (correction from the residual, or the bonus token at a leaf).
      if (!has_q) {
        for (int64_t i = u + 1; i < N; ++i)
          if (parent(i) == u && token(i) >= 0) removed[token(i)] = 1;
      }
      float best = -1.f, best_p = -1.f;
      int64_t best_i = 0, best_pi = 0;
      Words4 r{};
      for (int64_t v = 0; v < V; ++v) {
        if ((v & 3) == 0)
          r = philox4x32_10(rng.k0, rng.k1, kRaceCounterBit | static_cast<uint32_t>(v >> 2),
                            static_cast<uint32_t>(b), rng.c2, rng.c3);
        const float e = race_exponential(r.w[v & 3]);
        const float pv = p_at(u, v);
        float w;
        if (has_q) {
          const float cq = c * q_at(u, v);
          w = std::max(pv - cq, 0.f);
        } else {
          w = removed[v] ? 0.f : pv;
        }
        const float key = w / e, kp = pv / e;
        if (key > best) {
          best = key;
          best_i = v;
        }
        if (kp > best_p) {
          best_p = kp;
          best_pi = v;
        }
      }
      if (!has_q) {
        for (int64_t i = u + 1; i < N; ++i)
          if (parent(i) == u && token(i) >= 0) removed[token(i)] = 0;
      }
      len_p[b] = static_cast<int32_t>(n);
      next_p[b] = best > 0.f ? best_i : best_pi;
    }
  });
}

// Calls f(PT{}) for the probability dtypes the ops accept.
template <typename F>
void dispatch_prob(const char* op, const char* arg, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& draft_probs, int64_t seed, int64_t offset) {
  constexpr const char* op = "_verify_sampling_cpu";
  check_index_tensor(op, "tokens", tokens, 2);
  check_index_tensor(op, "parents", parents, 2);
  TORCH_CHECK(parents.sizes() == tokens.sizes(), op, ": parents must have the shape of tokens");
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == tokens.size(0) &&
                  target_probs.size(1) == tokens.size(1) && target_probs.device().is_cpu(),
              op, ": target_probs must be a CPU tensor of shape [B, N, V]");
  const bool has_q = draft_probs.has_value();
  if (has_q)
    TORCH_CHECK(draft_probs->sizes() == target_probs.sizes() && draft_probs->device().is_cpu(), op,
                ": draft_probs must be a CPU tensor shaped like target_probs");
  const int64_t B = tokens.size(0), N = tokens.size(1), V = target_probs.size(2);
  TORCH_CHECK(V > 0, op, ": target_probs has an empty vocabulary");
  auto [acc, acc_len, next] = alloc_outputs(tokens, B, N);
  if (N == 0 || B == 0) return {acc, acc_len, next};
  const Rng rng(seed, offset);
  const IndexRows tok(tokens), par(parents);
  int32_t* acc_p = acc.data_ptr<int32_t>();
  int32_t* len_p = acc_len.data_ptr<int32_t>();
  int64_t* next_p = next.data_ptr<int64_t>();
  const at::Tensor& q = has_q ? *draft_probs : target_probs;  // its dtype only, when no draft
  const int64_t q_strides[3] = {q.stride(0), q.stride(1), q.stride(2)};
  dispatch_prob(op, "target_probs", target_probs.scalar_type(), [&](auto p_tag) {
    using PT = decltype(p_tag);
    dispatch_prob(op, "draft_probs", q.scalar_type(), [&](auto q_tag) {
      using QT = decltype(q_tag);
      const QT* Q = has_q ? q.data_ptr<QT>() : nullptr;
      sampling_walk<PT, QT>(tok, par, target_probs, Q, q_strides, rng, acc_p, len_p, next_p);
    });
  });
  return {acc, acc_len, next};
}

// Private schemas with the argument lists of the public ops (docs/API.md); the Python CPU kernels
// (loramix_kernels/ops/verify.py) call them after validating once.
TORCH_LIBRARY_FRAGMENT(loramix, m) {
  m.def("_verify_greedy_cpu(Tensor tokens, Tensor parents, Tensor target_ids)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("_verify_sampling_cpu(Tensor tokens, Tensor parents, Tensor target_probs, "
        "Tensor? draft_probs, int seed, int offset) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loramix, CPU, m) {
  m.impl("_verify_greedy_cpu", &verify_greedy_cpu);
  m.impl("_verify_sampling_cpu", &verify_sampling_cpu);
}

}  // namespace loramix
