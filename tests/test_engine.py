"""The decoding engine (loramix_kernels.engine): paged-cache bookkeeping, plain decoding against
transformers' generate, Mirror-SD greedy == plain greedy (batches of different prompt lengths, with
and without overlap, branch reuse hit and miss paths), sampling mode and a statistical check that
speculative sampling emits the target's distribution.

Everything runs on the CPU kernels (``use_backend("auto")``) except one tiny test of the Triton
kernels under the interpreter (the conftest's switch)."""

import contextlib

import multiprocessing

import pytest
import torch

import loramix_kernels
from loramix_kernels.engine import Engine, PagedKVCache, SamplingParams

transformers = pytest.importorskip("transformers")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEV == "cuda" else torch.float32


@pytest.fixture(autouse=True)
def _cpu_kernels():
    """CPU kernels (the interpreter path is far too slow for whole models), one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with loramix_kernels.use_backend("auto"):
        yield
    torch.set_num_threads(threads)


def tiny_llama(vocab=48, hidden=32, layers=3, heads=4, kv_heads=2, seed=0, ffn=64):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std init: fewer near-ties
        m.lm_head.weight.mul_(8.0)
    return m.to(DEV, DTYPE)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                                          25, 26, 27, 28, 29]]


def hf_greedy(model, prompts, n):
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=DEV)
        o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(o[0, len(p):].tolist())
    return out


# ------------------------------------------------------------------------------------ paged cache
def test_paged_cache_bookkeeping():
    c = PagedKVCache(2, 1, 4, num_blocks=6, block_size=4, max_batch=2, max_blocks_per_seq=3)
    assert c.k.shape == (2, 6, 4, 1, 4) and c.num_free_blocks == 6
    c.reserve(0, 5)  # 2 blocks
    c.reserve(1, 4)  # 1 block
    c.reserve(0, 8)  # still 2 blocks
    assert c.num_free_blocks == 3
    t0, t1 = c.table_blocks(0), c.table_blocks(1)
    assert len(t0) == 2 and len(t1) == 1 and not set(t0) & set(t1)
    assert c.block_table[0, :2].tolist() == t0 and c.block_table[0, 2] == -1
    pos = torch.tensor([[0, 3, 4, 7], [0, 1, 2, 3]])
    slots = c.slots(c.block_table[:2], pos).view(2, 4)
    assert slots[0].tolist() == [t0[0] * 4, t0[0] * 4 + 3, t0[1] * 4, t0[1] * 4 + 3]
    assert slots[1].tolist() == [t1[0] * 4 + i for i in range(4)]
    # flat views address the same storage by slot
    kf, _ = c.flat()
    kf[1, slots[0, 2]] = 7.0
    assert c.k[1, t0[1], 0, 0, 0] == 7.0
    with pytest.raises(RuntimeError, match="table holds 3"):
        c.reserve(1, 13)
    c.free(0)
    assert c.num_free_blocks == 5 and (c.block_table[0] == -1).all()
    with pytest.raises(RuntimeError, match="out of blocks"):
        c.alloc_blocks(6)


def test_engine_rejects_bad_arguments():
    m = tiny_llama()
    with pytest.raises(ValueError, match="draft_layers"):
        Engine(m, draft_layers=3)
    eng = Engine(m, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="1 to 2 prompts"):
        eng.generate(PROMPTS, 4)
    with pytest.raises(ValueError, match="mode"):
        eng.generate(PROMPTS[:1], 4, mode="beam")
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate([[1], []], 4)


# ------------------------------------------------------------------------------------ greedy
def test_plain_greedy_matches_transformers_generate():
    m = tiny_llama()
    n = 16
    eng = Engine(m, max_batch=3, max_len=64, block_size=8)
    got = eng.generate(PROMPTS, n, mode="plain")
    assert got.tokens == hf_greedy(m, PROMPTS, n)
    assert eng.cache.num_free_blocks == eng.cache.num_blocks - eng._priv.numel()  # all released


@pytest.mark.parametrize("siblings,overlap,draft_layers,block_size", [
    (True, True, 1, 4), (True, False, 2, 16), (False, True, 1, 8)])
def test_mirror_greedy_equals_plain_greedy(siblings, overlap, draft_layers, block_size):
    m = tiny_llama()
    n = 24
    kw = dict(max_batch=3, max_len=64, block_size=block_size, chain_len=3, siblings=siblings,
              draft_layers=draft_layers, overlap=overlap)
    plain = Engine(m, **kw).generate(PROMPTS, n, mode="plain")
    mirror = Engine(m, **kw).generate(PROMPTS, n, mode="mirror")
    assert mirror.tokens == plain.tokens
    assert all(len(t) == n for t in mirror.tokens)
    assert mirror.steps < n - 1 or mirror.mean_accepted_len == 0


def test_branch_reuse_hits_and_misses_accept_like_fresh_drafts():
    """kappa = V - 2 covers every possible correction at an anchor (reuse hits whenever the path
    stops at the root or a chain node); kappa = 1 misses often. Either way the output equals plain
    greedy decoding, and a reused window is exactly the window a fresh rollout gives: the accepted
    lengths, step by step, equal those of reuse=False (fresh rollouts only)."""
    V = 16
    m = tiny_llama(vocab=V)
    n = 40
    kw = dict(max_batch=3, max_len=96, block_size=8, chain_len=3, draft_layers=1)
    prompts = [[t % V for t in p] for p in PROMPTS]
    plain = Engine(m, **kw).generate(prompts, n, mode="plain")
    fresh = Engine(m, reuse=False, **kw).generate(prompts, n, mode="mirror")
    assert fresh.tokens == plain.tokens and fresh.reuse_hits == 0
    rates = []
    for kappa in (V - 2, 1):
        for overlap in (True, "thread", False):  # CPU: worker process, thread, in line
            r = Engine(m, kappa=kappa, overlap=overlap, **kw).generate(prompts, n, mode="mirror")
            assert r.tokens == plain.tokens
            assert r.accepted_per_step == fresh.accepted_per_step
            rates.append(r.branch_reuse_rate)
    assert rates[0] == rates[1] == rates[2] and rates[3] == rates[4] == rates[5]
    assert rates[0] > 0.5 and rates[0] > rates[3]
    assert 0 < rates[0] < 1 or rates[3] < 1  # both the reuse and the fresh-rollout paths ran


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_draft_worker_process_lifecycle():
    """CPU overlap runs the branch rollouts in one forked worker per engine, started by the first
    Mirror-SD call and reused; close() stops it and the next call starts a new one; a worker that
    dies is reported (RuntimeError naming it) and replaced on the next call; the outputs equal
    plain greedy decoding throughout."""
    m = tiny_llama()
    n = 16
    kw = dict(max_batch=3, max_len=64, block_size=8, chain_len=3, draft_layers=1, kappa=2)
    plain = Engine(m, **kw).generate(PROMPTS, n, mode="plain")
    eng = Engine(m, overlap=True, **kw)
    assert eng._use_process and eng._worker is None
    eng.generate(PROMPTS, n, mode="plain")
    assert eng._worker is None  # plain decoding needs no draft worker
    first = eng.generate(PROMPTS, n, mode="mirror")
    proc = eng._worker.proc
    assert proc.is_alive() and first.tokens == plain.tokens and first.draft_rollout_s > 0
    assert eng.generate(PROMPTS, n, mode="mirror").tokens == plain.tokens
    assert eng._worker.proc is proc  # one worker per engine
    eng.close()
    assert eng._worker is None and not proc.is_alive()
    assert eng.generate(PROMPTS, n, mode="mirror").tokens == plain.tokens  # a new worker
    eng._worker.proc.kill()
    eng._worker.proc.join()
    with pytest.raises(RuntimeError, match="draft worker process died"):
        eng.generate(PROMPTS, n, mode="mirror")
    assert eng._worker is None
    assert eng.generate(PROMPTS, n, mode="mirror").tokens == plain.tokens
    eng.close()


def test_mirror_with_lora_mixer_layers_matches_transformers():
    """The engine calls the model's own projection modules: injected LoRA-Mixer layers (packed
    q/k/v, top-k routing, non-zero experts) run inside it exactly as in transformers' forward."""
    nn = pytest.importorskip("loramix_kernels.nn")
    m = tiny_llama(hidden=32)
    nn.inject(m, ["q_proj", "k_proj", "v_proj", "o_proj"], num_experts=4, r=4, top_k=2, pack_qkv=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in nn.mixer_modules(m).values():
            mod.lora_b.normal_(0, 0.2)
            mod.router.weight.normal_(0, 1.0)
    n = 16
    want = hf_greedy(m, PROMPTS, n)
    kw = dict(max_batch=3, max_len=64, block_size=8, chain_len=3)
    assert Engine(m, **kw).generate(PROMPTS, n, mode="plain").tokens == want
    assert Engine(m, **kw).generate(PROMPTS, n, mode="mirror").tokens == want
    # A draft through the base projections only (draft_experts=False): the same output, in every
    # overlap mode, and its reused windows equal fresh rollouts (reuse=False) step by step; its
    # proposals do differ from the full draft's (the mixers matter to the draft too).
    full = Engine(m, reuse=False, **kw).generate(PROMPTS, n, mode="mirror")
    fresh = Engine(m, reuse=False, draft_experts=False, **kw).generate(PROMPTS, n, mode="mirror")
    assert fresh.tokens == want
    for overlap in (True, "thread", False):
        eng = Engine(m, overlap=overlap, draft_experts=False, kappa=2, **kw)
        r = eng.generate(PROMPTS, n, mode="mirror")
        eng.close()
        assert r.tokens == want and r.accepted_per_step == fresh.accepted_per_step
    assert fresh.accepted_per_step != full.accepted_per_step
    # and the mixers matter: without them the output differs
    with torch.no_grad():
        for mod in nn.mixer_modules(m).values():
            mod.lora_b.zero_()
    assert Engine(m, **kw).generate(PROMPTS, n, mode="plain").tokens != want


# ------------------------------------------------------------------------------------ sampling
def test_sampling_mode_sanity():
    m = tiny_llama()
    n = 20
    kw = dict(max_batch=3, max_len=64, block_size=8, chain_len=3)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a = Engine(m, **kw).generate(PROMPTS, n, mode="mirror", sampling=sp)
    b = Engine(m, **kw).generate(PROMPTS, n, mode="mirror", sampling=sp)
    assert a.tokens == b.tokens  # deterministic for a seed
    assert all(len(t) == n and all(0 <= x < 48 for x in t) for t in a.tokens)
    c = Engine(m, **kw).generate(PROMPTS, n, mode="mirror", sampling=SamplingParams(1.0, 0.9, seed=4))
    assert c.tokens != a.tokens
    # A nucleus holding only the top token is greedy decoding, through verify_sampling.
    greedy = Engine(m, **kw).generate(PROMPTS, n, mode="plain")
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=5)
    assert Engine(m, **kw).generate(PROMPTS, n, mode="mirror", sampling=tiny_p).tokens == greedy.tokens
    assert Engine(m, **kw).generate(PROMPTS, n, mode="plain", sampling=tiny_p).tokens == greedy.tokens


