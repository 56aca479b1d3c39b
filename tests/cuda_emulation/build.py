"""Builds the CUDA kernels of csrc/cuda as a CPU library, for tests/test_cuda_emulation.py.

Every csrc/cuda/<op>.cu is compiled as C++ against the stand-in CUDA headers of fake_cuda/
(emu_cuda.h, emu_runtime.cpp: blocks run one at a time, their threads as fibers), after two textual
rewrites this script makes into build/cuda_emulation/:
  * `kernel<<<grid, block[, shared[, stream]]>>>(args)` becomes
    `::emu::launch(::emu::Cfg(grid, block, ...), [&]() { kernel(args); })`;
  * `extern __shared__ T name[];` becomes a reference to the launch's dynamic shared buffer.
The per-op torch bindings csrc/cuda/<op>.cpp (with SEGOPS_CUDA_EMULATION) and csrc/register.cpp
are compiled with the library renamed to `segops_cuda_emu` and the CUDA dispatch key replaced by
CPU, so torch.ops.segops_cuda_emu.<kernel> runs the unchanged kernel and binding code on CPU
tensors.
"""
from __future__ import annotations

import glob
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LIBRARY = "segops_cuda_emu"

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+|alignas\s*\(\s*\d+\s*\)\s+)*"
    r"([A-Za-z_][\w\s:]*?)\s+(\w+)\s*\[\s*\]\s*;")


def _matching(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} from offset {start}")


def rewrite_launches(text: str) -> str:
    out = []
    pos = 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        # The callee runs back to the start of the statement (after ; { } or a line of a macro).
        j = i
        depth = 0
        while j > pos:
            ch = text[j - 1]
            if ch in ")>]":
                depth += 1
            elif ch in "(<[":
                if depth == 0:
                    break
                depth -= 1
            elif ch in ";{}" and depth == 0:
                break
            j -= 1
        lead = len(text[j:i]) - len(text[j:i].lstrip())
        callee_start = j + lead
        callee = text[callee_start:i].strip()
        k = text.find(">>>", i)
        config = text[i + 3:k]
        p = text.index("(", k)
        q = _matching(text, p, "(", ")")
        args = text[p + 1:q]
        out.append(text[pos:callee_start])
        out.append(f"::emu::launch(::emu::Cfg({config}), [&]() {{ {callee}({args}); }})")
        pos = q + 1


def rewrite_extern_shared(text: str) -> str:
    return _EXTERN_SHARED.sub(
        lambda m: f"static auto& {m.group(2)} = reinterpret_cast<{m.group(1).strip()}*&>(::emu::dyn_smem);",
        text)


def sources(root: str = ROOT, out_dir: str | None = None) -> list[str]:
    out_dir = out_dir or os.path.join(root, "build", "cuda_emulation")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def emit(name: str, text: str) -> None:
        path = os.path.join(out_dir, name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:  # keep mtimes (and ninja's incremental build) when nothing changed
            with open(path, "w") as f:
                f.write(text)
        written.append(path)

    for cu in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))):
        text = open(cu).read()
        text = rewrite_extern_shared(rewrite_launches(text))
        emit(os.path.basename(cu)[:-3] + "_emu.cpp", f'#line 1 "{cu}"\n' + text)
    for cpp in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp"))):
        binding = open(cpp).read()
        if "TORCH_LIBRARY_IMPL(segops_C, CUDA, m)" not in binding:
            raise RuntimeError(f"{cpp} registers no CUDA kernels")
        binding = binding.replace("TORCH_LIBRARY_IMPL(segops_C, CUDA, m)", f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)")
        emit(os.path.basename(cpp)[:-4] + "_binding_emu.cpp", f'#line 1 "{cpp}"\n' + binding)
    register = open(os.path.join(root, "csrc", "register.cpp")).read()
    if "TORCH_LIBRARY(segops_C, m)" not in register:
        raise RuntimeError("csrc/register.cpp does not define TORCH_LIBRARY(segops_C, m)")
    emit("register_emu.cpp", register.replace("TORCH_LIBRARY(segops_C, m)", f"TORCH_LIBRARY({LIBRARY}, m)"))
    return written + [os.path.join(HERE, "fake_cuda", "emu_runtime.cpp")]


def build(root: str = ROOT, verbose: bool = False) -> None:
    """Compile (incrementally) and load the emulation library into this process."""
    from torch.utils.cpp_extension import load

    out_dir = os.path.join(root, "build", "cuda_emulation")
    srcs = sources(root, out_dir)
    load(name=LIBRARY, sources=srcs, build_directory=out_dir, is_python_module=False,
         extra_include_paths=[os.path.join(HERE, "fake_cuda"), os.path.join(root, "csrc", "include")],
         extra_cflags=["-std=c++20", "-O1", "-DSEGOPS_CUDA_EMULATION", "-Wno-unknown-pragmas", "-ffp-contract=off",
                       "-Wno-unused-function", "-Wno-unused-variable"],
         extra_ldflags=["-pthread"], verbose=verbose)


if __name__ == "__main__":
    import sys
    build(sys.argv[1] if len(sys.argv) > 1 else ROOT, verbose=True)
    print("built and loaded", LIBRARY)
