"""The package's main job, end to end: Mirror speculative decoding of a LoRA-Mixer model.

    python -m loramix_kernels.demo [--quick] [--device DEV] [--json PATH] [--plot PATH]

1. Builds a small Llama-architecture transformers model (random init, byte-level tokenizer) and
   trains it briefly on text that ships with Python (the standard library's own source files),
   with an early-exit loss on an intermediate layer so that the target's first layers and its
   shared LM head form the draft (LayerSkip-style self-speculation). Then LoRA-Mixer experts and
   routers are injected into q/k/v/o (``loramix_kernels.nn.inject``, packed q/k/v) and trained.
   The weights are cached on disk (``~/.cache/loramix_kernels/demo``), so a second run starts at once.
2. Decodes a batch of prompts of different lengths with the engine (``loramix_kernels.engine``):
   plain decoding (one token per target pass) and Mirror-SD (tree drafts, early-exit candidates,
   branch rollouts overlapped with the target's suffix layers, one-pass tree verification, branch
   reuse), greedy; checks that Mirror-SD's output equals plain greedy decoding token for token for
   every prompt; and runs transformers' assisted generation (``generate(assistant_model=...)``) on
   the same weights (the draft = the same first layers and head) as the peer.
3. Prints and writes a JSON report (tokens per second, speedups, mean accepted length, branch
   reuse rate, time per op, overlap measurement) and a PNG plot (if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

#: Standard-library sources used as training text (those present in the running Python).
CORPUS_FILES = (
    "textwrap.py", "argparse.py", "functools.py", "dataclasses.py", "inspect.py", "typing.py",
    "pathlib.py", "shutil.py", "os.py", "random.py", "string.py", "heapq.py", "bisect.py",
    "contextlib.py", "enum.py", "fractions.py", "statistics.py", "tempfile.py", "collections/__init__.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "unittest/case.py",
)

#: Model and run sizes. ``quick`` is for CI (seconds); ``full`` for the README command.
PRESETS = {
    "full": dict(hidden=128, layers=8, heads=4, kv_heads=2, ffn=256, draft_layers=2,
                 experts=4, rank=8, top_k=2, seq=96, batch=8, steps=600, mixer_steps=60,
                 lr=3e-3, corpus_bytes=600_000, prompts=8, new_tokens=64,
                 chain_len=6, kappa=2, num_anchors=1, hf_prompts=4, repeats=4),
    "quick": dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=128, draft_layers=1,
                  experts=4, rank=4, top_k=2, seq=64, batch=8, steps=80, mixer_steps=10,
                  lr=4e-3, corpus_bytes=150_000, prompts=4, new_tokens=32,
                  chain_len=4, kappa=2, num_anchors=2, hf_prompts=2, repeats=1),
}

#: Bump when training changes, so stale cached weights are not reused.
TRAIN_VERSION = 1


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- data
def load_corpus(max_bytes: int) -> bytes:
    """The training text: standard-library source files of the running Python, concatenated."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"\n".join(parts)[:max_bytes]
    if len(text) < 10_000:
        raise RuntimeError(f"demo: found only {len(text)} bytes of standard-library source under {root}")
    return text


