"""scripts/gpu_check.sh without a GPU: its dry run, the order and commands of a real run (with a stand-in python
that records what it is asked to run), the time budget, and the pytest plugin's subset and deadline."""
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="CI's check on CPU tensors; on a GPU machine "
                            "scripts/gpu_check.sh runs for real")
PARTS = ["1-build", "2-contract-tests", "2b-gpu-only-tests", "3-bench-voc-core", "3-bench-cityscapes-core",
         "3b-bench-voc-upsampled", "3b-bench-cityscapes-upsampled", "4a-bench-voc-core-vs-compile",
         "4a-bench-cityscapes-core-vs-compile", "4b-bench-voc-other-ops", "4b-bench-cityscapes-other-ops",
         "4c-kernel-resources", "4d-bench-e2e", "4e-bench-e2e-compile", "4f-rest-of-tests"]


def _run(*args, env=None, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _summary_rows(out: Path):
    return [line.split(" | ") for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")
            and not line.startswith("| part") and not line.startswith("| ---")]


def test_header_states_the_order_and_the_time_of_each_part():
    header = SCRIPT.read_text().split("\nset -uo")[0]
    steps = re.findall(r"^#\s+(\d[a-z]?\.|[a-f]\.)\s+(.+?)\s+~([\d.]+) min", header, flags=re.M)
    assert [s[0] for s in steps] == ["1.", "2.", "2b.", "3.", "3b.", "a.", "b.", "c.", "d.", "e."], steps
    assert "budget" in header and "480" in header and "rest of the test suite" in header


@ON_CPU
def test_dry_run_proves_every_part_well_formed(tmp_path):
    out = tmp_path / "dry"
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = _summary_rows(out)
    assert [r[0].strip("| ") for r in rows] == PARTS
    assert all(r[2] == "dry run: ok" for r in rows), rows
    by = {r[0].strip("| "): r[3] for r in rows}
    for name in ("2-contract-tests", "2b-gpu-only-tests", "4f-rest-of-tests"):  # test selections collect tests
        assert int(re.match(r"(\d+)/\d+ tests collected", by[name]).group(1)) > 0, by[name]
    assert "cross_entropy2d, generator_loss[labelled], generator_loss[unlabelled] at voc, float32, bfloat16" \
        in by["3-bench-voc-core"]
    assert "with torch.compile" in by["4a-bench-cityscapes-core-vs-compile"]
    assert "cross_entropy2d[upsampled]" in by["4a-bench-voc-core-vs-compile"]
    for shape in ("voc", "cityscapes"):  # the loss path as users call it: every upsampling row, no compile
        note = by[f"3b-bench-{shape}-upsampled"]
        assert ("4 rows x 1 shapes x 2 dtypes: softmax2d[upsampled], cross_entropy2d[upsampled], "
                f"generator_loss[labelled,upsampled], generator_path[labelled,upsampled] at {shape}, float32, "
                "bfloat16") in note and "torch.compile" not in note, note
    assert "e2e-compile: the training step compiled vs eager" in by["4e-bench-e2e-compile"]
    assert "call-overhead: per-call cost at the smoke shape" in by["3-bench-voc-core"]
    subset = (out / "2-contract-tests.log").read_text()
    assert "backends ['cpu', 'triton'] on cpu" in subset  # the subset rule, on the backends CPU tensors have
    assert "gpu_check: no part skipped" in proc.stdout


def test_dry_run_fails_on_a_selection_that_does_not_resolve(tmp_path):
    """A dry run is a check: a benchmark part that names an unknown op fails it (the script, cut to that part)."""
    script = tmp_path / "scripts" / "gpu_check.sh"
    script.parent.mkdir()
    lines = SCRIPT.read_text().replace("--ops generator_loss cross_entropy2d", "--ops generator_los").splitlines()
    script.write_text("\n".join(line for line in lines if not line.startswith("part ")
                                 or line.startswith("part 3-bench-voc-core")) + "\n")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    proc = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "dry")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 1, proc.stdout
    assert "unknown op(s) ['generator_los']" in proc.stdout
    assert _summary_rows(tmp_path / "dry")[0][2] == "dry run: failed (1)"


