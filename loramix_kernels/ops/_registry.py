"""The one helper that turns a family's functions into a ``torch.ops.loramix.*`` op.

Every op of the package is registered by :func:`register_op`, so the pattern lives here once:

* the schema is defined in the ``loramix`` namespace;
* one implementation, registered for CPU and CUDA, validates the arguments ONCE with the family's
  ``validate_<op>`` (or, for ops with a ``checked_cpu`` native kernel, lets that kernel check them
  in C++ on CPU) and then dispatches: the Triton launcher ``<op>_triton`` for CUDA tensors (and
  for CPU tensors under the test switch ``LORAMIX_BACKEND=triton`` + ``TRITON_INTERPRET=1``), the
  CPU kernel otherwise (native C++ where the family has one, else fast PyTorch);
* the fake kernel (torch.compile, meta tensors) runs the same validator (value checks skip fake
  tensors by themselves) and then the family's ``fake`` allocator, whose output strides must match
  the real kernels' (the compile tests with the default inductor backend check it);
* autograd (``register_autograd``) and autocast where given.

Naming ladder of a family ``ops/<family>.py`` (``<op>`` is the op's name without a trailing ``_``):
``validate_<op>`` (checks; raises ``<op>: <argument> ...``), ``<op>_ref`` (plain PyTorch in
``reference/<family>.py``), ``<op>_cpu`` (the CPU kernel, where it is not the reference itself),
``<op>_triton`` (launcher), ``_<op>_kernel`` (``@triton.jit`` in ``kernels/<family>.py``) and the
public ``<op>`` function. Launchers and CPU kernels are called only after validation and never
validate again.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .. import _backend, _native

#: The ``loramix`` namespace. A fragment, so that the native extension (csrc/) can add its private
#: CPU ops to the same namespace with TORCH_LIBRARY_FRAGMENT.
LIB = torch.library.Library("loramix", "FRAGMENT")


@dataclasses.dataclass(frozen=True)
class OpDef:
    """What was registered for one op (tests iterate :data:`OPS`)."""

    name: str
    schema: str
    validate: Callable
    triton: Callable | None
    cpu: Callable
    fake: Callable
    differentiable: bool
    #: Positions of the arguments written in place (``Tensor(a!)`` in the schema).
    mutates: tuple[int, ...]
    #: ``torch.ops.loramix.<name>.default``.
    op: torch._ops.OpOverload = dataclasses.field(repr=False, compare=False, default=None)
    #: Whether its CPU key runs a direct C++ kernel (``direct_cpu``, the extension built).
    direct: bool = False

    def __call__(self, *args):
        """Run the op (what the public functions do). In eager mode, when no gradient can flow
        (grad disabled, or no tensor argument requires grad: the test of torch.library's own
        autograd kernel), a differentiable op skips that Python kernel, which would only
        redispatch below autograd: the same result, about 5 us less per call."""
        if (self.differentiable and not torch.compiler.is_compiling()  # (dynamo: first)
                and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
            with torch._C._AutoDispatchBelowAutograd():
                return self.op(*args)
        return self.op(*args)


#: Every registered op by name, in registration order.
OPS: dict[str, OpDef] = {}


def register_op(
    name: str,
    schema: str,
    *,
    validate: Callable,
    cpu: Callable,
    fake: Callable,
    triton: Callable | None = None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    autocast: Sequence[int] = (),
    checked_cpu: Callable | None = None,
    direct_cpu: bool = False,
) -> OpDef:
    """Define ``loramix::<name><schema>`` and register its kernels.

    Parameters
    ----------
    name, schema
        ``"routed_lora"``, ``"(Tensor x, ...) -> Tensor"``.
    validate
        ``validate(*args) -> info``: metadata checks (shapes, dtypes, devices; safe on fake
        tensors) plus value checks where :func:`_backend.check_values` allows. Raises errors that
        start with ``<op>: <argument>``. ``info`` is handed to ``fake`` only.
    cpu
        ``cpu(*args)``: the CPU kernel, called after ``validate``.
    fake
        ``fake(info, *args)``: allocates the outputs (no data access) with the real kernels'
        shapes, dtypes and strides.
    triton
        ``triton(*args)``: the launcher, called after ``validate`` for CUDA tensors and under the
        test switch; ``None`` for ops that have no kernel of their own (then ``cpu`` runs on every
        device).
    backward, setup_context
        As for :func:`torch.library.register_autograd`.
    autocast
        Positions of floating-point arguments (tensors or lists of tensors) that are cast to the
        autocast dtype inside an autocast region (CPU and CUDA), the others are left alone. Empty:
        the op ignores autocast.
    checked_cpu
        Optional, for a CPU call that the CPU kernel would handle: a native kernel that makes the
        validator's checks itself (in C++, a fraction of the Python validator's per-call cost at
        decode sizes) and computes; it calls ``validate`` only to name a rejected argument.
        Returns ``NotImplemented`` when it cannot run (no native extension): then ``validate`` +
        ``cpu`` run as for every op.
    direct_cpu
        The native extension has a direct CPU kernel for this op (``csrc/direct.h``): a C++
        kernel on the op's CPU key that checks the arguments itself and computes, so a CPU call
        never enters Python. It hands what it does not take (an argument to reject, a case its
        fast path lacks, the interpreter test switch) to the Python kernel, registered as
        ``loramix::_<name>_py``. Without the extension the Python kernel is the CPU kernel.
    """
    qualname = f"loramix::{name}"
    LIB.define(name + schema)
    first_tensor = _first_tensor_position(schema)
    mutates = _mutated_arguments(schema)

    def impl(*args):
        t = args[first_tensor]
        if checked_cpu is not None and t.device.type == "cpu" and not _backend.use_triton(t):
            out = checked_cpu(*args)
            if out is not NotImplemented:
                return out
        validate(*args)
        if triton is not None and _backend.use_triton(t):
            return triton(*args)
        return cpu(*args)

    # Plain Library.impl (not torch.library.register_kernel, whose dynamo-disable wrapper costs a
    # microsecond or two per call): custom ops are opaque to torch.compile either way.
    keys = ["CPU", "CUDA"]
    direct = False
    if direct_cpu and _native.load() is not None:
        LIB.define(f"_{name}_py" + schema)
        LIB.impl(f"_{name}_py", impl, "CPU")
        direct = _native.install_direct(name)
        if direct:
            keys.remove("CPU")
    for key in keys:
        LIB.impl(name, impl, key)
    torch.library.register_fake(qualname, lambda *args: fake(validate(*args), *args), lib=LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIB)
    for device_type in ("cpu", "cuda") if autocast else ():
        _register_autocast(name, device_type, tuple(autocast))
    d = OpDef(name, schema, validate, triton, cpu, fake, backward is not None, mutates,
              getattr(torch.ops.loramix, name).default, direct)
    OPS[name] = d
    return d


def _first_tensor_position(schema: str) -> int:
    """Index of the first ``Tensor`` argument: its device picks the kernel."""
    for i, a in enumerate(torch._C.parse_schema("loramix::op" + schema).arguments):
        if a.type.kind() == "TensorType":
            return i
    raise ValueError(f"schema {schema!r} has no Tensor argument")


def _mutated_arguments(schema: str) -> tuple[int, ...]:
    args = torch._C.parse_schema("loramix::op" + schema).arguments
    return tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)


def _register_autocast(name: str, device_type: str, positions: tuple[int, ...]) -> None:
    """Autocast rule: cast the floating-point arguments at ``positions`` to the region's autocast
    dtype (read at call time, unlike :func:`torch.library.register_autocast`'s fixed dtype), then
    run the op with autocast excluded. Autograd sees the casts, so fp32 master weights get fp32
    gradients."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(torch.ops.loramix, name).default

    def cast(v, dtype):
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() and v.device.type == device_type else v
        if isinstance(v, (list, tuple)):
            return [cast(t, dtype) for t in v]
        return v

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(cast(a, dtype) if i in positions else a for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

    LIB.impl(name, kernel, key, with_keyset=True)
