"""ConfusionMatrix and its results against hand-computed confusion matrices."""
import json
import math

import pytest
import torch

from fastadvseg.metrics import ConfusionMatrix, format_table, metrics_from_matrix


def _cm(pred, target, c=3, **kw):
    cm = ConfusionMatrix(c, **kw)
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm


def test_hand_computed_matrix_with_ignore_and_absent_class():
    # 4 classes; class 3 appears in neither prediction nor ground truth; two ignored pixels.
    target = [[[0, 0, 1, 1], [2, 2, 255, 255]]]
    pred = [[[0, 1, 1, 1], [2, 0, 3, 0]]]   # predictions under ignore pixels are not counted
    cm = _cm(pred, target, c=4)
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    r = cm.compute()
    # IoU: class0 1/(2+2-1)=1/3, class1 2/(2+3-2)=2/3, class2 1/(2+1-1)=1/2, class3 undefined
    assert r.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(r.iou[3])
    assert r.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)   # absent class excluded, not counted as 0
    assert r.pixel_acc == pytest.approx(4 / 6)
    assert r.class_acc[:3] == pytest.approx([1 / 2, 1.0, 1 / 2]) and math.isnan(r.class_acc[3])
    assert r.mean_class_acc == pytest.approx(2 / 3)
    assert r.num_pixels == 6


def test_class_only_predicted_counts_as_zero_iou():
    r = _cm([[0, 2]], [[0, 0]]).compute()       # class 2 predicted but absent from ground truth: IoU 0
    assert r.iou[0] == pytest.approx(0.5) and r.iou[2] == 0.0 and math.isnan(r.iou[1])
    assert r.miou == pytest.approx(0.25)


def test_perfect_prediction_and_accumulation():
    t = torch.randint(0, 5, (3, 7, 9))
    cm = ConfusionMatrix(5)
    cm.update(t, t)
    cm.update(t[:1], t[:1])
    r = cm.compute()
    assert r.miou == 1.0 and r.pixel_acc == 1.0 and r.mean_class_acc == 1.0
    assert int(cm.mat.sum()) == 4 * 7 * 9
    cm.reset()
    assert int(cm.mat.sum()) == 0 and math.isnan(cm.compute().miou)


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_table_and_dict():
    r = metrics_from_matrix(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    names = ["background", "cat", "dog"]
    table = format_table(names, r)
    assert table.splitlines()[0].startswith("| class | IoU")
    assert "| cat | 66.7 |" in table and "| dog | – |" in table
    d = r.to_dict(names)
    assert d["iou"]["dog"] is None and d["iou"]["cat"] == pytest.approx(2 / 3)
    json.dumps(d, allow_nan=False)   # JSON-ready: no NaN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pred, target = torch.randint(0, 4, (2, 16, 16)), torch.randint(0, 4, (2, 16, 16))
    target[0, :3] = 255
    a, b = ConfusionMatrix(4), ConfusionMatrix(4, device="cuda")
    a.update(pred, target)
    b.update(pred.cuda(), target.cuda())
    assert b.mat.is_cuda and torch.equal(a.mat, b.mat.cpu())


def test_all_reduce_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    cm = _cm([[0, 1]], [[0, 0]])
    cm.all_reduce()                       # not initialised: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(cm.mat, torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0]]))
