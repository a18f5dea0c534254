"""Every public op x every available backend x dtype x direction, against eager and torch.compile.

Run: ``pytest benchmarks/ --benchmark-only`` (options in ``benchmarks/conftest.py``). Each benchmark's
``extra_info`` carries the op, shape, dtype, direction, impl and the byte model's byte count. The Markdown/PNG
report with ratios, memory and bandwidth is ``python -m benchmarks.report`` (same cases, same timing rules).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from benchmarks import cases as C
from benchmarks.shapes import shape_set
from benchmarks.timing import sync, warm_up


def _device(config) -> torch.device:
    name = config.getoption("--bench-device", default=None)
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "bench" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    shapes = shape_set(config.getoption("--shapes", default=None) or ("full" if device.type == "cuda" else "small"))
    dtypes = config.getoption("--bench-dtypes", default=None)
    dtypes = dtypes.split(",") if dtypes else ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    ops = config.getoption("--bench-ops", default=None)
    cases = C.select_cases(ops.split(",") if ops else None)
    baselines = ["eager"] + ([] if config.getoption("--no-compile", default=False) else ["compile"])
    params, ids = [], []
    for shape, dtype, case in itertools.product(shapes, dtypes, cases):
        impls = baselines + C.fused_backends(device, shape, config.getoption("--include-triton-cpu", default=False))
        for impl in impls:
            for direction in (("fwd", "fwdbwd") if case.has_backward else ("fwd",)):
                params.append((device, shape, dtype, case, impl, direction))
                ids.append(f"{shape.name}-{dtype}-{case.name}-{direction}-{impl}")
    metafunc.parametrize("bench", params, ids=ids)


_current = {"key": None, "sets": None, "forwards": {}}


def _prepared(device, shape, dtype, case, impl):
    """Input sets and forwards of the current case, kept across its impls and directions: torch.compile compiles
    once per (case, shape, dtype), and dynamo is reset when the case changes."""
    key = (device, shape, dtype, case.name)
    if _current["key"] != key:
        torch._dynamo.reset()
        _current.update(key=key, sets=None, forwards={})
        _current["sets"] = C.make_input_sets(case, shape, getattr(torch, dtype), device)
    if impl not in _current["forwards"]:
        _current["forwards"][impl] = C.impl_function(case, impl)
    return _current["sets"], _current["forwards"][impl]


def test_op(benchmark, bench, request):
    device, shape, dtype, case, impl, direction = bench
    threads = request.config.getoption("--bench-threads", default=None) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    sets, forward = _prepared(device, shape, dtype, case, impl)
    fn = forward if direction == "fwd" else C.forward_backward(case, forward)
    try:
        fn(sets[0])  # JIT / compile outside the timing
    except (TypeError, NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"{impl} does not run {case.name} {dtype}: {exc}")
    counter = itertools.count()

    def call():
        fn(sets[next(counter) % len(sets)])
        sync(device)  # pytest-benchmark reads a host clock: the device work must be done

    per_call = warm_up(lambda k: call(), device)
    benchmark.extra_info.update(op=case.name, shape=str(shape), dtype=dtype, direction=direction, impl=impl,
                                bytes=case.bytes(shape, getattr(torch, dtype), direction), threads=threads,
                                device=str(device))
    benchmark.group = f"{shape.name} {dtype} {case.name} {direction}"
    benchmark.pedantic(call, rounds=max(5, min(50, int(0.5 / max(per_call, 1e-6)))), warmup_rounds=0, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GBps_at_median"] = benchmark.extra_info["bytes"] / stats.stats.median / 1e9
