"""Bytes moved, measured from the Triton kernels themselves.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a kernel reaches the interpreter's builder
(``create_masked_load`` / ``create_masked_store``) with the element addresses and the mask of the access. The
builder is instrumented here to record, per access, the addresses it touches (masked-off lanes excluded), so that
a test can count how often each element of each tensor is read and written by one launch:

* every logit (and label, discriminator logit, mask, target) is read exactly once, every gradient / output element
  written exactly once, the inputs are never written, and nothing else is touched (not even the padding of a
  sliced view), for every kernel at an odd shape, a channels_last one and a sliced one;
* the only other accesses are the per-program partial sums and bad-label reports: single-element stores, each
  cell written once, never read by a kernel;
* the benchmark byte model (``benchmarks/cases.py``) equals the bytes these kernels move, per op, for the
  forward without gradients and for forward + backward;
* with inputs read upsampled (a ``size``): the full-resolution labels, masks, target maps and probabilities are
  read once by the forward and once more per low-resolution index they feed along the axis the gradient's first
  pass reduces, the low-resolution logits and maps gathered 4 times per full-resolution pixel and visit, each
  output and gradient stored once, and the only other stores are the first pass's float32 intermediate
  (N·C·H·w or N·C·h·W elements, each once, read back at most twice): no (N, C, H, W) logits or gradient.
"""
import contextlib
import os

import numpy as np
import pytest
import torch

from helpers import layout_3d, layout_4d

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the accesses of Triton's interpreter (CPU, TRITON_INTERPRET=1)")
triton_interpreter = pytest.importorskip("triton.runtime.interpreter")

from benchmarks import cases as C  # noqa: E402
from benchmarks.shapes import SMOKE  # noqa: E402
from fastadvseg.kernels.triton import bce_with_logits as bce, cross_entropy, discriminator_loss as discriminator, generator_loss as generator, one_hot, pseudo_label, semi_cross_entropy as semi, softmax  # noqa


class Accesses:
    """The element addresses each load and store touched while :func:`counted` was active."""

    def __init__(self):
        self.events = []  # (kind, byte addresses touched, bytes per element, scalar access)

    def record(self, kind, ptrs, mask):
        touched = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        self.events.append((kind, touched.astype(np.uint64), ptrs.get_element_ty().primitive_bitwidth // 8,
                            ptrs.data.size == 1))

    def addresses(self, kind, scalar=False):
        picked = [a for k, a, _, s in self.events if k == kind and s == scalar]
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.uint64)

    def counts(self, t: torch.Tensor, kind: str) -> np.ndarray:
        """How often each element of ``t`` (any strides) was touched by ``kind`` accesses of whole blocks."""
        uniq, cnt = np.unique(self.addresses(kind), return_counts=True)
        want = element_addresses(t)
        pos = np.minimum(np.searchsorted(uniq, want), max(len(uniq) - 1, 0))
        hit = (uniq[pos] == want) if len(uniq) else np.zeros(want.shape, dtype=bool)
        return np.where(hit, cnt[pos] if len(uniq) else 0, 0)

    def tile_bytes(self) -> int:
        """Bytes of every block access (loads and stores), i.e. all but the per-program scalar rows."""
        return sum(len(a) * size for _, a, size, scalar in self.events if not scalar)


