"""Runs the semantic_difference_conv2d CUDA launchers on the CPU emulator (see README.md) and
compares forward and backward with segops.reference in fp64 (the tests' tolerance rule).

    python scripts/cuda_emu/sdc_check.py [--build] [--sanitize thread|address] [--no-wmma] [--quick]
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)
from segops.reference.semantic_difference_conv2d import semantic_difference_conv2d as ref  # noqa: E402

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SIM = {"none": 0, "charbonnier": 1, "gaussian": 2}
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def build(out_dir: str, sanitize: str | None, no_wmma: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, "sdc_emu.cpp")
    subprocess.run([sys.executable, os.path.join(HERE, "convert.py"),
                    os.path.join(ROOT, "csrc", "cuda", "semantic_difference_conv2d.cu"), src], check=True)
    exe = os.path.join(out_dir, "sdc_harness")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", "-D__CUDA_ARCH__=800",
           "-I" + os.path.join(HERE, "inc"), "-I" + os.path.join(ROOT, "csrc", "include"),
           "-include", os.path.join(HERE, "inc", "emu_core.h"), "-pthread", "-Wall",
           "-Wno-unknown-pragmas", src, os.path.join(HERE, "sdc_harness.cpp"), "-o", exe]
    if sanitize:
        cmd.insert(1, f"-fsanitize={sanitize}")
    if no_wmma:
        cmd.insert(1, "-DSEGOPS_SDC_NO_WMMA")
    subprocess.run(cmd, check=True)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype in (F16, BF16):
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _unraw(b: bytes, n: int, dtype: torch.dtype, off: int):
    es = torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(0, dtype=dtype), off
    buf = bytearray(b[off:off + n * es])
    t = (torch.frombuffer(buf, dtype=torch.int16).view(dtype) if dtype in (F16, BF16)
         else torch.frombuffer(buf, dtype=dtype))
    return t, off + n * es


def case(exe, work, dtype, sim, N, Cin, Cg, Cout, H, W, k, dil, sigma=0.7, bias=True, seed=0) -> bool:
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, Cin, H, W, generator=g, dtype=F64)
    V = torch.randn(N, Cg, H, W, generator=g, dtype=F64)
    Wt = torch.randn(Cout, Cin, k, k, generator=g, dtype=F64) * 0.3
    B = torch.randn(Cout, generator=g, dtype=F64)
    G = torch.randn(N, Cout, H, W, generator=g, dtype=F64)
    hdr = struct.pack("12q", DT[dtype], SIM[sim], N, Cin, Cg, Cout, H, W, k, dil, int(bias), 0)
    fin, fout = os.path.join(work, "in.bin"), os.path.join(work, "out.bin")
    with open(fin, "wb") as f:
        f.write(hdr + struct.pack("d", sigma) + b"".join(_raw(x.to(dtype)) for x in (U, V, Wt, B, G)))
    t0 = time.time()
    r = subprocess.run([exe, fin, fout], capture_output=True, text=True)
    if r.returncode:
        print("FAIL rc", r.returncode, r.stderr[-3000:])
        return False
    b = open(fout, "rb").read()
    off, outs = 0, []
    for shape in [(N, Cout, H, W), (N, Cin, H, W), (N, Cg, H, W), (Cout, Cin, k, k), (Cout,)]:
        t, off = _unraw(b, int(np.prod(shape)), dtype, off)
        outs.append(t.view(shape))

    def run_ref(dt):
        xs = [x.to(dt).detach().requires_grad_(True) for x in (U, V, Wt, B)]
        y = ref(xs[0], xs[1], xs[2], xs[3] if bias else None, dilation=dil, similarity=sim, sigma=sigma)
        y.backward(G.to(dt))
        return [y.detach()] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]

    r64 = run_ref(F64)
    rdt = run_ref(dtype) if dtype != F64 else r64
    ok, msgs = True, []
    for i, name in enumerate(["out", "dU", "dV", "dW", "db"]):
        got, exp = outs[i].double(), r64[i].double()
        if name == "db" and not bias:
            exp = G.sum((0, 2, 3))
        if got.numel() == 0:
            msgs.append(f"{name}:empty")
            continue
        err = (got - exp).abs().max().item()
        referr = (rdt[i].double() - exp).abs().max().item() if not (name == "db" and not bias) else 0.0
        tol = 2 * referr + FLOOR[dtype] * max(1.0, exp.abs().max().item())
        good = bool(np.isfinite(err) and err <= tol)
        ok &= good
        msgs.append(f"{name}:{err:.1e}/{tol:.1e}{'' if good else ' BAD'}")
    print(("ok   " if ok else "BAD  ") + f"{str(dtype)[6:]:8s} {sim:11s} N{N} Cin{Cin} Cg{Cg} Cout{Cout} "
          f"{H}x{W} k{k} d{dil} bias{int(bias)} ({time.time() - t0:.1f}s) " + " ".join(msgs), flush=True)
    return ok


QUICK = [
    (F64, "charbonnier", 2, 3, 3, 5, 7, 6, 3, 1),
    (F64, "gaussian", 2, 3, 4, 5, 7, 6, 3, 2),
    (F32, "none", 1, 3, 2, 5, 5, 9, 3, 1),
    (F16, "charbonnier", 2, 3, 3, 5, 7, 6, 3, 1),
    (BF16, "gaussian", 2, 3, 4, 5, 7, 6, 3, 2),
]
FULL = QUICK + [
    (F16, "none", 1, 5, 2, 17, 9, 8, 3, 1),
    (F64, "gaussian", 2, 37, 5, 70, 12, 11, 3, 1),   # 2 channel blocks, 2 o-tiles, 6 K-tiles, splits
    (F64, "charbonnier", 2, 37, 37, 66, 13, 10, 3, 2),
    (F32, "none", 1, 8, 1, 3, 20, 9, 7, 3),            # wide halo
    (F64, "charbonnier", 1, 2, 2, 2, 3, 4, 5, 4),      # dilation beyond the image
    (F64, "gaussian", 2, 1, 1, 1, 1, 1, 1, 1),         # k = 1, one pixel
    (F16, "gaussian", 2, 37, 3, 70, 12, 11, 3, 1),
    (BF16, "charbonnier", 2, 20, 20, 66, 9, 9, 3, 1),
    (F64, "none", 2, 3, 0, 5, 7, 6, 3, 1),             # empty guidance
]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sanitize", choices=["thread", "address"])
    ap.add_argument("--no-wmma", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "cuda_emu"))
    a = ap.parse_args()
    exe = build(a.work, a.sanitize, a.no_wmma)
    allok = True
    for c in QUICK if a.quick else FULL:
        allok &= case(exe, a.work, *c)
    allok &= case(exe, a.work, F32, "gaussian", 1, 4, 2, 5, 6, 7, 3, 1, bias=False)
    allok &= case(exe, a.work, F64, "charbonnier", 3, 5, 5, 7, 16, 16, 3, 1, sigma=2.5, seed=3)
    print("ALL OK" if allok else "SOME BAD")
    sys.exit(0 if allok else 1)
