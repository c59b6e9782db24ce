"""Benchmarks of the tensor-parallel LoRA-Mixer kernels on ONE device: what each rank runs locally
at shard widths 1/2, 1/4, 1/8 of the issue-A shapes (d 4096, packed q/k/v 4096/1024/1024, E 8,
r 16, k 2, T in {1, 64, 2048}), and the communication volume per layer.

* ``layer="column"`` (q/k/v): ``routed_lora`` on the local rows of B (full A): no communication.
  Candidates: ``loramix`` (the local sharded call), ``per_expert`` (the PyTorch per-expert loop on
  the same shard), ``unsharded`` (the full-width routed_lora one device would run: its "speedup"
  is the local time saving of sharding).
* ``layer="row"`` (o): the local half of a row-parallel layer: ``routed_lora_shrink`` of the input
  shard ``[T, d/w]`` (the partial h that is all-reduced) and ``routed_lora_expand_`` of the rank's
  chunk of B into its columns of the partial base output. Candidates: ``loramix``, ``reference``
  (the per-slot gather + bmm references of both ops), ``unsharded`` (full-width routed_lora_add_).
* Communication per row-parallel layer, in each case's label: ``h_allreduce_B = T*k*r*4`` (the
  fp32 partial h, S-LoRA's trick) against ``allgather_B = T*d_out*2`` (all-gathering the bf16
  activations instead); :func:`comm_table` prints the table (``python -m
  loramix_kernels.bench.bench_sharding``). The base layer's own all-reduce of ``[T, d_out]`` is
  the same in both designs and not counted.

Run: ``python -m loramix_kernels.bench sharding [--full] [--json PATH]``.
"""

import itertools

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels.ops.routed_lora import routed_lora, routed_lora_add_
from loramix_kernels.ops.sharding import routed_lora_expand_, routed_lora_shrink
from loramix_kernels.reference.routed_lora import routed_lora_ref
from loramix_kernels.reference.sharding import routed_lora_expand_ref, routed_lora_shrink_ref

FULL = dict(d=4096, qkv=[4096, 1024, 1024], E=8, r=16, k=2)
QUICK = dict(d=256, qkv=[256, 64, 64], E=8, r=16, k=2)


