"""Smoke test of the benchmark suite: the report runs end to end on a tiny shape set and writes a Markdown table,
a JSON file and a PNG plot that cover every op and every backend; plus the SPEC section 5 judging logic.

Timings are not asserted (CI machines are shared and noisy); only that every measurement ran and was recorded. One
thread: on a loaded 2-core machine OpenMP barriers make 2-thread runs of tiny ops 10-20x slower.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.report", "--shapes", "smoke", "--device", "cpu", "--dtypes", "float32",
           "--no-compile", "--repeats", "3", "--budget", "0.01", "--threads", "1", "--out", str(out), "--name", "smoke",
           "--e2e-tiny", "--steady-malloc"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cmd.append("--include-triton-cpu")  # CI sets it for the Triton tests: time the interpreter on the tiny set
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "smoke"


def test_report_files_exist_and_parse(smoke_report):
    result = json.loads(smoke_report.with_suffix(".json").read_text())
    md = smoke_report.with_suffix(".md").read_text()
    png = smoke_report.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(smoke_report.with_suffix(".png"))).shape[0] > 100
    meta = result["meta"]
    for key in ("device", "torch", "triton", "python", "threads", "date", "git_commit", "load_average_start",
                "copy_bandwidth"):
        assert key in meta, key
    assert "| op | dtype | dir | impl | median ms" in md
    if sys.platform.startswith("linux"):  # glibc: the allocator setting the run used is in the header
        assert meta["malloc"].startswith("steady"), meta["malloc"]
        assert "| malloc | steady" in md
    import fastadvseg

    if "cpu" in fastadvseg.available_backends():  # which kernel build ran is in the header
        from fastadvseg import _C_cpu

        assert meta["cpu_kernels"].startswith(_C_cpu.isa()), meta["cpu_kernels"]
        assert f"| cpu backend kernels | {_C_cpu.isa()}" in md


def test_report_covers_every_op_and_backend(smoke_report):
    from benchmarks.cases import CASES

    result = json.loads(smoke_report.with_suffix(".json").read_text())
    md = smoke_report.with_suffix(".md").read_text()
    backends = list(result["meta"]["backends"])
    if "triton" in backends and "--include-triton-cpu" not in result["meta"]["argv"]:
        backends.remove("triton")  # the interpreter is excluded from CPU timing unless asked for
    assert "reference" in backends
    seen = {(r["op"], r["impl"], r["direction"]): r for r in result["rows"]}
    for case in CASES:
        for impl in ["eager"] + backends:
            for direction in ("fwd", "fwdbwd") if case.has_backward else ("fwd",):
                row = seen.get((case.name, impl, direction))
                assert row is not None, (case.name, impl, direction)
                assert row["status"] == "ok", row
                assert row["median_ms"] > 0 and row["n"] >= 3
                if impl != "eager":
                    assert row["speedup_vs_eager"] > 0
        assert case.name in md
    for impl in backends:
        assert f"| {impl} |" in md
    e2e = result["e2e"]
    assert e2e["fused"]["images_per_s"] > 0 and e2e["reference"]["images_per_s"] > 0


def test_readme_table_prints_recorded_rows(smoke_report, capsys):
    from benchmarks import readme_table

    assert readme_table.main([str(smoke_report.with_suffix(".json"))]) == 0
    text = capsys.readouterr().out
    assert "| op | dtype | backend |" in text and "softmax2d" in text and "images/s" in text


def _row(impl, **kw):
    row = {"op": "generator_loss[labelled]", "shape": "voc", "dtype": "float32", "direction": "fwdbwd",
           "impl": impl, "status": "ok", "speedup_vs_eager": 5.0, "speedup_vs_compile": 1.0, "bw_pct": 90.0,
           "mem_vs_eager": 0.4}
    row.update(kw)
    return row


def test_targets_are_judged_with_gap():
    from benchmarks.targets import evaluate

    checks = evaluate([_row("triton"), _row("eager"), _row("cuda", shape="ade"), _row("cuda", status="TypeError: x")],
                      "cuda", {"speedup": 1.1, "shape": "s", "dtype": "float32"})
    by = {(c["impl"], c["target"]): c for c in checks}
    assert not any(c["impl"] == "eager" or c["shape"] == "ade" for c in checks)
    assert by[("triton", "fused >= 4x eager")]["met"] is True
    compile_check = by[("triton", "fused >= 1.5x torch.compile")]
    assert compile_check["met"] is False and compile_check["gap"] == "needs 1.50x more"
    assert by[("triton", "peak memory <= 1/2 eager")]["met"] is True
    assert by[("cuda", "fused >= 4x eager")]["met"] is None  # failed row: not measured, never "met"
    assert by[("auto", "training iteration >= 1.2x images/s")]["met"] is False
    cpu = evaluate([_row("cpu", shape="voc-n2", speedup_vs_eager=2.0), _row("reference", shape="voc-n2")], "cpu")
    assert [(c["impl"], c["met"], c["gap"]) for c in cpu] == [("cpu", False, "needs 1.50x more")]


def test_byte_model_and_order_statistics():
    import torch

    from benchmarks.cases import select_cases
    from benchmarks.shapes import VOC
    from benchmarks.timing import summarize

    gen = select_cases(["generator_loss[labelled]"])[0]
    p, c = VOC.n * VOC.h * VOC.w, VOC.c
    # read logits, labels, z; write their gradients (SPEC 5: "the bytes the op must move")
    assert gen.bytes(VOC, torch.float32, "fwdbwd") == 2 * p * c * 4 + 8 * p + 2 * p * 4
    assert gen.bytes(VOC, torch.bfloat16, "fwd") == p * c * 2 + 8 * p + p * 2
    stats = summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (stats["median_ms"], stats["min_ms"], stats["n"]) == (3.0, 1.0, 5)
    assert stats["p10_ms"] < stats["q1_ms"] < stats["median_ms"] < stats["q3_ms"] < stats["p90_ms"]
