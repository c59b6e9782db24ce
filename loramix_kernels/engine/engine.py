"""The decoding engine: batched prefill, plain decoding, and Mirror-SD speculative decoding over a
paged KV cache, on a transformers Llama model (LoRA-Mixer layers included)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass, field

import torch

from . import _ops
from .cache import PagedKVCache, shared_zeros
from .model import LlamaRunner, OpTimer


@dataclass
class SamplingParams:
    """``temperature <= 0`` means greedy decoding; else sample from softmax(logits / temperature)
    restricted to the smallest top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenerationResult:
    """Generated token ids per prompt (prompt excluded) and what the run measured."""

    tokens: list[list[int]]
    elapsed_s: float
    steps: int = 0
    #: Per speculative step: mean (over the batch) number of accepted draft tokens.
    accepted_per_step: list[float] = field(default_factory=list)
    #: Per speculative step: tokens emitted per second so far (for plots).
    step_times: list[float] = field(default_factory=list)
    reuse_hits: int = 0
    reuse_trials: int = 0
    #: Seconds the main thread waited for the draft's branch rollouts after the target's pass.
    draft_wait_s: float = 0.0
    #: Seconds spent in branch rollouts (in the worker when overlapped).
    draft_rollout_s: float = 0.0
    #: Seconds spent in fresh (non-reused) draft rollouts, which nothing overlaps.
    fresh_draft_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def mean_accepted_len(self) -> float:
        a = self.accepted_per_step
        return sum(a) / len(a) if a else 0.0

    @property
    def branch_reuse_rate(self) -> float:
        return self.reuse_hits / self.reuse_trials if self.reuse_trials else 0.0


