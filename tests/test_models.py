"""Networks: DeepLab-v2 shape/ASPP/BatchNorm modes, the FC discriminator, parameter groups, local weight loading."""
import pytest
import torch
from torch import nn

import fastadvseg as fas
from fastadvseg.models import ASPP, CaffeInput, FCDiscriminator, build_segmenter
from fastadvseg.models.weights import detect_layout, load_pretrained


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(0)
    return build_segmenter("deeplabv2_compact", 8)


@pytest.mark.parametrize("size", [(33, 33), (64, 64), (65, 97)])
def test_discriminator_shapes(size):
    D = FCDiscriminator(8, ndf=16)
    out = D(torch.randn(2, 8, *size))
    assert out.shape == (2, 1, *size)
    convs = list(D.convs) + [D.classifier]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)


def test_discriminator_default_channels():
    D = FCDiscriminator(21)
    assert [c.out_channels for c in D.convs] == [64, 128, 256, 512] and D.convs[0].in_channels == 21
    assert D.leaky_relu.negative_slope == 0.2


def _discriminator_in_plain_pytorch(D, x, strides):
    """D's own map written out with F.conv2d in float64: 4x4 stride-2 pad-1 convs first, then 3x3 stride-1 pad-1."""
    import torch.nn.functional as F

    layers = list(D.convs) + [D.classifier]
    x = x.double()
    for i, conv in enumerate(layers):
        stride, kernel = (2, 4) if i < strides else (1, 3)
        assert conv.weight.shape[-2:] == (kernel, kernel)
        x = F.conv2d(x, conv.weight.double(), conv.bias.double(), stride=stride, padding=1)
        if i < len(layers) - 1:
            x = F.leaky_relu(x, 0.2)
    return x


