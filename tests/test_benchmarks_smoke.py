"""Smoke test of the benchmark suite: the report runs end to end on a tiny shape set and writes a Markdown table,
a JSON file and a PNG plot that cover every op and every backend; the CPU peak-memory table (``--memory``) and the
compiled training step (``--e2e-compile``) at tiny sizes; the per-call cost table (``--call-overhead``); the
pipeline's training step, the allocators and the authors' loop (``--train-step``, ``--allocators``,
``--authors-loop``) at a tiny size, and the copy of the same bytes; the pytest-benchmark layer over the same cases;
a case whose logits are below the labels' resolution, and the rows of the loss path with upsampling (eager and
fused against a float64 oracle, their byte models, their targets); plus the judging of the targets, and the
authors'-loop port computing what our losses compute.

Timings are not asserted (CI machines are shared and noisy); only that every measurement ran and was recorded. One
thread: on a loaded 2-core machine OpenMP barriers make 2-thread runs of tiny ops 10-20x slower.
"""
from __future__ import annotations

import json
import math
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
           "--e2e-tiny", "--steady-malloc", "--call-overhead", "--train-step", "--allocators", "--authors-loop"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cmd.append("--include-triton-cpu")  # CI sets it for the Triton tests: time the interpreter on the tiny set
    # under the Triton interpreter each of its calls takes about a second: a few minutes on a busy 2-core machine
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
    assert md.splitlines()[2].startswith("**Run quality: ")  # loaded / noisy / quiet, before any number
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


@pytest.fixture(scope="module")
def extras_report(tmp_path_factory):
    """``--memory`` and ``--e2e-compile`` alone (``--no-op-timing``), one op, one dtype, the compact G at a tiny
    size: about a minute, most of it starting fresh processes and torch.compile. 1x5x256x256: its logits (1.25 MiB)
    are far above the mmap threshold and the few hundred KiB the kernel's RSS counters may be off by."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc")
    out = tmp_path_factory.mktemp("bench_extras")
    cmd = [sys.executable, "-m", "benchmarks.report", "--device", "cpu", "--dtypes", "float32", "--ops",
           "cross_entropy2d", "--threads", "1", "--no-op-timing", "--no-plot", "--memory", "--memory-shape",
           "1x5x256x256", "--e2e-tiny", "--e2e-compile", "--out", str(out),
           "--name", "extras"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "extras.json").read_text()), (out / "extras.md").read_text()


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_memory_table(extras_report):
    result, md = extras_report
    mem = result["memory"]
    assert (mem["N"], mem["C"], mem["H"], mem["W"]) == (1, 5, 256, 256)
    backends = [b for b in result["meta"]["backends"] if b != "triton"]
    rows = {r["impl"]: r for r in mem["rows"]}
    assert set(rows) == {"eager", "compile", *backends}
    for impl, r in rows.items():
        assert r["status"] == "ok", r
        assert r["op"] == "cross_entropy2d" and r["dtype"] == "float32" and r["n"] >= 3
        for key in ("median_MiB", "p10_MiB", "p90_MiB", "baseline_MiB"):
            assert _finite_positive(r[key]), (impl, key, r[key])
        if impl != "eager":
            assert _finite_positive(r["mem_vs_eager"]), r
            assert isinstance(r["too_noisy"], bool)
    # eager keeps the log-softmax and its gradient alive: at least the 1.25 MiB of the logits' gradient
    assert rows["eager"]["median_MiB"] > 1.2
    assert "## Peak memory of one forward+backward, CPU (1x5x256x256: N=1, C=5, 256x256)" in md
    assert "| op | dtype | impl | peak MiB | p10-p90 MiB | mem/eager | note |" in md
    assert "MALLOC_MMAP_THRESHOLD_=65536" in md and "Threads: 1" in md


def test_compiled_training_step(extras_report):
    """--e2e-compile: the pipeline's step with fastadvseg's and with the eager losses, each plain and compiled, the
    ratios those medians give, and the graph breaks of fastadvseg's loss calls."""
    result, md = extras_report
    e = result["e2e_compile"]
    rows = {r["impl"]: r for r in e["rows"]}
    assert set(rows) == {"fastadvseg", "fastadvseg_compiled", "eager", "compile"}
    assert e["baselines"] == ["fastadvseg", "eager"]
    for r in rows.values():
        assert r["status"] == "ok" and r["step"] == "pipeline", r
        assert _finite_positive(r["median_ms"]) and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert _finite_positive(r["first_step_s"]) and _finite_positive(r["images_per_s"])
    compiled, plain = rows["fastadvseg_compiled"], rows["fastadvseg"]
    assert compiled["speedup_vs_fastadvseg"] == pytest.approx(plain["median_ms"] / compiled["median_ms"])
    lo, hi = compiled["speedup_vs_fastadvseg_range"]
    assert 0 < lo <= compiled["speedup_vs_fastadvseg"] <= hi
    reference = rows["eager"]["median_ms"] / rows["compile"]["median_ms"]
    assert rows["compile"]["speedup_vs_eager"] == pytest.approx(reference)
    assert "deeplabv2_compact" in e["models"]
    if e["graph_breaks"] is None:  # explain failed: the reason is recorded, the timing still ran
        assert e["explain_status"] != "ok"
    else:
        assert e["graph_breaks"] >= 0 and e["graphs"] >= 1
    assert "## Compiled training step" in md and "Graph breaks" in md
    assert "| step | shape | impl | median ms | p10-p90 ms | images/s | x fastadvseg | x eager |" in md


