"""Registers, spills and shared memory of every compiled kernel, without a GPU.

``python -m tools.compile_check`` compiles every Triton kernel, as the backend launches it at
the tiles of real images (also with inputs read upsampled, and the passes of their gradients), for sm_90 (cubin,
ptxas shipped with triton) and the CUDA backend's kernels with ``nvcc --resource-usage``, and fails on a register
spill at C <= 256 that no "accepted spill" comment explains. It runs once per session here (a few minutes on 2
cores with a cold Triton cache); the tests read its JSON report.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "fastadvseg" / "kernels"
TILE_KERNELS = ("softmax_fwd_kernel", "softmax_bwd_kernel", "cross_entropy_kernel", "generator_kernel",
                "one_hot_kernel", "adjoint_pass_kernel", "pseudo_label_kernel")
MAP_KERNELS = ("bce_kernel", "discriminator_kernel")
# the kernels of inputs read upsampled: the forward tile kernels under these flags, the gradients' first passes
UPSAMPLED_FLAGS = {"UPSAMPLE", "UP_X", "UP_T"}
UPSAMPLED_TILE_KERNELS = ("softmax_fwd_kernel", "cross_entropy_kernel", "generator_kernel", "pseudo_label_kernel")
GRAD_TILE_KERNELS = ("cross_entropy_grad_kernel", "softmax_bwd_grad_kernel", "pseudo_label_grad_kernel")
DTYPES = ("fp32", "fp16", "bf16")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU every kernel test already runs compiled kernels")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tools.compile_check", "--arch", "90",
                           "--json", str(out)], env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_every_kernel_compiles_for_sm90_without_unexplained_spills(check):
    """Under TRITON_INTERPRET=1 the kernels never meet Triton's compiler: compile each one as the backend launches
    it (every op, dtype, layout family and flag set the sweep covers) in a process without the interpreter."""
    proc, report = check
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert report["failures"] == [] and report["triton"]["missing"] == []
    import triton

    from fastadvseg.kernels.triton.common import TILE_ELEMS

    # the report names the Triton release it compiled with (the numbers are that release's), and its tiles
    assert report["triton"]["toolchain"]["triton"] == triton.__version__
    assert report["triton"]["toolchain"]["tile_elems"] == str(TILE_ELEMS)
    assert proc.stdout.startswith(f"compile_check: Triton {triton.__version__} (ptxas ")
    rows = report["triton"]["rows"]
    assert all(r["error"] is None and r["regs"] > 0 and r["spill"] is not None for r in rows)
    accepted = {(a["kernel"], a["block"]) for a in report["accepted_spills"]}
    for r in rows:  # what the exit status says, from the rows themselves
        if r["spill"] and min(r["classes"]) <= 256:
            assert (r["kernel"], r["block"]) in accepted, r
    for r in (report["cuda"] or {"rows": []})["rows"]:
        if r["spill"]:
            assert (r["kernel"], None) in accepted, r


def _upsampled(row) -> bool:
    return bool(UPSAMPLED_FLAGS & set(row["flags"]))


def test_report_covers_every_class_count_and_dtype_at_the_tiles_of_real_images(check):
    """Per kernel, C in {19, 21, 150, 256} and every dtype: a row whose tile is the one a 512x1024 image gets; the
    kernels that read inputs upsampled at their own tiles (fastadvseg/kernels/triton/bilinear.py)."""
    from fastadvseg.kernels.triton.bilinear import GATHER_TILE_ELEMS, GRAD_MAP_BLOCK, UPSAMPLED_MAP_BLOCK
    from fastadvseg.kernels.triton.common import map_block, tile_shape

    _, report = check
    rows = report["triton"]["rows"]
    big = 512 * 1024

    def tiles(kernel, c, dtype, upsampled):
        return {(r["tile"], r["warps"]) for r in rows if r["kernel"] == kernel and c in r["classes"]
                and dtype in r["dtypes"] and not r["i64"] and _upsampled(r) == upsampled
                and not (kernel == "adjoint_pass_kernel" and r["tile"].startswith("1x"))}  # maps' pass 2: C = 1

    for c in (19, 21, 150, 256):
        block_c, block_p, warps = tile_shape(c, big)
        for dtype in DTYPES:
            for kernel in TILE_KERNELS:
                assert tiles(kernel, c, dtype, False) == {(f"{block_c}x{block_p}", warps)}, (kernel, c, dtype)
            for kernel in UPSAMPLED_TILE_KERNELS + GRAD_TILE_KERNELS:
                upsampled = kernel in UPSAMPLED_TILE_KERNELS
                bc, bp, warps = tile_shape(c, big, GATHER_TILE_ELEMS)
                assert tiles(kernel, c, dtype, upsampled) == {(f"{bc}x{bp}", warps)}, (kernel, c, dtype)
    block, warps = map_block(big)
    for kernel in MAP_KERNELS:
        for dtype in DTYPES:
            assert any(r["kernel"] == kernel and dtype in r["dtypes"] and r["tile"] == str(block)
                       and r["warps"] == warps for r in rows), (kernel, dtype)
            assert any(r["kernel"] == kernel and dtype in r["dtypes"] and r["tile"] == str(UPSAMPLED_MAP_BLOCK)
                       and {"UPSAMPLE", "UP_FAKE", "UP_REAL"} & set(r["flags"]) for r in rows), (kernel, dtype)
    for dtype in DTYPES:
        assert any(r["kernel"] == "map_grad_kernel" and dtype in r["dtypes"] and r["tile"] == str(GRAD_MAP_BLOCK)
                   for r in rows), dtype
    # the int64 pass (strides >= 2**31) covers both tile families too, and the kernels of upsampled inputs
    assert {r["tile"] for r in rows if r["i64"] and r["kernel"] == "generator_kernel" and not _upsampled(r)} == \
        {"x".join(map(str, tile_shape(c, big)[:2])) for c in (19, 256)}
    assert {r["tile"] for r in rows if r["i64"] and r["kernel"] == "cross_entropy_grad_kernel"} == \
        {"x".join(map(str, tile_shape(c, big, GATHER_TILE_ELEMS)[:2])) for c in (19, 256)}


def test_cuda_kernels_are_reported_per_dtype(check):
    """Every __global__ kernel of fastadvseg/kernels/cuda, once per dtype it is instantiated for."""
    _, report = check
    if report["cuda"] is None:
        pytest.skip("nvcc not on PATH")
    rows = report["cuda"]["rows"]
    assert report["cuda"]["errors"] == []
    assert all(isinstance(r.get(k), int) for r in rows for k in ("regs", "spill", "stack", "smem"))
    names = set(re.findall(r"__global__ void __launch_bounds__\(\w+\) (\w+)\(",
                           "".join(p.read_text() for p in KERNELS.glob("cuda/*.cu"))))
    assert names and names == {r["kernel"].split("<")[0] for r in rows}
    for name in ("softmax_forward_kernel", "softmax_backward_kernel", "semi_kernel", "generator_kernel"):
        instances = {r["kernel"] for r in rows if r["kernel"].startswith(name + "<")}
        assert len(instances) == 3, (name, instances)  # float, __half, __nv_bfloat16


_SPILL_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from triton.backends.compiler import GPUTarget
    from fastadvseg.kernels.triton import cross_entropy as ce
    from tools import compile_check as cc

    launches = []
    def record(*args, grid=None, warmup=False, **kwargs):
        meta = {k: v for k, v in kwargs.items() if k != "num_warps"}
        sig, constants = cc._signature(ce.cross_entropy_kernel, args, meta, False)
        launches.append(cc.Launch(ce.cross_entropy_kernel, sig, constants, {"num_warps": kwargs["num_warps"]}))
    ce.cross_entropy_kernel.run = record
    x = torch.randn(1, 150, 16, 16)
    ce.cross_entropy_forward(x, torch.randint(0, 150, (1, 16, 16)), None, 255, store_grad=True, store_map=False)
    launch = launches[0]
    capped = launch._replace(options={**launch.options, "maxnreg": int(sys.argv[1])})
    out = {}
    for name, l in (("default", launch), ("capped", capped)):
        res = cc.compile_resources(l, GPUTarget("cuda", 90, 32))
        out[name] = {**l.describe(), "block": l.block, "classes": [150], "dtypes": ["fp32"], **res}
    print(json.dumps(out))
""")


