"""Tests for verify_greedy, verify_sampling, match_branch.

Exact tests (greedy walk, edge cases, determinism, path equality between the C++, torch and Triton
paths) and statistical proofs of losslessness for verify_sampling.

Statistical design (why these tests can fail for a biased sampler, and what they assert)
---------------------------------------------------------------------------------------
The target is a Markov model: the distribution after a node depends on its depth and its token,
``P[d][prev]`` (rows with forced zeros); the draft is another such model ``Q`` (also with zeros),
and each request's draft tokens are drawn from it (children i.i.d. from ``Q`` of their parent) --
the premise of SpecInfer's losslessness. Without draft probabilities the proposals come from an
unrelated model ``R``, independent of the target's randomness. B copies of the setup form one
batch, each request its own independent Philox stream. Checks, all at a fixed seed:

1. exact: no emitted token ever has target probability 0 in its context;
2. per emitted position k, conditioned on the whole emitted prefix: a pooled chi-square of the
   counts against ``P[k-1][y_{k-1}]`` (bins with expected count < 5 merged), p-value floor 1e-6;
3. chains: the accepted length against the analytic law ``P(len = j) = a_0...a_{j-1} (1 - a_j)``,
   ``a_i = sum_x min(p_i, q_i)`` (without draft probs ``a_i = sum_x r_i(x) p_i(x)``), chi-square
   p-value floor 1e-6;
4. the full emitted sequence, completed to a fixed length L by sampling the rest from the exact
   target: a lossless sampler makes it an exact target sample, so (a) chi-square over all V^L
   cells, p-value floor 1e-6, and (b) total variation below mean + 6 std of the TV of exact
   samples of the same size (simulated null).

A floor of 1e-6 over the ~60 p-values of this file keeps the false-failure probability below
1e-4 for a correct sampler, while the deliberately biased sampler (accept with p/q but no
residual, :func:`no_residual_sampler`) gives p-values of 0 (test ``test_biased_sampler_is_caught``).
"""

import math

import pytest
import torch

from loramix_kernels import _backend, match_branch, verify_greedy, verify_sampling
from loramix_kernels.ops import verify as verify_ops
from loramix_kernels.reference.verify import (
    match_branch_ref,
    rng_words,
    sanitize_parents,
    verify_greedy_ref,
    verify_sampling_literal,
    verify_sampling_ref,
)

from tests.common import (HAS_CUDA, TRITON_DEVICE, TRITON_OK, backends, reference_path, requires_cuda,
                          requires_triton, strided, to_device, triton_path, value_checks_off)

P_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rand_tree(B, N, gen, pad_frac=0.15):
    """Random valid trees: parents[i] uniform in [0, i), some padding nodes (never parents)."""
    par = torch.full((B, N), -1, dtype=torch.long)
    pad = torch.rand(B, N, generator=gen) < pad_frac
    pad[:, 0] = False
    for i in range(1, N):
        cand = torch.randint(0, i, (B,), generator=gen)
        # re-draw onto the root when the drawn parent is padding
        cand = torch.where(pad.gather(1, cand[:, None])[:, 0], 0, cand)
        par[:, i] = torch.where(pad[:, i], -1, cand)
    return par


def greedy_walk_py(tokens, parents, target):
    """Hand-written per-request oracle of API.md's greedy rule."""
    B, N = tokens.shape
    acc = torch.full((B, N), -1, dtype=torch.int32)
    lens = torch.zeros(B, dtype=torch.int32)
    nxt = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        u, path = 0, [0]
        while True:
            kids = [c for c in range(1, N) if int(parents[b, c]) == u]
            match = [c for c in kids if int(tokens[b, c]) == int(target[b, u])]
            if not match:
                break
            u = match[0]
            path.append(u)
        acc[b, : len(path)] = torch.tensor(path, dtype=torch.int32)
        lens[b] = len(path) - 1
        nxt[b] = int(target[b, u])
    return acc, lens, nxt


def no_residual_sampler(tokens, parents, target_probs, draft_probs, seed):
    """The classic bug, for ``test_biased_sampler_is_caught``: each child in index order is
    accepted with probability ``min(1, p(x) / q(x))`` (without draft probabilities ``p(x)``), but
    after a rejection the next sibling and the final correction use the unmodified target ``p``
    instead of the residual. Written independently of the reference (torch's generator)."""
    g = torch.Generator().manual_seed(seed)
    B, N = tokens.shape
    par = sanitize_parents(parents)
    tok = tokens.long()
    idx = torch.arange(N)
    rows = torch.arange(B)
    acc = torch.full((B, N), -1, dtype=torch.int64)
    acc[:, 0] = 0
    u = torch.zeros(B, dtype=torch.int64)
    j = torch.zeros(B, dtype=torch.int64)  # children of u still to test are > j
    n = torch.zeros(B, dtype=torch.int64)
    for _ in range(N):
        nxt = torch.where((par == u[:, None]) & (idx > j[:, None]), idx, N).min(1).values
        has = nxt < N
        x = tok.gather(1, nxt.clamp(max=N - 1)[:, None])[:, 0]
        px = target_probs[rows, u, x].double()
        ratio = px if draft_probs is None else px / draft_probs[rows, u, x].double()
        ok = has & (torch.rand(B, generator=g, dtype=torch.float64) < ratio)
        n = n + ok.long()
        acc[rows[ok], n[ok]] = nxt[ok]
        u = torch.where(ok, nxt, u)
        j = torch.where(has, nxt, j)
    y = torch.multinomial(target_probs[rows, u].double(), 1, generator=g)[:, 0]
    return acc.to(torch.int32), n.to(torch.int32), y