@pytest.mark.parametrize("strides, size", [(5, (64, 64)), (3, (64, 64)), (3, (37, 50)), (2, (33, 41)), (0, (9, 7))])
def test_discriminator_strides_and_its_own_map(strides, size):
    """D with ``strides`` stride-2 convolutions: its own map (upsample=False) is the conv stack at input // 2^strides
    cells a side; the default output is that map upsampled bilinearly to the input size."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(strides)
    torch.manual_seed(strides)
    low = FCDiscriminator(6, ndf=4, strides=strides, upsample=False)
    full = FCDiscriminator(6, ndf=4, strides=strides)
    full.load_state_dict(low.state_dict())
    x = torch.rand(2, 6, *size, generator=gen)
    grid = tuple(s // 2 ** strides for s in size)
    assert low.output_size(size) == grid
    want = _discriminator_in_plain_pytorch(low, x, strides)
    got = low(x)
    assert got.shape == (2, 1, *grid)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full(x).double(), F.interpolate(want, size=size, mode="bilinear", align_corners=True),
                               rtol=1e-4, atol=1e-5)


def test_discriminator_sees_at_least_8x8_cells_on_the_embedded_crop():
    """The paper's D (5 stride-2 convs) judges a 64-pixel synthetic crop as 2x2 cells; d_strides 3 gives >= 8x8. The
    D the pipeline builds follows the config's d_strides, validated, and VOC keeps the paper's D."""
    from types import SimpleNamespace

    from fastadvseg.config import ConfigError, load_config
    from fastadvseg.utils.builders import build_models

    bundle = SimpleNamespace(num_classes=8, mean=(0.5,) * 3, std=(0.2,) * 3)
    for d_strides, at_least in ((5, (2, 2)), (3, (8, 8))):
        cfg = load_config("synthetic", {"d_strides": d_strides, "device": "cpu"})
        _, D = build_models(cfg, bundle, torch.device("cpu"), log=lambda *a: None)
        D.upsample = False
        with torch.no_grad():
            grid = tuple(D(torch.zeros(1, 8, *cfg.crop_size)).shape[-2:])
        assert grid == D.output_size(cfg.crop_size) and min(grid) >= min(at_least), (d_strides, grid)
        assert cfg.to_dict()["d_strides"] == d_strides
    assert grid == (8, 8)
    assert load_config("voc_1_8").d_strides == 5 and load_config("synthetic").d_strides == 5
    for bad in (-1, 6, 2.5):
        with pytest.raises(ConfigError, match="d_strides"):
            load_config(None, {"d_strides": bad})
    with pytest.raises(ValueError, match="strides"):
        FCDiscriminator(8, strides=6)


# the authors' ceil-mode max-pool: 321 -> 41, 64 -> 9 (about 1/8)
@pytest.mark.parametrize("size,expected", [((64, 64), (9, 9)), ((65, 65), (9, 9)), ((33, 49), (5, 7)), ((321, 321), (41, 41))])
def test_output_stride_8(compact, size, expected):
    with torch.no_grad():
        assert compact(torch.randn(1, 3, *size)).shape == (1, 8, *expected)


def test_resnet101_structure():
    G = build_segmenter("deeplabv2_resnet101", 21)
    assert [len(getattr(G.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert G.backbone.layer3[5].conv2.dilation == (2, 2) and G.backbone.layer4[2].conv2.dilation == (4, 4)
    assert G.backbone.layer3[0].conv1.stride == (1, 1) and G.backbone.layer2[0].conv1.stride == (2, 2)
    assert [b.dilation for b in G.classifier.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert G.classifier.branches[0].in_channels == 2048


def test_aspp_sums_all_four_branches():
    torch.manual_seed(0)
    aspp = ASPP(16, 5)
    x = torch.randn(2, 16, 9, 9)
    calls = []
    for b in aspp.branches:
        b.register_forward_hook(lambda m, i, o: calls.append(o))
    out = aspp(x)
    assert len(calls) == 4
    torch.testing.assert_close(out, sum(calls))
    # zeroing any one branch changes the output: each contributes
    for k in range(4):
        with torch.no_grad():
            saved = aspp.branches[k].weight.clone()
            aspp.branches[k].weight.zero_()
            aspp.branches[k].bias.zero_()
            assert not torch.allclose(aspp(x), out)
            aspp.branches[k].weight.copy_(saved)


def test_frozen_bn_stays_frozen():
    torch.manual_seed(0)
    G = build_segmenter("deeplabv2_compact", 4, batchnorm="frozen")
    bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:  # non-trivial statistics, so a change would show
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in G.state_dict().items() if "bn" in k or "downsample.1" in k}
    G.train()
    assert all(not m.training for m in bns) and G.backbone.conv1.training
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    opt = torch.optim.SGD(G.param_groups(0.1), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(2, 3, 33, 33), torch.randint(0, 4, (2, 5, 5))
    for _ in range(2):
        opt.zero_grad()
        fas.cross_entropy2d(G(x), y, backend="reference").backward()
        opt.step()
    after = G.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not torch.equal(G.backbone.conv1.weight, build_segmenter("deeplabv2_compact", 4).backbone.conv1.weight)


@pytest.mark.parametrize("batchnorm", ["frozen_affine", "live"])
def test_training_bn_normalises_with_batch_statistics(batchnorm):
    """frozen_affine is the authors' BatchNorm (model.train() on BN layers whose parameters have requires_grad off):
    batch statistics, running statistics updated, scale and shift never trained; live also trains scale and
    shift. Checked on the stem's BN against the float64 formula and on two SGD steps."""
    torch.manual_seed(0)
    G = build_segmenter("deeplabv2_compact", 4, batchnorm=batchnorm)
    bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    affine = {id(p): p.detach().clone() for m in bns for p in m.parameters()}
    bn, seen = G.backbone.bn1, {}
    running_mean = bn.running_mean.clone()
    bn.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().double(), y=o.detach().double()))
    G.train()
    assert all(m.training for m in bns)
    assert all(p.requires_grad == (batchnorm == "live") for m in bns for p in m.parameters())
    x, y = torch.randn(3, 3, 35, 41), torch.randint(0, 4, (3, 5, 6))
    G(x)
    mean, var = seen["x"].mean((0, 2, 3)), seen["x"].var((0, 2, 3), unbiased=False)
    view = lambda t: t.double().view(1, -1, 1, 1)
    want = (seen["x"] - view(mean)) / torch.sqrt(view(var) + bn.eps) * view(bn.weight) + view(bn.bias)
    torch.testing.assert_close(seen["y"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean.double(), 0.9 * running_mean.double() + 0.1 * mean)
    opt = torch.optim.SGD(G.param_groups(0.1), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        fas.cross_entropy2d(G(x), y, backend="reference").backward()
        opt.step()
    changed = [not torch.equal(p, affine[id(p)]) for m in bns for p in m.parameters()]
    assert all(changed) if batchnorm == "live" else not any(changed)
    G.eval()
    assert not any(m.training for m in bns)
    with pytest.raises(ValueError, match="batchnorm='eval'"):
        build_segmenter("deeplabv2_compact", 4, batchnorm="eval")


def test_param_groups_head_lr_x10(compact):
    groups = compact.param_groups(2.5e-4)
    assert [g["lr"] for g in groups] == [2.5e-4, 2.5e-3] and [g["lr_mult"] for g in groups] == [1.0, 10.0]
    head = {id(p) for p in compact.classifier.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    trainable = {id(p) for p in compact.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def _fill(state, value=0.5):
    return {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in state.items()}


def test_load_torchvision_layout(tmp_path, compact):
    # an ImageNet-style state_dict: backbone keys without prefix, plus fc.* which has no place here
    sd = {k[len("backbone."):]: v for k, v in compact.state_dict().items() if k.startswith("backbone.")}
    sd = _fill(sd)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    path = tmp_path / "imagenet.pth"
    torch.save(sd, path)
    G = build_segmenter("deeplabv2_compact", 8, pretrained=str(path))
    rep = G.load_report
    assert rep.layout == "torchvision"
    assert torch.all(G.backbone.layer2[0].conv1.weight == 0.5)
    assert "fc.weight" in rep.unexpected and "fc.bias" in rep.unexpected
    assert "backbone.conv1.weight" in rep.loaded
    assert set(rep.missing) == {f"classifier.branches.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert "missing" in rep.summary()
    assert not G.backbone.stride_in_1x1 and G.input_transform is None  # torchvision: stride on the 3x3, RGB input


def test_load_deeplab_coco_layout_with_shape_mismatch(tmp_path):
    src = build_segmenter("deeplabv2_compact", 21)
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("backbone.", "").replace("classifier.branches.", "layer5.conv2d_list.")
        sd["Scale." + k] = v
    sd = _fill(sd, 0.25)
    path = tmp_path / "resnet101COCO.pth"
    torch.save(sd, path)
    G = build_segmenter("deeplabv2_compact", 8, pretrained=str(path))
    rep = G.load_report
    assert rep.layout == "deeplab" and G.backbone.stride_in_1x1 and G.input_transform is not None
    assert torch.all(G.backbone.layer4[0].conv2.weight == 0.25)
    skipped = {k for k, _, _ in rep.mismatched}
    assert skipped == {f"classifier.branches.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert ("classifier.branches.0.weight", (21, 64, 3, 3), (8, 64, 3, 3)) in rep.mismatched
    assert "file has shape [21, 64, 3, 3], model needs [8, 64, 3, 3]" in rep.summary()
    assert not torch.all(G.classifier.branches[0].weight == 0.25)
    # the same file into a 21-class model loads the head too, into ASPP branch order
    G21 = build_segmenter("deeplabv2_compact", 21, pretrained=str(path))
    assert not G21.load_report.mismatched and not G21.load_report.missing
    assert torch.all(G21.classifier.branches[3].bias == 0.25)


def test_layout_detection_and_missing_file(tmp_path):
    assert detect_layout(["Scale.conv1.weight"]) == "deeplab"
    assert detect_layout(["layer5.conv2d_list.0.weight", "conv1.weight"]) == "deeplab"
    assert detect_layout(["conv1.weight", "fc.weight"]) == "torchvision"
    assert detect_layout(["backbone.conv1.weight"]) == "fastadvseg"
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_segmenter("deeplabv2_compact", 8, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("deeplabv3", 8)


def test_own_checkpoint_roundtrip(tmp_path, compact):
    path = tmp_path / "g.pt"
    torch.save({"G": compact.state_dict(), "step": 3}, path)
    G = build_segmenter("deeplabv2_compact", 8)
    rep = load_pretrained(G, str(path))
    assert rep.layout == "fastadvseg" and not rep.missing and not rep.mismatched
    for k, v in compact.state_dict().items():
        assert torch.equal(v, G.state_dict()[k])


def test_caffe_input_for_the_authors_weights():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.rand(2, 3, 5, 5)  # RGB in [0, 1]
    normalised = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    caffe = rgb.flip(1) * 255 - torch.tensor(CaffeInput.CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    torch.testing.assert_close(CaffeInput(mean, std)(normalised), caffe, rtol=1e-5, atol=1e-3)
    assert build_segmenter("deeplabv2_compact", 8).input_transform is None
    assert "input_transform.scale" not in build_segmenter("deeplabv2_compact", 8, caffe_input=True).state_dict()
