"""loramix_kernels.distributed: tensor parallelism (column / row LoRA-Mixer layers, 2 and 4
ranks) and data parallelism (DDP, FSDP2), gloo on CPU, ranks spawned by torch.multiprocessing on a
file rendezvous (no network), bounded timeouts. The checks run inside the workers (an assertion
there fails the test with the worker's traceback). Workers use ``use_backend("auto")`` (the
PyTorch CPU kernels: the Triton interpreter is too slow for multi-process tests; the sharding
ops' Triton kernels are tested in tests/test_sharding.py).
"""

import copy
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

TIMEOUT_S = 120


def _entry(rank, world, store_path, fn, args):
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to pick, so parallel test workers cannot race for one.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        import loramix_kernels

        with loramix_kernels.use_backend("auto"):
            fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(world, fn, *args):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raises a worker's failure; kills
    the workers after TIMEOUT_S."""
    store = tempfile.NamedTemporaryFile(prefix="loramix_dist_", delete=False)
    store.close()
    os.unlink(store.name)  # the store file must not exist yet; each run gets its own name
    ctx = mp.start_processes(_entry, args=(world, store.name, fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        if os.path.exists(store.name):
            os.unlink(store.name)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """up (column-parallel) -> gelu -> down (row-parallel): the tensor-parallel MLP block."""

    def __init__(self, d=12, hidden=18):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def make_model(seed=0, E=4, r=3, k=2, routing="topk"):
    """A LoRA-Mixer MLP with non-zero B (identical on every rank for one seed)."""
    from loramix_kernels import nn as lnn

    torch.manual_seed(seed)
    model = MLP()
    lnn.inject(model, ["up", "down"], num_experts=E, r=r, top_k=k, lora_alpha=2 * r, routing=routing)
    with torch.no_grad():
        for m in lnn.mixer_modules(model).values():
            m.lora_b.normal_(0, 0.3)
            m.router.weight.mul_(3)
    return model


def close(a, b, what, tol=2e-5):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------
# tensor parallelism
# ------------------------------------------------------------------------------------------


PLAN = {"up": "column", "down": "row"}


def _tp_worker(rank, world, routing):
    from loramix_kernels import distributed as D

    full = make_model(routing=routing)
    tp = copy.deepcopy(full)
    new = D.shard_mixer(tp, None, PLAN)
    assert set(new) == {"up", "down"}
    assert isinstance(tp.up, D.ColumnParallelLoRAMixerLinear) and isinstance(tp.down, D.RowParallelLoRAMixerLinear)
    torch.manual_seed(1)
    T, k, r, E = 2 * 7, full.up.top_k, full.up.r, full.up.num_experts
    x = torch.randn(2, 7, 12)
    w = torch.randn(2, 7, 12)
    xf = x.clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)

    # forward: the row layer returns the full output on every rank
    y_full = full(xf)
    y_tp = tp(xt)
    close(y_tp, y_full, "forward")
    # routing identical to the unsharded model and across ranks (same ids, same gates)
    for name in ("up", "down"):
        m_full, m_tp = getattr(full, name), getattr(tp, name)
        assert torch.equal(m_tp.last_expert_ids.long(), m_full.last_expert_ids.long()), name
        ids = m_tp.last_expert_ids.long().contiguous()
        gates = m_tp.last_gates.detach().float().contiguous()
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        all_g = [torch.empty_like(gates) for _ in range(world)]
        dist.all_gather(all_ids, ids)
        dist.all_gather(all_g, gates)
        for i in range(world):
            assert torch.equal(all_ids[i], ids), f"{name}: expert ids differ between ranks 0..{world}"
            assert torch.equal(all_g[i], gates), f"{name}: gates differ between ranks"
        probs = m_tp.last_router_probs.detach().contiguous()
        all_p = [torch.empty_like(probs) for _ in range(world)]
        dist.all_gather(all_p, probs)
        assert all(torch.equal(p, probs) for p in all_p), f"{name}: router probabilities differ between ranks"
    # bytes all-reduced: the LoRA part of the row layer is exactly T*k*r*4 (k: the routed slots,
    # all E experts in soft routing); column layer: none
    k = tp.down.last_gates.shape[1]
    assert k == (E if routing == "soft" else full.down.top_k)
    assert tp.down.comm_bytes["lora"] == T * k * r * 4, tp.down.comm_bytes
    assert tp.down.comm_bytes["router"] == T * E * 4
    assert tp.down.comm_bytes["base"] == T * 12 * 4  # the base layer's own all-reduce
    assert all(v == 0 for v in tp.up.comm_bytes.values()), tp.up.comm_bytes
    tp.down.reset_comm_bytes()
    with torch.no_grad():  # inference path: fused routed_lora in the column layer
        close(tp(x), y_full.detach(), "forward without autograd")
    assert tp.down.comm_bytes["lora"] == T * k * r * 4

    # backward: every sharded gradient equals its slice of the unsharded gradient
    (y_full * w).sum().backward()
    (y_tp * w).sum().backward()
    close(xt.grad, xf.grad, "dx")
    up, fu = tp.up, full.up
    close(up.lora_a.grad, fu.lora_a.grad, "up.lora_a")
    close(up.lora_b.grad, fu.lora_b.grad[:, up.lo:up.hi], "up.lora_b")
    close(up.router.weight.grad, fu.router.weight.grad, "up.router.weight")
    close(up.router.bias.grad, fu.router.bias.grad, "up.router.bias")
    dn, fd = tp.down, full.down
    close(dn.lora_a.grad, fd.lora_a.grad[:, :, dn.lo:dn.hi], "down.lora_a")
    close(dn.lora_b.grad, fd.lora_b.grad[:, dn.out_lo:dn.out_hi], "down.lora_b")
    close(dn.router_weight.grad, fd.router.weight.grad[:, dn.lo:dn.hi], "down.router_weight")
    close(dn.router_bias.grad, fd.router.bias.grad, "down.router_bias")
    assert up.weight.grad is None and dn.weight.grad is None  # frozen bases

    # a single layer through shard_mixer (plan given as a string)
    row = D.shard_mixer(full.down, None, "row")[""]
    assert isinstance(row, D.RowParallelLoRAMixerLinear) and (row.lo, row.hi) == D.shard_bounds(18, world, rank)
    # a column layer alone with gather_output: the full output on every rank
    col = D.ColumnParallelLoRAMixerLinear(full.up, gather_output=True)
    with torch.no_grad():
        close(col(x), full.up(x), "gather_output")


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_unsharded(world):
    run_workers(world, _tp_worker, "topk")


def test_tensor_parallel_soft_routing():
    run_workers(2, _tp_worker, "soft")


# ------------------------------------------------------------------------------------------
# data parallelism
# ------------------------------------------------------------------------------------------


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, 12, generator=g), torch.randn(8, 5, 12, generator=g)


def _loss(forward, model, x, w, mode):
    """Task loss (mean over the tokens) plus a routing balance term over both layers: ``none``;
    ``local``: losses.switch_balance_loss of the tokens this process saw; ``global``: the same
    loss on distributed.global_routing_statistics; ``reference``: the same loss on the
    single-process statistics of all tokens passed (the oracle of ``global``)."""
    from loramix_kernels import distributed as D
    from loramix_kernels import losses

    loss = (forward(x) * w).mean()
    if mode == "none":
        return loss
    for m in (model.up, model.down):
        probs, ids = m.last_router_probs, m.last_expert_ids
        if mode == "local":
            loss = loss + 0.1 * losses.switch_balance_loss(probs, ids)
            continue
        stats = D.global_routing_statistics if mode == "global" else losses.routing_statistics
        pbar, fbar = stats(probs, ids)
        loss = loss + 0.1 * probs.shape[-1] * (pbar * fbar).sum()
    return loss


def _single_process_grads(mode, world):
    """The oracle: one process, the whole batch. ``local``: the mean of the per-rank losses (what
    DDP computes with a per-rank routing loss); ``global``: the loss of the whole batch."""
    model = make_model(seed=5)
    x, w = _batch()
    if mode == "local":
        loss = sum(_loss(model, model, xs, ws, "local") for xs, ws in zip(x.chunk(world), w.chunk(world))) / world
    else:
        loss = _loss(model, model, x, w, "reference" if mode == "global" else "none")
    loss.backward()
    return {n: p.grad for n, p in _trainable(model).items()}


def _ddp_worker(rank, world, tmpdir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from loramix_kernels import nn as lnn

    x, w = _batch()
    xs, ws = x.chunk(world)[rank], w.chunk(world)[rank]
    grads = {}
    for mode in ("none", "local", "global"):
        model = make_model(seed=5)
        ddp = DDP(model)
        _loss(ddp, model, xs, ws, mode).backward()
        want = _single_process_grads(mode, world)
        for n, p in _trainable(model).items():
            close(p.grad, want[n], f"DDP {mode}: {n}")
        grads[mode] = {n: p.grad for n, p in _trainable(model).items()}
    # the routing loss does not see the global batch by itself: local != global statistics
    diff = max((grads["local"][n] - grads["global"][n]).abs().max().item() for n in grads["local"])
    assert diff > 1e-5, "the local and global routing statistics gave the same gradients"
    # one optimizer step, checkpoint from rank 0, load back on every rank
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    path = os.path.join(tmpdir, "mixer.safetensors")
    if rank == 0:
        lnn.save_mixer(model, path)
    dist.barrier()
    fresh = MLP()
    lnn.load_mixer(fresh, path)
    for n, p in _trainable(model).items():
        assert torch.equal(dict(fresh.named_parameters())[n].detach(), p.detach()), n


def test_ddp_gradients_equal_single_process():
    with tempfile.TemporaryDirectory() as d:
        run_workers(2, _ddp_worker, d)


def _fsdp_worker(rank, world, tmpdir):
    from torch.distributed.fsdp import fully_shard

    from loramix_kernels import nn as lnn

    x, w = _batch()
    xs, ws = x.chunk(world)[rank], w.chunk(world)[rank]
    model = make_model(seed=5)
    for m in lnn.mixer_modules(model).values():
        fully_shard(m)
    fully_shard(model)
    y = model(xs)
    # FSDP2 reduce-scatters the gradients with an average over the ranks, like DDP
    (y * ws).mean().backward()
    want = _single_process_grads("none", world)
    for n, p in _trainable(model).items():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        close(g, want[n], f"FSDP2: {n}")
    # checkpoint: gather the full parameters on every rank, save on rank 0, load back
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    plain = make_model(seed=5)
    plain.load_state_dict(state)
    path = os.path.join(tmpdir, "fsdp.safetensors")
    if rank == 0:
        lnn.save_mixer(plain, path)
    dist.barrier()
    fresh = MLP()
    lnn.load_mixer(fresh, path)
    for n, p in _trainable(plain).items():
        assert torch.equal(dict(fresh.named_parameters())[n].detach(), p.detach()), n


def test_fsdp2_gradients_equal_single_process():
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    with tempfile.TemporaryDirectory() as d:
        run_workers(2, _fsdp_worker, d)


def test_shard_mixer_bad_plan():
    from loramix_kernels import distributed as D

    model = make_model()
    with pytest.raises(ValueError, match="shard_mixer: plan"):
        D.shard_mixer(model, None, {"up": "diagonal"})
    with pytest.raises(ValueError, match="shard_mixer: plan"):
        D.shard_mixer(model, None, None)


def test_unsupported_layers_raise():
    from loramix_kernels import distributed as D
    from loramix_kernels import nn as lnn

    hard = lnn.LoRAMixerLinear(nn.Linear(4, 6), 3, 2, 1, routing="hard")
    with pytest.raises(ValueError, match="ColumnParallelLoRAMixerLinear: routing 'hard'"):
        D.ColumnParallelLoRAMixerLinear(hard)
    arrow = lnn.LoRAMixerLinear(nn.Linear(4, 6), 3, 2, 1, router_kind="arrow")
    with pytest.raises(ValueError, match="RowParallelLoRAMixerLinear: router_kind 'arrow'"):
        D.RowParallelLoRAMixerLinear(arrow)
    with pytest.raises(TypeError, match="must be a LoRAMixerLinear"):
        D.RowParallelLoRAMixerLinear(nn.Linear(4, 6))


def test_shard_bounds():
    from loramix_kernels.distributed import shard_bounds

    for n in (1, 7, 18, 64):
        for world in (1, 2, 3, 4):
            b = [shard_bounds(n, world, r) for r in range(world)]
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(world - 1))
            assert [hi - lo for lo, hi in b] == [len(c) for c in torch.arange(n).tensor_split(world)]
