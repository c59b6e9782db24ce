"""Compile the real launch configurations of our Triton kernels for Hopper (sm_90) on a CPU-only
machine, and report each kernel's shared memory.

The interpreter (which runs the kernels in CI) enforces no GPU limits: a tile that needs more
shared memory than an H100 has, or code that Triton cannot lower for sm_90, would only surface on
a GPU. This script runs launchers on CPU tensors with the interpreter OFF and replaces
``JITFunction.run`` by an ahead-of-time compile for ``GPUTarget("cuda", 90, 32)`` (ptxas ships
with triton), recording ``(kernel, shared bytes, num_warps)`` instead of launching.

Usage (a subprocess, since TRITON_INTERPRET must be unset before triton is imported):
``python -m tests.sm90_compile SCENARIO`` prints one JSON line per compiled kernel.
"""

import json
import os
import sys

if __name__ == "__main__":  # only in the subprocess: importing this module must not change a test run
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["LORAMIX_BACKEND"] = "auto"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

#: Hopper's largest dynamic shared memory per block (227 KB).
SM90_SMEM = 232448
TARGET = GPUTarget("cuda", 90, 32)
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1", torch.int16: "i16"}
_seen = {}


def _resource_usage(ptx: str) -> dict:
    """Registers per thread, stack frame and register-spill bytes, from ``ptxas -v`` for sm_90a
    (the ptxas that ships with triton and reads the PTX version it emits)."""
    import re
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tool = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                 if os.path.exists(os.path.join(bin_dir, n))), "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([tool, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return {"regs": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads")}


