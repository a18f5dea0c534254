"""Input factories, tolerances and the (backend, device) pairs under test, shared by the test modules."""
import torch
import torch.nn.functional as F

import fastadvseg as fas

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_CASES = [(b, d) for d in DEVICES for b in fas.available_backends(d)]
KERNEL_CASES = [c for c in BACKEND_CASES if c[0] != "reference"]

# relative tolerance of values and gradients against the float64 oracle, per input dtype
RTOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# (N, C, H, W): N=1, C not a power of two, H*W prime or not a multiple of any block, C=150 (ADE20K)
SHAPES = [(1, 3, 5, 7), (2, 19, 7, 11), (2, 21, 1, 31), (1, 150, 3, 5)]


def ids(case):
    return f"{case[0]}-{case[1]}"


def layout_4d(base: torch.Tensor, layout: str) -> torch.Tensor:
    """Return a tensor equal to ``base`` with the given memory layout, as a fresh leaf (no grad yet)."""
    n, c, h, w = base.shape
    if layout == "contiguous":
        return base.clone()
    if layout == "channels_last":
        return base.clone().to(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.zeros((n, c + 2, 2 * h + 1, w + 3), dtype=base.dtype, device=base.device)
        view = big[:, 1:c + 1, 1::2, 2:w + 2]
        view.copy_(base)
        assert not view.is_contiguous() and view.storage_offset() > 0
        return view.detach()
    raise ValueError(layout)


def layout_3d(base: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, H, W) map with a layout; 'channels_last' gives an (N, 1, H, W)-style strided map, 'sliced' a view."""
    n, h, w = base.shape
    if layout == "sliced":
        big = torch.zeros((n, 2 * h + 1, w + 3), dtype=base.dtype, device=base.device)
        view = big[:, 1::2, 2:w + 2]
        view.copy_(base)
        return view.detach()
    if layout == "channels_last":
        return layout_4d(base.unsqueeze(1), "channels_last")[:, 0].detach()
    return base.clone()


def make_logits(shape, dtype, layout, device, scale=3.0, generator=None):
    base = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)
    return layout_4d(base, layout).requires_grad_(True)


def make_target(shape, device, ignore_frac=0.2, ignore_index=255, generator=None):
    n, c, h, w = shape
    t = torch.randint(0, c, (n, h, w), generator=generator)
    t[torch.rand((n, h, w), generator=generator) < ignore_frac] = ignore_index
    return t.to(device)


def make_d_logits(n_h_w, dtype, device, threshold=0.2, layout="contiguous", generator=None):
    """Discriminator logits around the decision boundary but never within 0.05 of logit(threshold)."""
    z = torch.randn(n_h_w, generator=generator, dtype=torch.float64) * 2.0
    boundary = torch.logit(torch.tensor(threshold, dtype=torch.float64))
    near = (z - boundary).abs() < 0.05
    z[near] = boundary + 0.2
    z = z.to(dtype).to(device)
    return layout_3d(z, layout).requires_grad_(True)


def resolution(dtype) -> float:
    """The spacing of the dtype's subnormal numbers: no value of that dtype is closer to a number than this (float16:
    2**-24 ~ 6e-8, which a tolerance relative to a small gradient's maximum can fall below)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_close(actual, expected, dtype, what="", slack=1.0):
    """Compare against the float64 oracle with the dtype's relative tolerance (times ``slack``), atol scaled by the
    magnitude and never below the dtype's resolution."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = RTOL[dtype] * slack
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=max(rtol * max(scale, 1e-6), resolution(dtype)),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


class TinyD(torch.nn.Module):
    """A fully convolutional discriminator small enough for the interpreter: conv, LeakyReLU, conv, upsample."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Conv2d(c, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, p):
        y = self.b(F.leaky_relu(self.a(p.float()), 0.2))
        return F.interpolate(y, size=p.shape[-2:], mode="bilinear", align_corners=True)