def test_memory_target_is_judged():
    from benchmarks.targets import MEMORY_CHECK, evaluate

    def mem_row(op, impl, ratio, **kw):
        row = {"op": op, "impl": impl, "dtype": "float32", "shape": "voc-n2", "status": "ok", "mem_vs_eager": ratio,
               "mem_vs_eager_range": (ratio * 0.9, ratio * 1.1), "too_noisy": False}
        row.update(kw)
        return row

    memory = {"rows": [mem_row("cross_entropy2d", "cpu", 0.35), mem_row("generator_loss[labelled]", "cpu", 0.6),
                       mem_row("cross_entropy2d", "cpu", 0.5, dtype="bfloat16", too_noisy=True,
                               mem_vs_eager_range=(0.45, 0.55)),
                       mem_row("softmax2d", "cpu", 0.9), mem_row("cross_entropy2d", "reference", 1.2),
                       mem_row("cross_entropy2d", "eager", 1.0)]}
    checks = {(c["op"], c["dtype"]): c for c in evaluate([], "cpu", None, memory) if c["target"] == MEMORY_CHECK}
    assert set(checks) == {("cross_entropy2d", "float32"), ("generator_loss[labelled]", "float32"),
                           ("cross_entropy2d", "bfloat16")}
    assert checks[("cross_entropy2d", "float32")]["met"] is True
    assert checks[("generator_loss[labelled]", "float32")]["gap"] == "1.20x over"
    noisy = checks[("cross_entropy2d", "bfloat16")]
    assert noisy["met"] is None and noisy["gap"].startswith("too noisy to tell")
    assert evaluate([], "cuda", None, memory) == []  # the RSS table is about the CPU


def test_too_noisy_straddles_threshold():
    from benchmarks.timing import ratio_range, summarize, too_noisy

    fast, slow = summarize([0.010, 0.011, 0.012]), summarize([0.020, 0.021, 0.022])
    assert not too_noisy(fast, slow, 1.0) and ratio_range(fast, slow)[1] < 1
    wide = summarize([0.005, 0.015, 0.030])
    assert too_noisy(wide, slow, 1.0)


def test_readme_summary_prints_recorded_rows(smoke_report, capsys):
    from benchmarks import render

    assert render.main(["--summary", str(smoke_report.with_suffix(".json"))]) == 0
    text = capsys.readouterr().out
    assert "| op | backend | float32 ms | float32 x eager |" in text and "softmax2d" in text and "images/s" in text
    assert "run quality:" in text


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
    # read logits, labels, z; write their gradients (the byte model: the fewest bytes the op must move)
    assert gen.bytes(VOC, torch.float32, "fwdbwd") == 2 * p * c * 4 + 8 * p + 2 * p * 4
    assert gen.bytes(VOC, torch.bfloat16, "fwd") == p * c * 2 + 8 * p + p * 2
    stats = summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (stats["median_ms"], stats["min_ms"], stats["n"]) == (3.0, 1.0, 5)
    assert stats["p10_ms"] < stats["q1_ms"] < stats["median_ms"] < stats["q3_ms"] < stats["p90_ms"]


