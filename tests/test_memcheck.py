"""The cpu backend under a memory checker: tests/memcheck_driver.py (every op, forward and backward, every dtype
of every tensor argument, at tiny shapes) runs in one process under valgrind memcheck, which reports each read or
write of freed or unallocated memory, e.g. a kernel handed the address of a temporary copy that was freed before
it ran (a value test sees that only when the freed block happens to be reused before the kernel reads it).

How it runs: ``PYTHONMALLOC=malloc`` (CPython's small-object allocator would hide freed blocks from valgrind),
``FASTADVSEG_CPU_ISA=avx2`` (valgrind cannot execute AVX-512; a CPU without AVX2 runs the portable build; set
FASTADVSEG_MEMCHECK_ISA=base to check that one instead), no undefined-value tracking (not needed for invalid
accesses; it costs time and brings noise). The noise of the loader, CPython and torch is left out by keeping
only the errors with a frame of our extension (fastadvseg/_C_cpu*) in their stack; any such error fails the
test, its first report in the message. About 2 minutes on 2 cores, most of it importing torch under valgrind.

Skipped without valgrind, unless FASTADVSEG_REQUIRE_MEMCHECK=1 (CI sets it and installs valgrind): then a missing
valgrind or cpu backend fails. FASTADVSEG_SKIP_MEMCHECK=1 skips it when it is not required.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastadvseg as fas

DRIVER = Path(__file__).resolve().parent / "memcheck_driver.py"
DONE_MARKER = "memcheck driver: done"  # tests/memcheck_driver.py DONE_MARKER
TIMEOUT_S = 480  # the run takes ~2 min on 2 idle cores; a hung or crawling one fails instead of holding CI
ENV_REQUIRE = "FASTADVSEG_REQUIRE_MEMCHECK"
ENV_SKIP = "FASTADVSEG_SKIP_MEMCHECK"
ENV_ISA = "FASTADVSEG_MEMCHECK_ISA"  # the kernel build checked: avx2 unless set (base: the portable one)


def _on(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _package_root() -> str:
    """The directory that holds the fastadvseg package this session imports (the child must import the same)."""
    return str(Path(fas.__file__).resolve().parent.parent)


def _extension_files() -> set:
    return {os.path.realpath(p) for p in glob.glob(str(Path(fas.__file__).resolve().parent / "_C_cpu*"))}


def _driver_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


# ---- valgrind's report ------------------------------------------------------------------------------------
# The text log: "==PID== " before every line; each report starts with an unindented line that says what (e.g.
# "Invalid read of size 16"), then "   at 0x..: fn (in obj)" / "   by ..." frames, " Address ... free'd" and the
# stacks of the free and of the allocation, and ends with a blank line (valgrind's one-line notes, such as
# "Warning: set address range perms: ...", have none). (The XML log would be easier to read, but XML mode forces a
# leak search at exit: half a gigabyte of leak records here, and more time.)

_PREFIX = re.compile(r"^==\d+==(?: |$)")
_FRAME = re.compile(r"^\s+(?:at|by) 0x[0-9A-Fa-f]+: (?P<fn>.*?)(?: \((?:in )?(?P<where>[^()]*)\))?$")


def _reports(log: str):
    """The blocks of valgrind's text log (lists of lines without the ==PID== prefix) that hold a stack."""
    blocks, block = [], []
    for raw in log.splitlines():
        m = _PREFIX.match(raw)
        if not m:
            continue  # the program's own output, were it in this file
        line = raw[m.end():].rstrip()
        if block and (not line or not line[0].isspace()):  # a report ends at a blank line or at the next
            blocks.append(block)                            # unindented one (e.g. a one-line "Warning: ...")
            block = []
        if line:
            block.append(line)
    if block:
        blocks.append(block)
    return [b for b in blocks if any(_FRAME.match(line) for line in b[1:])]


def _is_ours(line: str, ours: set) -> bool:
    m = _FRAME.match(line)
    if not m:
        return False
    where = (m.group("where") or "").split(":")[0]
    if where and (os.path.realpath(where) in ours or os.path.basename(where).startswith("_C_cpu")):
        return True
    return re.search(r"\bfas::", m.group("fn")) is not None


def memcheck_errors(log: str, ours: set):
    """(reports with a frame of our extension in any of their stacks, number of all reports) of a memcheck log."""
    reports = [b for b in _reports(log) if "lost in loss record" not in b[0]]
    return [b for b in reports if any(_is_ours(line, ours) for line in b[1:])], len(reports)


def _report_text(block, frames_per_stack=10, max_width=300) -> str:
    """A report as valgrind wrote it, each stack cut to its first frames and each line to max_width."""
    lines, run = [], 0
    for line in block:
        run = run + 1 if _FRAME.match(line) else 0
        if run <= frames_per_stack:
            lines.append(line if len(line) <= max_width else line[:max_width] + " ...")
        elif run == frames_per_stack + 1:
            lines.append("   ...")
    return "\n".join(lines)


# ---- the test -----------------------------------------------------------------------------------------------