def _aot_run(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: the same argument specialisation as a real launch (ints equal
    to 1 become constants, 16-divisible ints and aligned pointers get divisibility hints, which
    decide vectorisation and so register use), then a compile for sm_90 instead of a launch."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
    const = {self.params[path[0]].name: v for path, v in constexprs.items() if len(path) == 1}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    key = (self.__name__, json.dumps({k: str(v) for k, v in const.items()}, sort_keys=True), str(opts),
           str(sorted(attrs.items())))
    if key not in _seen:
        src = ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
        _seen[key] = {"kernel": self.__name__, "shared": compiled.metadata.shared,
                      **_resource_usage(compiled.asm["ptx"]),
                      "num_warps": compiled.metadata.num_warps, "num_stages": opts.get("num_stages"),
                      "constexprs": {k: str(v) for k, v in const.items()
                                     if self.params[self.arg_names.index(k)].is_constexpr}}
        print(json.dumps(_seen[key]), flush=True)
    return None


def scenarios():
    """name -> callable running launchers at GPU-sized shapes (CPU tensors, small where allowed)."""
    import loramix_kernels  # noqa: F401
    from loramix_kernels.bench.bench_routed_lora import routed_lora_two_launch
    from loramix_kernels.ops import routed_lora as rl

    def routed_inputs(T, E, r, k, widths, d_in, dt=torch.bfloat16):
        x = torch.zeros(T, d_in, dtype=dt)
        A = [torch.zeros(E, r, d_in, dtype=dt) for _ in widths]
        B = [torch.zeros(E, w, r, dtype=dt) for w in widths]
        ids = torch.arange(T * k, dtype=torch.int32).reshape(T, k) % E
        return dt, x, A, B, ids, torch.ones(T, k)

    def routed(T, E, r, k, widths, strategy=None, d_in=4096, add=False, dt=torch.bfloat16):
        def go():
            _, x, A, B, ids, g = routed_inputs(T, E, r, k, widths, d_in, dt)
            out = torch.zeros(T, sum(widths), dtype=dt) if add else None
            rl.routed_lora_triton(x, A, B, ids, g, 1.0, out=out, strategy=strategy)
            if strategy == "expert_sorted":
                routed_lora_two_launch(x, A, B, ids, g, 1.0)
        return go

    def routed_bwd(T, E, r, k, widths, d_in=4096, dt=torch.bfloat16):
        def go():
            _, x, A, B, ids, g = routed_inputs(T, E, r, k, widths, d_in, dt)
            assert rl.choose_strategy(E, [r] * len(widths), k) == "expert_sorted"
            dy = torch.zeros(T, sum(widths), dtype=dt)
            rl.routed_lora_backward_sorted(dy, x, A, B, ids, g, 1.0)
            # frozen experts (router-only training): the dx / d_gates-only variant
            rl.routed_lora_backward_sorted(dy, x, A, B, ids, g, 1.0, needs=[True, False, False, True])
        return go

    from loramix_kernels.ops import tree as tr

    def tree_attn(D, N, Hq, Hkv, num_splits, B=2, block=16, blocks=64):
        def go():
            dt = torch.bfloat16
            q = torch.zeros(B, N, Hq, D, dtype=dt)
            kc = torch.zeros(B * blocks, block, Hkv, D, dtype=dt)
            bt = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks)
            lens = torch.full((B,), blocks * block, dtype=torch.int32)
            mask, _, _, _ = tr.build_tree_forward(torch.arange(-1, N - 1).repeat(B, 1))
            tr.tree_attention_forward(q, kc, kc, bt, lens, mask, 0.1, num_splits=num_splits)
        return go

    def build(N):
        return lambda: tr.build_tree_forward(torch.arange(-1, N - 1).repeat(2, 1))

    tree = [build(n) for n in (16, 64, 256)]
    for D in (64, 128, 256):
        for N, Hq, Hkv in ((16, 32, 8), (64, 32, 8), (7, 8, 8), (64, 8, 1), (1, 8, 1)):
            for ns in (1, 4):
                tree.append(tree_attn(D, N, Hq, Hkv, ns))

    from loramix_kernels.bench.bench_verify import verify_sampling_separate_pass
    from loramix_kernels.ops import kv as kvops
    from loramix_kernels.ops import verify as vf

    def verify(B, N, V, draft):
        def go():
            parents = torch.arange(-1, N - 1).repeat(B, 1)
            tokens = torch.zeros(B, N, dtype=torch.int64)
            p = torch.full((B, N, V), 1.0 / V)
            q = p.clone() if draft else None
            vf.verify_sampling_triton(tokens, parents, p, q, 0, 0)
            # RNG words are int32 and never specialised: any seed / offset, one compiled kernel
            vf.verify_sampling_triton(tokens, parents, p, q, -1, 2 ** 62 + 2 ** 31 + 5)
            vf.verify_greedy_triton(tokens, parents, tokens)
            # (outputs are never written here: kernels are compiled, not run)
            acc = torch.arange(N, dtype=torch.int32).repeat(B, 1)
            vf.match_branch_triton(acc, torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.int64),
                                    torch.zeros(B, 4, dtype=torch.int32), torch.zeros(B, 4, dtype=torch.int64))
            if draft:
                verify_sampling_separate_pass(tokens, parents, p, q, 0, 0)
        return go

    def compact(B, N, H, D, block=16):
        def go():
            blocks = 8
            kc = torch.zeros(B * blocks, block, H, D, dtype=torch.bfloat16)
            bt = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks)
            lens = torch.full((B,), 100, dtype=torch.int32)
            acc = torch.arange(N, dtype=torch.int32).repeat(B, 1)
            kvops.compact_kv_triton(kc, kc.clone(), bt, lens, acc, torch.full((B,), N - 1, dtype=torch.int32))
        return go

    verify_cases = [verify(2, n, v, d) for n, v, d in ((4, 32000, True), (64, 128256, True),
                                                       (8, 32000, False), (1, 7, True))]
    verify_cases += [compact(2, n, h, d) for n, h, d in ((8, 8, 128), (64, 32, 64), (4, 1, 256))]

    from loramix_kernels.ops import routing as rt

    def route(T, E, k, dt=torch.bfloat16):
        return lambda: [rt.route_topk_triton(torch.zeros(T, E, dtype=dt), k, r) for r in (False, True)]

    # decode (one row per program), prefill (BLOCK_T rows), the widest rows, k = E
    routing = [route(T, E, k) for T, E, k in ((1, 6, 3), (64, 8, 2), (32768, 8, 2), (4096, 64, 8),
                                              (32768, 256, 8), (4, 256, 256), (2, 1024, 8))]
    routing.append(route(4096, 64, 3, torch.float32))

    qkv = [4096, 1024, 1024]
    return {
        "routing": routing,
        "verify": verify_cases,
        "tree": tree,
        "routed_lora": [
            routed(16, 8, 16, 2, qkv), routed(16, 6, 16, 3, qkv), routed(8192, 8, 16, 2, qkv),
            routed(64, 8, 16, 8, [4096], add=True), routed(2048, 64, 16, 3, qkv, "expert_sorted"),
            routed(16, 64, 64, 1, [4096], "expert_sorted"), routed(2048, 8, 64, 2, [4096]),
            routed(16, 4, 64, 2, qkv, "token_major"), routed(64, 64, 1, 64, [4096]),
            # fp16: the gated intermediate stays fp32 into the expand (H_FP32)
            routed(16, 8, 16, 2, qkv, dt=torch.float16), routed(8192, 8, 16, 2, qkv, dt=torch.float16),
            routed(16, 64, 64, 1, [4096], "expert_sorted", dt=torch.float16),
            routed(8192, 4, 64, 2, qkv, "token_major", dt=torch.float16),
        ],
        # expert_sorted backward: prefill (BLOCK_M 64, no split), decode (BLOCK_M 16, KSPLIT /
        # NSPLIT shares), and rank 64 (the largest register tiles of dh / h)
        "routed_lora_backward": [
            routed_bwd(2048, 64, 16, 3, qkv), routed_bwd(16, 64, 16, 3, qkv),
            routed_bwd(2048, 8, 64, 2, [4096]), routed_bwd(2048, 64, 16, 3, qkv, dt=torch.float16),
        ],
    }


def main(name):
    JITFunction.run = _aot_run
    for fn in scenarios()[name]:
        fn()


if __name__ == "__main__":
    main(sys.argv[1])