def _exact_marginals(m, prompt, temperature, V):
    """Exact distributions of the 2nd and 3rd sampled tokens after ``prompt`` (by enumeration)."""
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt], device=DEV)).logits[0, -1].double() / temperature, -1)
        x1 = torch.arange(V)
        ctx = torch.tensor([prompt] * V)
        p2 = torch.softmax(m(torch.cat([ctx, x1[:, None]], 1).to(DEV)).logits[:, -1].double()
                           / temperature, -1)  # [x1, x2]
        x12 = torch.cartesian_prod(x1, x1)
        ctx = torch.tensor([prompt] * V * V)
        p3 = torch.softmax(m(torch.cat([ctx, x12], 1).to(DEV)).logits[:, -1].double()
                           / temperature, -1).view(V, V, V)  # [x1, x2, x3]
    joint12 = p1[:, None] * p2
    m2 = joint12.sum(0)
    m3 = (joint12[..., None] * p3).sum((0, 1))
    return m2.cpu(), m3.cpu()


def _tv(samples, p, V):
    counts = torch.bincount(torch.tensor(samples), minlength=V).double()
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def test_speculative_sampling_matches_target_distribution():
    """Lossless sampling, statistically: over 2400 requests (one batch), the 2nd and 3rd emitted
    tokens of Mirror-SD sampling (the first ones that go through verify_sampling and the drafted
    tree) follow the exact target marginals (enumerated) as closely as plain sampling does
    (total variation within the sampling noise), while the drafts are accepted often enough that
    the test means something. A sampler that kept the draft's greedy tokens would fail it."""
    V, T, B = 6, 1.0, 2400
    m = tiny_llama(vocab=V, hidden=16, layers=2, heads=2, kv_heads=1, ffn=32, seed=3)
    with torch.no_grad():  # context-dependent, neither flat nor peaked; the draft differs
        m.lm_head.weight.mul_(2.0)
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.mul_(4.0)
            layer.self_attn.o_proj.weight.mul_(4.0)
    prompt = [1, 4, 2]
    m2, m3 = _exact_marginals(m, prompt, T, V)
    assert 0.25 < m2.max() < 0.7 and m3.max() < 0.7  # not flat, not degenerate
    kw = dict(max_batch=B, max_len=16, block_size=8, chain_len=2, kappa=1, overlap=False)
    sp = SamplingParams(temperature=T, seed=11)
    spec = Engine(m, **kw).generate([prompt] * B, 3, mode="mirror", sampling=sp)
    plain = Engine(m, **kw).generate([prompt] * B, 3, mode="plain", sampling=SamplingParams(T, seed=12))
    assert spec.accepted_per_step[0] > 0.2  # drafts do get accepted
    # noise floor: E[TV] ~ 0.5 * sum sqrt(2 p (1 - p) / (pi B)) ~ 0.02 here; 0.05 is > 2.5x that
    for pos, exact in ((1, m2), (2, m3)):
        tv_spec = _tv([t[pos] for t in spec.tokens], exact, V)
        tv_plain = _tv([t[pos] for t in plain.tokens], exact, V)
        assert tv_plain < 0.05, (pos, tv_plain)
        assert tv_spec < 0.05, (pos, tv_spec, tv_plain)
    # Power: the draft's distribution of the 2nd token (early exit after layer 1) is far from the
    # target's, so a sampler leaning towards the draft would show up.
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt], device=DEV)).logits[0, -1].double() / T, -1)
        ctx = torch.cat([torch.tensor([prompt] * V), torch.arange(V)[:, None]], 1).to(DEV)
        h = m(ctx, output_hidden_states=True).hidden_states[1][:, -1]
        q2 = torch.softmax(m.lm_head(m.model.norm(h)).double() / T, -1)
    draft_m2 = (p1[:, None] * q2).sum(0).cpu()
    assert 0.5 * (draft_m2 - m2).abs().sum() > 0.1


# ------------------------------------------------------------------------------------ interpreter
@pytest.mark.skipif(not torch.cuda.is_available() and not loramix_kernels._backend.INTERPRET,
                    reason="needs CUDA or the Triton interpreter")
def test_mirror_on_triton_kernels_tiny():
    """Mirror-SD greedy on the Triton kernels (the interpreter on CPU): same output as plain
    greedy decoding on the CPU kernels."""
    m = tiny_llama(vocab=16, hidden=16, layers=2, heads=2, kv_heads=1, ffn=16)
    prompts = [[1, 2, 3], [4, 5]]
    kw = dict(max_batch=2, max_len=16, block_size=8, chain_len=2, kappa=1, overlap=False)
    want = Engine(m, **kw).generate(prompts, 5, mode="plain").tokens
    ctx = loramix_kernels.use_backend("triton")
    with ctx if torch.cuda.is_available() or loramix_kernels._backend.INTERPRET else contextlib.nullcontext():
        got = Engine(m, **kw).generate(prompts, 5, mode="mirror")
    assert got.tokens == want
