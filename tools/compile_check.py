"""Compile every Triton kernel for a GPU target on a machine without a GPU, and report what each compiled kernel
costs in registers, spills and shared memory: ``python -m tools.compile_check [--arch 90]
[--json report.json]``.

Under ``TRITON_INTERPRET=1`` (how CI tests the kernels on CPU) the kernels run in numpy and never meet Triton's
compiler, so typing errors of the compiled path (branch results of different types, a constexpr misuse, an
int32 overflow in address arithmetic) would only show on a GPU, and so would a tile too big for the register
file. This tool runs the backend's ops on CPU tensors with every kernel launch replaced by a record of the very
arguments and meta-parameters the launch would use, then compiles each distinct launch with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` down to a cubin (ptxas ships with triton), in
parallel processes. A second pass types every integer argument as int64, as Triton does for strides >= 2**31.
The sweep also calls every logit and D-map launch of the backend with a ``size`` (inputs read upsampled, and the
passes of their gradients: ``fastadvseg/kernels/triton/bilinear.py``).

Resources, per kernel and launch configuration (tile, warps, flags), for C in :data:`CLASSES` and every dtype,
at an image size where the tile is the one real images get (:func:`common.tile_shape` at many pixels):

* ``regs``: registers per thread, ``spill``: bytes of the per-thread stack frame (``cuobjdump -res-usage`` of
  the cubin, the same numbers as ptxas' "Used N registers" and "N bytes stack frame"; a Triton kernel has no
  local arrays and no calls, so its stack frame holds only spilled registers), ``smem``: the shared memory the
  launch asks for (the compiled kernel's metadata);
* the CUDA backend's kernels (``fastadvseg/kernels/cuda/*.cu``, one thread per pixel: the same for every C), per
  dtype instantiation, from ``nvcc --resource-usage`` (spill = ptxas' "bytes spill stores"); skipped with a line
  when nvcc is not on PATH (``--no-cuda`` skips it always).

A spill at C <= 256 fails the check unless a comment in the kernel sources (at the launch configuration:
``common.tile_shape`` for the Triton tiles, the launch in the ``.cu`` file) reads "accepted spill of `<kernel>`
[at block <BLOCK_C or BLOCK>]: <why it is acceptable>"; where a configuration spills, change the tile choice,
not the check.
Numbers are those of this Triton release and its ptxas, which the first and last lines of the output name (and the
JSON report's ``triton.toolchain``); releases differ, by far more than a few registers (3.6 and 3.9:
``common.TILE_ELEMS``), so CI runs the check under every Triton release the project supports.

``--kernels a,b`` compiles only the launches of the named Triton kernels (the sweep still records every launch):
a quick look at the kernels one is changing.

Exit status: 0 all compiled and nothing spills, 1 a kernel failed to compile or spills, 3 this machine cannot
compile for the target (e.g. no NVIDIA backend in this triton build), 2 run with TRITON_INTERPRET=1 (the kernels
are then interpreted).
"""
import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch

KERNELS = Path(__file__).resolve().parent.parent / "fastadvseg" / "kernels"  # the sources this checks

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}
CLASSES = (19, 21, 150, 256)  # Cityscapes, VOC, ADE20K, and the largest C at which no kernel may spill
SPILL_RULE_MAX_C = 256
IMAGE = (2, 17, 31)  # N, H, W of the sweep: enough pixels for the tile (and map block) of real images