STAND_IN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # records every call, answers the one-line questions the script asks python
    echo "$*" >> "$CALLS"
    case "$1" in
        -c) echo "Stand In GPU" ;;
        -) cat > /dev/null; echo "gpu Stand In GPU" ;;
        -m) [ "$2" = pytest ] && echo "gpu_check: 3 tests not started (time budget spent)" ;;
    esac
    exit 0
""")


@pytest.fixture
def stand_in(tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return {"PYTHON": str(python), "CALLS": str(tmp_path / "calls")}


def test_a_run_makes_its_parts_in_order_on_cuda_tensors(tmp_path, stand_in):
    out = tmp_path / "out"
    proc = _run("--out", str(out), env=stand_in)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    calls = Path(stand_in["CALLS"]).read_text().splitlines()
    work = [c for c in calls if c.startswith("-m ")]
    assert re.match(r"-m pip install -v --no-build-isolation --no-deps -e \.$", work[0])
    assert re.match(r"-m pytest .*--gpu-check subset --gpu-check-device cuda .*tests/test_losses.py tests/test_ops.py",
                    work[1])
    assert re.match(r"-m pytest .*--gpu-check gpu-only --gpu-check-device cuda .* tests$", work[2])
    assert [c for c in calls if "fastadvseg._cuda_kernels" in c]  # part 1 asks whether the extension imports
    reports = [c for c in work if c.startswith("-m benchmarks.report")]
    assert [re.search(r"--name (\S+)", c).group(1) for c in reports] == [p for p in PARTS if "bench" in p]
    assert all("--device cuda" in c and f"--out {out}" in c for c in reports)
    assert "--ops generator_loss cross_entropy2d --dtypes float32 bfloat16" in reports[0]
    assert "--shapes voc" in reports[0] and "--shapes cityscapes" in reports[1] and "--no-compile" in reports[1]
    assert "--call-overhead" in reports[0] and "--call-overhead" not in reports[1]
    assert "--ops upsampled" in reports[2] and "--shapes voc" in reports[2] and "--shapes cityscapes" in reports[3]
    assert "--no-compile" not in reports[4] and "--no-compile" not in reports[5]
    assert "cross_entropy2d[upsampled]" in reports[4] and "cross_entropy2d[upsampled]" in reports[5]
    assert work[-4].startswith("-m tools.compile_check --json")  # then e2e twice, then tests
    assert "--e2e --no-op-timing" in work[-3] and "--e2e-compile --no-op-timing" in work[-2]
    assert re.match(r"-m pytest .*--gpu-check rest --gpu-check-device cuda .* tests$", work[-1])
    rows = _summary_rows(out)
    assert [r[0].strip("| ") for r in rows] == PARTS and all(r[2].startswith("ok") for r in rows)
    assert "3 tests not started" in rows[1][2]  # the plugin's deadline count reaches the summary
    assert (out / "environment.txt").read_text().startswith("gpu Stand In GPU")
    assert "gpu_check: no part skipped" in proc.stdout


FAILED_BUILD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # a GPU machine where the cuda extension did not build: pip succeeds (setup.py only warns, as it does when
    # CUDA_HOME is wrong); part 1's verdict runs in a real python, where fastadvseg._cuda_kernels is not built
    echo "$*" >> "$CALLS"
    case "$1" in
        -c) case "$2" in
                *fastadvseg._cuda_kernels*) exec "$REAL_PYTHON" "$@" ;;
                *) echo "Stand In GPU" ;;
            esac ;;
        -) cat > /dev/null; echo "gpu Stand In GPU" ;;
        -m) if [ "$2" = pip ]; then
                echo "  /usr/local/include/c10/cuda/CUDAStream.h:4:10: fatal error: cuda_runtime_api.h: No such file"
                echo "  ninja: build stopped: subcommand failed."
                echo "  fastadvseg: WARNING: fastadvseg._cuda_kernels not built (RuntimeError: Error compiling objects"
                echo "  Successfully installed fastadvseg"
            fi ;;
    esac
    exit 0
""")


