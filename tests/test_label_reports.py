"""Deferred label reports of CUDA tensors (fastadvseg/_labels.py): safe while a CUDA graph is being captured, and
ordered on the labels' own device.

On any machine, with the CUDA calls of ``_labels`` replaced by a stand-in (:class:`FakeCuda`: devices with one
stream each, whose queued work runs only when an event on that stream is waited for, and a capture flag per
device):

* while the current stream is capturing, no event is queried or waited on, the queued reports stay queued, and
  ``check_labels_now()`` refuses (RuntimeError) instead of waiting; the first check after the capture raises the
  report's error;
* a report of labels on ``cuda:1`` while the current device is 0 is copied and its event recorded on cuda:1's
  stream, so waiting for the event waits for the copy.

On a GPU (skipped without one): the same two things for real, as scripts/gpu_check.sh's "rest of the test suite"
runs them: an op captured in a CUDA graph right after an eager call of it, and a report from ``cuda:1`` with the
current device 0 while cuda:1 is busy (skipped with fewer than two GPUs).
"""
from __future__ import annotations

import contextlib
from collections import deque

import pytest
import torch

import fastadvseg as fas
from fastadvseg import _labels

C, IGNORE = 5, 255


@pytest.fixture(autouse=True)
def no_pending_reports():
    _labels._pending.clear()
    yield
    _labels._pending.clear()


# ------------------------------------------------------------------------------------ the CUDA calls, stood in

class FakeStream:
    """A device's stream: work queued on it runs only when something waits for it (a busy GPU)."""

    def __init__(self, index: int):
        self.index = index
        self.queue: deque = deque()
        self.done = 0  # how many queued items have run

    def enqueue(self, work) -> None:
        self.queue.append(work)

    def run_until(self, mark: int) -> None:
        while self.done < mark:
            self.queue.popleft()()
            self.done += 1

    @property
    def queued(self) -> int:
        return self.done + len(self.queue)


class FakeCuda:
    """What ``_labels`` calls on torch.cuda, with a current device, one stream per device and capture flags."""

    def __init__(self, devices: int = 2):
        self.current = 0
        self.streams = [FakeStream(i) for i in range(devices)]
        self.capturing: set = set()  # devices whose current stream is capturing
        self.calls: list = []  # ("query" | "synchronize", stream index) of every event call

    def index(self, device) -> int:
        if device is None:
            return self.current
        return device if isinstance(device, int) else torch.device(device).index

    def current_stream(self, device=None) -> FakeStream:
        return self.streams[self.index(device)]

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, self.index(device)
        try:
            yield
        finally:
            self.current = previous

    def is_current_stream_capturing(self) -> bool:
        return self.current in self.capturing

    def event_class(self):
        cuda = self

        class FakeEvent:
            def __init__(self):
                self.stream, self.mark = None, 0

            def record(self, stream=None):  # torch's default: the current device's current stream
                self.stream = stream if stream is not None else cuda.current_stream()
                self.mark = self.stream.queued

            def query(self) -> bool:
                cuda.calls.append(("query", self.stream.index))
                return self.stream.done >= self.mark

            def synchronize(self) -> None:
                cuda.calls.append(("synchronize", self.stream.index))
                self.stream.run_until(self.mark)

        return FakeEvent

    def pinned_pair(self):
        cuda = self

        class FakeHost:
            """The pinned buffer: a non-blocking copy into it lands when its device's stream runs it."""

            def __init__(self):
                self.values = torch.zeros(2, dtype=torch.int64)

            def copy_(self, src, non_blocking=False):
                assert non_blocking
                value = src.as_subclass(torch.Tensor).clone()
                # torch queues a device-to-host copy on the current stream of the source tensor's device
                cuda.current_stream(src.device).enqueue(lambda: self.values.copy_(value))
                return self

            def numpy(self):
                return self.values.numpy()

        return FakeHost()


class OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device (set per class): the ``bad`` report of a kernel."""

    where = torch.device("cuda", 1)

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return self.where


def on_cuda(values, index: int) -> torch.Tensor:
    cls = type(f"OnCuda{index}", (OnCuda,), {"where": torch.device("cuda", index)})
    return torch.tensor(values, dtype=torch.int64).as_subclass(cls)


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda.current)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", cuda.is_current_stream_capturing)
    monkeypatch.setattr(torch.cuda, "Event", cuda.event_class())
    monkeypatch.setattr(_labels, "_pinned_pair", cuda.pinned_pair)
    return cuda


def test_stand_in_is_faithful_where_it_matters(fake_cuda):
    """The stand-in's race is real: an event recorded on another stream than the copy's does not wait for it."""
    host = fake_cuda.pinned_pair()
    host.copy_(on_cuda([1, 9], 1), non_blocking=True)
    wrong = torch.cuda.Event()
    wrong.record()  # current device 0
    wrong.synchronize()
    assert host.numpy().tolist() == [0, 0]
    right = torch.cuda.Event()
    right.record(torch.cuda.current_stream(1))
    right.synchronize()
    assert host.numpy().tolist() == [1, 9]


# ------------------------------------------------------------------------------------------- reports, on CPU

def test_report_from_another_device_is_waited_for_on_that_device(fake_cuda):
    """Labels on cuda:1, current device 0 (the launch's device guard has exited): waiting for the report waits
    for cuda:1's stream, where the copy was queued, and the error surfaces."""
    assert fake_cuda.current == 0
    _labels.report(on_cuda([3, 9], 1), C, IGNORE)
    assert len(_labels._pending) == 1
    _labels.check_pending()  # cuda:1 is busy: nothing has landed, nothing is read
    assert len(_labels._pending) == 1 and fake_cuda.calls == [("query", 1)]
    with pytest.raises(ValueError, match=r"label 9 \(3 pixel"):
        fas.check_labels_now()
    assert fake_cuda.calls[-1] == ("synchronize", 1)
    assert not _labels._pending and fake_cuda.current == 0


def test_report_from_another_device_lands_before_it_is_read_without_waiting(fake_cuda):
    _labels.report(on_cuda([2, -1], 1), C, IGNORE)
    fake_cuda.streams[0].run_until(fake_cuda.streams[0].queued)  # device 0 idle: its stream says nothing
    _labels.check_pending()
    assert len(_labels._pending) == 1
    fake_cuda.streams[1].run_until(fake_cuda.streams[1].queued)  # cuda:1 catches up
    with pytest.raises(ValueError, match=r"label -1 \(2 pixel"):
        _labels.check_pending()


def test_nothing_queries_an_event_while_the_current_stream_captures(fake_cuda):
    """The eager call before a capture (a warm-up) leaves a report queued; inside the capture it is neither
    queried nor waited for, nor dropped: the first check after the capture raises its error."""
    _labels.report(on_cuda([1, 7], 0), C, IGNORE)  # the warm-up, eager
    fake_cuda.streams[0].run_until(fake_cuda.streams[0].queued)  # its copy has even landed
    fake_cuda.capturing.add(0)
    _labels.check_pending()  # what every op and backward does first
    _labels.check_pending()
    assert fake_cuda.calls == [] and len(_labels._pending) == 1
    with pytest.raises(RuntimeError, match="captured"):
        fas.check_labels_now()
    assert fake_cuda.calls == [] and len(_labels._pending) == 1
    _labels.report(on_cuda([4, 8], 0), C, IGNORE)  # an op inside the capture queues nothing
    assert len(_labels._pending) == 1
    fake_cuda.capturing.clear()
    with pytest.raises(ValueError, match=r"label 7 \(1 pixel"):
        _labels.check_pending()
    assert fake_cuda.calls == [("query", 0)]


def test_a_capture_on_the_labels_device_queues_nothing(fake_cuda):
    fake_cuda.capturing.add(1)  # cuda:1 captures; the current device is 0
    _labels.report(on_cuda([1, 7], 1), C, IGNORE)
    assert not _labels._pending and fake_cuda.streams[1].queued == 0


def test_clean_reports_are_checked_in_order_and_leave_nothing(fake_cuda):
    for index in (0, 1, 0):
        _labels.report(on_cuda([0, 0], index), C, IGNORE)
    fas.check_labels_now()
    assert not _labels._pending
    assert [c[1] for c in fake_cuda.calls] == [0, 1, 0]


# ---------------------------------------------------------------------------------------- on GPUs, for real

GPU_BACKENDS = ("reference", "triton", "cuda")


def _gpu_backend(backend: str, devices: int = 1) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA device(s)")
    if backend not in fas.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on cuda: {fas.unavailable_reason(backend)}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_capture_right_after_an_eager_call(backend):
    """The eager warm-up leaves its label report queued; the first op inside ``torch.cuda.graph`` must not query
    its event (that invalidated the capture). The report, of a bad label, still raises after the capture."""
    _gpu_backend(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, C, 8, 8), generator=gen).cuda()
    d = torch.randn((2, 8, 8), generator=gen).cuda()
    good = torch.randint(0, C, (2, 8, 8), generator=gen).cuda()
    bad = good.clone()
    bad[1, 2, 3] = 7
    with _labels.label_validation(True):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, the way torch's documentation does it
            fas.generator_loss(x, d, good, lambda_adv=0.1, backend=backend)
            fas.cross_entropy2d(x, bad, backend=backend)  # last: its report is checked by no eager call
        torch.cuda.current_stream().wait_stream(side)
        assert _labels._pending, "the warm-up left its reports queued"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ce = fas.cross_entropy2d(x, good, backend=backend)
            gl = fas.generator_loss(x, d, good, lambda_adv=0.1, backend=backend).total
        assert _labels._pending, "the capture kept the reports queued"
        graph.replay()
        torch.cuda.synchronize()
        with pytest.raises(ValueError, match=r"label 7 \(1 pixel"):
            fas.check_labels_now()  # the warm-up's report, checked after the capture
        torch.testing.assert_close(ce, fas.cross_entropy2d(x, good, backend="reference"))
        torch.testing.assert_close(gl, fas.generator_loss(x, d, good, lambda_adv=0.1, backend="reference").total)
        fas.check_labels_now()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_report_from_the_second_device_while_it_is_busy(backend):
    """Labels on cuda:1, current device 0, cuda:1 busy for a while: the report is read only once its copy has
    landed (an event on device 0's stream completed at once, and the host read the buffer before the copy)."""
    _gpu_backend(backend, devices=2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((1, C, 16, 16), generator=gen).to("cuda:1")
    t = torch.randint(0, C, (1, 16, 16), generator=gen)
    t[0, 4, 5] = 9
    t = t.to("cuda:1")
    with _labels.label_validation(True), torch.cuda.device(0):
        fas.cross_entropy2d(x, t.clamp(max=C - 1), backend=backend)
        fas.check_labels_now()  # a clean report first (its pinned block may be the one reused below)
        with torch.cuda.device(1):
            torch.cuda._sleep(int(1e9))  # ~0.5 s of cuda:1's current stream before the op's kernels
        fas.cross_entropy2d(x, t, backend=backend)
        assert torch.cuda.current_device() == 0
        with pytest.raises(ValueError, match=r"label 9 \(1 pixel"):
            fas.check_labels_now()