def chi2_pooled(obs, exp):
    """Pooled chi-square over rows (contexts) of ``obs`` / ``exp`` [C, V] (float64).

    Per row, bins with expected count < 5 are merged into one 'rest' bin; a rest bin still below 5
    is merged into the row's largest bin. Returns (statistic, degrees of freedom).
    """
    obs, exp = obs.double(), exp.double()
    small = exp < 5
    big = ~small
    rest_o = (obs * small).sum(1)
    rest_e = (exp * small).sum(1)
    keep_rest = rest_e >= 5
    o, e = obs.clone(), exp.clone()
    o[small] = 0
    e[small] = 0
    # rest bin too small: add it to the largest bin of the row
    top = exp.argmax(1, keepdim=True)
    add = (~keep_rest)[:, None].double()
    o.scatter_add_(1, top, rest_o[:, None] * add)
    e.scatter_add_(1, top, rest_e[:, None] * add)
    ok = e > 0
    stat = (((o - e) ** 2) / torch.where(ok, e, 1.0) * ok).sum()
    stat = stat + (((rest_o - rest_e) ** 2) / torch.where(keep_rest, rest_e, 1.0) * keep_rest).sum()
    nbins = (big & (exp > 0)).sum(1) + keep_rest.long()
    nbins = torch.where(nbins == 0, (rest_e > 0).long(), nbins)
    df = int((nbins - 1).clamp_min(0).sum())
    return float(stat), df


def chi2_pvalue(stat, df):
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _sparse_rows(shape, V, gen, zero_frac=0.3):
    """Random probability rows with about ``zero_frac`` exact zeros (at least two nonzeros)."""
    w = torch.rand(*shape, V, generator=gen, dtype=torch.float64) ** 2
    z = torch.rand(*shape, V, generator=gen) < zero_frac
    keep = torch.rand(*shape, V, generator=gen).argsort(-1)[..., :2]
    z.scatter_(-1, keep, False)
    w = torch.where(z, 0.0, w)
    return w / w.sum(-1, keepdim=True)