def element_addresses(t: torch.Tensor) -> np.ndarray:
    """Byte address of every element of ``t``, in ``t``'s logical order (strides and storage offset applied)."""
    storage = t.untyped_storage()
    index = torch.arange(storage.nbytes() // t.element_size()).as_strided(t.shape, t.stride(), t.storage_offset())
    return np.uint64(storage.data_ptr()) + index.reshape(-1).numpy().astype(np.uint64) * np.uint64(t.element_size())


@contextlib.contextmanager
def counted():
    """Instrument the interpreter's loads and stores (masked or not: the unmasked ones go through the same two)."""
    builder = triton_interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    acc = Accesses()

    # the leading arguments are the same in every supported Triton; the cache and volatility flags that follow
    # differ (3.9: cache_policy[, is_volatile]; 3.6: cache_modifier, eviction_policy[, is_volatile]): passed on
    def counted_load(ptrs, mask, other, *flags):
        acc.record("load", ptrs, mask)
        return load(ptrs, mask, other, *flags)

    def counted_store(ptrs, value, mask, *flags):
        acc.record("store", ptrs, mask)
        return store(ptrs, value, mask, *flags)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield acc
    finally:
        del builder.create_masked_load, builder.create_masked_store  # back to the class's methods


def assert_each_once(acc: Accesses, read=(), written=()):
    """Each element of ``read`` loaded once and never stored, each of ``written`` stored once and never loaded,
    and no block access outside them; scalar accesses are stores only, each cell once."""
    for kind, other, tensors in (("load", "store", read), ("store", "load", written)):
        for name, t in tensors:
            n = acc.counts(t, kind)
            assert n.min() == 1 and n.max() == 1, f"{name}: {kind} counts {np.bincount(n)} (index = times)"
            assert not acc.counts(t, other).any(), f"{name} was {other}d"
        expected = sum(t.numel() for _, t in tensors)
        assert len(acc.addresses(kind)) == expected, f"{kind}s outside the listed tensors"
    scalar_stores = acc.addresses("store", scalar=True)
    assert len(acc.addresses("load", scalar=True)) == 0
    assert len(np.unique(scalar_stores)) == len(scalar_stores), "a partial-sum cell written twice"


# ------------------------------------------------------------------------------------- each element, once

LAYOUTS = [("contiguous", (2, 19, 13, 11)), ("channels_last", (1, 150, 5, 7)), ("sliced", (2, 5, 9, 7))]


@pytest.fixture(params=LAYOUTS, ids=[f"{lay}-{'x'.join(map(str, s))}" for lay, s in LAYOUTS])
def inputs(request, gen):
    """Logits, labels (some ignored, some out of range), D-logits, a target map and a mask in one layout; an odd
    H·W that is not a multiple of any block, with more than one block per image."""
    layout, shape = request.param
    n, c, h, w = shape
    y = torch.randint(0, c, (n, h, w), generator=gen)
    y[torch.rand((n, h, w), generator=gen) < 0.2] = 255
    y[0, 0, 0] = c + 3  # a bad label: reported, never used as an index
    mask = torch.rand((n, h, w), generator=gen) < 0.3
    return {
        "x": layout_4d(torch.randn(shape, generator=gen) * 3, layout),
        "y": layout_3d(y, layout),
        "d": layout_3d(torch.randn((n, h, w), generator=gen), layout),
        "t": layout_3d(torch.rand((n, h, w), generator=gen), layout),
        "m": layout_3d(mask, layout),
        "g": layout_4d(torch.randn(shape, generator=gen), layout),
    }


def test_softmax_reads_each_logit_once_and_writes_each_probability_once(inputs):
    x, g = inputs["x"], inputs["g"]
    with counted() as acc:
        p = softmax.softmax_forward(x)
    assert_each_once(acc, read=[("logits", x)], written=[("probabilities", p)])
    with counted() as acc:
        dx = softmax.softmax_backward(p, g)
    assert_each_once(acc, read=[("probabilities", p), ("grad_output", g)], written=[("grad_input", dx)])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_reads_each_logit_once_and_writes_each_gradient_once(inputs, smoothing):
    x, y = inputs["x"], inputs["y"]
    with counted() as acc:
        _, _, loss_map, grad, _ = cross_entropy.cross_entropy_forward(x, y, None, 255, label_smoothing=smoothing,
                                                                      store_grad=True, store_map=True)
    assert_each_once(acc, read=[("logits", x), ("labels", y)], written=[("gradient", grad), ("loss map", loss_map)])
    with counted() as acc:  # no gradient needed: only the reads
        cross_entropy.cross_entropy_forward(x, y, None, 255, store_grad=False, store_map=False)
    assert_each_once(acc, read=[("logits", x), ("labels", y)])


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_generator_loss_reads_each_logit_once_and_writes_each_gradient_once(inputs, labelled):
    x, d, y = inputs["x"], inputs["d"], inputs["y"]
    with counted() as acc:
        *_, gx, gz, _ = generator.generator_forward(x, d, y if labelled else None, 255, 0.2, store_gx=True,
                                                    store_gz=True)
    read = [("logits", x), ("d_logits", d)] + ([("labels", y)] if labelled else [])
    assert_each_once(acc, read=read, written=[("logits gradient", gx), ("d_logits gradient", gz)])


def test_semi_cross_entropy_reads_each_logit_once_and_writes_each_gradient_once(inputs):
    x, d, m = inputs["x"], inputs["d"], inputs["m"]
    with counted() as acc:
        *_, loss_map, grad = semi.semi_forward(x, d, 0.2, m, store_grad=True, store_map=True)
    assert_each_once(acc, read=[("logits", x), ("d_logits", d), ("mask", m)],
                     written=[("gradient", grad), ("loss map", loss_map)])


@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "self"])
def test_pseudo_label_reads_each_logit_and_teacher_logit_once_and_writes_each_gradient_once(inputs, teacher):
    """With every test on (tau, D, mask): each logit and teacher logit read once; the student as its own teacher
    reads its logits once, for both roles."""
    x, d, m = inputs["x"], inputs["d"], inputs["m"]
    t = inputs["g"] if teacher else None  # another logits tensor of the same shape and layout
    with counted() as acc:
        *_, loss_map, grad = pseudo_label.pseudo_label_forward(x, t, d, 0.5, 0.2, m, store_grad=True, store_map=True)
    read = [("logits", x), ("d_logits", d), ("mask", m)] + ([("teacher logits", t)] if teacher else [])
    assert_each_once(acc, read=read, written=[("gradient", grad), ("loss map", loss_map)])
    with counted() as acc:  # no D, no tau, no mask, no gradient: only the logits (and the teacher's)
        pseudo_label.pseudo_label_forward(x, t, None, None, 0.2, None, store_grad=False, store_map=False)
    assert_each_once(acc, read=[("logits", x)] + ([("teacher logits", t)] if teacher else []))