def test_quality_flags_a_loaded_noisy_run_and_overlapping_ratios():
    from benchmarks.targets import add_ratios, assess, evaluate, ratio_cell

    def row(impl, p10, median, p90):
        return {"op": "cross_entropy2d", "shape": "voc-n2", "dtype": "float32", "direction": "fwdbwd", "impl": impl,
                "status": "ok", "p10_ms": p10, "median_ms": median, "p90_ms": p90}

    # a loaded run: eager descheduled for most calls
    eager, cpu = row("eager", 0.27, 47.9, 60.0), row("cpu", 2.0, 2.4, 3.0)
    rows = [eager, cpu, row("compile", 5.0, 5.2, 5.4)]
    for r in rows[1:]:
        r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
    cpu["speedup_vs_compile"] = 5.2 / 2.4
    add_ratios(rows)
    assert cpu["speedup_vs_eager_overlap"] and ratio_cell(cpu, "eager").startswith("~")
    assert not cpu["speedup_vs_compile_overlap"] and ratio_cell(cpu, "compile") == "2.17x"
    q = assess({"meta": {"load_average_start": [1.9, 1.5, 1.4], "device": "X (2 logical CPUs)"}, "rows": rows})
    assert q["flags"] == ["LOADED", "NOISY"]
    quiet = assess({"meta": {"load_average_start": [0.1, 0.1, 0.1], "logical_cpus": 2}, "rows": rows[1:]})
    assert quiet["flags"] == []
    # a target the p10-p90 range straddles is not judged on the median alone
    check = evaluate([cpu], "cpu")[0]
    assert check["met"] is None and check["gap"].startswith("too noisy to tell")


