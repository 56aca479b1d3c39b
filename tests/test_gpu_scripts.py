"""The GPU tooling that runs without a GPU: the CUDA resource report's ptxas parser and budget
checks (scripts/check_cuda_resources.py), and the GPU validation script's refusal on a machine
without a GPU (scripts/gpu_validate.py)."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


resources = _script("check_cuda_resources")
validate = _script("gpu_validate")

# Captured from `nvcc -Xptxas -v` (nvcc 13.0) on csrc/cuda/qco.cu and criss_cross_attention.cu,
# names shortened; the sm_90 entry of region_grad_kernel has its numbers changed to differ from
# sm_80's.
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6segops4cuda12_GLOBAL__N_118region_grad_kernelIfLi512EEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN6segops4cuda12_GLOBAL__N_118region_grad_kernelIfLi512EEEvPKT_
    48 bytes stack frame, 48 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 48 bytes cumulative stack size, 192 bytes smem, 494 bytes cmem[0]
ptxas info    : Compile time = 6193.314 ms
ptxas info    : Compiling entry function '_ZN6segops4cuda12_GLOBAL__N_114cca_dot_kernelIfEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN6segops4cuda12_GLOBAL__N_114cca_dot_kernelIfEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 396 bytes cmem[0]
ptxas info    : Compile time = 269.572 ms
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6segops4cuda12_GLOBAL__N_118region_grad_kernelIfLi512EEEvPKT_' for 'sm_90'
ptxas info    : Function properties for _ZN6segops4cuda12_GLOBAL__N_118region_grad_kernelIfLi512EEEvPKT_
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 88 registers, used 1 barriers, 25856 bytes smem, 494 bytes cmem[0]
ptxas info    : Compile time = 5000.000 ms
"""


def test_ptxas_report_is_parsed_per_kernel_and_architecture():
    kernels = resources.parse_ptxas(PTXAS_SAMPLE)
    got = [(k.arch, k.registers, k.spill_stores, k.spill_loads, k.stack, k.static_smem)
           for k in kernels]
    assert got == [(80, 64, 48, 52, 48, 192), (80, 32, 0, 0, 0, 0), (90, 88, 0, 0, 8, 25856)]
    assert kernels[0].mangled == kernels[2].mangled != kernels[1].mangled


def test_kernel_names_lose_namespaces_and_parameters():
    short = resources.short_name
    assert short("segops::cuda::(anonymous namespace)::region_grad_kernel<float, 512>"
                 "(float const*, segops::cuda::(anonymous namespace)::Geo)") == \
        "region_grad_kernel<float, 512>"
    assert short("segops::cuda::(anonymous namespace)::cca_line_kernel<double, "
                 "(segops::cuda::(anonymous namespace)::Mode)1, false, true>"
                 "(segops::cuda::(anonymous namespace)::LineArgs<double>)") == \
        "cca_line_kernel<double, (Mode)1, false, true>"


def test_probe_output_is_parsed():
    assert resources.parse_probe("attention_*_kernel<float, 4>\t37376\nregion_hist_kernel<*>\t"
                                 "40960\n") == [("attention_*_kernel<float, 4>", 37376),
                                                ("region_hist_kernel<*>", 40960)]


def test_budgets_fail_spills_and_shared_memory_over_the_limit(monkeypatch):
    spilling, ok, big = resources.parse_ptxas(PTXAS_SAMPLE)
    spilling.name, ok.name, big.name = "region_grad_kernel<float, 512>", "cca_dot_kernel<float>", \
        "region_grad_kernel<float, 512>"
    assert resources.check("qco", ok) == []
    assert resources.check("qco", spilling) == ["48 B spilled > budget 0 B"]
    big.dynamic_smem = resources.SMEM_LIMIT[90] - big.static_smem + 1
    assert resources.check("qco", big) == [f"shared memory {resources.SMEM_LIMIT[90] + 1} B > "
                                           f"{resources.SMEM_LIMIT[90]} B"]
    monkeypatch.setattr(resources, "SPILL_EXCEPTIONS",
                        {("qco", "region_grad_kernel<*>", 80): (48, "measured")})
    assert resources.check("qco", spilling) == []
    assert resources.check("criss_cross_attention", spilling) != []


def test_report_has_one_row_per_kernel_with_both_architectures():
    kernels = resources.parse_ptxas(PTXAS_SAMPLE)
    for k in kernels:
        k.name = "cca_dot_kernel<float>" if "cca" in k.mangled else "region_grad_kernel<float, 512>"
    text = resources.report([resources.FileResult("qco", kernels)], [80, 90], 1.0, "nvcc 13.0")
    rows = [line for line in text.splitlines() if line.startswith("| qco |")]
    assert rows == ["| qco | `cca_dot_kernel<float>` | 32 / 0 / 0 / 0.0 | – | yes |",
                    "| qco | `region_grad_kernel<float, 512>` | 64 / 48 / 52 / 0.2 | "
                    "88 / 0 / 0 / 25.2 | **no** |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_validate_refuses_at_once_without_a_gpu(tmp_path):
    out = tmp_path / "results"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_validate.py"), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no GPU on this machine" in proc.stderr
    assert not out.exists()
    assert time.perf_counter() - start < 60


def test_gpu_validate_dry_run_lists_the_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_validate.py"), "--dry-run",
                           "--out", str(tmp_path / "results")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("build", "info", "tests-triton", "tests-cuda", "tests-cuda-vs-triton",
                 "sanitizer", "benchmark"):
        assert f"\n{step} (" in "\n" + proc.stdout
    assert "SEGOPS_BUILD_CUDA=1" in proc.stdout
    assert not (tmp_path / "results").exists()


def test_gpu_validate_steps_report_failure_and_timeout(tmp_path):
    def step(name, code, timeout=30):
        return validate.Step(name, [sys.executable, "-c", code], timeout)

    results = [(s.name, *validate.run_step(s, tmp_path, s.timeout)) for s in (
        step("passes", "print('fine')"), step("fails", "raise SystemExit(3)"),
        step("hangs", "import time; time.sleep(60)", timeout=1))]
    assert [(name, status) for name, status, _ in results] == [
        ("passes", "ok"), ("fails", "failed (exit 3)"), ("hangs", "timeout (1 s)")]
    assert results[2][2] < 30
    assert "fine" in (tmp_path / "passes.log").read_text()
    assert "| fails | failed (exit 3) |" in validate.table(results)