@ON_CPU
def test_part_1_fails_with_the_build_log_when_the_cuda_backend_is_missing(tmp_path):
    """No silent skip: a build that only warned leaves no fastadvseg._cuda_kernels; part 1 fails, prints the end of
    the build log, and the run exits 1 (the other parts still run: their results are still worth the lease)."""
    python = tmp_path / "python"
    python.write_text(FAILED_BUILD)
    python.chmod(0o755)
    out = tmp_path / "out"
    proc = _run("--out", str(out), env={"PYTHON": str(python), "CALLS": str(tmp_path / "calls"),
                                        "REAL_PYTHON": sys.executable})
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = {r[0].strip("| "): r[2] for r in _summary_rows(out)}
    assert rows.pop("1-build") == "FAILED (exit 1)"
    assert all(r.startswith("ok") for r in rows.values()), rows
    build = proc.stdout.split("== 1-build: FAILED")[0]
    assert "gpu_check: FAILED: fastadvseg._cuda_kernels does not import" in build
    assert "gpu_check: FAILED: backend cuda is not available on cuda" in build
    assert "cuda_runtime_api.h: No such file" in build and "ninja: build stopped" in build  # the build log's end
    assert "fastadvseg: WARNING: fastadvseg._cuda_kernels not built" in (out / "1-build.log").read_text()
    assert "Successfully installed" in (out / "1-build-pip.log").read_text()


