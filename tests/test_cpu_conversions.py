"""The cpu backend reads and writes float16/bfloat16 logits and gradients in place with vector conversions
(kernels_impl.h, VecIO): they must round exactly as the scalar ones (dtypes.h) and as torch does."""
import pytest
import torch

import fastadvseg as fas

pytestmark = pytest.mark.skipif("cpu" not in fas.available_backends("cpu"),
                                reason=f"cpu backend not built: {fas.unavailable_reason('cpu')}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_in_place_match_the_scratch_path(dtype):
    """Full blocks of NCHW half logits take the in-place path, a channels_last copy the scratch path (scalar
    conversions): same loss and the same gradient bits."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn((2, 21, 16, 48), generator=g) * 4).to(dtype)
    x[0, 3, 0, :20] = float("nan")  # NaN and infinities survive both conversions alike
    x[1, 4, 2, :7] = float("inf")
    x[1, 5, 3, :9] = float("-inf")
    x[0, 6, 5, :11] = 6.0e-8  # half subnormals
    t = torch.randint(0, 21, (2, 16, 48), generator=g)
    t[:, :2] = 255
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_()
        loss = fas.cross_entropy2d(xl, t, reduction="none", backend="cpu")
        loss.sum().backward()
        grads.append((loss.detach(), xl.grad.contiguous()))
    (l1, g1), (l2, g2) = grads
    assert torch.equal(l1.isnan(), l2.isnan())
    torch.testing.assert_close(l1, l2, rtol=0, atol=0, equal_nan=True)
    # (NaN payloads may differ; every other gradient bit must not)
    assert torch.equal(g1.isnan(), g2.isnan())
    finite = ~g1.isnan()
    assert torch.equal(g1.view(torch.int16)[finite], g2.view(torch.int16)[finite]), "gradient bits differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_rounds_like_torch(dtype):
    """The gradient written in the logits' dtype is torch's rounding of the float32 gradient."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn((1, 7, 8, 32), generator=g) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 7, (1, 8, 32), generator=g)
    fas.cross_entropy2d(x, t, reduction="sum", backend="cpu").backward()
    x32 = x.detach().float().requires_grad_()
    fas.cross_entropy2d(x32, t, reduction="sum", backend="cpu").backward()
    torch.testing.assert_close(x.grad, x32.grad.to(dtype), rtol=0, atol=0)
