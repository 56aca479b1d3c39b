"""The cheap guards of the CUDA bindings (csrc/cuda/<op>.cpp, segops/cuda/binding.h).

Each case calls one kernel of the emulated build (torch.ops.segops_cuda_emu, the unchanged binding
code on CPU tensors, see tests/cuda_emulation/build.py) directly with one bad argument and expects
a RuntimeError naming the problem instead of a crash. Checks the bindings leave to the launcher
(block sizes, odd kernel sizes, histogram levels, ...) surface as "kernel launch failed".
The device-mismatch branches need two devices: test_device_mismatch runs them on a GPU build.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_cuda_emulation import emulated  # noqa: F401  (the fixture)

F32, F64 = torch.float32, torch.float64


def _r(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype)


def _strided(*shape):
    """A non-contiguous float32 tensor of `shape`."""
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


def _valid(kernel):
    """Keyword arguments (the segops_C schema names) of a small valid call of `kernel`."""
    qkv4 = dict(query=_r(1, 2, 3, 4), key=_r(1, 2, 3, 4), value=_r(1, 3, 3, 4))
    isa = dict(query=_r(1, 2, 4, 4), key=_r(1, 2, 4, 4), value=_r(1, 3, 4, 4), bias=None,
               mask=None)
    isa_opts = dict(ph=2, pw=2, long_range=True, scale=1.0)
    dnl = dict(query=_r(1, 2, 5), key=_r(1, 2, 6), value=_r(1, 3, 6), unary=_r(1, 6))
    sdc = dict(input=_r(1, 2, 5, 5), guidance=_r(1, 2, 5, 5), weight=_r(3, 2, 3, 3))
    sdc_opts = dict(dilation=1, similarity="charbonnier", sigma=1.0)
    qco_opts = dict(num_levels=3, grid=2, cooc=True)
    recon = dict(sim=_r(1, 4, 4), levels=_r(1, 3), features=_r(1, 2, 3))
    return {
        "criss_cross_attention_forward": qkv4,
        "criss_cross_attention_backward": dict(grad_out=_r(1, 3, 3, 4), **qkv4, out=_r(1, 3, 3, 4),
                                               stats=_r(1, 2, 3, 4)),
        "interlaced_sparse_attention_forward": dict(**isa, **isa_opts),
        "interlaced_sparse_attention_backward": dict(grad_out=_r(1, 3, 4, 4), **isa,
                                                     out=_r(1, 3, 4, 4), lse=_r(1, 4, 4), **isa_opts),
        "disentangled_non_local_forward": dict(**dnl, whiten=True, s=1.0),
        "disentangled_non_local_backward": dict(grad_out=_r(1, 3, 5), **dnl, out=_r(1, 3, 5),
                                                lse=_r(1, 5), g=_r(1, 3), lse_u=_r(1), whiten=True,
                                                s=1.0),
        "semantic_difference_conv2d_forward": dict(**sdc, bias=_r(3), **sdc_opts),
        "semantic_difference_conv2d_backward": dict(grad_out=_r(1, 3, 5, 5), **sdc, **sdc_opts),
        "qco_forward": dict(x=_r(1, 2, 4, 4), **qco_opts),
        "qco_backward": dict(grad_hist=_r(1, 2, 2, 3, 3), grad_levels=_r(1, 2, 2, 3),
                             grad_sim=_r(1, 4, 4), x=_r(1, 2, 4, 4), hist=_r(1, 2, 2, 3, 3),
                             sim=_r(1, 4, 4), rnorm=_r(1, 4, 4), mean=_r(1, 4, 2), stats=_r(1, 4, 3),
                             **qco_opts),
        "texture_reconstruct_forward": recon,
        "texture_reconstruct_backward": dict(grad_out=_r(1, 2, 4, 4), **recon),
    }[kernel]


def _as(dtype):
    """Every tensor argument in `dtype`."""
    return lambda a: {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def _set(**changes):
    """Arguments with `changes` applied (a callable value maps the old argument to the new one)."""
    return lambda a: {**a, **{k: (v(a[k]) if callable(v) else v) for k, v in changes.items()}}


CCA_F, CCA_B = "criss_cross_attention_forward", "criss_cross_attention_backward"
ISA_F, ISA_B = "interlaced_sparse_attention_forward", "interlaced_sparse_attention_backward"
DNL_F, DNL_B = "disentangled_non_local_forward", "disentangled_non_local_backward"
SDC_F, SDC_B = "semantic_difference_conv2d_forward", "semantic_difference_conv2d_backward"
QCO_F, QCO_B = "qco_forward", "qco_backward"
REC_F, REC_B = "texture_reconstruct_forward", "texture_reconstruct_backward"

# (kernel, bad arguments, fragment of the expected message)
CASES = [
    # criss_cross_attention
    (CCA_F, _set(query=lambda t: t[0]), "query must be 4-D"),
    (CCA_F, _as(torch.int32), "query has dtype Int, which this backend does not implement"),
    (CCA_F, _set(key=lambda t: t.double()), "key has dtype Double, expected Float"),
    (CCA_F, _set(value=_strided(1, 3, 3, 4)), "value must be contiguous"),
    (CCA_F, _set(key=_r(1, 2, 3, 5)), "key must have shape [1, 2, 3, 4]"),
    (CCA_F, _set(value=_r(2, 3, 3, 4)), "value must have shape [1, 3, 3, 4]"),
    (CCA_B, _set(query=lambda t: t[0]), "query must be 4-D"),
    (CCA_B, _set(grad_out=lambda t: t.double()), "grad_out has dtype Double, expected Float"),
    (CCA_B, _set(grad_out=_r(1, 3, 3, 5)), "grad_out must have shape [1, 3, 3, 4]"),
    (CCA_B, _set(out=_r(1, 3, 4, 4)), "out must have shape [1, 3, 3, 4]"),
    (CCA_B, _set(stats=_r(1, 1, 3, 4)), "stats must have shape [1, 2, 3, 4]"),
    (CCA_B, _set(stats=lambda t: t.double()), "stats has dtype Double, expected Float"),
    (CCA_B, _set(stats=_strided(1, 2, 3, 4)), "stats must be contiguous"),
    # interlaced_sparse_attention
    (ISA_F, _set(key=lambda t: t[0]), "key must be 4-D"),
    (ISA_F, _as(torch.int64), "query has dtype Long, which this backend does not implement"),
    (ISA_F, _set(value=_strided(1, 3, 4, 4)), "value must be contiguous"),
    (ISA_F, _set(key=_r(1, 3, 4, 4)), "key must have shape [1, 2, 4, 4]"),
    (ISA_F, _set(value=_r(1, 3, 4, 2)), "value must have shape [1, 3, 4, 4]"),
    (ISA_F, _set(ph=3), "kernel launch failed"),
    (ISA_B, _set(value=lambda t: t[0]), "value must be 4-D"),
    (ISA_B, _set(out=_strided(1, 3, 4, 4)), "out must be contiguous"),
    (ISA_B, _set(grad_out=_r(1, 2, 4, 4)), "grad_out must have shape [1, 3, 4, 4]"),
    (ISA_B, _set(out=_r(1, 3, 4, 2)), "out must have shape [1, 3, 4, 4]"),
    (ISA_B, _set(lse=_r(1, 16)), "lse must have shape [1, 4, 4]"),
    (ISA_B, _set(lse=lambda t: t.half()), "lse has dtype Half, expected Float"),
    (ISA_F, _set(bias=_r(4, 4)), "bias must be 3-D"),
    (ISA_F, _set(bias=_r(1, 3, 4)), "bias must have shape [1, 4, 4]"),
    (ISA_F, _set(mask=_r(3, 4, 4)), "mask.size(0) must divide 4"),
    (ISA_B, _set(bias=_r(1, 4, 4).double()), "bias has dtype Double, expected Float"),
    (ISA_B, _set(mask=_strided(2, 4, 4)), "mask must be contiguous"),
    # disentangled_non_local
    (DNL_F, _set(query=lambda t: t[0]), "query must be 3-D"),
    (DNL_F, _as(torch.int32), "query has dtype Int, which this backend does not implement"),
    (DNL_F, _set(key=_r(1, 3, 6)), "key must have shape [1, 2, 6]"),
    (DNL_F, _set(value=_r(1, 3, 5)), "value must have shape [1, 3, 6]"),
    (DNL_F, _set(unary=_r(1, 5)), "unary must have shape [1, 6]"),
    (DNL_F, _set(unary=lambda t: t.double()), "unary has dtype Double, expected Float"),
    (DNL_F, _set(key=_r(1, 2, 0), value=_r(1, 3, 0), unary=_r(1, 0)), "kernel launch failed"),
    (DNL_B, _set(value=lambda t: t[0]), "value must be 3-D"),
    (DNL_B, _set(grad_out=_strided(1, 3, 5)), "grad_out must be contiguous"),
    (DNL_B, _set(out=_r(1, 3, 6)), "out must have shape [1, 3, 5]"),
    (DNL_B, _set(grad_out=_r(1, 2, 5)), "grad_out must have shape [1, 3, 5]"),
    (DNL_B, _set(lse=_r(1, 6)), "lse must have shape [1, 5]"),
    (DNL_B, _set(g=_r(1, 2)), "g must have shape [1, 3]"),
    (DNL_B, _set(lse_u=_r(2)), "lse_u must have shape [1]"),
    # semantic_difference_conv2d
    (SDC_F, _set(weight=lambda t: t[0]), "weight must be 4-D"),
    (SDC_F, _as(torch.int32), "input has dtype Int, which this backend does not implement"),
    (SDC_F, _set(guidance=lambda t: t.double()), "guidance has dtype Double, expected Float"),
    (SDC_F, _set(similarity="cosine"), "similarity must be charbonnier, gaussian or none, got cosine"),
    (SDC_F, _set(guidance=_r(1, 2, 5, 4)), "guidance must have shape [1, 2, 5, 5]"),
    (SDC_F, _set(weight=_r(3, 2, 3, 1)), "weight must have shape [3, 2, 3, 3]"),
    (SDC_F, _set(bias=lambda t: t.double()), "bias has dtype Double, expected Float"),
    (SDC_F, _set(bias=_r(4)), "bias must have shape [3]"),
    (SDC_F, _set(weight=_r(3, 2, 2, 2)), "kernel launch failed"),
    (SDC_B, _set(input=lambda t: t[0]), "input must be 4-D"),
    (SDC_B, _set(grad_out=_strided(1, 3, 5, 5)), "grad_out must be contiguous"),
    (SDC_B, _set(grad_out=_r(1, 2, 5, 5)), "grad_out must have shape [1, 3, 5, 5]"),
    # qco
    (QCO_F, _set(x=lambda t: t[0]), "x must be 4-D"),
    (QCO_F, _as(torch.int32), "x has dtype Int, which this backend does not implement"),
    (QCO_F, _set(x=_strided(1, 2, 4, 4)), "x must be contiguous"),
    (QCO_F, _set(x=_r(1, 2, 5, 4), grid=2), "kernel launch failed"),
    (QCO_B, _set(x=lambda t: t[0]), "x must be 4-D"),
    (QCO_B, _set(hist=_r(1, 2, 2, 3)), "hist must have shape [1, 2, 2, 3, 3]"),
    (QCO_B, _set(hist=lambda t: t.double()), "hist has dtype Double, expected Float"),
    (QCO_B, _set(grad_hist=_r(1, 3, 3)), "grad_hist must have shape [1, 2, 2, 3, 3]"),
    (QCO_B, _set(grad_levels=_r(1, 3)), "grad_levels must have shape [1, 2, 2, 3]"),
    (QCO_B, _set(grad_sim=_r(1, 4, 5)), "grad_sim must have shape [1, 4, 4]"),
    (QCO_B, _set(sim=_strided(1, 4, 4)), "sim must be contiguous"),
    (QCO_B, _set(rnorm=_r(1, 4)), "rnorm must have shape [1, 4, 4]"),
    (QCO_B, _set(mean=_r(1, 4, 3)), "mean must have shape [1, 4, 2]"),
    (QCO_B, _set(stats=_r(1, 4, 2)), "stats must have shape [1, 4, 3]"),
    # texture_reconstruct
    (REC_F, _set(sim=lambda t: t[0]), "sim must be 3-D"),
    (REC_F, _set(levels=lambda t: t[0]), "levels must be 2-D"),
    (REC_F, _set(features=lambda t: t[0]), "features must be 3-D"),
    (REC_F, _as(torch.int32), "sim has dtype Int, which this backend does not implement"),
    (REC_F, _set(levels=lambda t: t.double()), "levels has dtype Double, expected Float"),
    (REC_F, _set(levels=_r(2, 3)), "levels must have shape [1, 3]"),
    (REC_F, _set(features=_r(1, 2, 4)), "features must have shape [1, 2, 3]"),
    (REC_F, _set(levels=_r(1, 0), features=_r(1, 2, 0)), "kernel launch failed"),
    (REC_B, _set(features=_strided(1, 2, 3)), "features must be contiguous"),
    (REC_B, _set(grad_out=lambda t: t.double()), "grad_out has dtype Double, expected Float"),
    (REC_B, _set(grad_out=_r(1, 2, 4, 5)), "grad_out must have shape [1, 2, 4, 4]"),
]

KERNELS = sorted({kernel for kernel, _, _ in CASES})


@pytest.mark.parametrize("kernel", KERNELS)
def test_valid_arguments_pass(emulated, kernel):  # noqa: F811
    """The base arguments of the cases below are valid: each case fails on its one change."""
    torch.manual_seed(0)
    getattr(emulated, kernel)(**_valid(kernel))


@pytest.mark.parametrize("kernel, bad, message", CASES,
                         ids=[f"{k}-{m.split(' ')[0]}-{i}" for i, (k, _, m) in enumerate(CASES)])
def test_bad_argument_raises(emulated, kernel, bad, message):  # noqa: F811
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as info:
        getattr(emulated, kernel)(**bad(_valid(kernel)))
    assert f"segops_C.{kernel} (cuda): " in str(info.value)
    assert message in str(info.value)


DEVICE_CASES = [
    (CCA_F, "key"), (CCA_B, "stats"), (ISA_B, "lse"), (DNL_F, "unary"), (DNL_B, "g"),
    (SDC_F, "bias"), (QCO_B, "hist"), (REC_B, "grad_out"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
@pytest.mark.parametrize("kernel, name", DEVICE_CASES)
def test_device_mismatch(kernel, name):
    """On a CUDA build: one argument left on the CPU is named (the guards' device branches)."""
    import segops  # noqa: F401  (loads segops._C)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"segops_C::{kernel}", "CUDA"):
        pytest.skip("segops._C has no CUDA kernels")
    args = {k: v.cuda() if isinstance(v, torch.Tensor) and k != name else v
            for k, v in _valid(kernel).items()}
    with pytest.raises(RuntimeError, match=f"{name} is on cpu"):
        getattr(torch.ops.segops_C, kernel)(**args)
