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
residual) gives p-values of 0 (test ``test_biased_sampler_is_caught``).
"""

import math

import pytest
import torch

from loramix_kernels import _backend
from loramix_kernels.ops.verify import match_branch, verify_greedy, verify_sampling
from loramix_kernels.reference.verify import (
    match_branch_ref,
    verify_greedy_ref,
    verify_sampling_literal,
    verify_sampling_ref,
)

from tests.common import HAS_CUDA, TRITON_DEVICE, TRITON_OK, backends, reference_path, requires_cuda, triton_path

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
    out = verify_sampling_ref(tokens, parents, p, q, 2024, 7, residual=False)
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
    from loramix_kernels.ops.verify import _cext

    if _cext() is None:
        pytest.skip("C++ extension not built")
    tok, par, p, q = _random_sampling_inputs(3000, 11, 7, draft, seed=3)
    with reference_path():
        got = verify_sampling(tok, par, p, q, seed=5, offset=9)
    want = verify_sampling_ref(tok, par, p, q, 5, 9)
    # identical up to fp32 rounding ties in the residual sums (none expected at this size)
    same = (got[0] == want[0]).all(1) & (got[1] == want[1]) & (got[2] == want[2])
    assert float(same.float().mean()) >= 0.999
    assert int(got[1].max()) >= 2
    gg = verify_greedy(tok, par, tok.roll(1, 1))
    with reference_path():
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
    tok, par, p, q = (t.to(device) for t in (tok, par, p, q))
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
# bad input, opcheck
# --------------------------------------------------------------------------------------------------


def _good(B=2, N=4, V=5):
    par = torch.tensor([[-1, 0, 0, 1]] * B)
    tok = torch.tensor([[0, 1, 2, 3]] * B)
    p = torch.full((B, N, V), 1.0 / V)
    return tok, par, p, p.clone()


@pytest.mark.parametrize("name, device, ctx", backends())
def test_bad_inputs(name, device, ctx):
    tok, par, p, q = (t.to(device) for t in _good())
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
            for bad in ([0, 0, 0, 1], [-1, 0, 3, 1], [-1, 0, -1, 2], [-1, -2, 0, 1]):
                pb = par.clone()
                pb[1] = torch.tensor(bad)
                with pytest.raises(ValueError, match="parents.*not a tree"):
                    run(par=pb)
                with pytest.raises(ValueError, match="parents.*not a tree"):
                    verify_greedy(tok, pb, tok)
            with pytest.raises(ValueError, match="accept_len"):
                match_branch(tok, tok[:, 0] + 7, tok[:, 0], tok, tok)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_opcheck(name, device, ctx):
    tok, par, p, q = (t.to(device) for t in _random_sampling_inputs(6, 7, 9, True, seed=1))
    acc, n, nxt = verify_greedy_ref(tok.cpu(), par.cpu(), tok.roll(1, 1).cpu())
    with ctx():
        torch.library.opcheck(torch.ops.loramix.verify_greedy.default, (tok, par, tok.roll(1, 1)))
        torch.library.opcheck(torch.ops.loramix.verify_sampling.default, (tok, par, p, q, 3, 1))
        torch.library.opcheck(torch.ops.loramix.verify_sampling.default, (tok, par.int(), p, None, 3, 1))
        torch.library.opcheck(torch.ops.loramix.match_branch.default,
                              (acc.to(device), n.to(device), nxt.to(device), par, tok))
