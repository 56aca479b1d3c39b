"""One declarative description per operator (`OpSpec`), and what is generated from it.

An OpSpec says what an operator's fused implementations take and return; `define(spec)` then
creates, once for every operator, what used to be written out by hand in each ops module:

- the forward custom op `segops::<name>` and the backward custom op `segops::<name>_backward`
  (schemas built from the description), with their fake implementations,
- the autograd formula linking the two (what the forward saves, which incoming gradients the
  backward takes, which inputs receive gradients),
- the backend registrations: `cpu` and `cuda` on the segops_C kernels, `triton` on the
  launchers of `segops/triton/<module>.py`.

The description also carries sample inputs (ordinary, edge and empty cases) and bad inputs with
the error they must raise; the contract tests (tests/test_contract.py), the CUDA emulation and
cuda-vs-triton tests and the benchmarks iterate them. docs/adding_an_op.md walks through it.

Calling conventions of a fused implementation (the segops_C kernels and the Triton launchers):
  forward(*inputs, *params, *kernel_args) -> results            (a tuple, or one tensor)
  backward(*incoming, *saves, *params, *kernel_args) -> grads   (a tuple, or one tensor)
where `incoming` are the gradients of the results named in `grad_of` (a None there is an
incoming gradient the kernels accept but this op never provides) and `grads` are the gradients
of the inputs named in `differentiable`, in that order; the gradient of an absent optional
input is an empty tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from segops._backend import FusedBackend, OpBackends, op_backends

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclass
class Sample:
    """One call of an operator: fp64 CPU tensors, the other keyword arguments, and the names of
    the tensors that receive gradients. `exact_inputs`: compare a low-precision run against the
    fp64 reference evaluated on the rounded inputs (for banded ops, where rounding an input can
    move it across a band edge, a discontinuity no kernel can undo)."""

    name: str
    tensors: dict
    kwargs: dict = field(default_factory=dict)
    grads: tuple = ()
    exact_inputs: bool = False
    gradcheck: bool = False  # small and smooth enough for torch.autograd.gradcheck


@dataclass
class ErrorSample:
    """A bad call: `update` replaces arguments of the op's first sample (fp32 tensors); the call
    must raise `error` with a message matching `match`."""

    name: str
    update: dict
    match: str
    error: type = ValueError


@dataclass
class OpSpec:
    """What an operator is, for its custom ops, backends, tests and benchmarks.

    name: the public function, custom op and backend-registry name.
    inputs: tensor arguments of the fused forward, in order; a trailing "?" marks an optional one.
    params: (name, type) of its other arguments (int, float, bool or str).
    results: names of what the fused forward returns, the `public` first, then statistics kept
        for the backward.
    saves: inputs or results the backward receives after the incoming gradients.
    grad_of: results whose gradients the backward receives (default: the public ones).
    differentiable: inputs the backward returns gradients for, in order.
    fake: (*inputs, *params) -> results as empty tensors (shapes and dtypes only).
    grad_fake: optional {input: (saved tensors by name, params by name) -> empty gradient} for a
        gradient whose input is not saved.
    kernels: the segops_C (forward, backward) kernels of the cpu and cuda backends
        (default: <name>_forward, <name>_backward).
    triton: "module:function" of the Triton forward and backward launchers
        (default: segops.triton.<name>:forward and :backward).
    kernel_args: constant trailing arguments of every fused implementation (one kernel pair can
        serve several ops).
    samples / error_samples: () -> list of Sample / ErrorSample.
    make: (generator, name, *sizes, **options) -> Sample, the op's input factory: its samples,
        large samples and benchmark cases all come from it.
    large_samples: () -> list of GPU-sized Samples spanning several tiles, channel chunks and
        thread blocks (the cuda tier compares both GPU backends on them).
    """

    name: str
    public: int
    inputs: tuple
    params: tuple
    results: tuple
    saves: tuple
    differentiable: tuple
    fake: Callable
    samples: Callable[[], list]
    kernels: Optional[tuple] = None
    triton: Optional[tuple] = None
    error_samples: Callable[[], list] = list
    large_samples: Callable[[], list] = list
    make: Optional[Callable[..., Sample]] = None
    grad_of: Optional[tuple] = None
    grad_fake: dict = field(default_factory=dict)
    kernel_args: tuple = ()
    reference: Optional[Callable] = None
    function: Optional[Callable] = None
    # Filled in by define().
    backends: Optional[OpBackends] = field(default=None, repr=False)
    forward_op: Any = field(default=None, repr=False)
    backward_op: Any = field(default=None, repr=False)

    # -- names ---------------------------------------------------------------------------------
    @property
    def input_names(self) -> tuple:
        return tuple(n.rstrip("?") for n in self.inputs)

    @property
    def optional_inputs(self) -> frozenset:
        return frozenset(n[:-1] for n in self.inputs if n.endswith("?"))

    @property
    def param_names(self) -> tuple:
        return tuple(n for n, _ in self.params)

    @property
    def incoming(self) -> tuple:
        """Results whose gradients the backward receives (None: a slot the op never fills)."""
        return self.grad_of if self.grad_of is not None else self.results[:self.public]

    @property
    def slots(self) -> Optional[tuple]:
        """The incoming-gradient slots of the fused backward when the op leaves some unfilled."""
        return self.incoming if None in self.incoming else None

    def compiled_backend(self, library: str, name: str = "cpu", dtypes: tuple = CUDA_DTYPES
                         ) -> FusedBackend:
        """This op's kernel pair from a compiled library: segops_C for the cpu and cuda
        backends, or another build of the same kernels (the CUDA emulation)."""
        return FusedBackend(
            name, _implementation(_compiled(library, self.kernels[0]), self.kernel_args),
            _implementation(_compiled(library, self.kernels[1]), self.kernel_args, self.slots),
            dtypes=dtypes, kernels=self.kernels)

    # -- calling -------------------------------------------------------------------------------
    def select(self, backend: str, like: Tensor) -> str:
        """The concrete backend for a call (see segops._backend for the rules)."""
        return self.backends.select(backend, like.device, like.dtype)

    def fused(self, backend: str, *args):
        """Run the fused forward on `backend` (contiguous tensors); returns the public results."""
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        results = self.forward_op(*args, backend)
        if isinstance(results, Tensor):
            return results
        return results[0] if self.public == 1 else tuple(results[:self.public])


def _schema_type(kind: type) -> str:
    if kind not in _SCHEMA_TYPES:
        raise TypeError(f"unsupported parameter type {kind!r}")
    return _SCHEMA_TYPES[kind]


def _returns(count: int) -> str:
    return "Tensor" if count == 1 else "(" + ", ".join(["Tensor"] * count) + ")"


def _forward_schema(spec: OpSpec) -> str:
    args = [f"Tensor? {n[:-1]}" if n.endswith("?") else f"Tensor {n}" for n in spec.inputs]
    args += [f"{_schema_type(t)} {n}" for n, t in spec.params] + ["str backend"]
    return f"({', '.join(args)}) -> {_returns(len(spec.results))}"


def _backward_schema(spec: OpSpec) -> str:
    args = [f"Tensor grad_{n}" for n in spec.incoming if n is not None]
    args += [f"Tensor? {n}" if n in spec.optional_inputs else f"Tensor {n}" for n in spec.saves]
    args += [f"{_schema_type(t)} {n}" for n, t in spec.params] + ["str backend"]
    return f"({', '.join(args)}) -> {_returns(len(spec.differentiable))}"


def _fill_slots(args: tuple, slots: Optional[tuple]) -> tuple:
    """Re-insert the incoming-gradient slots the op never fills (None in `grad_of`)."""
    if slots is None:
        return args
    it = iter(args)
    return tuple(None if s is None else next(it) for s in slots) + tuple(it)


def _implementation(resolve: Callable[[], Callable], kernel_args: tuple,
                    slots: Optional[tuple] = None) -> Callable:
    """A fused implementation following the calling convention above: `resolve()` finds the
    kernel or launcher on first use (so nothing is imported or looked up at segops import)."""
    cache = {}

    def call(*args):
        if "fn" not in cache:
            cache["fn"] = resolve()
        return cache["fn"](*_fill_slots(args, slots), *kernel_args)
    return call


def _compiled(library: str, kernel: str) -> Callable[[], Callable]:
    """Resolver of a compiled kernel (the dispatcher picks its CPU or CUDA implementation)."""
    return lambda: getattr(getattr(torch.ops, library), kernel)


def _imported(target: str) -> Callable[[], Callable]:
    """Resolver of a "module:function" launcher (no Triton import at segops import)."""
    def resolve():
        import importlib
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)
    return resolve


def define(spec: OpSpec) -> OpSpec:
    """Create the custom ops, fakes, autograd and backend registrations of `spec`."""
    name = spec.name
    spec.kernels = spec.kernels or (f"{name}_forward", f"{name}_backward")
    spec.triton = spec.triton or (f"segops.triton.{name}:forward", f"segops.triton.{name}:backward")
    spec.backends = backends = op_backends(name)
    backends.register(spec.compiled_backend("segops_C", "cpu", CPU_DTYPES))
    backends.register(spec.compiled_backend("segops_C", "cuda", CUDA_DTYPES))
    backends.register(FusedBackend(
        "triton", _implementation(_imported(spec.triton[0]), spec.kernel_args),
        _implementation(_imported(spec.triton[1]), spec.kernel_args, spec.slots),
        dtypes=TRITON_DTYPES, module=spec.triton[0].split(":")[0]))

    n_inputs, n_params = len(spec.inputs), len(spec.params)

    def forward_impl(*args):
        return backends.fused[args[-1]].forward(*args[:-1])

    forward_op = torch.library.custom_op(f"segops::{name}", forward_impl, mutates_args=(),
                                         schema=_forward_schema(spec))
    forward_op.register_fake(lambda *args: spec.fake(*args[:-1]))

    def backward_impl(*args):
        return backends.fused[args[-1]].backward(*args[:-1])

    backward_op = torch.library.custom_op(f"segops::{name}_backward", backward_impl,
                                          mutates_args=(), schema=_backward_schema(spec))

    n_incoming = sum(n is not None for n in spec.incoming)

    def backward_fake(*args):
        saved = dict(zip(spec.saves, args[n_incoming:n_incoming + len(spec.saves)]))
        params = dict(zip(spec.param_names, args[n_incoming + len(spec.saves):-1]))
        grads = []
        for d in spec.differentiable:
            if d in spec.grad_fake:
                grads.append(spec.grad_fake[d](saved, params))
            elif saved.get(d) is None:  # an absent optional input: an empty gradient
                grads.append(args[n_incoming].new_empty((0,)))
            else:
                grads.append(saved[d].new_empty(saved[d].shape))
        return grads[0] if len(grads) == 1 else tuple(grads)

    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        values = dict(zip(spec.input_names, inputs[:n_inputs]))
        results = (output,) if isinstance(output, Tensor) else tuple(output)
        values.update(zip(spec.results, results))
        ctx.save_for_backward(*(values[s] for s in spec.saves))
        ctx.params = tuple(inputs[n_inputs:n_inputs + n_params])
        ctx.backend = inputs[-1]
        ctx.present = tuple(inputs[i] is not None for i in range(n_inputs))

    def backward(ctx, *grad_results):
        by_name = dict(zip(spec.results, grad_results))
        incoming = [by_name[n].contiguous() for n in spec.incoming if n is not None]
        grads = backward_op(*incoming, *ctx.saved_tensors, *ctx.params, ctx.backend)
        grads = dict(zip(spec.differentiable, (grads,) if isinstance(grads, Tensor) else grads))
        out = [grads.get(n) if present else None
               for n, present in zip(spec.input_names, ctx.present)]
        return tuple(out) + (None,) * (n_params + 1)

    forward_op.register_autograd(backward, setup_context=setup_context)
    spec.forward_op, spec.backward_op = forward_op, backward_op
    SPECS[name] = spec
    return spec


SPECS: dict[str, OpSpec] = {}


# -- sample-input helpers ----------------------------------------------------------------------
def randn(generator: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """fp64 CPU normal samples from `generator` (samples are reproducible on any machine)."""
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64) + shift


def logits_need_a_channel(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """(query, key) as the kernels take them: without channels every logit is 0, which one
    zero channel gives as well (the kernels' GEMM tiles need at least one)."""
    if query.shape[1] > 0:
        return query, key
    zeros = query.new_zeros((query.shape[0], 1) + tuple(query.shape[2:]))
    return zeros, key.new_zeros((key.shape[0], 1) + tuple(key.shape[2:]))


def qkv_error_samples(n: int, ck: int, cv: int, h: int, w: int) -> list:
    """The bad calls every (query, key, value) attention op rejects the same way, built against
    a valid call with query/key (n, ck, h, w) and value (n, cv, h, w)."""
    return [
        ErrorSample("query_rank", dict(query=torch.randn(n, ck, h)), "`query` must be 4-D"),
        ErrorSample("key_shape", dict(key=torch.randn(n, ck + 1, h, w)), "`key` must have"),
        ErrorSample("value_shape", dict(value=torch.randn(n, cv, h, w + 1)), "`value` must have"),
        ErrorSample("mixed_dtype", dict(value=torch.randn(n, cv, h, w, dtype=torch.float64)), "dtype"),
        ErrorSample("integer", dict(query=torch.ones(n, ck, h, w, dtype=torch.int64)), "floating"),
        ErrorSample("not_a_tensor", dict(key=[[1.0]]), "must be a torch.Tensor", TypeError),
    ]
