"""The benchmark harness (benchmarks/): cost models, derived columns, the allocator settings of
the timing and memory processes, and one quick end-to-end run with --compare."""
import json
import os

import pytest
import torch

from benchmarks import cases as cases_mod
from benchmarks import run
from benchmarks.common import MODES
from benchmarks.measure import MEMORY_ENV, best_bounds, counted_flops, make_step, roofline

QUICK_CASES = [case for op in cases_mod.available_ops()
               for case in cases_mod.load(op).cases("cpu", torch.float32, quick=True)]


def _meta(case):
    return case.make("meta", torch.float32)


@pytest.mark.parametrize("case", [c for c in QUICK_CASES if c.cost], ids=lambda c: c.label)
def test_cost_of_every_mode(case):
    cost = case.cost(_meta(case))
    assert set(cost) == set(MODES)
    for mode in MODES:
        assert cost[mode].flops > 0 and cost[mode].bytes > 0
    assert cost["fwd+bwd"] == cost["fwd"] + cost["bwd"]
    assert cost["bwd"].flops >= cost["fwd"].flops and cost["bwd"].bytes > cost["fwd"].bytes


def _counted(case, mode):
    kwargs = case.make("cpu", torch.float32)
    for name in case.grad:
        kwargs[name].requires_grad_(True)
    return counted_flops(make_step(case.providers["reference"], kwargs, case.grad, mode))


GEMM_OPS = ("criss_cross_attention", "interlaced_sparse_attention", "disentangled_non_local",
            "semantic_difference_conv2d")


@pytest.mark.parametrize("case", [c for c in QUICK_CASES if c.op in GEMM_OPS], ids=lambda c: c.label)
def test_analytic_flops_match_the_references_products(case):
    """The references compute exactly the products the cost counts (the criss-cross reference
    counts the centre twice, H+W instead of H+W-1; the analytic SDC count adds the elementwise
    work, a few FLOPs per product term), in the forward and in the backward."""
    cost = case.cost(_meta(case))
    fwd = _counted(case, "fwd")
    bwd = _counted(case, "fwd+bwd") - fwd
    assert 0.85 <= fwd / cost["fwd"].flops <= 1.05
    assert 0.85 <= bwd / cost["bwd"].flops <= 1.05


def test_texture_reconstruct_counts_two_levels_per_position():
    """The reference multiplies the dense (N, P, K) encoding: K/2 times the two-level count."""
    case = next(c for c in QUICK_CASES if c.op == "texture_reconstruct")
    k = case.params["K"]
    assert _counted(case, "fwd") == pytest.approx(k / 2 * case.cost(_meta(case))["fwd"].flops)


def test_roofline_takes_the_larger_bound():
    bounds = dict(flops_per_s=1e11, bytes_per_s=1e10)
    assert roofline(1e9, 1e7, bounds) == dict(bound_ms=10.0, bound="compute")
    assert roofline(1e6, 1e9, bounds) == dict(bound_ms=100.0, bound="memory")
    assert roofline(None, None, bounds) == {}
    slower = dict(flops_per_s=5e10, bytes_per_s=2e10)
    assert best_bounds(bounds, slower) == dict(flops_per_s=1e11, bytes_per_s=2e10)


def _row(provider, ms, **kw):
    return dict(op="op", case="c", mode="fwd+bwd", dtype="float32", provider=provider,
                status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms, **kw)


def test_derived_columns():
    rows = [_row("reference", 40.0, peak_bytes=400, counted_flops=2e9),
            _row("conv2d", 10.0, peak_bytes=100), _row("cpu", 20.0, peak_bytes=100, op_ms=5.0)]
    bounds = {"float32": dict(flops_per_s=1e12, bytes_per_s=1e11)}
    run.add_derived(rows, bounds, {("op", "c"): "conv2d"})
    cpu = rows[2]
    assert cpu["speedup_vs_reference"] == 2.0 and cpu["memory_ratio_vs_reference"] == 0.25
    assert cpu["vs_anchor"] == 2.0 and cpu["anchor"] == "conv2d"
    assert cpu["op_fraction"] == 0.25
    # no analytic cost: the reference's counted FLOPs, a compute bound of 2 ms
    assert cpu["flops"] == 2e9 and cpu["flops_counted"]
    assert cpu["bound"] == "compute" and cpu["roofline_fraction"] == pytest.approx(0.1)
    assert "10% C" in run.markdown(rows, dict(device_name="x", torch="t", triton="t", git_sha="g"),
                                   {"float32": dict(bounds["float32"], flops_source="measured")})


def test_only_the_memory_process_changes_the_allocator(monkeypatch):
    """Timing runs with the caller's environment (glibc defaults); peak memory in its own
    process with MEMORY_ENV."""
    seen = []

    def fake_worker(job, timeout, env):
        seen.append((job["phase"], {k: env.get(k) for k in MEMORY_ENV}))
        if job["phase"] == "time":
            return [dict(provider=job["providers"][0], mode="fwd", status="ok", median_ms=1.0)]
        return [dict(provider=p, mode="fwd", status="ok", peak_bytes=123) for p in job["providers"]]

    for key in MEMORY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(run, "run_worker", fake_worker)
    job = dict(kind="op", op="qco", index=0, dtype="float32", providers=["a", "b"], modes=["fwd"])
    rows = [r for p in job["providers"] for r in run.run_worker(dict(job, phase="time",
                                                                     providers=[p]), 1, os.environ)]
    run.add_memory(rows, job, 1)
    assert [r["peak_bytes"] for r in rows] == [123, 123]
    assert seen[:2] == [("time", {k: None for k in MEMORY_ENV})] * 2
    assert seen[2] == ("memory", MEMORY_ENV)


