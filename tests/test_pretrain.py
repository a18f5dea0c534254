"""The paper's protocol on the embedded data: the held-out test split, the pretraining command, the shipped pretrained
backbone and ``--init pretrained|scratch`` (tiny sizes: seconds)."""
import hashlib
import json
import os

import pytest

import fastadvseg.train as train_mod
from fastadvseg import evaluate as evaluate_mod
from fastadvseg.data import build_data
from fastadvseg.data.synthetic import generate

from test_train import tiny


def _digest(img, lab) -> str:
    return hashlib.sha256(img.tobytes() + lab.tobytes()).hexdigest()


# ---------------------------------------------------------------- the held-out test split


def test_synthetic_test_split_is_fixed_and_disjoint_from_train_and_val():
    b = build_data("synthetic", crop_size=33, synthetic_num_train=40, synthetic_num_val=8, val_limit=4)
    assert len(b.test) == 200 and b.test.ids[0] == "test_0000"  # all of it, whatever val_limit says
    image, label, name = b.test[3]
    assert name == "test_0003" and image.shape == (3, 96, 96) and label.shape == (96, 96)
    assert set(b.test.ids).isdisjoint(b.val.ids) and set(b.test.ids).isdisjoint(b.split["labelled"])
    test = {_digest(*generate(i, "test")) for i in range(40)}
    others = {_digest(*generate(i, s)) for s in ("train", "val") for i in range(40)}
    assert len(test) == 40 and not test & others
    assert _digest(*generate(5, "test")) == _digest(*generate(5, "test"))  # a pure function of (seed, split, index)


def test_train_scores_the_final_model_on_the_test_split_and_evaluate_can_too(tmp_path, capsys):
    out = train_mod.train(tiny(tmp_path, mode="baseline", eval_test=True))
    with open(os.path.join(out["run_dir"], "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert 0 <= summary["test_miou"] <= 1 and summary["test_images"] == 200
    assert summary["miou"] != summary["test_miou"]  # val (4 images) and test (200) are other images
    assert os.path.isfile(os.path.join(out["run_dir"], "eval_test.md"))
    assert evaluate_mod.main(["--run", out["run_dir"], "--which", "last", "--split", "test",
                              "--out", str(tmp_path / "ev")]) == 0
    assert "test mIoU" in capsys.readouterr().out
    with open(tmp_path / "ev" / "eval_test.json", encoding="utf-8") as f:
        assert json.load(f)["miou"] == pytest.approx(summary["test_miou"])  # the same final model, the same images