def _valgrind_or_skip() -> str:
    required = _on(ENV_REQUIRE)
    valgrind = shutil.which("valgrind")
    if required:
        if valgrind is None:
            pytest.fail(f"{ENV_REQUIRE}=1 but valgrind is not installed (apt-get install valgrind)")
        if "cpu" not in fas.available_backends():
            pytest.fail(f"{ENV_REQUIRE}=1 but the cpu backend is not available: {fas.unavailable_reason('cpu')}")
        return valgrind
    if _on(ENV_SKIP):
        pytest.skip(f"{ENV_SKIP}=1")
    if valgrind is None:
        pytest.skip(f"valgrind is not installed (CI installs it and sets {ENV_REQUIRE}=1)")
    if "cpu" not in fas.available_backends():
        pytest.skip(f"cpu backend not built: {fas.unavailable_reason('cpu')}")
    return valgrind


def test_cpu_backend_under_valgrind_memcheck(tmp_path):
    valgrind = _valgrind_or_skip()
    log_file = tmp_path / "memcheck.log"
    cmd = [valgrind, "--tool=memcheck", f"--log-file={log_file}", "--leak-check=no", "--undef-value-errors=no",
           "--error-limit=no", "--num-callers=30", "--child-silent-after-fork=yes",
           sys.executable, str(DRIVER), "--no-compare", "--expect-valgrind"]
    env = _driver_env(PYTHONMALLOC="malloc", FASTADVSEG_CPU_ISA=os.environ.get(ENV_ISA, "avx2"))
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the driver did not finish under valgrind in {TIMEOUT_S} s; its output so far:\n{out[-3000:]}")
    out = run.stdout + run.stderr
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    assert DONE_MARKER in run.stdout and run.returncode == 0, (
        f"the driver did not complete under valgrind (exit {run.returncode}):\n{out[-4000:]}\n"
        f"valgrind's log ({log_file}):\n{log[-3000:]}")
    mine, total = memcheck_errors(log, _extension_files())
    if mine:
        pytest.fail(f"valgrind memcheck: {len(mine)} of its {total} reports have a frame of fastadvseg's cpu "
                    f"extension (full log: {log_file}); the first:\n{_report_text(mine[0])}", pytrace=False)


def test_driver_matches_the_reference_without_the_checker():
    """The same driver without the checker, comparing every result with the reference backend: a freed
    temporary that is reused before the kernel reads it shows up as wrong values (a few seconds)."""
    if "cpu" not in fas.available_backends():
        pytest.skip(f"cpu backend not built: {fas.unavailable_reason('cpu')}")
    run = subprocess.run([sys.executable, str(DRIVER)], env=_driver_env(), capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 or DONE_MARKER not in run.stdout:
        out = run.stdout + run.stderr
        failed = [line[:400] for line in out.splitlines() if line.startswith("memcheck driver:")]
        pytest.fail(f"the driver (exit {run.returncode}):\n" + "\n".join(failed[:30] + failed[-1:] if failed else
                                                                        [out[-6000:]]), pytrace=False)


def test_the_filter_keeps_only_errors_in_our_extension():
    """The parsing on a hand-written log: the loader's report is noise, the kernel's (ours) is kept."""
    log = """==77== Memcheck, a memory error detector
==77== Command: python tests/memcheck_driver.py
==77== 
==77== Invalid read of size 8
==77==    at 0x4023C74: strncmp (strcmp-sse2.S:162)
==77==    by 0x4004BEE: is_dst (dl-load.c:216)
==77==  Address 0x5544e91 is 1 bytes inside a block of size 8 alloc'd
==77==    at 0x48407B4: malloc (vg_replace_malloc.c:381)
==77== 
==77== Warning: set address range perms: large range [0x9789000, 0x1e195000) (defined)
memcheck driver: done: 1 calls, 0 failed
==77== Invalid read of size 16
==77==    at 0x43EDDD68: void fas::base::(anonymous namespace)::gather_map<float, float>(fas::Map3 const&) (in /x/fastadvseg/_C_cpu.cpython-311-x86_64-linux-gnu.so)
==77==    by 0x8011725: GOMP_parallel (in /x/torch/lib/libgomp.so.1)
==77==  Address 0x407ed600 is 0 bytes inside a block of size 672 free'd
==77==    at 0x48431EF: free (vg_replace_malloc.c:872)
==77== 
==77== Invalid write of size 4
==77==    at 0x1: ??? (in /x/fastadvseg/_C_cpu.cpython-311-x86_64-linux-gnu.so)
==77==  Address 0x0 is not stack'd, malloc'd or (recently) free'd
==77== 
==77== ERROR SUMMARY: 3 errors from 3 contexts (suppressed: 0 from 0)
"""
    mine, total = memcheck_errors(log, set())
    assert total == 3 and len(mine) == 2
    text = _report_text(mine[0])
    assert text.splitlines()[0] == "Invalid read of size 16" and "gather_map" in text and "size 672 free'd" in text
    assert mine[1][0] == "Invalid write of size 4"