class Engine:
    """Batched decoding of a transformers ``LlamaForCausalLM`` over a paged KV cache.

    ``generate(prompts, n, mode="plain")`` decodes one token per target pass (the baseline).
    ``mode="mirror"`` is Mirror speculative decoding (Mirror-SD, arXiv 2510.13161):

    * the draft is the target's first ``draft_layers`` layers with the final norm and the shared LM
      head; it reads the target's own cache for those layers (same weights, same K/V); with
      ``draft_experts=False`` its rollouts run those layers' frozen base projections only (no
      LoRA-Mixer router or experts, :func:`loramix_kernels.nn.base_only`): a cheaper draft whose
      proposals the target still verifies with its experts;
    * a draft window is a tree: a chain of ``chain_len`` greedy draft tokens with, at every depth,
      the draft's second choice as a sibling leaf (``siblings=True``);
    * the target verifies the window in one pass (``tree_attention``, positions = prefix length +
      depth); after layer ``draft_layers`` its early-exit head (``lm_head_topk`` on the normed
      hidden state, shared head) gives ``kappa`` candidates for the correction / bonus token at the
      deepest ``num_anchors`` chain nodes (default all, root included; tokens equal to a drafted
      child are skipped: a correction never equals a child's token). For each (anchor node, candidate) the draft rolls out the next
      window, in a forked worker process on CPU (a second CUDA stream on GPU) while the target runs its remaining
      layers (``overlap=True``);
    * ``verify_greedy`` / ``verify_sampling`` accept a path, ``compact_kv_layers_`` moves its K/V in
      every layer at once, and ``match_branch`` picks the precomputed branch whose anchor is the
      last accepted node and whose candidate is the emitted token: it becomes the next window as
      is; when none matches the draft rolls out a fresh window. A reused window is the window a
      fresh rollout would give (same draft, same context), so ``reuse=False`` (always roll out
      afresh, no branches) accepts exactly the same tokens, only slower.

    Output is lossless by construction: greedy verification emits exactly the target's greedy
    tokens, and ``verify_sampling`` with deterministic proposals samples the target's distribution
    (``tests/test_engine.py`` checks both, the latter statistically).
    """

    def __init__(self, model, *, draft_layers: int = 1, chain_len: int = 4, siblings: bool = True,
                 kappa: int = 2, block_size: int = 16, max_len: int = 1024, max_batch: int = 8,
                 num_blocks: int | None = None, overlap: bool | str = True, reuse: bool = True,
                 num_anchors: int | None = None, draft_experts: bool = True,
                 timer: OpTimer | None = None):
        self.model = model
        self.runner = LlamaRunner(model, timer)
        r = self.runner
        if not 1 <= draft_layers < r.num_layers:
            raise ValueError(f"Engine: draft_layers must be in [1, {r.num_layers}), got {draft_layers}")
        if chain_len < 1 or kappa < 1:
            raise ValueError("Engine: chain_len and kappa must be >= 1")
        if num_anchors is not None and not 1 <= num_anchors <= chain_len + 1:
            raise ValueError(f"Engine: num_anchors must be in [1, {chain_len + 1}], got {num_anchors}")
        self.num_anchors = chain_len + 1 if num_anchors is None else num_anchors
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.draft_layers = draft_layers
        # False: the draft's rollouts run the first layers' frozen base projections only (no
        # LoRA-Mixer router or experts: nn.base_only), a cheaper draft; the target still verifies
        # with its experts, so the output does not change.
        self.draft_experts = bool(draft_experts)
        self.chain_len = chain_len
        self.siblings = siblings
        self.kappa = kappa
        self.block_size = block_size
        self.max_batch = max_batch
        if overlap not in (True, False, "process", "thread"):
            raise ValueError(f"Engine: overlap must be True, False, 'process' or 'thread', got {overlap!r}")
        # CPU: the branch rollouts run in a forked worker process (True / "process"; a thread
        # gains nothing there: both sides hold the GIL most of the time), or a thread ("thread",
        # and where fork does not exist). CUDA: a second stream.
        self._use_process = (self.device.type == "cpu" and overlap in (True, "process")
                             and "fork" in multiprocessing.get_all_start_methods())
        self.overlap = bool(overlap)
        self.reuse = reuse
        max_blocks = -(-(max_len + 4 * chain_len + 8) // block_size)
        self._setup_tree()
        self.num_branches = len(self.anchors) * kappa
        # Private blocks of each (request, branch): the copied partial prefix block plus the
        # branch's path and rollout.
        self.branch_blocks = -(-(block_size + 2 * (chain_len + 1) + 1) // block_size) + 1
        if num_blocks is None:
            num_blocks = max_batch * (max_blocks + self.num_branches * self.branch_blocks)
        self.cache = PagedKVCache(r.num_layers, r.num_kv_heads, r.head_dim, num_blocks=num_blocks,
                                  block_size=block_size, max_batch=max_batch,
                                  max_blocks_per_seq=max_blocks, dtype=self.dtype, device=self.device,
                                  shared=self._use_process)
        self._worker = None  # the draft worker process, started by the first Mirror-SD generate
        self._priv = torch.tensor(
            self.cache.alloc_blocks(max_batch * self.num_branches * self.branch_blocks),
            dtype=torch.int32, device=self.device).view(max_batch * self.num_branches, self.branch_blocks)
        self._stream = (torch.cuda.Stream(device=self.device)
                        if self.device.type == "cuda" and overlap else None)

    # ------------------------------------------------------------------ tree template
    def _setup_tree(self):
        L, dev = self.chain_len, self.device
        if self.siblings:  # chain node j at 2j - 1, its sibling leaf at 2j
            chain_idx = [0] + [2 * j - 1 for j in range(1, L + 1)]
            N = 2 * L + 1
            parents = [-1] * N
            for j in range(1, L + 1):
                parents[2 * j - 1] = parents[2 * j] = chain_idx[j - 1]
        else:
            chain_idx = list(range(L + 1))
            N = L + 1
            parents = [-1] + list(range(L))
        self.N = N
        self.chain_idx = chain_idx
        self.parents = torch.tensor([parents], dtype=torch.int32, device=dev)
        mask, depth, _, _ = _ops.build_tree(self.parents)
        self.tree_mask, self.depth = mask, depth.long()
        self._node = torch.arange(N, device=dev)[None]
        # Branch anchors: the deepest ``num_anchors`` nodes of the chain (root included when all).
        js = list(range(L + 1 - self.num_anchors, L + 1))
        self.anchors = torch.tensor([chain_idx[j] for j in js], dtype=torch.long, device=dev)
        # Children tokens to exclude per anchor (-1 = none), the anchor's path (root first).
        kids = []
        for j in js:
            c = [i for i in range(1, N) if parents[i] == chain_idx[j]]
            kids.append(c + [-1] * (2 - len(c)))
        self.anchor_kids = torch.tensor(kids, dtype=torch.long, device=dev)
        self.anchor_paths = torch.tensor([chain_idx[:j + 1] + [0] * (L - j) for j in js],
                                         dtype=torch.long, device=dev)
        self.anchor_pathlen = torch.tensor([j + 1 for j in js], dtype=torch.long, device=dev)

    def window_tokens(self, root, chain, sib):
        """Tree tokens ``[R, N]`` from the root token, the chain and the sibling leaves."""
        R = root.shape[0]
        t = torch.empty(R, self.N, dtype=torch.long, device=self.device)
        t[:, 0] = root
        if self.siblings:
            t[:, 1::2] = chain
            t[:, 2::2] = sib
        else:
            t[:, 1:] = chain
        return t

    # ------------------------------------------------------------------ model passes
    def _forward(self, tokens, positions, table, seq_lens, tree_mask, start, end, x=None, rope=None,
                 cache_pos=None):
        """Layers ``[start, end)``. ``positions`` drive the rotary embedding (prefix length + depth);
        K/V go to cache positions ``cache_pos`` (default ``positions``; a tree's node i sits at
        ``seq_lens - N + i`` whatever its depth)."""
        r = self.runner
        if x is None:
            x = r.embed(tokens)
        if rope is None:
            rope = r.rope(x, positions)
        slots = self.cache.slots(table, positions if cache_pos is None else cache_pos)
        x = r.layers_forward(x, rope[0], rope[1], self.cache, start, end, table,
                             seq_lens.to(torch.int32), tree_mask, slots)
        return x, rope

    def _probs(self, logits, sp: SamplingParams):
        probs = torch.softmax(logits.float() / sp.temperature, dim=-1)
        if sp.top_p < 1.0:
            sp_, idx = probs.sort(dim=-1, descending=True)
            cum = sp_.cumsum(-1)
            drop = cum - sp_ >= sp.top_p  # keep the smallest prefix reaching top_p
            sp_ = sp_.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, idx, sp_)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def _pick(self, logits, sp: SamplingParams, gen):
        if sp.greedy:
            return logits.argmax(-1)
        p = self._probs(logits, sp)
        return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1])

    def _prefill(self, prompts, sp, gen):
        """All prompts in one pass: a chain tree per request, padded with unused nodes (parents -1)
        up to the longest prompt. Returns the first generated token of each request."""
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError("Engine.generate: every prompt needs at least one token")
        N = max(lens)
        dev = self.device
        c = self.cache
        for b in range(B):
            c.free(b)
            c.reserve(b, N)
        toks = torch.zeros(B, N, dtype=torch.long, device=dev)
        parents = torch.full((B, N), -1, dtype=torch.int32, device=dev)
        for b, p in enumerate(prompts):
            toks[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            parents[b, 1:len(p)] = torch.arange(len(p) - 1, dtype=torch.int32)
        mask, depth, _, _ = _ops.build_tree(parents)
        pos = torch.arange(N, device=dev)[None].expand(B, N)
        seq = torch.full((B,), N, dtype=torch.int32, device=dev)
        x, _ = self._forward(toks, pos, c.block_table[:B], seq, mask, 0, self.runner.num_layers)
        last = torch.tensor(lens, device=dev) - 1
        logits = self.runner.logits(x[torch.arange(B, device=dev), last])
        for b in range(B):
            c.lens[b] = lens[b]
        return self._pick(logits, sp, gen)

    # ------------------------------------------------------------------ public
    def close(self) -> None:
        """Stop the draft worker process, if one runs (CPU, ``overlap=True``). The next Mirror-SD
        ``generate`` starts a new one: call this after changing the model's weights, since the
        worker computes with the weights it saw when it started."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, mode: str = "mirror",
                 sampling: SamplingParams | None = None) -> GenerationResult:
        """Decode ``max_new_tokens`` tokens after each prompt (a list of token-id lists)."""
        sp = sampling or SamplingParams()
        B = len(prompts)
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"Engine.generate: 1 to {self.max_batch} prompts, got {B}")
        if mode not in ("plain", "mirror"):
            raise ValueError(f"Engine.generate: mode must be 'plain' or 'mirror', got {mode!r}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sp.seed)
        t0 = time.perf_counter()
        y = self._prefill(prompts, sp, gen)
        out = [[int(t)] for t in y.tolist()]
        res = GenerationResult(tokens=out, elapsed_s=0.0)
        if mode == "plain":
            self._plain(y, out, max_new_tokens, sp, gen, res)
        else:
            if self._use_process and self.reuse and self._worker is None:
                self._worker = _DraftWorker(self)
            try:
                self._mirror(y, out, max_new_tokens, sp, res, t0)
            except _WorkerFailed:
                self.close()  # the next call starts a fresh worker
                raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        res.elapsed_s = time.perf_counter() - t0
        res.tokens = [t[:max_new_tokens] for t in out]
        for b in range(B):
            self.cache.free(b)
        return res

    def _plain(self, y, out, n, sp, gen, res):
        c, dev = self.cache, self.device
        B = y.shape[0]
        mask = torch.ones(B, 1, 1, dtype=torch.int32, device=dev)
        S = torch.tensor(c.lens[:B], dtype=torch.long, device=dev)
        for _ in range(n - 1):
            for b in range(B):
                c.reserve(b, c.lens[b] + 1)
                c.lens[b] += 1
            x, _ = self._forward(y[:, None], S[:, None], c.block_table[:B], S + 1, mask, 0,
                                 self.runner.num_layers)
            y = self._pick(self.runner.logits(x[:, 0]), sp, gen)
            S = S + 1
            for b, t in enumerate(y.tolist()):
                out[b].append(t)
            res.steps += 1

    # ------------------------------------------------------------------ Mirror-SD
    def _rollout(self, table, start, first, timed=True):
        """Greedy draft rollout of ``chain_len`` tokens per row (the target's first layers and the
        shared head, through ``lm_head_topk``): row r feeds ``first[r]`` at position ``start[r]``.
        Returns the chain and the second choices (sibling leaves), ``[R, chain_len]`` each."""
        if not self.draft_experts:
            from ..nn import base_only

            with base_only():
                return self._rollout_steps(table, start, first)
        return self._rollout_steps(table, start, first)

    def _rollout_steps(self, table, start, first):
        R = first.shape[0]
        mask = torch.ones(R, 1, 1, dtype=torch.int32, device=self.device)
        chain = torch.empty(R, self.chain_len, dtype=torch.long, device=self.device)
        sib = torch.empty_like(chain)
        tok = first
        for t in range(self.chain_len):
            pos = (start + t)[:, None]
            x, _ = self._forward(tok[:, None], pos, table, pos[:, 0] + 1, mask, 0, self.draft_layers)
            _, top = self.runner.exit_topk(x[:, 0], 2)
            chain[:, t], sib[:, t] = top[:, 0], top[:, 1]
            tok = top[:, 0]
        return chain, sib

    def _branch_tables(self, S, table):
        """Block tables of the B * M branch rollouts: the request's full prefix blocks (shared),
        then private blocks. Also copies, in the draft's layers, the prefix's partial last block
        and the anchor's path K/V (written by the verify pass) into the private blocks."""
        c, M, bs, dev = self.cache, self.num_branches, self.block_size, self.device
        B = table.shape[0]
        R = B * M
        req = torch.arange(B, device=dev).repeat_interleave(M)
        anchor_slot = torch.arange(M, device=dev) // self.kappa  # anchor position in self.anchors
        aslot = anchor_slot.repeat(B)
        Sr = S[req]
        nfull = Sr // bs
        col = torch.arange(table.shape[1], device=dev)[None]
        rel = col - nfull[:, None]
        priv = self._priv[:R].long()
        own = torch.gather(priv, 1, rel.clamp(0, self.branch_blocks - 1))
        bt = torch.where(rel < 0, table[req].long(), own)
        bt = torch.where(rel >= self.branch_blocks, torch.full_like(bt, -1), bt).to(torch.int32)
        # Copies: partial block (same positions), then path node j: S + path[j] -> S + j.
        o = torch.arange(bs, device=dev)[None]
        ppos = nfull[:, None] * bs + o
        pvalid = ppos < Sr[:, None]
        paths = self.anchor_paths[aslot]
        j = torch.arange(paths.shape[1], device=dev)[None]
        qvalid = j < self.anchor_pathlen[aslot][:, None]
        src_pos = torch.cat([ppos, Sr[:, None] + paths], 1)
        dst_pos = torch.cat([ppos, Sr[:, None] + j], 1)
        valid = torch.cat([pvalid, qvalid], 1).reshape(-1)
        src = c.slots(table[req], torch.where(torch.cat([pvalid, qvalid], 1), src_pos, 0))[valid]
        dst = c.slots(bt, torch.where(torch.cat([pvalid, qvalid], 1), dst_pos, 0))[valid]
        kf, vf = c.flat(slice(0, self.draft_layers))
        kf[:, dst] = kf[:, src]
        vf[:, dst] = vf[:, src]
        start = Sr + self.anchor_pathlen[aslot]
        return bt, start

    def _branch_work(self, S, table, branch_token, result):
        try:
            self._branch_work_inner(S, table, branch_token, result)
        except BaseException as e:  # re-raised by the main thread after join
            result["error"] = e

    def _branch_work_inner(self, S, table, branch_token, result):
        t0 = time.perf_counter()
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                bt, start = self._branch_tables(S, table)
                result["rollout"] = self._rollout(bt, start, branch_token.reshape(-1))
        else:
            bt, start = self._branch_tables(S, table)
            result["rollout"] = self._rollout(bt, start, branch_token.reshape(-1))
        result["time"] = time.perf_counter() - t0

    def _mirror(self, y, out, n, sp, res, t0):
        """Mirror-SD steps until every request has ``n`` tokens; a request that has them leaves the
        batch (its table rows are gathered, nothing else moves)."""
        c, dev, B_all, N, M = self.cache, self.device, y.shape[0], self.N, self.num_branches
        r = self.runner
        S_all = torch.tensor(c.lens[:B_all], dtype=torch.long, device=dev)
        for b in range(B_all):
            c.reserve(b, c.lens[b] + N)
        tf = time.perf_counter()
        chain, sib = self._rollout(c.block_table[:B_all], S_all, y)
        res.fresh_draft_s += time.perf_counter() - tf
        tokens_all = self.window_tokens(y, chain, sib)
        kids = self.anchor_kids
        A = self.anchors.shape[0]
        step = 0
        while True:
            act = [b for b in range(B_all) if len(out[b]) < n]
            if not act:
                break
            B = len(act)
            for b in act:
                c.reserve(b, c.lens[b] + N)
            if B == B_all:
                rows = None
                table, S, tokens = c.block_table[:B], S_all, tokens_all
            else:
                rows = torch.tensor(act, device=dev)
                table, S, tokens = c.block_table[rows], S_all[rows], tokens_all[rows]
            parents = self.parents.expand(B, N).contiguous()
            tree_mask = self.tree_mask.expand(B, N, -1).contiguous()
            pos = S[:, None] + self.depth
            cpos = S[:, None] + self._node
            seq = S + N
            # Target layers [0, d): then the early-exit candidates at the anchors.
            x, rope = self._forward(tokens, pos, table, seq, tree_mask, 0, self.draft_layers,
                                    cache_pos=cpos)
            xa = x[:, self.anchors].reshape(B * A, -1)
            _, cand = r.exit_topk(xa, self.kappa + 2)
            cand = cand.view(B, A, self.kappa + 2)
            kid_tok = torch.where(kids[None] >= 0, tokens[:, kids.clamp(min=0)], -1)  # [B, A, 2]
            bad = (cand[..., None] == kid_tok[:, :, None, :]).any(-1)
            order = torch.sort(bad.to(torch.int8), dim=-1, stable=True).indices[..., :self.kappa]
            branch_token = torch.gather(cand, 2, order).reshape(B, M)
            branch_anchor = self.anchors.repeat_interleave(self.kappa)[None].expand(B, M)
            branch_anchor = branch_anchor.to(torch.int32).contiguous()
            # Branch rollouts, concurrently with the target's remaining layers.
            result = {}
            use_branches = self.reuse
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(dev))
            worker = None
            if use_branches and self._worker is not None:
                self._worker.submit(S, table, branch_token)
            elif use_branches and self.overlap:
                worker = threading.Thread(target=self._branch_work,
                                          args=(S, table, branch_token, result))
                worker.start()
            elif use_branches:
                self._branch_work(S, table, branch_token, result)
            x, _ = self._forward(None, pos, table, seq, tree_mask, self.draft_layers, r.num_layers,
                                 x=x, rope=rope, cache_pos=cpos)
            logits = r.logits(x)
            if sp.greedy:
                acc_idx, acc_len, nxt = r.timer("verify_greedy", _ops.verify_greedy, tokens, parents,
                                                logits.argmax(-1))
            else:
                probs = self._probs(logits, sp)
                acc_idx, acc_len, nxt = r.timer("verify_sampling", _ops.verify_sampling, tokens,
                                                parents, probs, None, sp.seed, step)
            if worker is not None:
                tw = time.perf_counter()
                worker.join()
                res.draft_wait_s += time.perf_counter() - tw
            elif use_branches and self._worker is not None:
                tw = time.perf_counter()
                result["rollout"], result["time"] = self._worker.result(B)
                res.draft_wait_s += time.perf_counter() - tw
            if "error" in result:
                raise result["error"]
            if self._stream is not None:
                main = torch.cuda.current_stream(dev)
                main.wait_stream(self._stream)
                for t in result.get("rollout", ()):  # made on the side stream, used on this one
                    t.record_stream(main)
            res.draft_rollout_s += result.get("time", 0.0)
            r.timer("compact_kv_layers_", _ops.compact_kv_layers_, c.k, c.v, table,
                    seq.to(torch.int32), acc_idx, acc_len)
            reuse = r.timer("match_branch", _ops.match_branch, acc_idx, acc_len, nxt, branch_anchor,
                            branch_token)
            # Emit: accepted path tokens, then the correction / bonus token.
            path_tok = torch.gather(tokens, 1, acc_idx.long().clamp(min=0))
            acc_len_h = acc_len.tolist()
            path_h = path_tok.tolist()
            nxt_h = nxt.tolist()
            for i, b in enumerate(act):
                k = acc_len_h[i]
                out[b].extend(path_h[i][1:k + 1])
                out[b].append(nxt_h[i])
                c.lens[b] += k + 1
            S = S + acc_len.long() + 1
            res.accepted_per_step.append(sum(acc_len_h) / B)
            res.step_times.append(time.perf_counter() - t0)
            res.steps += 1
            step += 1
            # Next window: the matching precomputed branch, else a fresh rollout.
            if not use_branches:
                reuse = torch.full_like(reuse, -1)
            reuse_h = reuse.tolist()
            res.reuse_trials += B
            miss = [i for i in range(B) if reuse_h[i] < 0]
            res.reuse_hits += B - len(miss)
            if use_branches:
                rchain, rsib = result["rollout"]
                pick = torch.arange(B, device=dev) * M + reuse.long().clamp(min=0)
                chain, sib = rchain[pick], rsib[pick]
            else:
                chain = torch.zeros(B, self.chain_len, dtype=torch.long, device=dev)
                sib = torch.zeros_like(chain)
            if miss:
                for b in act:
                    c.reserve(b, c.lens[b] + N)
                mt = torch.tensor(miss, device=dev)
                table = c.block_table[:B] if rows is None else c.block_table[rows]  # reserved anew
                tf = time.perf_counter()
                fc, fs = self._rollout(table[mt], S[mt], nxt[mt])
                res.fresh_draft_s += time.perf_counter() - tf
                chain[mt], sib[mt] = fc, fs
            new_tokens = self.window_tokens(nxt, chain, sib)
            if rows is None:
                S_all, tokens_all = S, new_tokens
            else:
                S_all = S_all.clone()
                S_all[rows] = S
                tokens_all = tokens_all.clone()
                tokens_all[rows] = new_tokens


