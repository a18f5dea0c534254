"""pytest plugin of scripts/gpu_check.sh: the fast contract subset, the rest of the suite, and a deadline.

Loaded with ``-p gpu_check_plugin`` (scripts/ on PYTHONPATH); without ``--gpu-check`` it does nothing.

* ``--gpu-check subset``: the contract tests (tests/test_losses.py, tests/test_ops.py, and the opcheck of
  tests/test_compile.py) of every kernel backend on
  ``--gpu-check-device`` (cuda on a GPU; cpu for a dry run), at one shape (C = 19, odd H·W), without the tests
  whose name says compile or export (torch.compile / torch.export: tens of seconds each). At collection it proves that the subset drops shapes only: for every test
  function and backend, each other parameter (op, dtype, layout, flags) keeps all the values the full suite has.
* ``--gpu-check gpu-only``: the tests that only a GPU runs (anywhere else they skip), outside the subset: those
  named ``test_gpu_*`` and those skipped (``pytest.mark.skipif``) with a reason that says they need a GPU or CUDA
  ("needs a GPU ...", "needs CUDA"): so they run early in a GPU run, not last, when the budget is often spent.
* ``--gpu-check rest``: every collected test that neither the subset nor gpu-only selects.
* ``--gpu-check-deadline T`` (seconds since the epoch; default: $GPU_CHECK_DEADLINE): tests not started by then
  are skipped with a reason that names the deadline, so the run ends cleanly, with its summary, within a time
  budget; the terminal summary then says how many.
"""
import os
import re
import time

import pytest

CONTRACT_FILES = ("test_losses.py", "test_ops.py", "test_compile.py")  # test_compile.py: its opcheck (the rest by name)
SUBSET_SHAPE = (2, 19, 7, 11)  # one shape: C = 19 (Cityscapes), 77 pixels (no block multiple), two images
SLOW_TESTS = re.compile(r"compile|export")  # test names: torch.compile / torch.export run in the rest
GPU_ONLY_REASON = re.compile(r"\bneeds (?:an? )?(?:\d+ )?(?:GPU|CUDA)", re.I)  # skip reasons of GPU-only tests
DEADLINE_REASON = "gpu_check: time budget spent before this test started"
_LATE = pytest.StashKey[int]()  # how many tests the deadline skipped


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check", "scripts/gpu_check.sh")
    group.addoption("--gpu-check", choices=("subset", "gpu-only", "rest"), default=None,
                    help="select the fast contract subset, the GPU-only tests outside it, or every other test")
    group.addoption("--gpu-check-device", default="cuda", help="device of the backends the subset runs (cuda)")
    group.addoption("--gpu-check-deadline", type=float, default=None,
                    help="skip tests not started by this time (seconds since the epoch)")


def _params(item) -> dict:
    spec = getattr(item, "callspec", None)
    return dict(spec.params) if spec else {}


def in_subset(item, device: str) -> bool:
    if item.path.name not in CONTRACT_FILES or SLOW_TESTS.search(item.originalname):
        return False
    params = _params(item)
    case = params.get("case")
    if not case or case[1] != device or case[0] == "reference":
        return False
    return "shape" not in params or tuple(params["shape"]) == SUBSET_SHAPE


def needs_gpu(item) -> bool:
    """A test that only runs on a GPU: named test_gpu_*, or marked skipif with a reason saying it needs a GPU/CUDA
    (on a GPU machine the marker's condition is false, the reason is still there)."""
    case = _params(item).get("case")
    if isinstance(case, tuple) and len(case) == 2 and case[1] != "cuda":
        return False  # a contract case on CPU tensors (test_ops.py's test_gpu_path_*: the GPU's code path, on CPU)
    if item.originalname.startswith("test_gpu_"):
        return True
    return any(GPU_ONLY_REASON.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def _coverage_gaps(items, chosen) -> list:
    """(test, backend, parameter, missing values) wherever the subset lost a value other than a shape."""
    def values(selection):
        seen = {}
        for item in selection:
            params = _params(item)
            key = (item.path.name, item.originalname, params["case"])
            for name, value in params.items():
                if name not in ("case", "shape"):
                    seen.setdefault(key + (name,), set()).add(repr(value))
        return seen

    wanted = {id(i) for i in chosen}
    keys = {(i.path.name, i.originalname, _params(i)["case"]) for i in chosen}
    full = values([i for i in items if "case" in _params(i)
                   and (i.path.name, i.originalname, _params(i)["case"]) in keys])
    kept = values([i for i in items if id(i) in wanted])
    return [(k, sorted(v - kept.get(k, set()))) for k, v in full.items() if v - kept.get(k, set())]


def pytest_collection_modifyitems(config, items):
    mode = config.getoption("--gpu-check")
    if mode is None:
        return
    device = config.getoption("--gpu-check-device")
    chosen = [i for i in items if in_subset(i, device)]
    if mode == "subset":
        gaps = _coverage_gaps(items, chosen)
        if not chosen or gaps:
            raise pytest.UsageError(f"gpu_check subset on {device}: {len(chosen)} tests; lost values: {gaps[:5]}")
        backends = sorted({_params(i)["case"][0] for i in chosen})
        ops = sorted({i.originalname for i in chosen})
        print(f"gpu_check subset: {len(chosen)} tests of {len(items)}, backends {backends} on {device}, "
              f"{len(ops)} test functions, shape {SUBSET_SHAPE} where a test takes a shape")
    subset = {id(i) for i in chosen}
    gpu_only = {id(i) for i in items if id(i) not in subset and needs_gpu(i)}
    if mode == "gpu-only":
        print(f"gpu_check gpu-only: {len(gpu_only)} tests of {len(items)} (named test_gpu_*, or skipped without a "
              "GPU by a marker that says so)")
    keep = {"subset": subset, "gpu-only": gpu_only}.get(mode)
    if keep is None:  # rest
        keep = {id(i) for i in items} - subset - gpu_only
    selected = [i for i in items if id(i) in keep]
    deselected = [i for i in items if id(i) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected


def _deadline(config):
    value = config.getoption("--gpu-check-deadline")
    if value is None and os.environ.get("GPU_CHECK_DEADLINE"):
        value = float(os.environ["GPU_CHECK_DEADLINE"])
    return value


def pytest_runtest_setup(item):
    deadline = _deadline(item.config)
    if deadline is not None and time.time() > deadline:
        item.config.stash[_LATE] = item.config.stash.get(_LATE, 0) + 1
        pytest.skip(DEADLINE_REASON)


def pytest_terminal_summary(terminalreporter, config):
    if _deadline(config) is not None:
        terminalreporter.write_line(f"gpu_check: {config.stash.get(_LATE, 0)} tests not started (time budget spent)")