def _case(layer, T, shard, dims):
    c = dict(layer=layer, T=T, shard=shard, d=dims["d"], E=dims["E"], r=dims["r"], k=dims["k"])
    if layer == "column":
        c["widths"] = "/".join(str(w // shard) for w in dims["qkv"])
    else:
        c["h_allreduce_B"] = T * dims["k"] * dims["r"] * 4
        c["allgather_B"] = T * dims["d"] * 2
    return c


def cases(quick: bool):
    dims, Ts, shards = (QUICK, [1, 16], [2, 4]) if quick else (FULL, [1, 64, 2048], [2, 4, 8])
    out = [_case(layer, T, s, dims) for layer, T, s in itertools.product(["column", "row"], Ts, shards)]
    return out + ([_case(layer, 512, 2, QUICK) for layer in ("column", "row")] if quick else [])  # prefill


def headline_cases():
    return [_case("column", 64, 8, FULL), _case("row", 1, 4, FULL), _case("row", 2048, 8, FULL)]


def _dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_inputs(case, device):
    g = torch.Generator().manual_seed(0)
    dt = _dtype(device)
    T, d, E, r, k, w = case["T"], case["d"], case["E"], case["r"], case["k"], case["shard"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt)

    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(device, torch.int32)
    gates = torch.softmax(torch.randn(T, k, generator=g), -1).to(device)
    if case["layer"] == "column":
        widths = [int(v) * w for v in case["widths"].split("/")]
        x = rnd(T, d)
        A = [rnd(E, r, d, scale=d ** -0.5) for _ in widths]
        B = [rnd(E, n, r, scale=r ** -0.5) for n in widths]
        return dict(x=x, A=A, B=B, B_shard=[b[:, : b.shape[1] // w] for b in B], ids=ids, gates=gates)
    x = rnd(T, d)
    A = rnd(E, r, d, scale=d ** -0.5)
    B = rnd(E, d, r, scale=r ** -0.5)
    return dict(x=x, A=A, B=B, x_shard=x[:, : d // w].contiguous(), A_shard=A[:, :, : d // w].contiguous(),
                B_chunk=B[:, : d // w].contiguous(), out=torch.zeros(T, d, device=device, dtype=dt),
                ids=ids, gates=gates)


def candidates(case, inp):
    ids, g = inp["ids"], inp["gates"]
    if case["layer"] == "column":
        x, A, Bs = inp["x"], inp["A"], inp["B_shard"]
        return {
            "loramix": lambda: routed_lora(x, A, Bs, ids, g, 1.0),
            "per_expert": lambda: routed_lora_ref(x, A, Bs, ids, g, 1.0),
            "unsharded": lambda: routed_lora(x, A, inp["B"], ids, g, 1.0),
        }
    xs, As, Bc, out = inp["x_shard"], [inp["A_shard"]], [inp["B_chunk"]], inp["out"]
    n = Bc[0].shape[1]
    part = out[:, :n]

    def ours():
        h = routed_lora_shrink(xs, As, ids)  # all-reduced here in a row-parallel layer
        routed_lora_expand_(part, h, Bc, ids, g, 1.0)

    def reference():
        h = routed_lora_shrink_ref(xs, As, ids)
        part.add_(routed_lora_expand_ref(h, Bc, ids, g, 1.0).to(part.dtype))

    return {"loramix": ours, "reference": reference,
            "unsharded": lambda: routed_lora_add_(out, inp["x"], [inp["A"]], [inp["B"]], ids, g, 1.0)}


def traffic_bytes(case):
    """bf16: x (shard) + the expected active experts' weights (shard) + y (shard), plus the fp32
    h written and read back for the row layer."""
    T, d, E, r, k, w = case["T"], case["d"], case["E"], case["r"], case["k"], case["shard"]
    active = E * (1 - (1 - k / E) ** T)
    if case["layer"] == "column":
        widths = [int(v) for v in case["widths"].split("/")]
        return int(2 * (T * d + active * sum(r * d + n * r for n in widths) + 2 * T * sum(widths)))
    return int(2 * (T * d / w + active * (r * d / w + d / w * r) + 2 * T * d / w) + 2 * T * k * r * 4)


def flops(case):
    T, d, r, k, w = case["T"], case["d"], case["r"], case["k"], case["shard"]
    if case["layer"] == "column":
        return int(2 * T * k * sum(r * d + n * r for n in (int(v) for v in case["widths"].split("/"))))
    return int(2 * T * k * (r * d / w + d / w * r))


def comm_table(quick: bool = False) -> str:
    """Bytes per row-parallel layer: the all-reduced fp32 h (T*k*r*4) against all-gathering the
    bf16 activations (T*d_out*2), per T (independent of the shard count)."""
    dims = QUICK if quick else FULL
    lines = [f"{'T':>6} {'h all-reduce (B)':>18} {'all-gather act. (B)':>20} {'ratio':>7}"]
    for T in ([1, 16] if quick else [1, 64, 2048]):
        h = T * dims["k"] * dims["r"] * 4
        a = T * dims["d"] * 2
        lines.append(f"{T:>6} {h:>18,} {a:>20,} {a / h:>7.0f}x")
    return "\n".join(lines)


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: f"{c['layer']}-T{c['T']}-w{c['shard']}")
@pytest.mark.parametrize("impl", ["loramix", "unsharded"])
def test_sharding(benchmark, case, impl):
    inp = make_inputs(case, torch.device("cpu"))
    benchmark(candidates(case, inp)[impl])


if __name__ == "__main__":
    print(comm_table())
