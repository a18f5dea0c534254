"""The paper's protocol on the embedded data: the held-out test split, the pretraining command, the shipped pretrained
backbone and ``--init pretrained|scratch`` (tiny sizes: seconds)."""
import hashlib
import json
import os

import pytest
import torch

import fastadvseg.train as train_mod
from fastadvseg import evaluate as evaluate_mod
from fastadvseg import pretrain as pretrain_mod
from fastadvseg.config import ConfigError, load_config
from fastadvseg.data import build_data
from fastadvseg.data.pretrain_shapes import PRETRAIN_CLASSES, generate_pretrain
from fastadvseg.data.synthetic import CLASS_NAMES, generate
from fastadvseg.models import FCDiscriminator, build_segmenter
from fastadvseg.models.weights import SHIPPED, sha256_file, shipped_weights
from fastadvseg.utils.builders import start_weights

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


# ---------------------------------------------------------------- the pretraining task and command


def test_pretraining_task_shares_no_class_and_no_image_with_the_target_data():
    assert not set(PRETRAIN_CLASSES[1:]) & set(CLASS_NAMES)
    img, lab = generate_pretrain(0, size=64)
    assert img.shape == (64, 64, 3) and img.dtype.name == "float32" and 0 <= img.min() <= img.max() <= 1
    assert set(lab.ravel().tolist()) <= set(range(len(PRETRAIN_CLASSES))) | {255}
    pre = {_digest(*generate_pretrain(i, size=96)) for i in range(30)}
    target = {_digest(*generate(i, s)) for s in ("train", "val", "test") for i in range(30)}
    assert not pre & target
    assert _digest(*generate_pretrain(7)) == _digest(*generate_pretrain(7))


def test_pretrain_command_is_reproducible_and_its_backbone_loads(tmp_path, capsys):
    paths = [str(tmp_path / f"{k}.pt") for k in "ab"]
    for p in paths:
        assert pretrain_mod.main(["--steps", "2", "--batch_size", "2", "--size", "40", "--out", p]) == 0
    assert sha256_file(paths[0]) == sha256_file(paths[1])  # same seed, same bytes (whatever the file name)
    with open(paths[0] + ".json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["sha256"] == sha256_file(paths[0]) and rec["steps"] == 2 and "--steps 2" in rec["command"]
    G = build_segmenter("deeplabv2_compact", len(CLASS_NAMES), paths[0], batchnorm="live")
    rep = G.load_report
    assert rep.loaded and all(k.startswith("backbone.") for k in rep.loaded) and not rep.mismatched
    assert all(k.startswith("classifier.") for k in rep.missing)  # a fresh head for the target classes
    assert pretrain_mod.main(["--steps", "0", "--out", paths[0]]) == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- the shipped start and --init


def test_shipped_backbone_matches_its_recorded_sha256_and_fits_the_compact_segmenter():
    name, digest = SHIPPED["deeplabv2_compact"]
    path = shipped_weights("deeplabv2_compact")
    assert os.path.basename(path) == name and sha256_file(path) == digest
    assert os.path.getsize(path) < 4 << 20  # a few MB at most
    with open(path + ".json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["sha256"] == digest and rec["command"].startswith("python -m fastadvseg.pretrain")
    G = build_segmenter("deeplabv2_compact", len(CLASS_NAMES), path, batchnorm="live")
    own = [k for k in G.state_dict() if k.startswith("backbone.")]
    assert sorted(G.load_report.loaded) == sorted(own) and not G.load_report.mismatched


def test_init_option(tmp_path, monkeypatch):
    assert start_weights(tiny(tmp_path)) is None  # default: from scratch
    assert start_weights(tiny(tmp_path, init="scratch")) is None
    assert start_weights(tiny(tmp_path, init="pretrained")) == shipped_weights("deeplabv2_compact")
    assert start_weights(tiny(tmp_path, pretrained="w.pt")) == "w.pt"  # --pretrained FILE alone: as before
    for bad, what in (({"init": "imagenet"}, "choose one of"), ({"init": "scratch", "pretrained": "w.pt"}, "contradicts"),
                      ({"init": "pretrained", "model": "deeplabv2_resnet18"}, "give --pretrained FILE")):
        with pytest.raises(ConfigError, match=what):
            load_config(None, bad)
    seen = {}
    real = train_mod.train_step

    def first_step(cfg, nets, step, *a, **k):  # the weights the first step starts from
        if step == 0:
            seen.update({k: v.clone() for k, v in nets.G.state_dict().items()})
        return real(cfg, nets, step, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", first_step)
    out = train_mod.train(tiny(tmp_path, init="pretrained", mode="baseline", steps=1))
    assert out["step"] == 1
    shipped = torch.load(shipped_weights("deeplabv2_compact"), weights_only=True)
    assert shipped and all(torch.equal(seen[k], v) for k, v in shipped.items())


def _record_d_inputs(monkeypatch):
    """The list of every input the discriminator will be given."""
    seen = []
    real_forward = FCDiscriminator.forward

    def record(self, x):
        seen.append(x.detach().clone())
        return real_forward(self, x)

    monkeypatch.setattr(FCDiscriminator, "forward", record)
    return seen


def test_d_real_smoothing_remedy_is_off_by_default_and_smooths_what_d_sees_as_real(tmp_path, monkeypatch):
    assert load_config(None, {}).d_real_smoothing == 0.0  # the paper's recipe stays the default
    with pytest.raises(ConfigError, match="d_real_smoothing"):
        load_config(None, {"d_real_smoothing": 1.0})
    seen = _record_d_inputs(monkeypatch)
    train_mod.train(tiny(tmp_path, mode="adv", steps=1, d_real_smoothing=0.2))
    d_step = seen[1]  # G step: D(pred); D step: D([pred, real])
    real = d_step[len(d_step) // 2:]
    valid = real.sum(1) > 0  # ignored pixels stay zero vectors
    assert torch.allclose(real.amax(1)[valid], torch.tensor(0.8 + 0.2 / real.shape[1]))
    assert torch.allclose(real.amin(1)[valid], torch.tensor(0.2 / real.shape[1]))


def test_a_config_saved_before_a_setting_existed_still_resumes():
    from fastadvseg.utils.checkpoint import config_differences

    now = load_config(None, {}).to_dict()
    old = {k: v for k, v in now.items() if k not in ("d_real_smoothing", "init")}
    assert config_differences(old, now) == {}
    assert "d_real_smoothing" in config_differences(old, {**now, "d_real_smoothing": 0.1})


def test_d_image_remedy_shows_d_the_image_beside_the_map(tmp_path, monkeypatch):
    assert load_config(None, {}).d_image is False  # the paper's recipe stays the default
    seen = _record_d_inputs(monkeypatch)
    out = train_mod.train(tiny(tmp_path, mode="semi", steps=2, d_image=True, plots=True))
    C = len(CLASS_NAMES)
    assert all(x.shape[1] == C + 3 for x in seen)  # G step (labelled, unlabelled), D step, samples.png
    real = seen[2][-2:]  # the D step's real half: one-hot ground truth, then the image
    assert torch.all((real[:, :C] == 0) | (real[:, :C] == 1)) and real[:, C:].abs().sum() > 0
    assert os.path.isfile(os.path.join(out["run_dir"], "samples.png"))