class Setup:
    """A statistical scenario: the tree, the Markov tables, and a sampler of B requests."""

    def __init__(self, kind, draft, V, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.draft, self.V = kind, draft, V
        if kind == "chain":
            K = 2 if V > 8 else 3
            self.parents = torch.tensor([-1] + list(range(K)))
        else:  # root with 3 children, a padding node, depths up to 3, siblings at two levels
            self.parents = torch.tensor([-1, 0, 0, 0, 1, 1, -1, 4, 2])
        N = self.parents.numel()
        depth = [0] * N
        for i in range(1, N):
            if self.parents[i] >= 0:
                depth[i] = depth[self.parents[i]] + 1
        self.depth = torch.tensor(depth)
        self.L = max(depth) + 1  # emitted tokens at most
        D = self.L
        if kind == "chain":  # depth-only tables: positions independent, analytic length law
            self.P = _sparse_rows((D, 1), V, g).expand(D, V, V).contiguous()
            self.Q = _sparse_rows((D, 1), V, g).expand(D, V, V).contiguous()
            self.R = _sparse_rows((D, 1), V, g).expand(D, V, V).contiguous()
        else:
            self.P = _sparse_rows((D, V), V, g)
            self.Q = _sparse_rows((D, V), V, g)
            self.R = _sparse_rows((D, V), V, g)
        # Proposals half-way to the target: deep acceptance paths (every position is exercised),
        # while the tables keep their own zeros (P = 0 < Q: always rejected; Q = 0: never drawn).
        self.Q = 0.5 * (self.P + self.Q)
        self.R = 0.5 * (self.P + self.R)

    def batch(self, B, seed):
        """tokens, parents, target_probs, draft_probs (or None) for B independent requests."""
        g = torch.Generator().manual_seed(seed)
        N = self.parents.numel()
        tok = torch.zeros(B, N, dtype=torch.long)  # root token 0
        prop = self.Q if self.draft else self.R
        for i in range(1, N):
            u = int(self.parents[i])
            if u < 0:
                tok[:, i] = 0
                continue
            rows = prop[self.depth[u], tok[:, u]]
            tok[:, i] = torch.multinomial(rows.float(), 1, replacement=True, generator=g)[:, 0]
        d = self.depth.expand(B, N)
        p = self.P[d, tok].float()
        q = self.Q[d, tok].float() if self.draft else None
        return tok, self.parents.expand(B, N).contiguous(), p, q

    def length_law(self):
        """Analytic P(accept_len = j) for chains."""
        K = self.L - 1
        if self.draft:
            a = [float(torch.minimum(self.P[i, 0], self.Q[i, 0]).sum()) for i in range(K)]
        else:
            a = [float((self.R[i, 0] * self.P[i, 0]).sum()) for i in range(K)]
        law, run = [], 1.0
        for j in range(K):
            law.append(run * (1 - a[j]))
            run *= a[j]
        law.append(run)
        return torch.tensor(law, dtype=torch.float64)


def sequence_law(P, L):
    """Exact target law of the first L tokens as a flat [V^L] tensor (row-major in the tokens):
    law(prefix, y) = law(prefix) * P[k][last token of prefix](y)."""
    V = P.shape[-1]
    law = P[0][0].double()
    for k in range(1, L):
        last = torch.arange(law.numel()) % V
        law = (law[:, None] * P[k][last]).reshape(-1)
    return law


def emitted(tokens, acc, n, nxt):
    """[B, L] emitted sequences padded with -1 (accepted path tokens then next_token)."""
    B, N = tokens.shape
    L = N + 1
    idx = acc.long().clamp_min(0)
    path_tok = tokens.gather(1, idx)[:, 1:]  # tokens of path nodes 1..N-1
    j = torch.arange(N - 1)[None, :]
    seq = torch.full((B, L), -1, dtype=torch.long)
    seq[:, : N - 1] = torch.where(j < n[:, None].long(), path_tok, -1)
    seq.scatter_(1, n.long()[:, None], nxt[:, None])
    return seq


def check_lossless(setup, tokens, out, gen_seed=1234, want_fail=False):
    """Run checks 1, 2 (and 3 for chains) and 4 of the module docstring. Returns the p-values /
    TV numbers; asserts them unless ``want_fail`` (then the caller asserts a failure)."""
    acc, n, nxt = (t.cpu() for t in out)
    B = tokens.shape[0]
    V, L, P = setup.V, setup.L, setup.P
    seq = emitted(tokens.cpu(), acc, n, nxt)
    report = {}
    # 1 + 2: per-position conditional laws given the full prefix
    prev = torch.zeros(B, dtype=torch.long)  # y_0 = root token 0
    ctx = torch.zeros(B, dtype=torch.long)
    alive = torch.ones(B, dtype=torch.bool)
    for k in range(L):
        y = seq[:, k]
        alive = alive & (y >= 0)
        if not bool(alive.any()):
            break
        pk = P[k][prev]  # [B, V] target law of position k+1 given the prefix
        zero_hit = alive & (pk.gather(1, y.clamp_min(0)[:, None])[:, 0] == 0)
        if not want_fail:
            assert not bool(zero_hit.any()), f"position {k + 1}: emitted a zero-probability token"
        C = V ** k
        cell = ctx[alive] * V + y[alive]
        obs = torch.bincount(cell, minlength=C * V).view(C, V).double()
        cnt = obs.sum(1)
        last = torch.arange(C) % V if k > 0 else torch.zeros(C, dtype=torch.long)
        exp = cnt[:, None] * P[k][last]
        stat, df = chi2_pooled(obs, exp)
        report[f"pos{k + 1}"] = chi2_pvalue(stat, df)
        ctx = ctx * V + y.clamp_min(0)
        prev = y.clamp_min(0)
    # 3: chain accepted-length law
    if setup.kind == "chain":
        law = setup.length_law()
        obs = torch.bincount(n.long(), minlength=L).double()[None]
        stat, df = chi2_pooled(obs, B * law[None])
        report["len"] = chi2_pvalue(stat, df)
    # 4: completed sequences against the exact target law
    g = torch.Generator().manual_seed(gen_seed)
    full = seq.clone()
    for k in range(1, L):
        need = full[:, k] < 0
        if bool(need.any()):
            rows = P[k][full[need, k - 1]]
            full[need, k] = torch.multinomial(rows.float(), 1, replacement=True, generator=g)[:, 0]
    code = torch.zeros(B, dtype=torch.long)
    for k in range(L):
        code = code * V + full[:, k]
    law = sequence_law(P, L)
    law = law.double()
    emp = torch.bincount(code, minlength=V ** L).double()
    stat, df = chi2_pooled(emp[None], B * law[None])
    report["seq_chi2"] = chi2_pvalue(stat, df)
    tv = 0.5 * float((emp / B - law).abs().sum())
    null = []
    for r in range(12):
        draws = torch.multinomial(law.float(), B, replacement=True, generator=g)
        null.append(0.5 * float((torch.bincount(draws, minlength=V ** L).double() / B - law).abs().sum()))
    null = torch.tensor(null)
    bound = float(null.mean() + 6 * null.std())
    report["tv"], report["tv_bound"] = tv, bound
    if not want_fail:
        for key, pv in report.items():
            if key.startswith("pos") or key in ("len", "seq_chi2"):
                assert pv >= P_FLOOR, f"{setup.kind} draft={setup.draft}: {key} p-value {pv:.3g} < {P_FLOOR}; {report}"
        assert tv <= bound, f"total variation {tv:.4f} above the null bound {bound:.4f}; {report}"
    return report


SETUPS = [("chain", True, 16), ("chain", False, 16), ("tree", True, 8), ("tree", False, 8)]


# --------------------------------------------------------------------------------------------------
# statistical tests
# --------------------------------------------------------------------------------------------------


def test_markov_law_helper():
    """The sequence law used by check 4 is the product of the conditionals (sanity of the test)."""
    s = Setup("tree", True, 8)
    # brute-force the law of one sequence
    P, y = s.P, [3, 1, 4, 2]
    want = float(P[0][0][y[0]] * P[1][y[0]][y[1]] * P[2][y[1]][y[2]] * P[3][y[2]][y[3]])
    law = sequence_law(P, s.L)
    code = ((y[0] * 8 + y[1]) * 8 + y[2]) * 8 + y[3]
    assert math.isclose(float(law[code]), want, rel_tol=1e-9)


@pytest.mark.parametrize("kind, draft, V", SETUPS)
def test_lossless_reference_200k(kind, draft, V):
    """The CPU path (C++ when built, else the vectorised reference), 200,000 samples per setup."""
    s = Setup(kind, draft, V, seed=11)
    tokens, parents, p, q = s.batch(200_000, seed=5)
    with reference_path():
        out = verify_sampling(tokens, parents, p, q, seed=2024, offset=7)
    check_lossless(s, tokens, out)


def test_lossless_torch_reference_function():
    """The vectorised torch reference itself (not the C++ path), tree with draft probs."""
    s = Setup("tree", True, 8, seed=3)
    tokens, parents, p, q = s.batch(200_000, seed=8)
    check_lossless(s, tokens, verify_sampling_ref(tokens, parents, p, q, 99, 0))


def test_lossless_literal_oracle():
    """The harness accepts the literal no-draft rule (sample y ~ p, match a child) -- an
    independently written sampler -- which ties our sequential formulation to API.md's wording."""
    s = Setup("tree", False, 8, seed=4)
    tokens, parents, p, _ = s.batch(200_000, seed=9)
    check_lossless(s, tokens, verify_sampling_literal(tokens, parents, p, seed=3))


@pytest.mark.parametrize("draft", [True, False])
def test_biased_sampler_is_caught(draft):
    """Accepting with p/q (or p) but drawing corrections from p instead of the residual is biased;
    the statistics must reject it (shows the tests above can fail)."""
    s = Setup("tree", draft, 8, seed=11)
    tokens, parents, p, q = s.batch(200_000, seed=5)
    out = no_residual_sampler(tokens, parents, p, q, 2024)
    rep = check_lossless(s, tokens, out, want_fail=True)
    assert min(v for k, v in rep.items() if k.startswith("pos")) < P_FLOOR, rep
    assert rep["seq_chi2"] < P_FLOOR, rep


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton path")
@pytest.mark.parametrize("draft", [True, False])
def test_lossless_triton_small(draft):
    """The Triton kernel (interpreter on CPU: 1,000 samples, it runs one program per request)."""
    s = Setup("tree", draft, 8, seed=11)
    B = 1000 if not HAS_CUDA else 200_000
    tokens, parents, p, q = s.batch(B, seed=6)
    dev = TRITON_DEVICE
    with triton_path():
        out = verify_sampling(tokens.to(dev), parents.to(dev), p.to(dev),
                              None if q is None else q.to(dev), seed=77, offset=1)
    check_lossless(s, tokens, out)


@requires_cuda
@pytest.mark.parametrize("kind, draft, V", SETUPS)
def test_lossless_triton_gpu_1m(kind, draft, V):
    s = Setup(kind, draft, V, seed=11)
    tokens, parents, p, q = s.batch(1_000_000, seed=5)
    with triton_path():
        out = verify_sampling(tokens.cuda(), parents.cuda(), p.cuda(), None if q is None else q.cuda(),
                              seed=31337, offset=3)
    check_lossless(s, tokens, out)


# --------------------------------------------------------------------------------------------------
# exact tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_greedy_random_trees(name, device, ctx, idx_dtype):
    g = torch.Generator().manual_seed(1)
    B, N, V = 64, 13, 3  # tiny vocabulary: many matches, deep paths, duplicate siblings
    par = rand_tree(B, N, g)
    tok = torch.randint(0, V, (B, N), generator=g)
    tgt = torch.randint(0, V, (B, N), generator=g)
    want = greedy_walk_py(tok, par, tgt)
    with ctx():
        got = verify_greedy(tok.to(device, idx_dtype), par.to(device, idx_dtype), tgt.to(device, idx_dtype))
    assert [t.dtype for t in got] == [torch.int32, torch.int32, torch.int64]
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert int(want[1].max()) >= 3  # the walks do go deep


def test_greedy_reference_matches_walk():
    g = torch.Generator().manual_seed(2)
    par = rand_tree(200, 10, g)
    tok, tgt = torch.randint(0, 2, (200, 10), generator=g), torch.randint(0, 2, (200, 10), generator=g)
    for a, b in zip(verify_greedy_ref(tok, par, tgt), greedy_walk_py(tok, par, tgt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_greedy_edge_cases(name, device, ctx):
    N = 5
    chain = torch.tensor([[-1, 0, 1, 2, 3]])
    tgt = torch.tensor([[10, 11, 12, 13, 14]])
    with ctx():
        # all accepted: the bonus token is the target after the leaf
        acc, n, nxt = verify_greedy(torch.tensor([[0, 10, 11, 12, 13]]).to(device), chain.to(device), tgt.to(device))
        assert acc.tolist() == [[0, 1, 2, 3, 4]] and n.tolist() == [4] and nxt.tolist() == [14]
        # all rejected: the correction is the target after the root
        acc, n, nxt = verify_greedy(torch.tensor([[0, 9, 11, 12, 13]]).to(device), chain.to(device), tgt.to(device))
        assert acc.tolist() == [[0, -1, -1, -1, -1]] and n.tolist() == [0] and nxt.tolist() == [10]
        # a padding node carrying the right token is never accepted; lowest-index child wins
        par = torch.tensor([[-1, -1, 0, 0, 2]])
        tok = torch.tensor([[0, 10, 10, 10, 12]])
        acc, n, nxt = verify_greedy(tok.to(device), par.to(device), tgt.to(device))
        assert acc.tolist() == [[0, 2, 4, -1, -1]] and n.tolist() == [2] and nxt.tolist() == [14]
        # N = 1 (root only) and B = 0
        acc, n, nxt = verify_greedy(torch.zeros(2, 1, dtype=torch.long).to(device),
                                    torch.full((2, 1), -1).to(device), torch.tensor([[3], [4]]).to(device))
        assert acc.tolist() == [[0], [0]] and n.tolist() == [0, 0] and nxt.tolist() == [3, 4]
        acc, n, nxt = verify_greedy(torch.zeros(0, N, dtype=torch.long).to(device),
                                    torch.zeros(0, N, dtype=torch.long).to(device),
                                    torch.zeros(0, N, dtype=torch.long).to(device))
        assert acc.shape == (0, N) and n.shape == (0,)


def _random_sampling_inputs(B, N, V, draft, seed, gen_tree=True):
    g = torch.Generator().manual_seed(seed)
    par = rand_tree(B, N, g)
    p = _sparse_rows((B, N), V, g).float()
    q = _sparse_rows((B, N), V, g).float() if draft else None
    tok = torch.zeros(B, N, dtype=torch.long)
    rows = (q if draft else p).gather(1, par.clamp_min(0)[:, :, None].expand(B, N, V))
    tok = torch.multinomial(rows.reshape(-1, V), 1, generator=g).view(B, N)
    tok[:, 0] = 0
    return tok, par, p, q


@pytest.mark.parametrize("draft", [True, False])
def test_cpp_matches_torch_reference(draft):
    """The C++ walk and the vectorised torch reference share the algorithm and Philox stream."""
    if not verify_ops.native_available():
        pytest.skip("C++ extension not built")
    tok, par, p, q = _random_sampling_inputs(3000, 11, 7, draft, seed=3)
    with reference_path():
        got = verify_sampling(tok, par, p, q, seed=5, offset=9)
    want = verify_sampling_ref(tok, par, p, q, 5, 9)
    # identical up to fp32 rounding ties in the residual sums (none expected at this size)
    same = (got[0] == want[0]).all(1) & (got[1] == want[1]) & (got[2] == want[2])
    assert float(same.float().mean()) >= 0.999
    assert int(got[1].max()) >= 2
    with reference_path():
        gg = verify_greedy(tok, par, tok.roll(1, 1))
        for a, b in zip(gg, verify_greedy_ref(tok, par, tok.roll(1, 1))):
            assert torch.equal(a, b)


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton path")
@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize("V", [5, 70])
def test_triton_matches_reference(draft, V):
    """Triton draws the same Philox stream as the reference: equal outputs (up to rare rounding
    ties; none on the interpreter). V = 70 spans several race tiles with a ragged tail."""
    tok, par, p, q = _random_sampling_inputs(48, 9, V, draft, seed=4)
    want = verify_sampling_ref(tok, par, p, q, -12345, 2 ** 33 + 5)
    d = TRITON_DEVICE
    with triton_path():
        got = verify_sampling(tok.to(d), par.to(d), p.to(d), None if q is None else q.to(d),
                              seed=-12345, offset=2 ** 33 + 5)
    same = (got[0].cpu() == want[0]).all(1) & (got[1].cpu() == want[1]) & (got[2].cpu() == want[2])
    assert float(same.float().mean()) >= (1.0 if not HAS_CUDA else 0.97)
    gw = greedy_walk_py(tok, par, tok.roll(1, 1))
    with triton_path():
        gt = verify_greedy(tok.to(d), par.to(d), tok.roll(1, 1).to(d))
    for a, b in zip(gt, gw):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_sampling_edge_cases(name, device, ctx):
    V = 6
    chain = torch.tensor([[-1, 0, 1, 2]])
    tok = torch.tensor([[0, 1, 2, 3]])
    onehot = torch.eye(V)[[1, 2, 3, 5]][None]  # p_u puts all mass on the next chain token
    with ctx():
        # all accepted (p = q one-hot): the bonus comes from p at the leaf
        acc, n, nxt = verify_sampling(tok.to(device), chain.to(device), onehot.to(device), onehot.to(device), 0, 0)
        assert acc.tolist() == [[0, 1, 2, 3]] and n.tolist() == [3] and nxt.tolist() == [5]
        acc, n, nxt = verify_sampling(tok.to(device), chain.to(device), onehot.to(device), None, 0, 0)
        assert acc.tolist() == [[0, 1, 2, 3]] and n.tolist() == [3] and nxt.tolist() == [5]
        # all rejected: p gives the proposal zero mass; the residual is p itself here
        p = torch.eye(V)[[4, 4, 4, 4]][None]
        q = torch.full((1, 4, V), 1.0 / V)
        acc, n, nxt = verify_sampling(tok.to(device), chain.to(device), p.to(device), q.to(device), 1, 2)
        assert acc.tolist() == [[0, -1, -1, -1]] and n.tolist() == [0] and nxt.tolist() == [4]
        # no draft: three rejected siblings, the correction avoids their tokens
        par = torch.tensor([[-1, 0, 0, 0]])
        tk = torch.tensor([[0, 1, 2, 1]])
        p = torch.tensor([[0.3, 0.3, 0.4, 0, 0, 0]] * 4)[None]
        seen = set()
        for seed in range(40):
            acc, n, nxt = verify_sampling(tk.to(device), par.to(device), p.to(device), None, seed, 0)
            assert int(n) in (0, 1) and acc[0, 1].item() in (-1, 1, 2)  # node 3 duplicates node 1
            if int(n) == 0:
                assert int(nxt) == 0
            seen.add(int(acc[0, 1]))
        assert seen == {-1, 1, 2}


@pytest.mark.parametrize("name, device, ctx", backends())
def test_sampling_determinism(name, device, ctx):
    tok, par, p, q = _random_sampling_inputs(64, 9, 11, True, seed=7)
    tok, par, p, q = to_device((tok, par, p, q), device)
    with ctx():
        a = verify_sampling(tok, par, p, q, seed=3, offset=4)
        b = verify_sampling(tok, par, p, q, seed=3, offset=4)
        c = verify_sampling(tok, par, p, q, seed=3, offset=5)
        d = verify_sampling(tok, par, p, q, seed=4, offset=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[2], c[2]) and not torch.equal(a[2], d[2])


# --------------------------------------------------------------------------------------------------
# match_branch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("M", [0, 1, 5, 70])
def test_match_branch(name, device, ctx, M):
    g = torch.Generator().manual_seed(M)
    B, N, V = 40, 6, 3
    par = rand_tree(B, N, g)
    tok = torch.randint(0, V, (B, N), generator=g)
    acc, n, nxt = verify_greedy_ref(tok, par, torch.randint(0, V, (B, N), generator=g))
    anchor = torch.randint(-1, N, (B, M), generator=g)
    btok = torch.randint(0, V, (B, M), generator=g)
    want = torch.full((B,), -1, dtype=torch.int32)
    for b in range(B):
        last = int(acc[b, int(n[b])])
        for m in range(M):
            if int(anchor[b, m]) == last and int(btok[b, m]) == int(nxt[b]):
                want[b] = m
                break
    assert torch.equal(match_branch_ref(acc, n, nxt, anchor, btok), want)
    with ctx():
        got = match_branch(acc.to(device), n.to(device), nxt.to(device), anchor.to(device, torch.int32),
                           btok.to(device))
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    if M >= 5:
        assert int((want >= 0).sum()) > 0


# --------------------------------------------------------------------------------------------------
# bad input (the table of tests/test_verify_adversarial.py covers more; opcheck, compile and strided
# views of every op run in tests/test_contract.py on sample_inputs below)
# --------------------------------------------------------------------------------------------------


def _good(B=2, N=4, V=5):
    par = torch.tensor([[-1, 0, 0, 1]] * B)
    tok = torch.tensor([[0, 1, 2, 3]] * B)
    p = torch.full((B, N, V), 1.0 / V)
    return tok, par, p, p.clone()


@pytest.mark.parametrize("name, device, ctx", backends())
def test_bad_inputs(name, device, ctx):
    tok, par, p, q = to_device(_good(), device)
    with ctx():
        def run(tok=tok, par=par, p=p, q=q):
            return verify_sampling(tok, par, p, q, 0, 0)

        def bad_p(fill):
            x = p.clone()
            x[1, 1] = fill
            return x

        with pytest.raises(TypeError, match="tokens"):
            run(tok=tok.float())
        with pytest.raises(ValueError, match="parents"):
            run(par=par[:, :3])
        with pytest.raises(ValueError, match="target_probs"):
            run(p=p[:, :3])
        with pytest.raises(ValueError, match="draft_probs"):
            run(q=q[..., :4])
        with pytest.raises(TypeError, match="target_ids"):
            verify_greedy(tok, par, p[..., 0])
        with pytest.raises(ValueError, match="accept_len"):
            match_branch(tok, tok[:1, 0], tok[:, 0], tok, tok)
        with pytest.raises(ValueError, match="branch_token"):
            match_branch(tok, tok[:, 0] * 0, tok[:, 0], tok, tok[:1])
        if _backend.check_values(p):
            with pytest.raises(ValueError, match="target_probs.*NaN"):
                run(p=bad_p(float("nan")))
            with pytest.raises(ValueError, match="target_probs.*negative"):
                run(p=bad_p(torch.tensor([-0.2, 0.3, 0.3, 0.3, 0.3])))
            with pytest.raises(ValueError, match="target_probs.*summing to 1"):
                run(p=bad_p(0.0))
            with pytest.raises(ValueError, match="draft_probs.*summing to 1"):
                run(q=torch.zeros_like(q))
            zq = q.clone()
            zq[0, 0, 1] = 0.0
            zq[0, 0] /= zq[0, 0].sum()
            with pytest.raises(ValueError, match="draft_probs.*zero probability"):
                run(q=zq)
            with pytest.raises(ValueError, match="tokens"):
                run(tok=tok + 10)
            for bad in ([0, 0, 0, 1], [-1, 0, 3, 1], [-1, 0, 2, 1], [-1, -2, 0, 1]):
                pb = par.clone()
                pb[1] = torch.tensor(bad)
                with pytest.raises(ValueError, match="parents.*not a tree"):
                    run(par=pb)
                with pytest.raises(ValueError, match="parents.*not a tree"):
                    verify_greedy(tok, pb, tok)
            with pytest.raises(ValueError, match="accept_len"):
                match_branch(tok, tok[:, 0] + 7, tok[:, 0], tok, tok)


# --------------------------------------------------------------------------------------------------
# sample inputs (tests/test_contract.py runs opcheck, compile and strided views on them)
# --------------------------------------------------------------------------------------------------


def sample_inputs(device):
    """(op name, args) for every op of the family, small enough for the interpreter: int32 and
    int64 indices, fp32 / fp16 / bf16 probabilities, with and without draft probabilities, a
    padding node with a node hanging from it, root-only trees, an empty batch, M = 0."""
    out = []
    g = torch.Generator().manual_seed(0)
    for (B, N, V, draft, pdt, idt) in [(3, 6, 9, True, torch.float32, torch.int64),
                                       (2, 5, 11, False, torch.float16, torch.int32),
                                       (2, 4, 5, True, torch.bfloat16, torch.int32),
                                       (2, 1, 3, False, torch.float32, torch.int64)]:
        tok, par, p, q = _random_sampling_inputs(B, N, V, draft, seed=B * N + V)
        if N >= 5:  # node 2 padding, node 3 hanging from it (unreachable, accepted by the rule)
            par[0, 2], par[0, 3] = -1, 2
        tok, par = tok.to(idt), par.to(idt)
        p = p.to(pdt)
        q = None if q is None else q.to(pdt)
        out.append(("verify_sampling", to_device((tok, par, p, q, B + N, 2 ** 33 + V), device)))
        out.append(("verify_greedy", to_device((tok, par, tok.roll(1, 1)), device)))
        acc, n, nxt = verify_greedy_ref(tok, par, tok.roll(1, 1))
        for M in (0, 4):
            anchor = torch.randint(-1, N, (B, M), generator=g).to(idt)
            anchor[:, :1] = acc.gather(1, n.long()[:, None])[:, :1].to(idt)[:, :M]
            btok = torch.randint(0, V, (B, M), generator=g)
            btok[:, :1] = nxt[:, None][:, :M]
            out.append(("match_branch", to_device((acc, n, nxt, anchor, btok), device)))
    z = torch.zeros(0, 4, dtype=torch.int64)
    out.append(("verify_greedy", to_device((z, z, z), device)))
    out.append(("verify_sampling", to_device((z, z, torch.zeros(0, 4, 3), None, 0, 0), device)))
    return out


def _run(name, args):
    return getattr(torch.ops.loramix, name)(*args)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_sample_inputs_match_reference_and_strided(name, device, ctx):
    """Every sample equals the reference function, also with every tensor argument a strided
    view (1-D ones included)."""
    refs = {"verify_greedy": verify_greedy_ref, "verify_sampling": verify_sampling_ref,
            "match_branch": match_branch_ref}
    for op, args in sample_inputs(device):
        want = refs[op](*to_device(args, "cpu"))
        with ctx():
            got = _run(op, args)
            got_strided = _run(op, strided(args))
        for g_ in (got, got_strided):
            for a, b in zip(g_ if isinstance(g_, tuple) else (g_,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(a.cpu(), b), (op, [getattr(t, "dtype", t) for t in args])


# --------------------------------------------------------------------------------------------------
# issue 9: strides of 1-D arguments, int64 seeds and offsets, the one parents rule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
def test_match_branch_strided_1d(name, device, ctx):
    """match_branch reads accept_len / next_token through their strides (the Triton kernel
    indexed ``ptr + b`` and returned [0, -1, -1] here)."""
    acc = torch.tensor([[0, 1, 2], [0, 2, 1], [0, 3, -1]]).to(device)
    accept_len = torch.tensor([[1, 0], [2, 0], [1, 0]]).to(device)[:, 0]
    next_token = torch.tensor([[7, 9], [8, 9], [6, 9]]).to(device)[:, 0]
    anchor = torch.tensor([[1, 0], [0, 1], [3, 3]]).to(device)
    btok = torch.tensor([[7, 7], [8, 8], [6, 5]]).to(device)
    assert not accept_len.is_contiguous() and not next_token.is_contiguous()
    with ctx():
        got = match_branch(acc, accept_len, next_token, anchor, btok)
    assert got.tolist() == [0, 1, 0]
    assert torch.equal(got.cpu(), match_branch_ref(acc.cpu(), accept_len.cpu(), next_token.cpu(),
                                                   anchor.cpu(), btok.cpu()))


#: int64 seeds and offsets at the edges of every 32-bit word (issue 9.2): offset mod 2^32 >= 2^31,
#: offsets >= 2^62 (c2 wraps mod 2^32), negative values (taken mod 2^64).
EDGE_INT64 = [2 ** 31, 2 ** 32 - 1, 2 ** 62 + 5, -1, -(2 ** 63), 2 ** 63 - 1, 0]


def _exec_paths():
    """(name, context) of every path computing verify_sampling: the CPU op (C++ when built),
    and the Triton kernels where they run."""
    out = [("cpu", reference_path)]
    if TRITON_OK:
        out.append(("triton", triton_path))
    return out


@pytest.mark.parametrize("draft", [True, False])
def test_sampling_int64_seeds_and_offsets_all_paths(draft):
    """Every int64 seed and offset works on every path, with the same outputs as the reference
    (the Triton kernel failed to compile for offset mod 2^32 >= 2^31, offsets >= 2^62 and
    negative ones: "Cannot bitcast data-type of size 64 to data-type of size 32")."""
    tok, par, p, q = _random_sampling_inputs(8, 7, 13, draft, seed=21)
    seen = set()
    pairs = [(0, o) for o in EDGE_INT64] + [(sd, 3) for sd in EDGE_INT64] + [(-1, -1), (2 ** 31, 2 ** 62 + 5)]
    for seed, offset in pairs:
        want = verify_sampling_ref(tok, par, p, q, seed, offset)
        seen.add(tuple(want[2].tolist()))
        for path, ctx in _exec_paths():
            dev = TRITON_DEVICE if path == "triton" else "cpu"
            with ctx():
                got = verify_sampling(*to_device((tok, par, p, q), dev), seed=seed, offset=offset)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b), (path, seed, offset)
    assert len(seen) >= len(pairs) - 2  # distinct (seed, offset) give distinct streams


def test_sampling_seed_offset_must_fit_int64():
    tok, par, p, q = _good()
    with pytest.raises(ValueError, match="verify_sampling: offset must fit in int64"):
        verify_sampling(tok, par, p, q, 0, 2 ** 63)
    with pytest.raises(ValueError, match="verify_sampling: seed must fit in int64"):
        verify_sampling(tok, par, p, q, -(2 ** 63) - 1, 0)
    with pytest.raises(TypeError, match="verify_sampling: seed must be an int"):
        verify_sampling(tok, par, p, q, 1.5, 0)


def _orphan_case(idx_dtype):
    """Node 2 is padding and node 3 hangs from it; node 3's token is the target's pick and has all
    the probability mass, so a walk that could reach node 3 would accept it."""
    par = torch.tensor([[-1, 0, -1, 2, 0]] * 4, dtype=idx_dtype)
    tok = torch.tensor([[0, 1, 2, 3, 4]] * 4, dtype=idx_dtype)
    V = 5
    p = torch.full((4, 5, V), 0.01)
    p[:, :, 3] = 0.96  # the target wants token 3 everywhere: node 3 if reachable
    return tok, par, p, V


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_node_under_padding_accepted_by_validation_never_accepted(idx_dtype):
    """The one parents rule (docs/API.md): a node hanging from a padding node passes validation
    (verify used to reject it) and is never accepted, on every path: the reference functions,
    the CPU op (C++), and Triton."""
    tok, par, p, V = _orphan_case(idx_dtype)
    target = torch.full_like(tok, 3)
    paths = [("ref", None)] + _exec_paths()
    for seed in range(4):
        for path, ctx in paths:
            dev = TRITON_DEVICE if path == "triton" else "cpu"
            args = to_device((tok, par, p), dev)
            for q in (None, torch.softmax(torch.randn(4, 5, V, generator=torch.Generator().manual_seed(seed)), -1)):
                qd = None if q is None else q.to(dev)
                if path == "ref":
                    outs = [verify_sampling_ref(*args, qd, seed, seed), verify_greedy_ref(args[0], args[1], target)]
                else:
                    with ctx():
                        outs = [verify_sampling(*args, qd, seed=seed, offset=seed),
                                verify_greedy(args[0], args[1], target.to(dev))]
                for acc, n, nxt in outs:
                    assert not bool((acc.cpu() == 3).any()), (path, seed)
                    assert not bool((acc.cpu() == 2).any())
    # greedy on a path that would go 0 -> 2 -> 3 if padding were walked
    with reference_path():
        acc, n, nxt = verify_greedy(tok, par, torch.tensor([[2, 0, 3, 0, 0]] * 4, dtype=idx_dtype))
    assert acc[0].tolist() == [0, -1, -1, -1, -1] and nxt.tolist() == [2] * 4


@pytest.mark.skipif(not verify_ops.native_available(), reason="C++ extension not built")
@pytest.mark.parametrize("pdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
def test_native_reads_dtypes_and_strides_in_place(pdt, idt):
    """The C++ ops read int32 / int64 indices and fp16 / bf16 / fp32 probabilities with their
    strides (no Python-side copies): strided views give the reference's result on the same
    values."""
    tok, par, p, q = _random_sampling_inputs(40, 8, 10, True, seed=5)
    tok, par, p, q = tok.to(idt), par.to(idt), p.to(pdt), q.to(pdt)
    want = verify_sampling_ref(tok, par, p, q, 9, 2 ** 40 + 1)
    # probabilities transposed in memory (vocabulary not the fastest dimension), indices strided
    pt = p.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.ops.loramix._verify_sampling_cpu(strided(tok), strided(par), pt, strided(q), 9, 2 ** 40 + 1)
    same = (got[0] == want[0]).all(1) & (got[1] == want[1]) & (got[2] == want[2])
    assert float(same.float().mean()) >= 0.97 and int(got[1].max()) >= 2
    gw = verify_greedy_ref(tok, par, tok.roll(1, 1))
    gg = torch.ops.loramix._verify_greedy_cpu(strided(tok), par.t().contiguous().t(), strided(tok.roll(1, 1)))
    for a, b in zip(gg, gw):
        assert torch.equal(a, b)


def test_cpu_fallback_without_native_warns_once(monkeypatch):
    """Without the native extension the CPU kernels run the vectorised reference and say so once."""
    monkeypatch.setattr(verify_ops, "native_available", lambda: False)
    _backend.warn_once.cache_clear()
    tok, par, p, q = _random_sampling_inputs(5, 6, 7, True, seed=2)
    with reference_path():
        with pytest.warns(RuntimeWarning, match="slower vectorised PyTorch reference"):
            got = verify_sampling(tok, par, p, q, seed=1, offset=2)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            got_g = verify_greedy(tok, par, tok.roll(1, 1))
    for a, b in zip(got, verify_sampling_ref(tok, par, p, q, 1, 2)):
        assert torch.equal(a, b)
    for a, b in zip(got_g, verify_greedy_ref(tok, par, tok.roll(1, 1))):
        assert torch.equal(a, b)


@requires_triton
def test_wide_int64_values_are_not_narrowed():
    """Range tests and compares run in the input's own width (issue 9.6): with value checks off
    (CUDA's default) an int64 parent 2^32 + 1, token 2^32 + 3 and target 2^32 + 3 are not parent 1
    / token 3, on the Triton and the CPU paths alike."""
    big = 2 ** 32
    par = torch.tensor([[-1, 0, big + 1, 0]])  # node 2: invalid parent -> padding, not parent 1
    tok = torch.tensor([[0, big + 3, 3, 3]])   # node 1's token is not 3
    tgt = torch.tensor([[3, 3, 0, 7]])
    p = torch.zeros(1, 4, 5)
    p[..., 3] = 1.0
    with value_checks_off():
        for path, ctx in _exec_paths():
            dev = TRITON_DEVICE if path == "triton" else "cpu"
            with ctx():
                g = verify_greedy(*to_device((tok, par, tgt), dev))
                s = verify_sampling(*to_device((tok, par, p), dev), None, 0, 0)
            # narrowed, node 1 (token 3) and then node 2 (parent 1) would be accepted
            assert g[0].tolist() == [[0, 3, -1, -1]] and g[2].tolist() == [7], path
            assert s[0].tolist() == [[0, 3, -1, -1]], path
            la = torch.tensor([big]).to(dev)                  # accept_len 2^32 clamps to N - 1
            with ctx():
                m = match_branch(torch.tensor([[0, 1, 2, 3]]).to(dev), la, torch.tensor([5]).to(dev),
                                 torch.tensor([[big + 3, 3]]).to(dev), torch.tensor([[5, 5]]).to(dev))
            assert m.tolist() == [1], path


def test_offsets_differing_in_the_top_bit_are_different_streams():
    """Every int64 offset is its own stream (taken mod 2^64): o and o + 2^63 used to share one
    because the kind was folded into the offset's high word."""
    assert rng_words(0, 0) != rng_words(0, -2 ** 63)
    assert rng_words(5, -2 ** 32) != rng_words(5, 2 ** 63 - 2 ** 32)
    assert len({rng_words(1, o) for o in (0, 1, 2 ** 32, 2 ** 63 - 1, -1, -2 ** 63)}) == 6
    tok, par, p, q = _random_sampling_inputs(64, 5, 40, True, seed=4)
    a = verify_sampling_ref(tok, par, p, q, 3, 0)
    b = verify_sampling_ref(tok, par, p, q, 3, -2 ** 63)
    assert not torch.equal(a[2], b[2])