@pytest.mark.parametrize("quick", [False, True])
def test_rounds_interleave_the_providers_and_keep_each_rows_median(monkeypatch, tmp_path, quick):
    """--rounds R times every provider of a case once per round, in turn, and reports the median
    round (so that a slow phase of a shared machine does not land on one provider alone). Each
    provider is timed in a process of its own, except in a --quick smoke run (one per case)."""
    order, time_workers = [], []
    round_ms = {"reference": [9.0, 3.0, 5.0], "cpu": [1.0, 2.0, 7.0]}

    def fake_worker(job, timeout, env):
        if job["phase"] == "memory":
            return [dict(provider=p, mode="fwd", status="ok", peak_bytes=1 << 20)
                    for p in job["providers"]]
        time_workers.append(list(job["providers"]))
        rows = []
        for provider in job["providers"]:
            order.append((job["index"], provider))
            ms = round_ms[provider][sum(o == order[-1] for o in order) - 1]
            rows.append(dict(provider=provider, mode="fwd", status="ok", median_ms=ms, p20_ms=ms,
                             p80_ms=ms))
        return rows

    monkeypatch.setattr(run, "run_worker", fake_worker)
    monkeypatch.setattr(run, "machine_bounds", lambda *a, **k: dict(
        flops_per_s=1e12, bytes_per_s=1e10, flops_source="measured"))
    out = str(tmp_path / "rounds.json")
    assert run.main((["--quick"] if quick else [])
                    + ["--op", "qco", "--case", "recon", "--provider", "reference",
                       "cpu", "--mode", "fwd", "--rounds", "3", "--out", out, "--plot",
                       str(tmp_path)]) == 0
    cases = len({index for index, _ in order})
    assert [p for _, p in order] == ["reference", "cpu"] * 3 * cases
    assert time_workers == ([["reference", "cpu"]] if quick
                            else [["reference"], ["cpu"]]) * 3 * cases
    result = json.load(open(out))
    assert result["rounds"] == 3
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["reference"]["median_ms"] == 5.0 and rows["cpu"]["median_ms"] == 2.0
    assert rows["reference"]["round_medians_ms"] == [9.0, 3.0, 5.0]
    assert rows["cpu"]["speedup_vs_reference"] == pytest.approx(2.5)
    with pytest.raises(SystemExit):
        run.main(["--quick", "--op", "qco", "--rounds", "0"])


def test_model_operator_calls_are_captured():
    from benchmarks.cases import models
    case = next(c for c in models.cases("cpu", torch.float32, quick=True) if c.op == "ccnet_r50-d8")
    step = models.make_step(case.providers["reference"], case.make("cpu", torch.float32), "eval")
    calls = models._captured_calls(step)
    assert len(calls) == 2  # recurrence 2
    assert all(fn.__name__ == "criss_cross_attention" for fn, _, _ in calls)


@pytest.mark.slow
def test_quick_run_and_compare(tmp_path, capsys):
    out = str(tmp_path / "quick.json")
    argv = ["--quick", "--op", "criss_cross_attention", "--provider", "reference", "cpu",
            "--mode", "fwd", "--out", out]
    assert run.main(argv) == 0
    result = json.load(open(out))
    assert result["bounds"]["float32"]["flops_per_s"] > 0
    for r in result["rows"]:
        assert r["status"] == "ok" and r["peak_bytes"] is not None
        assert r["flops"] > 0 and r["bytes"] > 0 and 0 < r["roofline_fraction"]
    assert run.main(argv[:-1] + [str(tmp_path / "again.json"), "--compare", out]) == 0
    assert "new of roofline" in capsys.readouterr().out


def test_anchor_ratio_is_also_timed_paired(tmp_path):
    """A case with an anchor: each fused provider is timed again alternating with the anchor,
    and the note gives both ratios; the references are not paired."""
    out = str(tmp_path / "paired.json")
    argv = ["--quick", "--op", "semantic_difference_conv2d", "--provider", "reference", "conv2d",
            "cpu", "--mode", "fwd", "--out", out]
    assert run.main(argv) == 0
    rows = json.load(open(out))["rows"]
    by = {(r["case"], r["provider"]): r for r in rows}
    for case in {r["case"] for r in rows}:
        fused, anchor = by[(case, "cpu")], by[(case, "conv2d")]
        assert fused["anchor_pairs"] >= 5 and 0 < fused["vs_anchor_paired"] < 1e3
        assert "vs_anchor_paired" not in anchor and "vs_anchor_paired" not in by[(case, "reference")]
        assert f"(paired {fused['vs_anchor_paired']:.2f}×)" in run.fmt_note(fused)