def encode(text: bytes) -> list[int]:
    """Byte-level tokenizer: token id = byte value (vocabulary 256)."""
    return list(text)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def make_prompts(text: bytes, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of different lengths (12 to 48 bytes) cut at line starts of the held-out tail."""
    tail = text[int(len(text) * 0.9):]
    starts = [i + 1 for i in range(len(tail) - 64) if tail[i] == 10 and tail[i + 1] not in (10, 32)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        s = starts[int(torch.randint(len(starts), (1,), generator=g))]
        length = 12 + (36 * j) // max(n - 1, 1)
        out.append(encode(tail[s:s + length]))
    return out


# ---------------------------------------------------------------------------------------- model
def build_model(p, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=p["hidden"], intermediate_size=p["ffn"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def inject_mixer(model, p):
    from . import nn as lnn

    lnn.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], num_experts=p["experts"],
               r=p["rank"], top_k=p["top_k"], pack_qkv=True)
    lnn.set_routing(model, "topk")
    return model


def draft_view(model, draft_layers, experts=True):
    """A transformers ``LlamaForCausalLM`` made of the target's first ``draft_layers`` layers, final
    norm and LM head (shared modules, no copy): the draft as transformers sees it. ``experts=False``:
    each LoRA-Mixer projection of those layers replaced by its frozen base layer (the engine's
    ``draft_experts=False``; shallow copies of the layers, the weights still shared)."""
    from transformers import LlamaForCausalLM

    from .nn import LoRAMixerLinear

    def base_layer(layer):
        new = copy.copy(layer)
        new._modules = dict(layer._modules)
        for name, child in layer.named_children():
            if isinstance(child, LoRAMixerLinear):
                new._modules[name] = child.base
            elif any(isinstance(m, LoRAMixerLinear) for m in child.modules()):
                new._modules[name] = base_layer(child)
        return new

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers = draft_layers
    with torch.device("meta"):
        d = LlamaForCausalLM(cfg)
    d.model.embed_tokens = model.model.embed_tokens
    layers = list(model.model.layers[:draft_layers])
    d.model.layers = torch.nn.ModuleList(layers if experts else [base_layer(m) for m in layers])
    d.model.norm = model.model.norm
    d.model.rotary_emb = model.model.rotary_emb
    d.lm_head = model.lm_head
    d.generation_config = model.generation_config
    return d.eval()


def _loss(model, x, draft_layers):
    """Next-byte loss of the target, plus the early-exit head (layer ``draft_layers``, final norm,
    shared LM head): its own next-byte loss and a distillation term towards the target."""
    out = model(input_ids=x[:, :-1], output_hidden_states=True)
    y = x[:, 1:].reshape(-1)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    ex = model.lm_head(model.model.norm(out.hidden_states[draft_layers]))
    ex = ex.reshape(-1, ex.shape[-1]).float()
    kl = F.kl_div(F.log_softmax(ex, -1), F.log_softmax(logits.detach(), -1), log_target=True,
                  reduction="batchmean")
    return F.cross_entropy(logits, y), F.cross_entropy(ex, y) + kl


def _progress(total, desc, quiet):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=True)
    except ImportError:  # pragma: no cover - tqdm ships with transformers' dependencies
        class _Bar:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if not quiet:
                    print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                if not quiet:
                    print(file=sys.stderr)
        return _Bar()


def _train(model, params, data, steps, p, device, desc, quiet):
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    n = len(data) - p["seq"] - 2
    bar = _progress(steps, desc, quiet)
    last = (float("nan"), float("nan"))
    warm = max(1, steps // 10)
    for step in range(steps):
        lr = p["lr"] * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n, (p["batch"],), generator=g)
        x = data[starts[:, None] + torch.arange(p["seq"] + 1)].to(device)
        main, early = _loss(model, x, p["draft_layers"])
        opt.zero_grad(set_to_none=True)
        (main + early).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = (main.item(), early.item())
        bar.update(1)
        bar.set_postfix_str(f"loss {last[0]:.3f} early-exit {last[1]:.3f}")
    bar.close()
    return last


def cache_dir(arg=None) -> str:
    return arg or os.environ.get("LORAMIX_DEMO_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "loramix_kernels", "demo")


def trained_target(p, device, text, cache, quiet=False):
    """The trained target (LoRA-Mixer injected), from the disk cache when present.
    Returns (model, info dict)."""
    train_keys = ("hidden", "layers", "heads", "kv_heads", "ffn", "draft_layers", "experts", "rank",
                  "top_k", "seq", "batch", "steps", "mixer_steps", "lr", "corpus_bytes")
    key = json.dumps(dict({k: p[k] for k in train_keys}, v=TRAIN_VERSION,
                          text=hashlib.sha1(text).hexdigest()), sort_keys=True)
    path = os.path.join(cache, f"target-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
    model = build_model(p, "cpu")
    inject_mixer(model, p)
    info = dict(cache_path=path)
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        info.update(state["info"], cached=True, train_s=0.0)
        return model.to(device).eval(), info
    t0 = time.perf_counter()
    model = build_model(p, device)
    data = torch.tensor(encode(text), dtype=torch.long)
    model.train()
    l1 = _train(model, [q for q in model.parameters()], data, p["steps"], p, device,
                "train target (+ early-exit head)", quiet)
    from . import nn as lnn
    inject_mixer(model, p)
    lnn.mark_only_mixer_trainable(model)
    l2 = _train(model, [q for q in model.parameters() if q.requires_grad], data, p["mixer_steps"],
                p, device, "train LoRA-Mixer experts + routers", quiet)
    model.eval()
    info.update(cached=False, train_s=time.perf_counter() - t0, loss=l2[0], early_exit_loss=l2[1],
                pretrain_loss=l1[0], mixer_params=sum(q.numel() for q in model.parameters()
                                                      if q.requires_grad))
    for q in model.parameters():
        q.requires_grad_(False)
    os.makedirs(cache, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    torch.save(dict(model={k: v.cpu() for k, v in model.state_dict().items()},
                    info={k: v for k, v in info.items() if k not in ("cached", "train_s", "cache_path")}),
               tmp)
    os.replace(tmp, path)
    return model, info


# ---------------------------------------------------------------------------------------- bench
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_hf(model, draft, prompts, n, device, assisted: bool):
    """transformers ``generate`` (greedy), one prompt at a time (assisted generation takes batch 1).
    Returns (tokens per prompt, seconds)."""
    outs = []
    _sync(device)
    t0 = time.perf_counter()
    for pr in prompts:
        ids = torch.tensor([pr], device=device)
        kw = dict(assistant_model=draft) if assisted else {}
        o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        outs.append(o[0, len(pr):].tolist())
    _sync(device)
    return outs, time.perf_counter() - t0


def run(args) -> dict:
    from .engine import Engine, OpTimer

    p = dict(PRESETS["quick" if args.quick else "full"])
    for k in ("steps", "mixer_steps", "prompts", "new_tokens", "repeats"):
        v = getattr(args, k, None)
        if v is not None:
            p[k] = v
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    text = load_corpus(p["corpus_bytes"])
    model, info = trained_target(p, device, text, cache_dir(args.cache_dir), quiet=args.quiet)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model.to(dtype)
    prompts = make_prompts(text, p["prompts"])
    n = p["new_tokens"]
    d = p["draft_layers"]
    # The draft: the target's first d layers through their base projections (no LoRA-Mixer
    # experts: about a third of a layer's host time at these sizes, and the early-exit head above
    # them proposes as well); the target verifies with its experts, so the output is unchanged.
    kw = dict(draft_layers=d, chain_len=p["chain_len"], kappa=p["kappa"], max_batch=len(prompts),
              num_anchors=p["num_anchors"], max_len=max(map(len, prompts)) + n + 64,
              draft_experts=False)
    eng = Engine(model, overlap=True, **kw)
    eng_seq = Engine(model, overlap=False, **kw)
    eng_fresh = Engine(model, overlap=False, reuse=False, **kw)
    warm = [pr[:8] for pr in prompts]
    for e in (eng, eng_seq, eng_fresh):  # warm-up (allocator, lazy imports, CUDA compilation)
        e.generate(warm, 8, mode="plain")
        e.generate(warm, 8, mode="mirror")
    log("decoding ...")
    # Interleaved repeats, best of each (a shared machine's load varies from second to second);
    # every repeat's output is checked against plain greedy decoding.
    best = {}
    equal, equal_seq, equal_fresh = [True] * len(prompts), [True] * len(prompts), [True] * len(prompts)
    for _ in range(p["repeats"]):
        runs = dict(plain=eng.generate(prompts, n, mode="plain"),
                    mirror=eng.generate(prompts, n, mode="mirror"),
                    mirror_seq=eng_seq.generate(prompts, n, mode="mirror"),
                    fresh=eng_fresh.generate(prompts, n, mode="mirror"))
        ref = runs["plain"].tokens
        for flags, key in ((equal, "mirror"), (equal_seq, "mirror_seq"), (equal_fresh, "fresh")):
            for i, (a, b) in enumerate(zip(runs[key].tokens, ref)):
                flags[i] = flags[i] and a == b
        for k, v in runs.items():
            if k not in best or v.elapsed_s < best[k].elapsed_s:
                best[k] = v
    plain, mirror, mirror_seq, fresh = best["plain"], best["mirror"], best["mirror_seq"], best["fresh"]
    # transformers: plain greedy generate and assisted generation on the same weights.
    draft = draft_view(model, d, experts=kw["draft_experts"])  # the engine's own draft
    hp = prompts[:p["hf_prompts"]]
    run_hf(model, draft, [hp[0][:8]], 4, device, True)  # warm-up
    # The same prompts one at a time on the engine (batch 1, as transformers' assisted generation).
    one = dict(kw, max_batch=1)
    e1, e1_plain = Engine(model, overlap=True, **one), Engine(model, overlap=True, **one)
    e1_fresh = Engine(model, overlap=False, reuse=False, **one)
    for e in (e1, e1_fresh):
        e.generate([hp[0][:8]], 4, mode="mirror")
    # Batch 1 and HF: interleaved repeats as well, best of each (short runs: noisy one by one).
    t_m1 = t_p1 = t_f1 = hf_s = hf_plain_s = float("inf")
    for _ in range(p["repeats"]):
        hf_tok, s_ = run_hf(model, draft, hp, n, device, assisted=True)
        hf_s = min(hf_s, s_)
        hf_plain_tok, s_ = run_hf(model, draft, hp, n, device, assisted=False)
        hf_plain_s = min(hf_plain_s, s_)
        t_m1 = min(t_m1, sum(e1.generate([pr], n, mode="mirror").elapsed_s for pr in hp))
        t_p1 = min(t_p1, sum(e1_plain.generate([pr], n, mode="plain").elapsed_s for pr in hp))
        t_f1 = min(t_f1, sum(e1_fresh.generate([pr], n, mode="mirror").elapsed_s for pr in hp))
    hf_equal = [a == b for a, b in zip(hf_tok, plain.tokens)]
    e1.close()
    # Time per op: one more Mirror-SD run with a timer around every op (synchronised on CUDA;
    # overlap off so the draft's ops are not double counted).
    timer = OpTimer(enabled=True, sync=device.type == "cuda")
    prof = Engine(model, overlap=False, timer=timer, **kw).generate(prompts, min(n, 32), mode="mirror")
    prof_total = prof.elapsed_s

    plain_tps = plain.tokens_per_s
    mirror_tps = mirror.tokens_per_s
    hf_tps = len(hp) * n / hf_s
    per_prompt_plain_s = plain.elapsed_s  # the whole batch
    report = {
        "lossless": all(equal),
        "lossless_prompts": f"{sum(equal)}/{len(equal)}",
        "lossless_no_overlap": all(equal_seq),
        "lossless_no_branches": all(equal_fresh),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                 else f" ({platform.processor() or platform.machine()}, "
                                      f"{torch.get_num_threads()} threads)"),
        "dtype": str(dtype).replace("torch.", ""),
        "quick": bool(args.quick),
        "prompts": len(prompts),
        "prompt_lengths": [len(pr) for pr in prompts],
        "new_tokens_per_prompt": n,
        "timing": f"best of {p['repeats']} interleaved runs per engine mode, batch-1 mode and HF run",
        "plain_tokens_per_s": plain_tps,
        "mirror_tokens_per_s": mirror_tps,
        "mirror_no_overlap_tokens_per_s": mirror_seq.tokens_per_s,
        # Same engine, same tree drafts and verification, but no branch rollouts: the draft always
        # rolls out the next window after verification (what Mirror-SD's branches replace).
        "tree_spec_no_branches_tokens_per_s": fresh.tokens_per_s,
        "speedup_no_branches_vs_plain": fresh.tokens_per_s / plain_tps,
        "hf_assisted_tokens_per_s": hf_tps,
        "hf_plain_tokens_per_s": len(hp) * n / hf_plain_s,
        "hf_prompts": len(hp),
        "hf_assisted_matches_engine_plain": f"{sum(hf_equal)}/{len(hf_equal)}",
        "speedup_vs_plain": mirror_tps / plain_tps,
        "speedup_vs_hf_assisted": mirror_tps / hf_tps,
        # Batch 1 on both sides (the engine's batched run above is what a server would do; this
        # separates the batching gain from the decoding method).
        "mirror_batch1_tokens_per_s": len(hp) * n / t_m1,
        "plain_batch1_tokens_per_s": len(hp) * n / t_p1,
        "speedup_vs_hf_assisted_batch1": (len(hp) * n / t_m1) / hf_tps,
        "speedup_vs_plain_batch1": t_p1 / t_m1,
        "tree_spec_no_branches_batch1_tokens_per_s": len(hp) * n / t_f1,
        "speedup_no_branches_vs_plain_batch1": t_p1 / t_f1,
        "mean_accepted_len": mirror.mean_accepted_len,
        # per request and step: the accepted draft tokens plus the correction / bonus token
        "mean_tokens_per_step": mirror.mean_accepted_len + 1.0,
        "branch_reuse_rate": mirror.branch_reuse_rate,
        "mirror_steps": mirror.steps,
        "plain_steps": plain.steps + 1,
        "overlap": {
            "mode": ("cuda stream" if device.type == "cuda" else
                     "worker process" if eng._use_process else "worker thread"),
            "with_overlap_s": mirror.elapsed_s,
            "without_overlap_s": mirror_seq.elapsed_s,
            "gain": mirror_seq.elapsed_s / mirror.elapsed_s,
            "branch_rollout_s": mirror.draft_rollout_s,
            "wait_for_rollouts_s": mirror.draft_wait_s,
            "fresh_draft_s": mirror.fresh_draft_s,
        },
        "time_per_op_ms": {k: 1e3 * v for k, v in sorted(timer.total.items(), key=lambda kv: -kv[1])},
        "calls_per_op": dict(timer.calls),
        "profiled_run_s": prof_total,
        "plain_elapsed_s": per_prompt_plain_s,
        "tree": {"nodes": eng.N, "chain_len": p["chain_len"], "siblings": True, "kappa": p["kappa"],
                 "branches_per_request": eng.num_branches, "anchors": p["num_anchors"],
                 "draft_layers": d, "draft_experts": kw["draft_experts"],
                 "target_layers": p["layers"]},
        "model": {k: p[k] for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "experts",
                                    "rank", "top_k")},
        "training": info,
        "accepted_per_step": mirror.accepted_per_step,
        "step_times_s": mirror.step_times,
        "sample": {"prompt": decode(prompts[-1]), "mirror": decode(mirror.tokens[-1])},
        "torch": torch.__version__,
        "total_s": time.perf_counter() - t_start,
    }
    eng.close()  # the draft worker process
    return report


def plot(report, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    acc = report["accepted_per_step"]
    ts = report["step_times_s"]
    B, n = report["prompts"], report["new_tokens_per_prompt"]
    # Running speedup: tokens emitted so far / elapsed, over plain decoding's rate.
    emitted, tot = [], B  # the first token comes from the prefill
    for a in acc:
        tot += B * (a + 1)
        emitted.append(min(tot, B * n))
    speed = [e / t / report["plain_tokens_per_s"] for e, t in zip(emitted, ts)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(range(1, len(acc) + 1), acc, marker=".")
    ax[0].axhline(report["mean_accepted_len"], ls="--", c="gray", label="mean")
    ax[0].set(xlabel="Mirror-SD step", ylabel="accepted draft tokens (batch mean)",
              title="Accepted length")
    ax[0].legend()
    ax[1].plot(range(1, len(speed) + 1), speed, marker=".", label="Mirror-SD / plain (running)")
    ax[1].axhline(report["speedup_vs_plain"], ls="--", c="gray", label="end-to-end vs plain")
    ax[1].axhline(report["speedup_vs_hf_assisted"], ls=":", c="C3", label="end-to-end vs HF assisted")
    ax[1].set(xlabel="Mirror-SD step", ylabel="speedup", title=f"Speedup ({report['device']})")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(r) -> str:
    o = r["overlap"]
    tr = r["training"]
    trained = "cached" if tr["cached"] else "%.0f s" % tr["train_s"]
    lines = [
        f"device: {r['device']}, {r['prompts']} prompts x {r['new_tokens_per_prompt']} new tokens "
        f"(training: {trained})",
        f"lossless (Mirror-SD greedy == plain greedy, every prompt): {r['lossless']} "
        f"({r['lossless_prompts']})",
        f"plain decoding (engine)      {r['plain_tokens_per_s']:9.1f} tok/s",
        f"Mirror-SD (engine)           {r['mirror_tokens_per_s']:9.1f} tok/s   "
        f"x{r['speedup_vs_plain']:.2f} vs plain, x{r['speedup_vs_hf_assisted']:.2f} vs HF assisted",
        f"HF assisted generation       {r['hf_assisted_tokens_per_s']:9.1f} tok/s   (batch 1, "
        f"{r['hf_prompts']} prompts; HF plain generate {r['hf_plain_tokens_per_s']:.1f} tok/s)",
        f"batch 1 (same {r['hf_prompts']} prompts): Mirror-SD {r['mirror_batch1_tokens_per_s']:.1f} tok/s, "
        f"plain {r['plain_batch1_tokens_per_s']:.1f} tok/s: x{r['speedup_vs_plain_batch1']:.2f} vs plain, "
        f"x{r['speedup_vs_hf_assisted_batch1']:.2f} vs HF assisted",
        f"mean accepted length {r['mean_accepted_len']:.2f} draft tokens/step "
        f"({r['mean_tokens_per_step']:.2f} emitted), branch reuse rate {r['branch_reuse_rate']:.2f}",
        f"overlap ({o['mode']}): {o['with_overlap_s']:.3f} s with, {o['without_overlap_s']:.3f} s "
        f"without (x{o['gain']:.2f})",
        f"tree speculation without branch rollouts {r['tree_spec_no_branches_tokens_per_s']:.1f} tok/s "
        f"(x{r['speedup_no_branches_vs_plain']:.2f} vs plain; batch 1: "
        f"x{r['speedup_no_branches_vs_plain_batch1']:.2f})",
        "time per op (profiled run, ms): " + ", ".join(
            f"{k} {v:.1f}" for k, v in r["time_per_op_ms"].items()),
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m loramix_kernels.demo",
        description="Mirror speculative decoding of a LoRA-Mixer Llama model, end to end: trains a "
                    "small model on the Python standard library's source (cached after the first "
                    "run), then compares plain decoding, Mirror-SD and transformers' assisted "
                    "generation on the same weights, and checks that Mirror-SD is lossless.")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, short training and few tokens (seconds; for CI and smoke tests)")
    ap.add_argument("--device", default=None,
                    help="torch device to run on, e.g. cpu or cuda (default: cuda if available, else "
                         "cpu). On CUDA the ops run their Triton kernels, in float16")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the full report (all measurements, per-step accepted lengths) as JSON")
    ap.add_argument("--plot", default=None, metavar="PATH",
                    help="write a PNG plot of accepted length and speedup over the run (needs "
                         "matplotlib; skipped with a message otherwise)")
    ap.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="where trained weights are cached (default: $LORAMIX_DEMO_CACHE or "
                         "~/.cache/loramix_kernels/demo)")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    ap.add_argument("--mixer-steps", dest="mixer_steps", type=int, default=None,
                    help="override the LoRA-Mixer fine-tuning steps")
    ap.add_argument("--prompts", type=int, default=None, help="override the number of prompts (batch)")
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=None,
                    help="override the tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: tiny matrices gain nothing from "
                         "more, the draft's worker process takes another core, and spinning threads "
                         "collapse on a shared machine); 0 keeps torch's default")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats of each measurement (engine modes, batch 1, HF), best "
                         "one kept (default 4; 1 with --quick)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    report = run(args)
    if args.plot:
        report["plot"] = args.plot if plot(report, args.plot) else None
    print(summary(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