def test_part_1_verdict_names_each_missing_backend():
    """The verdict itself (BUILT_CHECK in the script), in this python: without a GPU and a built extension it
    names the extension and both GPU backends, and exits 1."""
    code = re.search(r"^BUILT_CHECK='\n(.*?)^'$", SCRIPT.read_text(), flags=re.M | re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available() and proc.returncode == 0:
        assert "gpu_check: backends on cuda:" in proc.stdout
        return
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: FAILED: ")]
    assert any("fastadvseg._cuda_kernels does not import" in line for line in lines), lines
    if not torch.cuda.is_available():
        assert {"cuda", "triton"} == {re.search(r"backend (\w+) is not available", line).group(1)
                                      for line in lines if "backend " in line}, lines


def test_a_spent_budget_skips_and_lists_every_part(tmp_path, stand_in):
    out = tmp_path / "out"
    proc = _run("--budget", "0", "--out", str(out), env=stand_in)
    assert proc.returncode == 0, proc.stdout[-3000:]
    calls = Path(stand_in["CALLS"])
    assert not calls.exists() or not [c for c in calls.read_text().splitlines() if c.startswith("-m ")]
    assert f"gpu_check: skipped {len(PARTS)} part(s)" in proc.stdout
    assert all(r[2].startswith("skipped") for r in _summary_rows(out))
    assert _run("--budget", "soon", env=stand_in).returncode == 2


@ON_CPU  # 31 s of waiting: not on a GPU lease
def test_a_part_past_its_limit_is_cut_not_failed(tmp_path):
    """A part gets at most what is left of the budget: with 31 s, every part that needs more is skipped, the
    resource check (at least 30 s) starts and is stopped at its limit, and the run does not fail for it."""
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\n[ \"$2\" = tools.compile_check ] && sleep 300\n"
                      "echo x\n")
    python.chmod(0o755)
    start = time.monotonic()
    proc = _run("--budget", "31", "--out", str(tmp_path / "out"), env={"PYTHON": str(python)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert 25 < time.monotonic() - start < 90
    results = {r[0].strip("| "): r[2] for r in _summary_rows(tmp_path / "out")}
    assert results.pop("4c-kernel-resources").startswith("cut at 31 s")
    assert all(r.startswith("skipped") for r in results.values()), results


def test_plugin_deadline_skips_tests_not_started(tmp_path):
    tests = tmp_path / "test_few.py"
    tests.write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts"), "GPU_CHECK_DEADLINE": str(time.time() - 1)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check_plugin", "-p", "no:cacheprovider",
                           "-rs", str(tests)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert "2 skipped" in proc.stdout and "gpu_check: 2 tests not started (time budget spent)" in proc.stdout
    env["GPU_CHECK_DEADLINE"] = str(time.time() + 600)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check_plugin", "-p", "no:cacheprovider",
                           str(tests)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert "2 passed" in proc.stdout and "gpu_check: 0 tests not started" in proc.stdout


def _collect(*args, files=("tests/test_losses.py", "tests/test_ops.py", "tests/test_compile.py")):
    """(selected test ids, how many the files hold) of a collection with the plugin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "-p", "gpu_check_plugin", *args, *files],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    total = int(re.search(r"(\d+) tests collected", proc.stdout).group(1))
    return {line for line in proc.stdout.splitlines() if "::" in line}, total


@ON_CPU
def test_plugin_subset_keeps_every_dtype_and_layout_and_leaves_the_rest_to_the_rest():
    subset, total = _collect("--gpu-check", "subset", "--gpu-check-device", "cpu")
    rest, total_again = _collect("--gpu-check", "rest", "--gpu-check-device", "cpu")
    assert subset and rest and not subset & rest and len(subset | rest) == total == total_again  # no gpu-only here
    assert not [t for t in subset if re.search(r"compile|export|reference-cpu", t.split("::")[1])]
    assert [t for t in rest if re.search(r"compile|export", t.split("::")[1])]  # tests/test_compile.py's, by name
    assert all("(2, 19, 7, 11)" in t for t in subset if re.search(r"\(\d+, \d+, \d+, \d+\)", t))
    for backend in ("triton-cpu", "cpu-cpu"):
        softmax = {t for t in subset if t.startswith("tests/test_losses.py::test_softmax2d[") and backend in t}
        assert len(softmax) == 9  # 3 layouts x 3 dtypes
        assert any(f"test_opcheck_every_registered_op[{backend}]" in t for t in subset)


def test_plugin_gpu_only_selects_the_tests_that_skip_without_a_gpu(tmp_path):
    """Part 2b's selection: tests named test_gpu_*, and tests whose skip marker says they need a GPU or CUDA; not a
    test that merely mentions a GPU, nor the contract cases on CPU tensors named test_gpu_path_*."""
    tests = tmp_path / "test_sel.py"
    tests.write_text(textwrap.dedent("""\
        import pytest
        NO_GPU = True

        def test_gpu_capture():
            pass

        @pytest.mark.skipif(NO_GPU, reason="needs a GPU and the built cuda backend")
        def test_streams():
            pass

        @pytest.mark.skipif(NO_GPU, reason="needs CUDA")
        def test_metrics_on_cuda():
            pass

        @pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
        def test_cpu_only():
            pass

        @pytest.mark.skipif(not NO_GPU, reason="on a GPU the kernels run compiled")
        def test_interpreted():
            pass

        @pytest.mark.parametrize("case", [("cpu", "cpu")])
        def test_gpu_path_on_cpu_tensors(case):
            pass
    """))
    gpu_only, total = _collect("--gpu-check", "gpu-only", "--gpu-check-device", "cpu", files=(str(tests),))
    assert total == 6
    assert {t.split("::")[1] for t in gpu_only} == {"test_gpu_capture", "test_streams", "test_metrics_on_cuda"}
    rest, _ = _collect("--gpu-check", "rest", "--gpu-check-device", "cpu", files=(str(tests),))
    assert {t.split("::")[1] for t in rest} == {"test_cpu_only", "test_interpreted",
                                                "test_gpu_path_on_cpu_tensors[case0]"}