def test_bce_and_discriminator_read_each_map_once_and_write_each_gradient_once(inputs):
    d, t, m = inputs["d"], inputs["t"], inputs["m"]
    with counted() as acc:
        _, _, loss_map, grad = bce.bce_forward(d, t, m, store_grad=True, store_map=True)
    assert_each_once(acc, read=[("d_logits", d), ("target", t), ("mask", m)],
                     written=[("gradient", grad), ("loss map", loss_map)])
    real = t[:1] * 4 - 2  # another map, of another shape and layout
    with counted() as acc:
        _, _, g_fake, g_real = discriminator.discriminator_forward(d, real, m, None, grad_fake=True, grad_real=True)
    assert_each_once(acc, read=[("fake", d), ("real", real), ("fake mask", m)],
                     written=[("fake gradient", g_fake), ("real gradient", g_real)])


def test_one_hot_reads_each_label_once_and_writes_each_output_once(inputs):
    y = inputs["y"]
    c = inputs["x"].shape[1]
    with counted() as acc:
        out = one_hot.one_hot(y, c, 255, torch.float16)
    assert_each_once(acc, read=[("labels", y)], written=[("one-hot", out)])


# ------------------------------------------------------------------------------------ the benchmark byte model

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", C.CASES, ids=C.CASE_NAMES)
def test_byte_model_is_what_the_kernels_move(case, dtype):
    """benchmarks/cases.py's byte model, per op, against the block accesses of every Triton launch the public
    function makes: the forward without gradients, and the training forward plus backward.

    For inputs read upsampled the model counts what must cross DRAM (each low-resolution value once), while the
    kernels gather every value four times per full-resolution pixel (cache hits on a GPU): their accesses are at
    least the model, and the tests below count them exactly."""
    fn = C.impl_function(case, "triton")
    inputs = C.make_inputs(case, SMOKE, dtype, torch.device("cpu"), seed=0)
    exact = not case.low_res
    with torch.no_grad(), counted() as acc:
        fn(inputs)
    model = case.bytes(SMOKE, dtype, "fwd")
    assert acc.tile_bytes() == model if exact else acc.tile_bytes() >= model
    if case.has_backward:
        with counted() as acc:
            C.forward_backward(case, fn)(inputs)
        model = case.bytes(SMOKE, dtype, "fwdbwd")
        assert acc.tile_bytes() == model if exact else acc.tile_bytes() >= model


# --------------------------------------------------------------------------------------- inputs read upsampled

