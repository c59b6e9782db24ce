// Native CPU kernels for multi-token acceptance (verify_greedy, verify_sampling).
//
// The per-request tree walks are sequential and data dependent, which vectorised torch can only
// express as N masked steps over the whole batch; here each request walks its own tree (one
// at::parallel_for over the batch). The algorithm and the random stream are the ones specified in
// loramix_kernels/reference/verify.py (Philox4x32-10 counters, uniform conversions, the scalar
// residual state (c, S), the exponential race), so this path and the vectorised reference agree
// on the same (seed, offset) up to rare fp32 rounding ties.
//
// The Python wrapper (loramix_kernels/ops/verify.py) validates every argument first and passes
// contiguous int64 index tensors and fp32 probabilities; the kernels still sanitise parents and
// tokens themselves (same rule as the Triton kernels) so no input can index out of bounds.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

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

struct Rng {
  uint32_t k0, k1, c2_accept, c2_race, c3;

  // U in [0, 1) for the acceptance test of child `node` of request `b`.
  float accept(int64_t b, int64_t node) const {
    const uint32_t r = philox4x32_10(k0, k1, static_cast<uint32_t>(node), static_cast<uint32_t>(b),
                                     c2_accept, c3).w[0];
    return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;  // 2^-24
  }
};

inline float race_exponential(uint32_t r) {
  const float u = (static_cast<float>(r >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
  return -std::log(u);
}

inline int64_t sanitized_parent(const int64_t* par, int64_t i) {
  const int64_t p = par[i];
  return (p >= 0 && p < i) ? p : -1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& tokens,
                                                                 const at::Tensor& parents,
                                                                 const at::Tensor& target_ids) {
  TORCH_CHECK(tokens.dtype() == at::kLong && parents.dtype() == at::kLong &&
                  target_ids.dtype() == at::kLong,
              "verify_greedy_cpu: int64 inputs expected");
  TORCH_CHECK(tokens.dim() == 2 && parents.sizes() == tokens.sizes() &&
                  target_ids.sizes() == tokens.sizes(),
              "verify_greedy_cpu: tokens, parents, target_ids must share shape [B, N]");
  const auto tok_c = tokens.contiguous(), par_c = parents.contiguous(), tgt_c = target_ids.contiguous();
  const int64_t B = tok_c.size(0), N = tok_c.size(1);
  auto acc = at::full({B, N}, -1, tokens.options().dtype(at::kInt));
  auto acc_len = at::zeros({B}, tokens.options().dtype(at::kInt));
  auto next = at::zeros({B}, tokens.options().dtype(at::kLong));
  const int64_t* tok = tok_c.data_ptr<int64_t>();
  const int64_t* par = par_c.data_ptr<int64_t>();
  const int64_t* tgt = tgt_c.data_ptr<int64_t>();
  int32_t* acc_p = acc.data_ptr<int32_t>();
  int32_t* len_p = acc_len.data_ptr<int32_t>();
  int64_t* next_p = next.data_ptr<int64_t>();
  if (N == 0) return {acc, acc_len, next};
  at::parallel_for(0, B, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t* tk = tok + b * N;
      const int64_t* pr = par + b * N;
      const int64_t* tg = tgt + b * N;
      int32_t* ac = acc_p + b * N;
      int64_t u = 0, n = 0;
      ac[0] = 0;
      for (;;) {
        int64_t child = -1;
        for (int64_t i = u + 1; i < N; ++i) {
          if (sanitized_parent(pr, i) == u && tk[i] == tg[u]) {
            child = i;
            break;
          }
        }
        if (child < 0) break;
        ac[++n] = static_cast<int32_t>(child);
        u = child;
      }
      len_p[b] = static_cast<int32_t>(n);
      next_p[b] = tg[u];
    }
  });
  return {acc, acc_len, next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& draft_probs, int64_t key0, int64_t key1, int64_t c2_accept,
    int64_t c2_race, int64_t c3) {
  TORCH_CHECK(tokens.dtype() == at::kLong && parents.dtype() == at::kLong,
              "verify_sampling_cpu: int64 tokens / parents expected");
  TORCH_CHECK(target_probs.dtype() == at::kFloat, "verify_sampling_cpu: fp32 target_probs expected");
  TORCH_CHECK(tokens.dim() == 2 && parents.sizes() == tokens.sizes() && target_probs.dim() == 3 &&
                  target_probs.size(0) == tokens.size(0) && target_probs.size(1) == tokens.size(1),
              "verify_sampling_cpu: shapes [B, N], [B, N], [B, N, V] expected");
  const bool has_q = draft_probs.has_value();
  at::Tensor q_c;
  if (has_q) {
    TORCH_CHECK(draft_probs->dtype() == at::kFloat && draft_probs->sizes() == target_probs.sizes(),
                "verify_sampling_cpu: fp32 draft_probs shaped like target_probs expected");
    q_c = draft_probs->contiguous();
  }
  const auto tok_c = tokens.contiguous(), par_c = parents.contiguous(), p_c = target_probs.contiguous();
  const int64_t B = tok_c.size(0), N = tok_c.size(1), V = p_c.size(2);
  TORCH_CHECK(V > 0, "verify_sampling_cpu: empty vocabulary");
  auto acc = at::full({B, N}, -1, tokens.options().dtype(at::kInt));
  auto acc_len = at::zeros({B}, tokens.options().dtype(at::kInt));
  auto next = at::zeros({B}, tokens.options().dtype(at::kLong));
  if (N == 0) return {acc, acc_len, next};
  const Rng rng{static_cast<uint32_t>(key0), static_cast<uint32_t>(key1),
                static_cast<uint32_t>(c2_accept), static_cast<uint32_t>(c2_race),
                static_cast<uint32_t>(c3)};
  const int64_t* tok = tok_c.data_ptr<int64_t>();
  const int64_t* par = par_c.data_ptr<int64_t>();
  const float* P = p_c.data_ptr<float>();
  const float* Q = has_q ? q_c.data_ptr<float>() : nullptr;
  int32_t* acc_p = acc.data_ptr<int32_t>();
  int32_t* len_p = acc_len.data_ptr<int32_t>();
  int64_t* next_p = next.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));

  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> removed(has_q ? 0 : V, 0);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t* tk = tok + b * N;
      const int64_t* pr = par + b * N;
      const float* pb = P + b * N * V;
      const float* qb = has_q ? Q + b * N * V : nullptr;
      int32_t* ac = acc_p + b * N;
      auto token = [&](int64_t i) -> int64_t {
        const int64_t t = tk[i];
        return (t >= 0 && t < V) ? t : -1;
      };
      int64_t u = 0, j = 0, n = 0;
      float c = 0.f, S = 1.f;
      ac[0] = 0;
      for (;;) {
        int64_t nxt = -1;
        for (int64_t i = j + 1; i < N; ++i) {
          if (sanitized_parent(pr, i) == u) {
            nxt = i;
            break;
          }
        }
        if (nxt < 0) break;
        const int64_t x = token(nxt);
        const float* pu = pb + u * V;
        const float px = x >= 0 ? pu[x] : 0.f;
        const float U = rng.accept(b, nxt);
        bool ok;
        float w;
        if (has_q) {
          const float qx = x >= 0 ? qb[u * V + x] : 0.f;
          const float cq = c * qx;
          w = std::max(px - cq, 0.f);
          ok = x >= 0 && (U * qx) * S < w;
        } else {
          bool dup = false;
          for (int64_t i = u + 1; i < nxt && !dup; ++i)
            dup = sanitized_parent(pr, i) == u && token(i) == x;
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
          for (int64_t i = nxt + 1; i < N && !more; ++i) more = sanitized_parent(pr, i) == u;
          if (more) {
            const float* qu = qb + u * V;
            double s = 0.0;
            for (int64_t v = 0; v < V; ++v) {
              const float cq = c_new * qu[v];
              s += std::max(pu[v] - cq, 0.f);
            }
            S = static_cast<float>(s);
          }
          c = c_new;
        } else {
          S = std::max(S - w, 0.f);
        }
      }
      // Final race at u (correction from the residual, or the bonus token at a leaf).
      const float* pu = pb + u * V;
      const float* qu = has_q ? qb + u * V : nullptr;
      if (!has_q) {
        for (int64_t i = u + 1; i < N; ++i)
          if (sanitized_parent(pr, i) == u && token(i) >= 0) removed[token(i)] = 1;
      }
      float best = -1.f, best_p = -1.f;
      int64_t best_i = 0, best_pi = 0;
      Words4 r{};
      for (int64_t v = 0; v < V; ++v) {
        if ((v & 3) == 0)
          r = philox4x32_10(rng.k0, rng.k1, static_cast<uint32_t>(v >> 2), static_cast<uint32_t>(b),
                            rng.c2_race, rng.c3);
        const float e = race_exponential(r.w[v & 3]);
        const float p = pu[v];
        float w;
        if (has_q) {
          const float cq = c * qu[v];
          w = std::max(p - cq, 0.f);
        } else {
          w = removed[v] ? 0.f : p;
        }
        const float key = w / e, kp = p / e;
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
          if (sanitized_parent(pr, i) == u && token(i) >= 0) removed[token(i)] = 0;
      }
      len_p[b] = static_cast<int32_t>(n);
      next_p[b] = best > 0.f ? best_i : best_pi;
    }
  });
  return {acc, acc_len, next};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loramix_kernels native CPU kernels";
  m.def("verify_greedy_cpu", &verify_greedy_cpu, "greedy tree verification (CPU)",
        py::arg("tokens"), py::arg("parents"), py::arg("target_ids"));
  m.def("verify_sampling_cpu", &verify_sampling_cpu, "lossless tree verification (CPU)",
        py::arg("tokens"), py::arg("parents"), py::arg("target_probs"), py::arg("draft_probs"),
        py::arg("key0"), py::arg("key1"), py::arg("c2_accept"), py::arg("c2_race"), py::arg("c3"));
}
