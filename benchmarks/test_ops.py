"""The report's per-op cases (``report.plan``) timed by pytest-benchmark, one impl after the other (the report
times them in turns); ``extra_info`` carries the op, shape, dtype, direction, impl and byte model."""
from __future__ import annotations

import itertools
import os
import shlex

import pytest
import torch

from benchmarks import cases as C
from benchmarks import report
from benchmarks.timing import sync, warm_up


def pytest_generate_tests(metafunc):
    args = report.parse_args(shlex.split(metafunc.config.getoption("--report-args")))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device, dtypes = report.device_and_dtypes(args)
    metafunc.parametrize("bench", [
        pytest.param((device, shape, dtype, case, impl, d), id=f"{shape.name}-{dtype}-{case.name}-{d}-{impl}")
        for shape, dtype, case, impls in report.plan(args, device, dtypes) for impl in impls for d in case.directions])


_current: dict = {}  # the input sets and forwards of one (shape, dtype, case), kept across its impls and directions


def test_op(benchmark, bench):
    device, shape, dtype, case, impl, direction = bench
    if _current.get("key") != (shape, dtype, case.name):
        torch._dynamo.reset()  # compile once per case
        _current.clear()
        _current.update(key=(shape, dtype, case.name),
                        sets=C.make_input_sets(case, shape, getattr(torch, dtype), device))
    sets = _current["sets"]
    forward = _current.setdefault(impl, C.impl_function(case, impl))
    fn = forward if direction == "fwd" else C.forward_backward(case, forward)
    try:
        fn(sets[0])  # JIT / compile outside the timing
    except Exception as exc:
        pytest.skip(f"{impl} does not run {case.name} {dtype}: {type(exc).__name__}: {exc}")
    counter = itertools.count()

    def call():
        fn(sets[next(counter) % len(sets)])
        sync(device)  # pytest-benchmark reads a host clock: the device work must be done

    per_call = warm_up(lambda k: call(), device)
    nbytes = case.bytes(shape, getattr(torch, dtype), direction)
    benchmark.extra_info.update(op=case.name, shape=str(shape), dtype=dtype, direction=direction, impl=impl,
                                bytes=nbytes, threads=torch.get_num_threads(), device=str(device))
    benchmark.group = f"{shape.name} {dtype} {case.name} {direction}"
    benchmark.pedantic(call, rounds=max(5, min(50, int(0.5 / max(per_call, 1e-6)))), iterations=1)
    if getattr(benchmark, "stats", None) is not None:  # None under --benchmark-disable
        benchmark.extra_info["GBps_at_median"] = nbytes / benchmark.stats.stats.median / 1e9