def test_a_spill_is_found_and_fails_unless_a_comment_accepts_it(tmp_path):
    """Capping the registers of the C = 150 cross-entropy tile (ptx .maxnreg) makes ptxas spill: the check's
    resource reading sees it, and its rule fails it unless an "accepted spill" comment names kernel and block.
    The cap, 24, makes the tile of every supported Triton spill (Triton 3.6's 256x4 tile needs 54 registers and
    fits in 40 without spilling)."""
    from tools.compile_check import accepted_spills, spill_failures

    cap = 24
    proc = subprocess.run([sys.executable, "-c", _SPILL_SCRIPT, str(cap)], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if "cannot" in proc.stderr and proc.returncode:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    default, capped = rows["default"], rows["capped"]
    assert default["spill"] == 0 and default["regs"] > cap
    assert capped["regs"] <= cap and capped["spill"] > 0
    assert spill_failures([default], {}) == []
    failures = spill_failures([capped], {})
    assert len(failures) == 1 and "cross_entropy_kernel" in failures[0]

    source = tmp_path / "k.py"
    source.write_text(f"# accepted spill of `cross_entropy_kernel` at block {capped['block']}: a test says so\n"
                      "# accepted spill of `softmax_forward_kernel<float>`: 8 bytes, once per pixel\n")
    accepted = accepted_spills([source])
    assert accepted == {("cross_entropy_kernel", capped["block"]): "a test says so",
                        ("softmax_forward_kernel<float>", None): "8 bytes, once per pixel"}
    assert spill_failures([capped], accepted) == []
    assert spill_failures([capped], {("cross_entropy_kernel", capped["block"] // 2): "another tile"}) == failures