class _WorkerFailed(RuntimeError):
    """The draft worker process died or raised (the engine stops it; the next call starts anew)."""


class _DraftWorker:
    """Mirror-SD's branch rollouts in a forked worker process, concurrently with the target's
    suffix layers in this one: the CPU counterpart of the second CUDA stream (two threads would
    take turns holding the GIL, which small-tensor PyTorch code holds most of the time).

    The fork shares the model's weights copy-on-write (read only: the worker is a snapshot of the
    weights at its start; :meth:`Engine.close` after changing them) and the KV cache, which the
    engine allocated in anonymous shared memory. Per step the engine writes the job (prefix
    lengths, block-table rows, branch tokens) into shared tensors and sends one message; the worker
    copies the anchors' paths into the branches' private blocks of the draft layers, rolls the
    branches out (``Engine._branch_tables`` / ``Engine._rollout``, the code a thread would run)
    and writes the chains back. The target's suffix layers touch only layers >= draft_layers and
    the worker only the branches' private blocks of layers < draft_layers, so nothing races.
    """

    def __init__(self, engine):
        B, M, L = engine.max_batch, engine.num_branches, engine.chain_len
        width = engine.cache.block_table.shape[1]
        self.S = shared_zeros((B,), torch.long)
        self.table = shared_zeros((B, width), torch.int32)
        self.tokens = shared_zeros((B, M), torch.long)
        self.chain = shared_zeros((B * M, L), torch.long)
        self.sib = shared_zeros((B * M, L), torch.long)
        self.num_branches = M
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_draft_worker_main, args=(engine, child, self), daemon=True,
                                name="loramix-draft")
        self.proc.start()
        child.close()

    def submit(self, S, table, tokens):
        B = S.shape[0]
        self.S[:B].copy_(S)
        self.table[:B].copy_(table)
        self.tokens[:B].copy_(tokens)
        try:
            self.conn.send(B)
        except OSError as e:  # BrokenPipeError: the worker is gone
            raise self._died() from e

    def _died(self):
        self.proc.join(timeout=1)
        return _WorkerFailed(f"Engine: the draft worker process died (exit code {self.proc.exitcode}); "
                             "overlap='thread' avoids the process")

    def result(self, B):
        """(chain, sib) ``[B * M, chain_len]`` of the submitted job, and the worker's seconds."""
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            raise self._died() from e
        if status != "ok":
            raise _WorkerFailed(f"Engine: the draft worker process failed: {payload}")
        R = B * self.num_branches
        return (self.chain[:R].clone(), self.sib[:R].clone()), payload

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.terminate()
        self.conn.close()


def _draft_worker_main(engine, conn, job):
    """The worker's loop (in the forked process): one job per message, None to stop."""
    torch.set_num_threads(1)  # one core each; also keeps OpenMP from starting a pool after fork
    while True:
        try:
            B = conn.recv()
        except (EOFError, OSError):
            break
        if B is None:
            break
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                bt, start = engine._branch_tables(job.S[:B].clone(), job.table[:B].clone())
                chain, sib = engine._rollout(bt, start, job.tokens[:B].reshape(-1))
            R = chain.shape[0]
            job.chain[:R].copy_(chain)
            job.sib[:R].copy_(sib)
            conn.send(("ok", time.perf_counter() - t0))
        except BaseException as e:  # reported to the engine, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()
