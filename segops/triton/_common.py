"""What the Triton modules share: constants, block sizes, compile targets, the tl.dot precision
policy, tile loads.

The constants are tl.constexpr so that @triton.jit code may read them (the compiler rejects any
other global); launchers read their `.value`.

Every launcher takes its tiles, num_warps and num_stages from one config function of (shape,
dtype, Target): the interpreter is one target, sm_80 and sm_90 are others, so the GPU
configurations can be computed (and compiled, scripts/check_triton_compile.py) on a machine
without a GPU. `target_of(tensor)` is the target a call runs on; `compile_target(t)` makes every
call inside it plan for `t` instead.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from segops.triton import _interpreter_compat  # noqa: F401  (numpy>=2.3 under TRITON_INTERPRET)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))


@dataclass(frozen=True)
class Target:
    """What a launcher plans for. arch: compute capability as 80, 90, ...; None for the CPU
    interpreter. sm_count: streaming multiprocessors (work splitting); smem_bytes: the shared
    memory one program may use (opt-in maximum per block)."""

    name: str
    arch: Optional[int]
    sm_count: int
    smem_bytes: int

    @property
    def gpu(self) -> bool:
        return self.arch is not None

    def launch(self, num_warps: int, num_stages: int) -> dict:
        """Launch options for a GPU; the interpreter takes none."""
        return dict(num_warps=num_warps, num_stages=num_stages) if self.gpu else {}


INTERPRETER = Target("interpreter", None, 1, 0)
SM80 = Target("sm_80", 80, 108, 164 * 1024)  # A100
SM90 = Target("sm_90", 90, 132, 227 * 1024)  # H100 / H200
_forced_target: list = []


@contextlib.contextmanager
def compile_target(target: Target) -> Iterator[None]:
    """Plan every launch inside for `target`, whatever device the tensors are on."""
    _forced_target.append(target)
    try:
        yield
    finally:
        _forced_target.pop()


def target_of(t: torch.Tensor) -> Target:
    """The target a launch on `t`'s device runs on (or the one compile_target forces)."""
    if _forced_target:
        return _forced_target[-1]
    if t.device.type != "cuda":
        return INTERPRETER
    index = t.device.index
    return _cuda_target(index if index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    return Target(f"sm_{arch}", arch, props.multi_processor_count,
                  getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def register_tiles(dtype: torch.dtype, target: Target) -> str:
    """Which GPU tile sizes fit in registers: "interpreter"; "fp32" (tl.dot of fp32 runs on the
    FMA units with exact products, its operand tiles held in registers: the smallest tiles);
    "mma" (sm_80's mma.sync keeps both operands in registers: medium tiles); "wgmma" (sm_90
    reads the operands from shared memory: the largest tiles)."""
    if not target.gpu:
        return "interpreter"
    if dtype == torch.float32:
        return "fp32"
    return "mma" if target.arch < 90 else "wgmma"


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """The power of two >= x, clamped to [lo, hi] (tl.dot wants every dimension >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(x)))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (no TF32, docs/operators.md §3); for
    fp16/bf16 operands the setting has no effect."""
    return "ieee" if dtype == torch.float32 else "tf32"


def log2_scale(scale: float) -> float:
    """A logit factor for exp2-domain softmax: exp(scale * x) = exp2(scale * LOG2E * x)."""
    return float(scale) * LOG2E.value


@triton.jit
def load_tile(base, offs_pos, offs_ch, mask_pos, mask_ch, ch_stride, TRANSPOSED: tl.constexpr):
    """A (positions x channels) tile of channel-major storage base[ch * ch_stride + pos], or
    (channels x positions) when TRANSPOSED; zero where masked."""
    # One return: the compiler checks every return of a function against the first, also those
    # a constexpr branch skips.
    if TRANSPOSED:
        ptr = base + offs_ch.to(tl.int64)[:, None] * ch_stride + offs_pos[None, :]
        tile = tl.load(ptr, mask=mask_ch[:, None] & mask_pos[None, :], other=0.0)
    else:
        ptr = base + offs_ch.to(tl.int64)[None, :] * ch_stride + offs_pos[:, None]
        tile = tl.load(ptr, mask=mask_pos[:, None] & mask_ch[None, :], other=0.0)
    return tile


@triton.jit
def store_tile(base, offs_pos, offs_ch, mask_pos, mask_ch, ch_stride, val):
    """Store a (positions x channels) tile into channel-major storage, in base's dtype."""
    ptr = base + offs_ch.to(tl.int64)[None, :] * ch_stride + offs_pos[:, None]
    tl.store(ptr, val.to(base.dtype.element_ty), mask=mask_pos[:, None] & mask_ch[None, :])


@triton.jit
def channel_dot_kernel(A, B, SUB, OUT, C, L, HAS_SUB: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """OUT[n, l] = sum_c A[n, c, l] * (B[n, c, l] - SUB[n, c] if HAS_SUB) in fp32, for
    contiguous (N, C, L) tensors: the softmax-backward row term D = <dout, out>.
    Grid: (cdiv(L, BLOCK_L), N)."""
    n = tl.program_id(1).to(tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    acc = tl.zeros([BLOCK_L], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        a = load_tile(A + n * C * L, offs_l, offs_c, mask_l, mask_c, L, True).to(tl.float32)
        b = load_tile(B + n * C * L, offs_l, offs_c, mask_l, mask_c, L, True).to(tl.float32)
        if HAS_SUB:
            b -= tl.load(SUB + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(a * b, 0)
    tl.store(OUT + n * L + offs_l, acc, mask=mask_l)


def channel_dot_config(c: int, dtype: torch.dtype, target: Target) -> dict:
    """channel_dot_kernel's tiles and launch options (a streaming reduction; 8 warps on a GPU:
    at 4 the subtracted variant spilled, scripts/check_triton_compile.py)."""
    return dict(BLOCK_C=pow2_clamp(c, 1, 32), BLOCK_L=128, **target.launch(8, 3))


def channel_dot(a: torch.Tensor, b: torch.Tensor, sub: torch.Tensor | None = None) -> torch.Tensor:
    """(N, *spatial) fp32 sum over the channels of a * (b - sub[n, c]) for contiguous
    (N, C, *spatial) a and b and an optional (N, C) fp32 sub. Not for empty tensors."""
    n, c = a.shape[:2]
    length = math.prod(a.shape[2:])
    out = torch.empty((n, *a.shape[2:]), device=a.device, dtype=torch.float32)
    cfg = channel_dot_config(c, a.dtype, target_of(a))
    channel_dot_kernel[(triton.cdiv(length, cfg["BLOCK_L"]), n)](
        a, b, sub if sub is not None else out, out, c, length, HAS_SUB=sub is not None, **cfg)
    return out