def _signature(kernel, args, kwargs, force_i64):
    params = [p for p in kernel.params if not p.is_constexpr]
    sig, constants = {}, {}
    for param, value in zip(params, args):
        name = param.name
        if value is None:
            sig[name], constants[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i64" if force_i64 or not -2 ** 31 <= value < 2 ** 31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name], constants[p.name] = "constexpr", kwargs[p.name]
    return {p.name: sig[p.name] for p in kernel.params}, constants


class Launch(NamedTuple):
    """One distinct compilation: a kernel, its typed signature, constexprs and options."""

    kernel: object
    sig: dict
    constants: dict
    options: dict

    @property
    def key(self):
        return (self.kernel.__name__, tuple(self.sig.items()), tuple(self.constants.items()),
                tuple(sorted(self.options.items())))

    @property
    def block(self) -> int:
        """The block size the spill exemptions are keyed by: BLOCK_C of a tile kernel, BLOCK of a map kernel."""
        return self.constants.get("BLOCK_C", self.constants.get("BLOCK"))

    def describe(self) -> dict:
        c = self.constants
        tile = f"{c['BLOCK_C']}x{c['BLOCK_P']}" if "BLOCK_C" in c else str(c.get("BLOCK"))
        flags = [k for k, v in c.items() if v is True]
        return {"kernel": self.kernel.__name__, "tile": tile, "warps": self.options.get("num_warps", 4),
                "flags": flags, "i64": any(t == "i64" for t in self.sig.values())}


_LAUNCHES: List[Launch] = []  # filled by the scenarios, read by the compile workers (forked: no pickling)
_TARGET = None


def toolchain() -> Dict[str, str]:
    """The Triton release this check runs under and its ptxas version (the numbers depend on both)."""
    import triton
    from triton import knobs

    from fastadvseg.kernels.triton.common import TILE_ELEMS

    try:
        out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
        ptxas = re.search(r"V(\d+\.\d+\.\d+)", out).group(1)
    except Exception:  # noqa: BLE001 - reported as unknown, the compilation itself says what is wrong
        ptxas = "unknown"
    return {"triton": triton.__version__, "ptxas": ptxas, "torch": torch.__version__,
            "tile_elems": str(TILE_ELEMS)}


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """{regs, spill} of the one kernel in a cubin, from ``cuobjdump -res-usage`` (shipped with triton): spill is
    the stack frame (plus local memory, none in Triton code), ptxas' "bytes stack frame"."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"regs": int(fields["REG"]), "spill": int(fields["STACK"]) + int(fields.get("LOCAL", 0))}


def compile_resources(launch: Launch, target) -> Dict[str, int]:
    """Compile one launch for ``target`` and return {regs, spill, smem} of its cubin."""
    import triton
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(launch.kernel, launch.sig, launch.constants), target=target,
                              options=launch.options)
    return {**cubin_resources(compiled.asm["cubin"]), "smem": int(compiled.metadata.shared)}


def _compile_job(index: int):
    start = time.perf_counter()
    try:
        return index, compile_resources(_LAUNCHES[index], _TARGET), None, time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - report every failing kernel, then fail
        return index, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start


class Recorder:
    """Replaces ``kernel.run`` of every kernel: records each launch (deduplicated) with the sweep's context."""

    def __init__(self):
        self.index: Dict[tuple, int] = {}
        self.contexts: Dict[int, list] = {}
        self.context: dict = {}
        self.force_i64 = False

    def patch(self, kernel):
        def run(*args, grid=None, warmup=False, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            sig, constants = _signature(kernel, args, meta, self.force_i64)
            launch = Launch(kernel, sig, constants, options)
            i = self.index.setdefault(launch.key, len(_LAUNCHES))
            if i == len(_LAUNCHES):
                _LAUNCHES.append(launch)
            self.contexts.setdefault(i, []).append(dict(self.context))
        kernel.run = run


def _kernels():
    from fastadvseg.kernels.triton import (bce_with_logits, bilinear, cross_entropy, discriminator_loss, generator_loss,
                                           one_hot, pseudo_label, softmax)

    return [softmax.softmax_fwd_kernel, softmax.softmax_bwd_kernel, cross_entropy.cross_entropy_kernel,
            bce_with_logits.bce_kernel, generator_loss.generator_kernel,
            discriminator_loss.discriminator_kernel, pseudo_label.pseudo_label_kernel,
            one_hot.one_hot_kernel,
            # the gradients of inputs read upsampled: pass 1 per op, pass 2 shared
            cross_entropy.cross_entropy_grad_kernel,
            pseudo_label.pseudo_label_grad_kernel,
            softmax.softmax_bwd_grad_kernel, bce_with_logits.map_grad_kernel, bilinear.adjoint_pass_kernel]


def record_launches(recorder: Recorder, classes=CLASSES) -> None:
    """Every launch of the sweep, the flags-off variants, C = 4100 and the int64 pass, recorded, not compiled."""
    import fastadvseg
    from fastadvseg.backends import triton as B

    B.supports_device = lambda device: True  # the launches only compile here: CPU tensors are fine
    fastadvseg.set_label_validation(False)  # (nothing runs, so the label reports hold no counts)
    g = torch.Generator().manual_seed(0)
    for c in classes:
        for dtype, layout in ((torch.float32, "contiguous"), (torch.float16, "channels_last"),
                              (torch.bfloat16, "contiguous"), (torch.float32, "sliced")):
            recorder.context = {"C": c, "dtype": _TYPES[dtype], "layout": layout}
            _training_ops((IMAGE[0], c, *IMAGE[1:]), dtype, layout, g)
        recorder.context = {"C": c, "dtype": "fp16", "layout": "channels_last"}
        _flags_off((1, c, *IMAGE[1:]), g)
    recorder.context = {"C": 4100, "dtype": "fp16", "layout": "channels_last"}
    _flags_off((1, 4100, 2, 3), g)
    _flags_off((1, 4100, *UPSAMPLED_LOW), g, size=UPSAMPLED_SIZE)
    for c in classes:  # the logits and D maps read upsampled, and their gradients
        for dtype, layout, align in ((torch.float32, "contiguous", False), (torch.float16, "channels_last", True),
                                     (torch.bfloat16, "sliced", False)):
            recorder.context = {"C": c, "dtype": _TYPES[dtype], "layout": layout}
            _upsampled_ops(c, dtype, layout, align, g)
        recorder.context = {"C": c, "dtype": "fp16", "layout": "channels_last"}
        _flags_off((1, c, *UPSAMPLED_LOW), g, size=UPSAMPLED_SIZE)
    # int64 arguments come with a stride >= 2**31, i.e. images of many pixels: the tiles of real images
    recorder.force_i64 = True
    for c in (min(classes), max(classes)):
        recorder.context = {"C": c, "dtype": "bf16", "layout": "sliced"}
        _training_ops((IMAGE[0], c, *IMAGE[1:]), torch.bfloat16, "sliced", g)
        _upsampled_ops(c, torch.bfloat16, "sliced", False, g)
    recorder.force_i64 = False


def _logits(shape, dtype, layout, g):
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        n, c, h, w = shape
        x = torch.zeros((n, c, 2 * h, w + 1), dtype=dtype)[:, :, ::2, 1:]
    return x.requires_grad_(True)


def _training_ops(shape, dtype, layout, g) -> None:
    """Every op as training calls it (gradients stored), plus the variant of each kernel with every flag on."""
    from fastadvseg import functional as F
    from fastadvseg.backends import triton as B

    T = "triton"
    n, c, h, w = shape
    x = _logits(shape, dtype, layout, g)
    d = torch.randn((n, h, w), generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, c, (n, h, w), generator=g)
    mask = torch.rand((n, h, w), generator=g) < 0.2
    F.softmax2d(x, backend=T).backward(torch.ones(shape, dtype=dtype))
    F.cross_entropy2d(x, y, backend=T)
    F.cross_entropy2d(x, y, torch.rand(c), label_smoothing=0.1, reduction="none", backend=T)
    F.bce_with_logits2d(d, torch.rand((n, h, w), generator=g).to(dtype), ignore_mask=mask, reduction="none",
                        backend=T)
    F.semi_cross_entropy2d(x, d, ignore_mask=mask, backend=T)
    # mean teacher with every test, and self-training on the confidence alone
    B.pseudo_label_cross_entropy2d(x.detach(), _logits(shape, dtype, layout, g).detach(), d.detach(), 0.9, 0.2, mask,
                                   "none", True)
    B.pseudo_label_cross_entropy2d(x.detach(), None, None, 0.9, 0.2, None, "mean", True)
    F.generator_loss(x, d, y, lambda_adv=0.01, backend=T)
    F.generator_loss(x, d, None, lambda_adv=0.01, backend=T)
    F.discriminator_loss(d, d[:1, ::2], ignore_mask_fake=mask, backend=T)
    F.one_hot2d(y, c, dtype=dtype, backend=T)


def _flags_off(shape, g, size=None) -> None:
    """No stored gradients, a scalar BCE target, no masks (fp16, channels_last); with a size, through the backend's
    launches with the logits and D maps read upsampled to it."""
    from fastadvseg import functional as F
    from fastadvseg.backends import triton as B

    T = "triton"
    n, c, h, w = shape
    with torch.no_grad():
        x = _logits(shape, torch.float16, "channels_last", g)
        d = torch.randn((n, h, w), generator=g).to(torch.float16)
        if size is not None:
            y = torch.randint(0, c, (n, *size), generator=g)
            B.cross_entropy2d(x, y, None, 255, 0.0, "mean", False, size=size)
            B.bce_with_logits2d(d, None, 1.0, None, "sum", False, size=size)
            B.generator_loss(x, d, None, 0.01, 0.1, 0.2, 255, False, False, size=size)
            B.pseudo_label_cross_entropy2d(x, None, None, None, 0.2, None, "sum", False, size=size)
            return
        y = torch.randint(0, c, (n, h, w), generator=g)
        F.cross_entropy2d(x, y, backend=T)
        F.bce_with_logits2d(d, 1.0, reduction="sum", backend=T)
        F.generator_loss(x, d, None, lambda_adv=0.01, backend=T)
        B.pseudo_label_cross_entropy2d(x, None, None, None, 0.2, None, "sum", False)
        F.one_hot2d(y, c, backend=T)


# logits (N, C, 9, 16) read upsampled to (33, 61), D maps from 1/4 of that: enough lanes in every pass for the tiles
# and map blocks of real images; the (H, w) and (h, W) intermediates differ by a few percent only, and the cases
# with one axis resampled (one pass, the gradient written directly) reduce each axis in turn
UPSAMPLED_LOW = (9, 16)
UPSAMPLED_SIZE = (33, 61)


def _upsampled_ops(c, dtype, layout, align_corners, g) -> None:
    """Every logit and D-map launch with its inputs read upsampled (gradients stored), through the backend's
    launches: both reduction orders of the gradient, one axis only, logits and D at different resolutions."""
    from fastadvseg.backends import triton as B

    n, (h, w), size = IMAGE[0], UPSAMPLED_LOW, UPSAMPLED_SIZE
    kw = dict(size=size, align_corners=align_corners)
    x = _logits((n, c, h, w), dtype, layout, g).detach()
    d = torch.randn((n, h, w), generator=g).to(dtype)
    d_small = torch.randn((n, 3, 5), generator=g).to(dtype)
    y = torch.randint(0, c, (n, *size), generator=g)
    mask = torch.rand((n, *size), generator=g) < 0.2
    p = B.softmax2d(x, **kw)
    B.softmax2d_backward(p, torch.ones_like(p), low_size=(h, w), align_corners=align_corners)
    B.cross_entropy2d(x, y, None, 255, 0.0, "mean", True, **kw)
    B.cross_entropy2d(x, y, torch.rand(c), 255, 0.1, "none", True, **kw)
    B.bce_with_logits2d(d, torch.rand((n, *size), generator=g).to(dtype), 0.0, mask, "none", True, **kw)
    B.semi_cross_entropy2d(x, d_small, 0.2, mask, "mean", True, **kw)
    B.generator_loss(x, d_small, y, 0.01, 0.1, 0.2, 255, True, True, **kw)
    B.generator_loss(x, d_small, None, 0.01, 0.1, 0.2, 255, True, True, **kw)
    B.discriminator_loss(d, d_small[:1], mask, None, True, True, **kw)
    # student, teacher and D each at its own resolution; the student its own teacher
    teacher = _logits((n, c, h - 2, w + 3), dtype, layout, g).detach()
    B.pseudo_label_cross_entropy2d(x, teacher, d_small, 0.9, 0.2, mask, "none", True, **kw)
    B.pseudo_label_cross_entropy2d(x, None, d_small, 0.9, 0.2, None, "mean", True, **kw)
    for one_axis in ((size[0], w), (h, size[1])):  # one pass, writing the gradient itself
        x1 = _logits((n, c, *one_axis), dtype, layout, g).detach()
        B.cross_entropy2d(x1, y, None, 255, 0.0, "mean", True, **kw)
        B.bce_with_logits2d(x1[:, 0], None, 1.0, None, "mean", True, **kw)
    # logits at full resolution with D upsampled, and the reverse
    x_full = _logits((n, c, *size), dtype, layout, g).detach()
    B.generator_loss(x_full, d_small, None, 0.01, 0.1, 0.2, 255, True, True, **kw)
    B.generator_loss(x, torch.randn((n, *size), generator=g).to(dtype), y, 0.01, 0.1, 0.2, 255, True, True, **kw)
    # a full-resolution teacher and D with the student upsampled, and an upsampled teacher of a full-resolution student
    B.pseudo_label_cross_entropy2d(x, x_full, torch.randn((n, *size), generator=g).to(dtype), 0.9, 0.2, mask, "mean",
                                   True, **kw)
    B.pseudo_label_cross_entropy2d(x_full, teacher, None, 0.9, 0.2, mask, "mean", True, **kw)


def triton_report(arch: int, jobs: int, classes=CLASSES, log=print, kernels=None) -> dict:
    """Record every launch, compile the distinct ones in ``jobs`` processes, and return the report; ``kernels``, a
    set of kernel names, restricts the compilation (and the report) to their launches."""
    global _TARGET
    from triton.backends.compiler import GPUTarget

    _TARGET = GPUTarget("cuda", arch, 32)
    _LAUNCHES.clear()
    recorder = Recorder()
    for kernel in _kernels():
        recorder.patch(kernel)
    record_launches(recorder, classes)
    selected = [i for i, launch in enumerate(_LAUNCHES) if kernels is None or launch.kernel.__name__ in kernels]
    start = time.perf_counter()
    results = {}
    if jobs > 1 and len(selected) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for index, res, err, seconds in pool.imap_unordered(_compile_job, selected):
                results[index] = (res, err, seconds)
    else:
        results = {i: _compile_job(i)[1:] for i in selected}
    rows = []
    for i in selected:
        launch = _LAUNCHES[i]
        res, err, seconds = results[i]
        contexts = recorder.contexts[i]
        row = {**launch.describe(), "block": launch.block, "classes": sorted({ctx["C"] for ctx in contexts}),
               "dtypes": sorted({ctx["dtype"] for ctx in contexts}),
               "layouts": sorted({ctx["layout"] for ctx in contexts}), "compile_s": round(seconds, 2),
               "error": err}
        row.update(res or {"regs": None, "spill": None, "smem": None})
        rows.append(row)
    log(f"compiled {len(rows)} distinct launches for sm_{arch} in {time.perf_counter() - start:.1f} s "
        f"({jobs} processes)")
    wanted = {k.__name__ for k in _kernels()} if kernels is None else set(kernels)
    return {"arch": arch, "rows": rows, "missing": sorted(wanted - {r["kernel"] for r in rows})}


_ACCEPTED = re.compile(r"accepted spill of `([^`]+)`(?: at block (\d+))?: (.+)")


def accepted_spills(sources=None) -> Dict[tuple, str]:
    """{(kernel, block or None): why} from the "accepted spill of `<kernel>` [at block <N>]: <why>" comments of
    the kernel sources (fastadvseg/kernels/triton/*.py, fastadvseg/kernels/cuda/*.cu and *.cuh)."""
    if sources is None:
        root = KERNELS
        sources = sorted(root.glob("triton/*.py")) + sorted(root.glob("cuda/*.cu*"))
    found = {}
    for path in sources:
        for line in Path(path).read_text().splitlines():
            if m := _ACCEPTED.search(line):
                found[(m.group(1), int(m.group(2)) if m.group(2) else None)] = m.group(3).strip()
    return found


def spill_failures(rows, accepted) -> List[str]:
    """The Triton rows that spill at some C <= SPILL_RULE_MAX_C without an accepted-spill comment for their
    (kernel, block)."""
    bad = []
    for r in rows:
        if r.get("spill") and min(r["classes"]) <= SPILL_RULE_MAX_C and (r["kernel"], r["block"]) not in accepted:
            bad.append(f"{r['kernel']} tile {r['tile']} warps {r['warps']} {'+'.join(r['flags'])} "
                       f"({','.join(r['dtypes'])}; C {','.join(map(str, r['classes']))}): {r['regs']} registers, "
                       f"{r['spill']} bytes spilled")
    return bad


# ------------------------------------------------------------------------------------------- the CUDA kernels

# the device-code flags of the build (setup.py: -O3 -lineinfo; torch's CUDAExtension: C++17 and its
# COMMON_NVCC_FLAGS), plus --resource-usage
CUDA_FLAGS = ["-cubin", "-O3", "-lineinfo", "-std=c++17", "--resource-usage", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr"]
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_resource_usage(text: str, demangle=lambda names: names) -> List[dict]:
    """Rows {kernel, regs, spill, smem} of ``nvcc --resource-usage`` (ptxas -v) output, one per entry function."""
    rows, current = [], None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"kernel": m.group(1)}
            rows.append(current)
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current["stack"], current["spill"] = int(m.group(1)), int(m.group(2))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["regs"], current["smem"] = int(m.group(1)), int(m.group(2) or 0)
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = _short_kernel_name(name)
    return rows


def _short_kernel_name(name: str) -> str:
    """``void ns::(anonymous namespace)::k<float, true>(Args, Workspace)`` -> ``k<float, true>``."""
    m = re.search(r"(\w+(?:<[^()]*>)?)\(", name)
    return m.group(1) if m else name


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def cuda_report(arch: int, nvcc: str = "nvcc", jobs: int = 2, log=print) -> Optional[dict]:
    """Resources of every kernel in fastadvseg/kernels/cuda/*.cu for sm_<arch>; None when nvcc is missing."""
    from concurrent.futures import ThreadPoolExecutor

    if not shutil.which(nvcc):
        return None
    src = KERNELS / "cuda"
    files = sorted(src.glob("*.cu"))
    start = time.perf_counter()

    def run(path):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([nvcc, *CUDA_FLAGS, f"-arch=sm_{arch}", "-I", str(src), str(path),
                                   "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return path.name, proc

    rows, errors = [], []
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for name, proc in pool.map(run, files):
            if proc.returncode != 0:
                errors.append(f"{name}: nvcc failed: {(proc.stderr or proc.stdout)[-2000:]}")
                continue
            rows += [{"file": name, **r} for r in parse_resource_usage(proc.stdout + proc.stderr, _demangle)]
    log(f"nvcc --resource-usage of {len(files)} .cu files for sm_{arch} in {time.perf_counter() - start:.1f} s")
    return {"arch": arch, "rows": rows, "errors": errors}


# ---------------------------------------------------------------------------------------------------- report

def format_triton(rows) -> List[str]:
    head = f"{'kernel':22} {'tile':>8} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6}  {'C':14} {'dtypes':14} " \
           f"{'layouts':28} flags"
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["block"], r["i64"], r["dtypes"], r["layouts"])):
        regs = "FAIL" if r["error"] else r["regs"]
        lines.append(f"{r['kernel']:22} {r['tile']:>8} {r['warps']:>5} {regs:>4} {r['spill'] or 0:>5} "
                     f"{r['smem'] or 0:>6}  {','.join(map(str, r['classes'])):14} {','.join(r['dtypes']):14} "
                     f"{','.join(r['layouts']):28} {'+'.join(r['flags']) + (' i64' if r['i64'] else '')}")
    return lines


def format_cuda(report) -> List[str]:
    lines = [f"{'file':22} {'kernel':48} {'regs':>4} {'spill':>5} {'stack':>5} {'smem':>5}"]
    for r in report["rows"]:
        lines.append(f"{r['file']:22} {r['kernel']:48} {r.get('regs', '?'):>4} {r.get('spill', '?'):>5} "
                     f"{r.get('stack', '?'):>5} {r.get('smem', '?'):>5}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--json", help="also write the report (both tables, failures) to this file")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc report of the .cu kernels")
    parser.add_argument("--kernels", help="comma-separated Triton kernel names: compile only their launches (the "
                        "sweep still records every launch); a name no launch has fails the check")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, so 3.9 does not warn
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        make_backend(GPUTarget("cuda", opts.arch, 32))
    except Exception as exc:  # noqa: BLE001
        print(f"cannot compile for sm_{opts.arch} here: {type(exc).__name__}: {exc}")
        return 3
    tools = toolchain()
    print(f"compile_check: Triton {tools['triton']} (ptxas {tools['ptxas']}), torch {tools['torch']}, sm_{opts.arch}, "
          f"tiles of {tools['tile_elems']} elements (fastadvseg.kernels.triton.common.TILE_ELEMS)")
    accepted = accepted_spills()
    kernels = None if not opts.kernels else {k.strip() for k in opts.kernels.split(",") if k.strip()}
    unknown = kernels - {k.__name__ for k in _kernels()} if kernels else set()
    if unknown:
        print(f"--kernels: no Triton kernel named {', '.join(sorted(unknown))} (the check compiles: "
              f"{', '.join(k.__name__ for k in _kernels())})")
        return 1
    report = triton_report(opts.arch, opts.jobs, kernels=kernels)
    report["toolchain"] = tools
    rows = report["rows"]
    print("\n".join(format_triton(rows)))
    failures = [f"{r['kernel']} {r['tile']} {'+'.join(r['flags'])}: {r['error']}" for r in rows if r["error"]]
    if report["missing"]:
        failures.append("never launched: " + ", ".join(report["missing"]))
    failures += [f"spills (no accepted-spill comment): {s}" for s in spill_failures(rows, accepted)]
    for (kernel, block), why in accepted.items():
        print(f"accepted spill of {kernel}" + (f" at block {block}" if block else "") + f": {why}")

    cuda = None if opts.no_cuda else cuda_report(opts.arch, os.environ.get("NVCC", "nvcc"), opts.jobs)
    if cuda is None:
        print("cuda kernels: SKIP (" + ("--no-cuda" if opts.no_cuda else "nvcc not on PATH") + ")")
    else:
        print("\n".join(format_cuda(cuda)))
        failures += cuda["errors"]
        failures += [f"spills (no accepted-spill comment): {r['file']} {r['kernel']}: {r['spill']} bytes spill "
                     "stores" for r in cuda["rows"] if r.get("spill") and (r["kernel"], None) not in accepted]
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"triton": report, "cuda": cuda, "failures": failures,
                       "accepted_spills": [{"kernel": k, "block": b, "why": why} for (k, b), why in accepted.items()]}, f, indent=1)
    for line in failures:
        print("FAILED", line)
    print(f"compile_check: Triton {tools['triton']}: " + (f"FAILED ({len(failures)})" if failures else
          f"ok, {len(rows)} launches compiled, no unexplained spill"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