def neighbours(low: int, full: int, align: bool):
    """(i0, i1) of every full-resolution index along one axis: PyTorch's bilinear source indices, in float32."""
    f32 = np.float32
    d = np.arange(full)
    if low == full:
        return d, d
    if align:
        scale = f32(low - 1) / f32(full - 1) if full > 1 else f32(0)
        src = scale * d.astype(f32)
    else:
        scale = f32(low) / f32(full)
        src = np.maximum(scale * (d.astype(f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(src.astype(np.int64), low - 1)
    return i0, np.minimum(i0 + 1, low - 1)


def feeds(low: int, full: int, align: bool) -> np.ndarray:
    """How many low-resolution indices each full-resolution index feeds along one axis (1 or 2)."""
    i0, i1 = neighbours(low, full, align)
    return 1 + (i0 != i1)


def reduced_first(h, w, big_h, big_w) -> str:
    """The axis pass 1 of a gradient reduces: W where only W is resampled or where H·w <= h·W."""
    if h == big_h:
        return "w"
    if w == big_w:
        return "h"
    return "w" if big_h * w <= h * big_w else "h"


def visits(h, w, size, align) -> np.ndarray:
    """(H, W): how often pass 1 visits each full-resolution pixel (once per low-resolution index it feeds along the
    axis pass 1 reduces)."""
    big_h, big_w = size
    if reduced_first(h, w, big_h, big_w) == "w":
        return np.broadcast_to(feeds(w, big_w, align)[None, :], size)
    return np.broadcast_to(feeds(h, big_h, align)[:, None], size)


def intermediate_elems(shape, size) -> int:
    """Elements of pass 1's float32 intermediate: N·C·H·w or N·C·h·W (whichever is reduced first), none where only
    one axis is resampled (pass 1 writes the gradient)."""
    n, c, h, w = shape
    big_h, big_w = size
    if h == big_h or w == big_w:
        return 0
    return n * c * (big_h * w if reduced_first(h, w, big_h, big_w) == "w" else h * big_w)


def assert_outputs_and_intermediate(acc, outputs, shape, size, read_inputs):
    """Each output stored once and never loaded; the only other block stores are pass 1's intermediate (each
    element once, 4 bytes, read back at most twice by pass 2, never more than N·C·H·w of them: no (N, C, H, W)
    tensor); the inputs never stored."""
    for name, t in outputs:
        n = acc.counts(t, "store")
        assert n.min() == 1 and n.max() == 1, f"{name}: store counts {np.bincount(n)}"
        assert not acc.counts(t, "load").any(), f"{name} was loaded"
    for name, t in read_inputs:
        assert not acc.counts(t, "store").any(), f"{name} was stored"
    output_addrs = np.concatenate([element_addresses(t) for _, t in outputs])
    stores = acc.addresses("store")
    extra = stores[~np.isin(stores, output_addrs)]
    assert len(np.unique(extra)) == len(extra), "an intermediate element stored twice"
    assert len(extra) == intermediate_elems(shape, size)
    n, c, h, w = shape
    assert len(extra) < n * c * size[0] * size[1]
    loads = acc.addresses("load")
    if len(extra):
        reads = np.unique(loads[np.isin(loads, extra)], return_counts=True)[1]
        assert len(reads) == len(extra) and reads.max() <= 2, np.bincount(reads)
    return len(extra)


UPSAMPLED = [("3x4_7x9", (2, 5, 3, 4), (7, 9), False, "contiguous"),  # the gradient reduces H first
             ("4x3_9x7", (2, 5, 4, 3), (9, 7), True, "channels_last"),  # W first
             ("5x2_17x5", (1, 3, 5, 2), (17, 5), True, "sliced"),
             ("7x4_7x9", (2, 3, 7, 4), (7, 9), False, "sliced")]  # one pass, no intermediate


@pytest.mark.parametrize("name,shape,size,align,layout", UPSAMPLED, ids=[u[0] for u in UPSAMPLED])
def test_upsampled_cross_entropy_reads_labels_per_visit_and_never_makes_full_resolution_logits(
        name, shape, size, align, layout, gen):
    """Forward: each label read once, each loss once; the low-resolution logits are gathered 4 times per
    full-resolution pixel and channel, nothing else. Gradient: each label read once more per low-resolution index it
    feeds along pass 1's axis, the logits 4 times per such visit, the gradient stored once."""
    n, c, h, w = shape
    x = layout_4d(torch.randn(shape, generator=gen) * 3, layout)
    y = torch.randint(0, c, (n, *size), generator=gen)
    y[torch.rand((n, *size), generator=gen) < 0.2] = 255
    y = layout_3d(y, layout)
    with counted() as acc:
        _, _, loss_map, _, _ = cross_entropy.cross_entropy_forward(x, y, None, 255, store_grad=False, store_map=True,
                                                                  size=size, align_corners=align)
    assert (acc.counts(y, "load") == 1).all() and (acc.counts(loss_map, "store") == 1).all()
    logit_loads = acc.counts(x, "load")
    assert logit_loads.sum() == 4 * n * c * size[0] * size[1]
    assert logit_loads.min() >= 1  # upsampling: every low-resolution logit is some pixel's neighbour
    assert len(acc.addresses("load")) == y.numel() + 4 * n * c * size[0] * size[1]
    assert len(acc.addresses("store")) == loss_map.numel()
    with counted() as acc:
        *_, grad, _ = cross_entropy.cross_entropy_forward(x, y, None, 255, store_grad=True, store_map=False,
                                                          size=size, align_corners=align)
    per_visit = visits(h, w, size, align)
    label_reads = acc.counts(y, "load").reshape(n, *size)
    assert (label_reads == 1 + per_visit[None]).all()
    assert acc.counts(x, "load").sum() == 4 * c * (n * size[0] * size[1] + n * int(per_visit.sum()))
    assert_outputs_and_intermediate(acc, [("gradient", grad)], shape, size, [("logits", x), ("labels", y)])


@pytest.mark.parametrize("name,shape,size,align,layout", UPSAMPLED, ids=[u[0] for u in UPSAMPLED])
def test_upsampled_softmax_backward_reads_full_resolution_inputs_per_visit(name, shape, size, align, layout, gen):
    """The backward of softmax2d with a low_size: p and the incoming gradient (full resolution) read once per
    low-resolution index each pixel feeds along pass 1's axis, nothing else; no full-resolution gradient."""
    n, c, h, w = shape
    p = layout_4d(torch.rand((n, c, *size), generator=gen), layout)
    g = layout_4d(torch.randn((n, c, *size), generator=gen), layout)
    with counted() as acc:
        dx = softmax.softmax_backward(p, g, (h, w), align)
    per_visit = np.broadcast_to(visits(h, w, size, align)[None, None], (n, c, *size)).reshape(-1)
    for what, t in (("probabilities", p), ("grad_output", g)):
        assert (acc.counts(t, "load") == per_visit).all(), what
    inter = assert_outputs_and_intermediate(acc, [("grad_input", dx)], shape, size, [("p", p), ("g", g)])
    assert len(acc.addresses("load")) == 2 * int(per_visit.sum()) + acc_intermediate_reads(acc, inter, dx)


def acc_intermediate_reads(acc, inter, *outputs) -> int:
    """Loads outside the inputs: pass 2's reads of the intermediate (0 without one)."""
    if not inter:
        return 0
    output_addrs = np.concatenate([element_addresses(t) for t in outputs])
    stores = acc.addresses("store")
    extra = stores[~np.isin(stores, output_addrs)]
    loads = acc.addresses("load")
    return int(np.isin(loads, extra).sum())


@pytest.mark.parametrize("name,shape,size,align,layout", UPSAMPLED[:3], ids=[u[0] for u in UPSAMPLED[:3]])
def test_upsampled_maps_and_generator_touch_only_their_tensors(name, shape, size, align, layout, gen):
    """BCE over an upsampled D map with a target map and a mask, and the unlabelled generator loss with logits and
    D at different resolutions: the full-resolution maps read once by the forward and once per visit by pass 1,
    the low-resolution D map gathered 4 times per full-resolution pixel and visit, each gradient stored once."""
    n, c, h, w = shape
    d = layout_3d(torch.randn((n, h, w), generator=gen), layout)
    t = layout_3d(torch.rand((n, *size), generator=gen), layout)
    m = layout_3d(torch.rand((n, *size), generator=gen) < 0.3, layout)
    with counted() as acc:
        _, _, loss_map, grad = bce.bce_forward(d, t, m, store_grad=True, store_map=True, size=size,
                                               align_corners=align)
    per_visit = visits(h, w, size, align)
    for what, full in (("target", t), ("mask", m)):
        assert (acc.counts(full, "load").reshape(n, *size) == 1 + per_visit[None]).all(), what
    assert acc.counts(d, "load").sum() == 4 * (n * size[0] * size[1] + n * int(per_visit.sum()))
    assert_outputs_and_intermediate(acc, [("gradient", grad), ("loss map", loss_map)], (n, 1, h, w), size,
                                    [("d", d), ("target", t), ("mask", m)])

    x = layout_4d(torch.randn(shape, generator=gen) * 3, layout)
    d_small = layout_3d(torch.randn((n, 2, 3), generator=gen), layout)
    with counted() as acc:
        *_, gx, gz, _ = generator.generator_forward(x, d_small, None, 255, 0.2, store_gx=True, store_gz=True,
                                                    size=size, align_corners=align)
    pixels = n * size[0] * size[1]
    x_visits = n * int(visits(h, w, size, align).sum())
    z_visits = n * int(visits(2, 3, size, align).sum())
    assert acc.counts(x, "load").sum() == 4 * c * (pixels + x_visits)
    # z: 4 per pixel in the forward, 4 per logits' pass-1 visit (the keep mask), 4 per its own pass-1 visit
    assert acc.counts(d_small, "load").sum() == 4 * (pixels + x_visits + z_visits)
    for what, g in (("logits gradient", gx), ("D gradient", gz)):
        counts = acc.counts(g, "store")
        assert counts.min() == 1 and counts.max() == 1 and not acc.counts(g, "load").any(), what
    assert gx.shape == x.shape and gz.shape == d_small.shape


@pytest.mark.parametrize("teacher_hw", [(2, 2), None], ids=["teacher", "self"])
@pytest.mark.parametrize("name,shape,size,align,layout", UPSAMPLED[:3], ids=[u[0] for u in UPSAMPLED[:3]])
def test_upsampled_pseudo_label_touches_only_its_tensors(name, shape, size, align, layout, teacher_hw, gen):
    """Student, teacher and D each at its own resolution: the forward gathers student and teacher 4 times per
    full-resolution pixel and channel, D 4 times per pixel, reads the mask once; pass 1 gathers all three again per
    visit of the student's pass-1 axis and reads the mask once per visit; the gradient is stored once at the
    student's resolution, no full-resolution tensor is made. The student as its own teacher is gathered once per
    pixel and visit, for both roles."""
    n, c, h, w = shape
    x = layout_4d(torch.randn(shape, generator=gen) * 3, layout)
    t = None if teacher_hw is None else layout_4d(torch.randn((n, c, *teacher_hw), generator=gen) * 3, layout)
    d = layout_3d(torch.randn((n, 3, 2), generator=gen), layout)
    m = layout_3d(torch.rand((n, *size), generator=gen) < 0.3, layout)
    with counted() as acc:
        *_, loss_map, grad = pseudo_label.pseudo_label_forward(x, t, d, 0.5, 0.2, m, store_grad=True, store_map=True,
                                                               size=size, align_corners=align)
    pixels = n * size[0] * size[1]
    per_visit = visits(h, w, size, align)
    x_visits = n * int(per_visit.sum())
    assert acc.counts(x, "load").sum() == 4 * c * (pixels + x_visits)
    if t is not None:
        assert acc.counts(t, "load").sum() == 4 * c * (pixels + x_visits)
    assert acc.counts(d, "load").sum() == 4 * (pixels + x_visits)
    assert (acc.counts(m, "load").reshape(n, *size) == 1 + per_visit[None]).all()
    inputs = [("logits", x), ("d", d), ("mask", m)] + ([("teacher", t)] if t is not None else [])
    inter = assert_outputs_and_intermediate(acc, [("gradient", grad), ("loss map", loss_map)], shape, size, inputs)
    input_loads = sum(int(acc.counts(u, "load").sum()) for _, u in inputs)
    assert len(acc.addresses("load")) == input_loads + acc_intermediate_reads(acc, inter, grad, loss_map)
    assert grad.shape == x.shape
