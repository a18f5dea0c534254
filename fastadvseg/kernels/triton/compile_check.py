"""Compile every Triton kernel for a GPU target on a machine without a GPU: ``python -m
fastadvseg.kernels.triton.compile_check [--arch 90]``.

Under ``TRITON_INTERPRET=1`` (how CI tests the kernels on CPU) the kernels run in numpy and never meet Triton's
compiler, so typing errors of the compiled path (branch results of different types, a constexpr misuse, an
int32 overflow in address arithmetic) would only show on a GPU. This tool runs the backend's ops on small CPU
tensors with every kernel launch replaced by ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` of the
very arguments and meta-parameters the launch would use, down to a cubin (ptxas ships with triton). A second pass
types every integer argument as int64, as Triton does for strides >= 2**31.

Exit status: 0 all compiled, 1 a kernel failed to compile, 3 this machine cannot compile for the target (e.g.
no NVIDIA backend in this triton build), 2 run with TRITON_INTERPRET=1 (the kernels are then interpreted).
"""
import argparse
import os
import sys
import time

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import bce, cross_entropy, discriminator, generator, one_hot, semi, softmax

    target = GPUTarget("cuda", opts.arch, 32)
    kernels = [softmax.softmax_fwd_kernel, softmax.softmax_bwd_kernel, cross_entropy.cross_entropy_kernel,
               bce.bce_kernel, semi.semi_kernel, generator.generator_kernel, discriminator.discriminator_kernel,
               one_hot.one_hot_kernel]
    compiled, failures = [], []
    force_i64 = [False]

    def compile_launch(kernel):
        def run(*args, grid=None, warmup=False, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            sig, constants = _signature(kernel, args, meta, force_i64[0])
            label = f"{kernel.__name__} {meta} i64={force_i64[0]}"
            start = time.perf_counter()
            try:
                triton.compile(ASTSource(kernel, sig, constants), target=target, options=options)
            except Exception as exc:  # noqa: BLE001 - report every failing kernel, then fail
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                return
            compiled.append(kernel.__name__)
            print(f"ok {time.perf_counter() - start:5.1f}s {label}", flush=True)
        return run

    try:
        triton.compile  # noqa: B018
        from triton.compiler.compiler import make_backend
        make_backend(target)
    except Exception as exc:  # noqa: BLE001
        print(f"cannot compile for {target} here: {type(exc).__name__}: {exc}")
        return 3
    for kernel in kernels:
        kernel.run = compile_launch(kernel)
    for force in (False, True):
        force_i64[0] = force
        _scenarios(long_ints=force)
    missing = {k.__name__ for k in kernels} - set(compiled)
    for line in failures:
        print("FAILED", line)
    if missing and not failures:
        print("FAILED: never launched:", ", ".join(sorted(missing)))
    return 1 if failures or missing else 0


def _scenarios(long_ints: bool) -> None:
    """Launch every kernel through the public API, over the flags and layouts that select different code."""
    import fastadvseg
    from fastadvseg import functional as F
    from fastadvseg.backends import triton as B

    T = "triton"
    B.supports_device = lambda device: True  # the launches only compile here: CPU tensors are fine
    fastadvseg.set_label_validation(False)  # (nothing runs, so the label reports hold no counts)

    g = torch.Generator().manual_seed(0)

    def logits(shape, dtype, layout="contiguous"):
        x = torch.randn(shape, generator=g).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            n, c, h, w = shape
            x = torch.zeros((n, c, 2 * h, w + 1), dtype=dtype)[:, :, ::2, 1:]
        return x.requires_grad_(True)

    def labels(shape):
        n, c, h, w = shape
        return torch.randint(0, c, (n, h, w), generator=g)

    shape = (2, 19, 5, 7)
    for dtype, layout in ((torch.float32, "contiguous"), (torch.bfloat16, "sliced")):
        x = logits(shape, dtype, layout)
        d = torch.randn((2, 5, 7), generator=g).to(dtype).requires_grad_(True)
        y = labels(shape)
        mask = torch.rand((2, 5, 7), generator=g) < 0.2
        F.softmax2d(x, backend=T).backward(torch.ones(shape, dtype=dtype))
        F.cross_entropy2d(x, y, torch.rand(19) if dtype == torch.float32 else None, reduction="none", backend=T)
        F.cross_entropy2d(x, y, label_smoothing=0.1, backend=T)
        F.bce_with_logits2d(d, torch.rand((2, 5, 7), generator=g).to(dtype), ignore_mask=mask, reduction="none",
                            backend=T)
        F.semi_cross_entropy2d(x, d, ignore_mask=mask, backend=T)
        F.generator_loss(x, d, y, lambda_adv=0.01, backend=T)
        F.generator_loss(x, d, None, lambda_adv=0.01, backend=T)
        F.discriminator_loss(d, d[:1, ::2], ignore_mask_fake=mask, backend=T)
        F.one_hot2d(y, 19, dtype=dtype, backend=T)
        if long_ints:
            return  # the int64 pass needs one sweep, not every combination
    with torch.no_grad():  # flags off: no stored gradients, scalar BCE target, no masks; C = 256 and C = 4100
        for c in (256, 4100):
            x = logits((1, c, 2, 3), torch.float16, "channels_last")
            d = torch.randn((1, 2, 3), generator=g)
            F.cross_entropy2d(x, labels(x.shape), backend=T)
            F.bce_with_logits2d(d, 1.0, reduction="sum", backend=T)
            F.generator_loss(x, d, None, lambda_adv=0.01, backend=T)
            F.one_hot2d(labels(x.shape), c, backend=T)


if __name__ == "__main__":
    sys.exit(main())