def test_readme_summary_names_a_missing_file_in_one_line(tmp_path, capsys):
    from benchmarks import render

    with pytest.raises(SystemExit) as exit_info:
        render.main(["--summary", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "no results file or folder" in capsys.readouterr().err


def test_call_overhead_table_has_every_loss_through_both_paths(smoke_report):
    """--call-overhead: per loss with a backward, eager, each backend as users call it, and the registered op of
    each kernel backend called alone, every one measured; the Markdown says what the Python around the op adds."""
    import fastadvseg

    result = json.loads(smoke_report.with_suffix(".json").read_text())
    rows = result["overhead"]["rows"]
    assert all(r["status"] == "ok" and r["median_us"] > 0 and r["n"] >= 3 for r in rows), rows
    kernel = [b for b in fastadvseg.available_backends("cpu") if b != "reference"]
    want = ["eager"] + [i for b in fastadvseg.available_backends("cpu") for i in
                        ([b, b + " op alone"] if b in kernel else [b])]
    ops = [r["op"] for r in rows if r["impl"] == "eager"]
    assert "one_hot2d" not in ops and {"softmax2d", "cross_entropy2d", "generator_loss[labelled]"} <= set(ops)
    for op in ops:
        impls = [r["impl"] for r in rows if r["op"] == op]
        assert set(want) <= set(impls), (op, impls)
    md = smoke_report.with_suffix(".md").read_text()
    assert "## Per-call cost (N=2, C=5, 17x23, float32" in md
    assert md.count(" op alone | ") >= len(ops) * len(kernel) and "| API adds |" in md


def test_copy_of_the_same_bytes_beside_generator_loss(smoke_report):
    """The labelled generator_loss fwdbwd row has a plain copy of its byte model's bytes beside it, reused and
    fresh destination, in the JSON and the Markdown."""
    result = json.loads(smoke_report.with_suffix(".json").read_text())
    (row,) = result["copy_rows"]
    assert (row["shape"], row["dtype"], row["op"]) == ("smoke", "float32", "generator_loss[labelled]")
    timed = {r["impl"]: r for r in result["rows"] if (r["op"], r["direction"]) == ("generator_loss[labelled]",
                                                                                   "fwdbwd")}
    assert row["bytes"] == timed["eager"]["bytes"]
    for kind in ("reused", "fresh"):
        assert _finite_positive(row["copy"][kind]["median_ms"]) and _finite_positive(row["copy"][kind]["GBps"])
    assert set(row["ops"]) == set(timed)
    for impl, o in row["ops"].items():
        assert o["median_ms"] == timed[impl]["median_ms"] and _finite_positive(o["pct_of_copy"]["reused"])
    md = smoke_report.with_suffix(".md").read_text()
    assert "## A plain copy of the same bytes" in md and "| copy, reused dst: ms | copy, fresh dst: ms |" in md


def test_training_step_table(smoke_report):
    """--train-step: the pipeline's step and the losses-only step, fastadvseg and eager (--no-compile), with the
    step-time distribution and page faults per step; the allocator in effect is named."""
    result = json.loads(smoke_report.with_suffix(".json").read_text())
    t = result["train_step"]
    rows = {(r["step"], r["impl"]): r for r in t["rows"]}
    assert set(rows) == {(s, i) for s in ("pipeline", "losses") for i in ("fastadvseg", "eager")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["N"], r["C"], r["H"], r["W"]) == (1, 5, 33, 33) and r["n"] >= 4
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and _finite_positive(r["images_per_s"])
        assert 0 <= r["faults_p10"] <= r["faults_median"] <= r["faults_p90"]
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] is None
    assert t["allocator"].startswith("steady")
    md = smoke_report.with_suffix(".md").read_text()
    assert "## Training step as the pipeline runs it (`--train-step`)" in md
    assert "| step | shape | impl | median ms | p10-p90 ms | images/s | x eager | x compile | faults/step |" in md


def test_allocator_table(smoke_report):
    """--allocators: the same steps in a fresh process per allocator; the C library's defaults and steady always,
    jemalloc and tcmalloc measured or said to be missing."""
    result = json.loads(smoke_report.with_suffix(".json").read_text())
    a = result["allocators"]
    assert set(a["allocators"]) == {"system", "steady", "jemalloc", "tcmalloc"}
    assert a["allocators"]["steady"].startswith("steady") and a["allocators"]["system"].startswith("system")
    measured = {r["allocator"] for r in a["rows"]}
    assert {"system", "steady"} <= measured
    for name in {"jemalloc", "tcmalloc"} - measured:
        assert "not installed" in a["allocators"][name]
    for r in a["rows"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["faults_median"] >= 0 and _finite_positive(r["rss_after_MiB"])
        assert _finite_positive(r["peak_rss_MiB"]) and r["peak_rss_MiB"] >= r["rss_after_MiB"] * 0.99
    md = smoke_report.with_suffix(".md").read_text()
    assert "## Allocators (`--allocators`)" in md and "| allocator | as run |" in md


def test_authors_loop_table(smoke_report):
    result = json.loads(smoke_report.with_suffix(".json").read_text())
    a = result["authors_loop"]
    rows = {r["impl"]: r for r in a["rows"]}
    assert set(rows) == {"authors", "fastadvseg", "eager"}  # --no-compile: no compiled variant
    for r in rows.values():
        assert r["status"] == "ok", r
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["speedup_vs_authors"])
    assert rows["authors"]["speedup_vs_authors"] == 1.0
    md = smoke_report.with_suffix(".md").read_text()
    assert "## The authors' training iteration (`--authors-loop`)" in md and "| authors | " in md


def test_authors_loop_port_computes_our_losses():
    """The baseline is correct: one iteration of the port of the authors' loop and one of the pipeline's
    train_step (fastadvseg's losses), from the same weights on the same tiny batch, give the same loss values and
    the same updated weights (SGD for D here: Adam's first step keeps only the gradients' signs). The semi threshold
    sits at the median of D's confidence, so the pseudo-label mask keeps about half the pixels."""
    import torch
    import torch.nn.functional as F

    from benchmarks.authors_loop import build_authors
    from benchmarks.shapes import Shape
    from benchmarks.train_step import build_pipeline
    from fastadvseg.utils.builders import set_lr
    from fastadvseg.utils.step import train_step

    shape, device = Shape("t", 2, 5, 64, 48), torch.device("cpu")  # D's output: 2x2 cells per image, upsampled

    def spread(nets):  # D's confidence over a wide range, so that the threshold can split it
        with torch.no_grad():
            nets.D.classifier.weight.mul_(100)
        return nets

    _, nets, (_, _, images_u) = build_pipeline(shape, device)
    with torch.no_grad():
        conf = torch.sigmoid(spread(nets).D(F.softmax(F.interpolate(nets.G(images_u), size=(64, 48),
                                                                    mode="bilinear", align_corners=True), 1)))
    conf = conf.flatten().sort().values
    k = next(k for k in range(len(conf) // 2, len(conf)) if conf[k] - conf[k - 1] > 1e-5)
    threshold = float(conf[k - 1] + conf[k]) / 2  # about half the pixels above, none within float noise of it
    for backend in ("reference", "auto"):
        config = dict(head_lr_mult=10.0, loss_backend=backend, lr=0.01, lr_d=0.01, semi_threshold=threshold)
        port, _, ported, batch = build_authors(shape, device, **config)
        cfg, nets, batch2 = build_pipeline(shape, device, **config)
        for n in (spread(ported), spread(nets)):
            n.opt_d = torch.optim.SGD(n.D.parameters(), lr=cfg.lr_d)
        port.optimizer_D = ported.opt_d
        images, labels, images_u = batch
        assert (labels == 255).any() and all(torch.equal(a, b) for a, b in zip(batch, batch2))
        theirs = port(0, (images, labels), images_u, labels)
        set_lr(nets.opt_g, cfg.lr, 0, cfg.steps, cfg.power)  # what the pipeline's loop and theirs set at step 0
        set_lr(nets.opt_d, cfg.lr_d, 0, cfg.steps, cfg.power)
        ours = {k: float(v) for k, v in train_step(cfg, nets, 0, *batch2, num_classes=shape.c).items()}
        assert 0.3 < theirs["semi_ratio"] < 0.7 and theirs["semi_ratio"] == pytest.approx(ours["semi_ratio"])
        for their_key, our_key in (("loss_seg", "loss_ce"), ("loss_adv_p", "loss_adv"), ("loss_semi", "loss_semi"),
                                   ("loss_semi_adv", "loss_semi_adv"), ("loss_D", "loss_d")):
            assert theirs[their_key] == pytest.approx(ours[our_key], rel=1e-5), (backend, their_key)
        for a, b in zip(list(ported.G.parameters()) + list(ported.D.parameters()),
                        list(nets.G.parameters()) + list(nets.D.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_case_below_the_labels_resolution():
    """A case whose logits are drawn at 1/scale of the labels' size (``OpCase.low_res``): its inputs have those
    sizes, its byte model counts their pixels, and its impls compute a float64 bilinear upsample + cross-entropy."""
    import torch
    import torch.nn.functional as F

    from benchmarks import cases as C
    from benchmarks import reference_ops as R
    from benchmarks.shapes import Shape

    case = C.OpCase("cross_entropy2d from 1/4", "cross_entropy2d", ("x", "y"), ("x",),
                    eager=lambda i: R.cross_entropy2d(R.upsample(i["x"], i["size"]), i["y"]),
                    fused=lambda i, b: C._fas().cross_entropy2d(R.upsample(i["x"], i["size"]), i["y"], backend=b),
                    byte_model="fwd: read x at 1/16 of the pixels, y (QCe + 8P); +bwd: write dx (+QCe)",
                    fwd_bytes=lambda p, c, e, q, qd: q * c * e + 8 * p, bwd_bytes=lambda p, c, e, q, qd: q * c * e,
                    scale=4, low_res=("x",))
    shape = Shape("odd", 2, 5, 19, 23)
    inputs = C.make_inputs(case, shape, torch.float32, torch.device("cpu"), seed=3)
    assert inputs["x"].shape == (2, 5, 5, 6) and inputs["y"].shape == (2, 19, 23) and inputs["size"] == (19, 23)
    assert case.bytes(shape, torch.float32, "fwdbwd") == 2 * (2 * 5 * 6) * 5 * 4 + 8 * 2 * 19 * 23
    x64 = inputs["x"].detach().double().requires_grad_()
    want = F.cross_entropy(F.interpolate(x64, size=(19, 23), mode="bilinear", align_corners=False), inputs["y"],
                           ignore_index=255)
    (want_grad,) = torch.autograd.grad(want, x64)
    for impl in ("eager", "reference"):
        fn = C.impl_function(case, impl)
        torch.testing.assert_close(fn(inputs).double(), want, rtol=1e-5, atol=1e-6)
        (grad,) = C.forward_backward(case, fn)(inputs)
        assert grad.shape == (2, 5, 5, 6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_pytest_benchmark_times_the_report_cases(tmp_path):
    """``pytest benchmarks/ --benchmark-only`` runs the report's own plan: one benchmark per impl and direction of
    the chosen case, each with its byte model's bytes."""
    import torch

    from benchmarks import report
    from benchmarks.shapes import SMOKE

    flags = "--shapes smoke --ops softmax2d --dtypes float32 --no-compile --backends reference --threads 1"
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/",
                           "--benchmark-only", f"--report-args={flags}", f"--benchmark-json={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    planned = report.plan(report.parse_args(flags.split()), torch.device("cpu"), ["float32"])
    assert sorted((b["op"], b["impl"], b["direction"]) for b in got) == sorted(
        (case.name, impl, d) for _, _, case, impls in planned for impl in impls for d in case.directions)
    case = planned[0][2]
    assert all(b["bytes"] == case.bytes(SMOKE, torch.float32, b["direction"]) for b in got)


UPSAMPLED_SHAPES = ["smoke", "2x5x67x45"]  # smoke: D's map is 1x1; 67x45: logits 9x6, D's map 3x2, both odd


def _float64_oracle(name, i):
    """The loss of an upsampling row written out with PyTorch's own ops in float64: bilinear upsampling with
    align_corners=True (the authors' choice) of the 1/8 logits and of D's map, then the loss at the labels' size."""
    import torch
    import torch.nn.functional as F

    from benchmarks.cases import LAMBDA_ADV

    up = lambda t: F.interpolate(t, size=i["size"], mode="bilinear", align_corners=True)  # noqa: E731
    y = i["y"] if "y" in i else None

    def labelled(x, z):
        keep = (y != 255).unsqueeze(1).double()
        bce = F.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="none")
        return F.cross_entropy(x, y, ignore_index=255) + LAMBDA_ADV * (bce * keep).sum() / keep.sum()

    if name == "softmax2d[upsampled]":
        return (torch.softmax(up(i["x"]), 1) * i["gout"]).sum()  # what autograd.grad with grad_outputs=gout sees
    if name == "cross_entropy2d[upsampled]":
        return F.cross_entropy(up(i["x"]), y, ignore_index=255)
    if name == "generator_loss[labelled,upsampled]":
        return labelled(up(i["x"]), up(i["z"]))
    assert name == "generator_path[labelled,upsampled]", name
    x = up(i["x"])
    return labelled(x, up(i["d_net"](torch.softmax(x, 1))))


@pytest.mark.parametrize("shape_name", UPSAMPLED_SHAPES)
def test_upsampling_rows_eager_and_fused_agree_with_a_float64_oracle(shape_name):
    """Every row of the loss path as users call it: inputs at 1/8 (D's map at 1/32) of the labels, the byte model
    counting them; eager (F.interpolate + the loss), the reference backend in float64 and the cpu backend in float32
    give the value and the low-resolution gradients of the same float64 formula."""
    import copy

    import torch

    import fastadvseg
    from benchmarks import cases as C
    from benchmarks.shapes import SMOKE, parse_shape

    shape = SMOKE if shape_name == "smoke" else parse_shape(shape_name)
    rows = C.select_cases([C.UPSAMPLED])
    assert [c.name for c in rows] == [c.name for c in C.UPSAMPLED_CASES] and len(rows) == 4
    low, d_low = (-(-shape.h // 8), -(-shape.w // 8)), (-(-shape.h // 32), -(-shape.w // 32))
    for case in rows:
        i64 = C.make_inputs(case, shape, torch.float64, torch.device("cpu"), seed=7)
        assert i64["x"].shape == (shape.n, shape.c, *low) and i64["size"] == (shape.h, shape.w)
        if "z" in i64:
            assert i64["z"].shape == (shape.n, 1, *d_low)
        if "d_net" in i64:  # the stand-in D's map is at 1/32 of the labels too
            assert i64["d_net"](torch.zeros(shape.n, shape.c, shape.h, shape.w, dtype=torch.float64)).shape == (
                shape.n, 1, *d_low)
            assert not any(p.requires_grad for p in i64["d_net"].parameters())
        leaves = [i64[k].detach().clone().requires_grad_() for k in case.grads]
        oracle_inputs = dict(i64, **dict(zip(case.grads, leaves)))
        want = _float64_oracle(case.name, oracle_inputs)
        want_grads = torch.autograd.grad(want, leaves)
        if case.name == "softmax2d[upsampled]":  # the row's forward is the probabilities, not their sum
            want = torch.softmax(torch.nn.functional.interpolate(i64["x"].detach(), size=i64["size"],
                                                                 mode="bilinear", align_corners=True), 1)

        i32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                   and v.is_floating_point() else v) for k, v in i64.items()}
        if "d_net" in i32:
            i32["d_net"] = copy.deepcopy(i64["d_net"]).float()
        i32["dtype"] = torch.float32
        runs = [("eager", i64, 1e-10), ("reference", i64, 1e-10)]
        if "cpu" in fastadvseg.available_backends():
            runs.append(("cpu", i32, 1e-4))
        for impl, inputs, rtol in runs:
            fn = C.impl_function(case, impl)
            got = fn(inputs)
            got_grads = C.forward_backward(case, fn)(inputs)
            what = f"{case.name} {impl} at {shape}"
            assert got.shape == want.shape, what
            torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=rtol * 1e-2,
                                       msg=lambda m: f"{what} value: {m}")
            for k, g, w in zip(case.grads, got_grads, want_grads):
                assert g.shape == inputs[k].shape, (what, k)
                torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * float(w.abs().max()),
                                           msg=lambda m: f"{what} d{k}: {m}")


def test_upsampling_byte_models_count_low_resolution_inputs():
    import torch

    from benchmarks.cases import select_cases
    from benchmarks.shapes import CITYSCAPES, VOC_SMALL

    ce, gen, path = select_cases(["cross_entropy2d[upsampled]", "generator_loss[labelled,upsampled]",
                                  "generator_path[labelled,upsampled]"])
    p, c = VOC_SMALL.pixels, VOC_SMALL.c
    q, qd = 2 * 41 * 41, 2 * 11 * 11  # 321 / 8 and 321 / 32, rounded up
    assert ce.bytes(VOC_SMALL, torch.float32, "fwdbwd") == 2 * q * c * 4 + 8 * p
    assert gen.bytes(VOC_SMALL, torch.bfloat16, "fwdbwd") == 2 * q * c * 2 + 8 * p + 2 * qd * 2
    assert path.bytes(VOC_SMALL, torch.float32, "fwd") == q * c * 4 + p * c * 4 + 8 * p + qd * 4
    q_city = 2 * 64 * 128
    assert ce.bytes(CITYSCAPES, torch.float32, "fwd") == q_city * 19 * 4 + 8 * CITYSCAPES.pixels


def test_upsampling_targets_are_judged():
    """The upsampling rows' own targets: cross_entropy2d >= 6x eager and >= 3x torch.compile (CPU and GPU), its
    peak memory <= 1/4 of eager's (the GPU's table, the CPU's RSS), labelled generator_loss >= 5x eager, G's loss
    path peak memory <= 1/2 of eager's; a target not met says by how much."""
    from benchmarks.targets import evaluate

    def row(op, impl="cpu", shape="voc-n2", **kw):
        r = {"op": op, "shape": shape, "dtype": "float32", "direction": "fwdbwd", "impl": impl, "status": "ok",
             "speedup_vs_eager": 7.0, "speedup_vs_compile": 2.0, "bw_pct": 90.0, "mem_vs_eager": 0.2}
        r.update(kw)
        return r

    ce, gen, path = ("cross_entropy2d[upsampled]", "generator_loss[labelled,upsampled]",
                     "generator_path[labelled,upsampled]")
    cpu = {(c["op"], c["target"]): c for c in evaluate(
        [row(ce), row(gen, speedup_vs_eager=4.0), row(path, speedup_vs_eager=1.1), row(ce, impl="eager")], "cpu")}
    assert set(cpu) == {(ce, "fused >= 6x eager"), (ce, "fused >= 3x torch.compile"), (gen, "fused >= 5x eager")}
    assert cpu[(ce, "fused >= 6x eager")]["met"] is True
    assert (cpu[(ce, "fused >= 3x torch.compile")]["met"], cpu[(ce, "fused >= 3x torch.compile")]["gap"]) == (
        False, "needs 1.50x more")
    assert (cpu[(gen, "fused >= 5x eager")]["met"], cpu[(gen, "fused >= 5x eager")]["gap"]) == (
        False, "needs 1.25x more")

    memory = {"rows": [
        {"op": op, "impl": "cpu", "dtype": "float32", "shape": "voc-n2", "status": "ok", "mem_vs_eager": ratio,
         "mem_vs_eager_range": (ratio * 0.9, ratio * 1.1), "too_noisy": False}
        for op, ratio in ((ce, 0.3), (path, 0.45), ("softmax2d[upsampled]", 0.9))]}
    rss = {c["op"]: c for c in evaluate([], "cpu", None, memory)}
    assert set(rss) == {ce, path}
    assert (rss[ce]["target"], rss[ce]["met"], rss[ce]["gap"]) == ("peak RSS <= 1/4 eager", False, "1.20x over")
    assert (rss[path]["target"], rss[path]["met"]) == ("peak RSS <= 1/2 eager", True)

    gpu = {(c["op"], c["target"]): c for c in evaluate(
        [row(ce, impl="triton", shape="voc", mem_vs_eager=0.3), row(path, impl="cuda", shape="cityscapes")], "cuda")}
    assert {t for op, t in gpu if op == path} == {"peak memory <= 1/2 eager"}
    assert {t for op, t in gpu if op == ce} == {"fused >= 6x eager", "fused >= 3x torch.compile",
                                                ">= 80% of copy bandwidth", "peak memory <= 1/4 eager"}
    assert gpu[(ce, "peak memory <= 1/4 eager")]["gap"] == "1.20x over"
    assert gpu[(path, "peak memory <= 1/2 eager")]["met"] is True


def test_memory_of_the_upsampling_loss_paths(tmp_path):
    """``--memory`` on the upsampling rows (a fresh process per row, no compile): every row measured, fused/eager
    ratios recorded and judged; the fused cross-entropy never holds a full-resolution tensor (eager holds the
    upsampled logits, their log-softmax and their gradient, 1.25 MiB each at 1x5x256x256)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc")
    import fastadvseg

    if "cpu" not in fastadvseg.available_backends():
        pytest.skip("the cpu backend is not built")
    ops = ["cross_entropy2d[upsampled]", "generator_path[labelled,upsampled]"]
    cmd = [sys.executable, "-m", "benchmarks.report", "--device", "cpu", "--dtypes", "float32", "--ops", *ops,
           "--threads", "1", "--no-op-timing", "--no-plot", "--no-compile", "--backends", "cpu", "--memory",
           "--memory-shape", "1x5x256x256", "--out", str(tmp_path), "--name", "mem"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "mem.json").read_text())
    rows = {(r["op"], r["impl"]): r for r in result["memory"]["rows"]}
    assert set(rows) == {(op, impl) for op in ops for impl in ("eager", "cpu")}
    assert all(r["status"] == "ok" and r["n"] >= 3 for r in rows.values()), rows
    ce_eager, ce_cpu = rows[(ops[0], "eager")], rows[(ops[0], "cpu")]
    assert ce_eager["median_MiB"] > 3 * 1.2
    assert ce_cpu["median_MiB"] < 0.25 * ce_eager["median_MiB"] and ce_cpu["mem_vs_eager"] < 0.25
    path_eager, path_cpu = rows[(ops[1], "eager")], rows[(ops[1], "cpu")]
    assert path_cpu["mem_vs_eager"] == pytest.approx(path_cpu["median_MiB"] / path_eager["median_MiB"])
    md = (tmp_path / "mem.md").read_text()
    assert "0.25x for cross_entropy2d[upsampled]" in md and "0.5x for generator_path[labelled,upsampled]" in md
