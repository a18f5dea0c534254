"""Data pipeline: synthetic dataset, augmentation, splits, and the file-based datasets on tiny folders."""
import json
import os

import numpy as np
import pytest
import torch

from fastadvseg.data import build_data, load_split, save_split
from fastadvseg.data.cityscapes import CITYSCAPES_CLASSES
from fastadvseg.data.synthetic import CLASS_NAMES, generate
from fastadvseg.data.transforms import pad_to, train_augment
from fastadvseg.data.voc import VOC_CLASSES

Image = pytest.importorskip("PIL.Image")

H, W = 20, 30


# ---------------------------------------------------------------- synthetic

def test_synthetic_items_deterministic_and_in_range():
    img, lab = generate(5, "train", seed=0)
    img2, lab2 = generate(5, "train", seed=0)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    assert img.shape == (96, 96, 3) and img.dtype == np.float32 and lab.dtype == np.uint8
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(lab)) <= set(range(len(CLASS_NAMES))) | {255}
    assert not np.array_equal(generate(5, "val", seed=0)[0], img)     # split changes the item
    assert not np.array_equal(generate(5, "train", seed=1)[0], img)   # seed changes the item
    assert not np.array_equal(generate(6, "train", seed=0)[0], img)


def test_synthetic_classes_all_present_and_ignore_band():
    counts = np.zeros(256, np.int64)
    for i in range(40):
        counts += np.bincount(generate(i, "train")[1].ravel(), minlength=256)
    assert (counts[: len(CLASS_NAMES)] > 0).all()
    frac = counts / counts.sum()
    assert 0.5 < frac[0] < 0.95        # background dominates, as in VOC, but objects are plentiful
    assert 0.0 < frac[255] < 0.1       # thin ignore band around objects


def test_synthetic_sample_dumper(tmp_path):
    from fastadvseg.data.synthetic import main

    main(["--out", str(tmp_path), "--n", "2", "--split", "val", "--zoom", "1"])
    im = Image.open(tmp_path / "val_0001.png")
    assert im.size == (96 * 2 + 4, 96) and im.mode == "RGB"


def test_synthetic_bundle_shapes_and_dtypes():
    torch.manual_seed(0)
    b = build_data("synthetic", crop_size=(41, 53), synthetic_num_train=40, synthetic_num_val=6, val_limit=4)
    assert b.num_classes == len(b.class_names) == 8 and b.class_names[0] == "background"
    assert b.ignore_index == 255 and len(b.mean) == len(b.std) == 3
    assert len(b.labelled) == 5 and len(b.unlabelled) == 35 and len(b.val) == 4
    x, y, name = b.labelled[0]
    assert x.shape == (3, 41, 53) and x.dtype == torch.float32
    assert y.shape == (41, 53) and y.dtype == torch.int64 and name in b.split["labelled"]
    x, y, name = b.unlabelled[0]
    assert x.shape == (3, 41, 53) and name in b.split["unlabelled"]
    x, y, name = b.val[0]
    assert x.shape == (3, 96, 96) and y.shape == (96, 96) and name == "val_0000"
    # val items are the plain normalised item
    img, lab = generate(0, "val")
    ref = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(b.mean).view(3, 1, 1)) / torch.tensor(b.std).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-6) and torch.equal(y, torch.from_numpy(lab).long())


def test_augmentation_reproducible_from_torch_seed():
    b = build_data("synthetic", crop_size=64, synthetic_num_train=8, synthetic_num_val=1, labelled_fraction=1)
    assert b.unlabelled is None
    torch.manual_seed(3)
    a = [b.labelled[i][0] for i in range(4)]
    torch.manual_seed(3)
    c = [b.labelled[i][0] for i in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(a, c))


def test_dataloader_workers_reproducible():
    from torch.utils.data import DataLoader

    b = build_data("synthetic", crop_size=32, synthetic_num_train=6, synthetic_num_val=1, labelled_fraction=1)

    def batches():
        torch.manual_seed(7)
        return [x for x, _, _ in DataLoader(b.labelled, batch_size=3, shuffle=True, num_workers=2)]

    first, second = batches(), batches()
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_crop_pads_with_ignore_and_zero():
    img = torch.ones(3, 10, 12)
    lab = torch.ones(10, 12, dtype=torch.long)
    pi, pl = pad_to(img, lab, 15, 14)
    assert pi.shape == (3, 15, 14) and pl.shape == (15, 14)
    assert (pl[10:] == 255).all() and (pl[:, 12:] == 255).all() and (pl[:10, :12] == 1).all()
    assert (pi[:, 10:] == 0).all() and (pi[:, :10, :12] == 1).all()
    torch.manual_seed(0)
    ai, al = train_augment(img, lab, (32, 40), scale_range=(1.0, 1.0))   # crop larger than the image
    assert ai.shape == (3, 32, 40) and al.shape == (32, 40)
    assert int((al == 1).sum()) == 10 * 12 and int((al == 255).sum()) == 32 * 40 - 120
    si, sl = train_augment(img, lab, (8, 8), scale_range=(2.0, 2.0), mirror=False)  # scaled up, then cropped
    assert si.shape == (3, 8, 8) and (sl == 1).all()


def test_val_pad_batches(tmp_path):
    b = build_data("synthetic", synthetic_num_train=4, synthetic_num_val=2, val_pad=100, synthetic_size=90)
    x, y, _ = b.val[1]
    assert x.shape == (3, 100, 100) and (y[90:] == 255).all() and (x[:, :, 90:] == 0).all()
    b = build_data("synthetic", synthetic_num_train=4, synthetic_num_val=1, val_pad=50)
    with pytest.raises(ValueError, match="val_pad"):
        b.val[0]


# ---------------------------------------------------------------- split

def test_split_seed_applied_and_file_roundtrip(tmp_path):
    kw = dict(synthetic_num_train=80, synthetic_num_val=2)
    s0 = build_data("synthetic", split_seed=0, labelled_fraction=0.25, **kw).split
    assert s0 == build_data("synthetic", split_seed=0, labelled_fraction=0.25, **kw).split
    s1 = build_data("synthetic", split_seed=1, labelled_fraction=0.25, **kw).split
    assert s0["labelled"] != s1["labelled"]
    assert len(s0["labelled"]) == 20 and len(s0["unlabelled"]) == 60
    assert set(s0["labelled"]).isdisjoint(s0["unlabelled"])
    assert len(build_data("synthetic", labelled_count=7, **kw).split["labelled"]) == 7

    path = tmp_path / "run" / "split.json"
    save_split(s1, path)
    assert load_split(path)["labelled"] == s1["labelled"]
    assert json.loads(path.read_text())["unlabelled"] == s1["unlabelled"]
    b = build_data("synthetic", split_file=str(path), split_seed=0, **kw)    # the file wins over the seed
    assert b.split == s1 and list(b.labelled.ids) == s1["labelled"]

    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_data("synthetic", split_file=str(tmp_path / "nope.json"), **kw)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        build_data("synthetic", split_file=str(bad), **kw)
    save_split({"labelled": ["train_0000", "cat_1"], "unlabelled": []}, tmp_path / "unk.json")
    with pytest.raises(ValueError, match="unk.json"):
        build_data("synthetic", split_file=str(tmp_path / "unk.json"), **kw)


# ---------------------------------------------------------------- file-based datasets

def _rgb(path, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _mask(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:  # an "L" image with a palette becomes a "P" image whose indices are the values
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def _label(seed, n):
    lab = np.random.default_rng(seed).integers(0, n, (H, W))
    lab[0] = 255
    return lab


def _voc_tree(base, n, n_train):
    """A VOC2012 folder of ``n`` items (palette masks), the first ``n_train`` listed in train.txt, the rest in val.txt."""
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, i in enumerate(ids):
        _rgb(base / "JPEGImages" / f"{i}.jpg", k)
        _mask(base / "SegmentationClass" / f"{i}.png", _label(k, 21), palette=True)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return ids, sets


def test_voc_layout(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids, sets = _voc_tree(base, 6, 4)
    b = build_data("voc", str(tmp_path), crop_size=(16, 16), labelled_count=2, val_pad=32)
    assert b.num_classes == 21 and b.class_names == VOC_CLASSES and len(b.labelled) == 2 and len(b.unlabelled) == 2
    x, y, name = b.val[0]
    assert name == ids[4] and x.shape == (3, 32, 32)
    assert Image.open(base / "SegmentationClass" / f"{ids[4]}.png").mode == "P"
    assert torch.equal(y[:H, :W], torch.from_numpy(_label(4, 21)))   # palette index = class id
    assert (y[H:] == 255).all()
    assert b.labelled[0][0].shape == (3, 16, 16)
    # train_aug list + SegmentationClassAug preferred when present
    _mask(base / "SegmentationClassAug" / f"{ids[0]}.png", np.full((H, W), 3))
    (sets / "train_aug.txt").write_text(f"/JPEGImages/{ids[0]}.jpg /SegmentationClassAug/{ids[0]}.png\n")
    b = build_data("voc", str(base), labelled_fraction=1.0)
    assert b.split["labelled"] == [ids[0]] and b.unlabelled is None
    b.labelled.train = False
    assert (b.labelled[0][1] == 3).all()


def test_cityscapes_layout_and_trainid_mapping(tmp_path):
    label = np.zeros((H, W), np.uint8)
    label[:, :10] = 7      # road -> 0
    label[:, 10:15] = 26   # car -> 13
    label[:, 15:20] = 33   # bicycle -> 18
    label[:, 20:25] = 0    # unlabelled -> 255
    label[:, 25:] = 4      # static -> 255
    for split, city in (("train", "aachen"), ("train", "bonn"), ("val", "lindau")):
        for k in range(2):
            stem = f"{city}_000000_00001{k}"
            _rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", k)
            _mask(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    b = build_data("cityscapes", str(tmp_path), crop_size=(8, 8), labelled_fraction=0.5)
    assert b.num_classes == 19 and b.class_names == CITYSCAPES_CLASSES
    assert len(b.labelled) == 2 and len(b.unlabelled) == 2 and len(b.val) == 2
    x, y, name = b.val[0]
    assert name == "lindau/lindau_000000_000010" and x.shape == (3, H, W)
    assert (y[:, :10] == 0).all() and (y[:, 10:15] == 13).all() and (y[:, 15:20] == 18).all()
    assert (y[:, 20:] == 255).all()
    # the paper's protocol: every item resized to a fixed size first (here 10x15, label by nearest)
    b = build_data("cityscapes", str(tmp_path), image_size=(10, 15), crop_size=(10, 15), scale_range=(1, 1))
    x, y, _ = b.val[0]
    assert x.shape == (3, 10, 15) and (y[:, :5] == 0).all() and (y[:, 10:] == 255).all()
    assert b.labelled[0][0].shape == (3, 10, 15)


def test_folder_dataset(tmp_path):
    for k in range(12):
        _rgb(tmp_path / "images" / f"img{k:02d}.{'png' if k % 2 else 'jpg'}", k)
        _mask(tmp_path / "masks" / f"img{k:02d}.png", _label(k, 4 if k != 3 else 5))
    b = build_data("folder", str(tmp_path), crop_size=(10, 10), labelled_fraction=1.0)
    assert b.num_classes == 5 and b.class_names[4] == "class_4"     # max label + 1 over the masks
    assert [n for *_, n in b.val] == ["img09"] and len(b.labelled) == 11   # every 10th sorted id is val
    (tmp_path / "classes.txt").write_text("bg\na\nb\nc\nd\ne\n")
    (tmp_path / "val.txt").write_text("img00\nimg01\n")
    b = build_data("folder", str(tmp_path), crop_size=(10, 10), labelled_count=3)
    assert b.class_names == ["bg", "a", "b", "c", "d", "e"]
    assert b.val.ids == ["img00", "img01"] and len(b.labelled) + len(b.unlabelled) == 10
    assert torch.equal(b.val[1][1], torch.from_numpy(_label(1, 4)))


def test_corrupt_and_missing_files_are_named(tmp_path):
    for k in range(3):
        _rgb(tmp_path / "images" / f"a{k}.png", k)
        _mask(tmp_path / "masks" / f"a{k}.png", _label(k, 3))
    (tmp_path / "images" / "a1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"a1\.png"):  # inferring the classes reads every item: found at once
        build_data("folder", str(tmp_path), crop_size=8, labelled_fraction=1.0)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    b = build_data("folder", str(tmp_path), crop_size=8, labelled_fraction=1.0)
    with pytest.raises(ValueError, match=r"a1\.png"):
        [b.labelled[i] for i in range(len(b.labelled))] + [b.val[i] for i in range(len(b.val))]
    os.remove(tmp_path / "masks" / "a0.png")
    with pytest.raises(FileNotFoundError, match=r"a0\.png"):
        b.labelled[0]
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        build_data("voc", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        build_data("imagenet", str(tmp_path))


def test_voc_and_cityscapes_items_are_checked_naming_the_file(tmp_path):
    from fastadvseg.data.check import DataError, check_bundle

    base = tmp_path / "voc" / "VOC2012"
    ids, _ = _voc_tree(base, 4, 3)
    check_bundle(build_data("voc", str(base)), log=lambda *a: None)  # fine
    _mask(base / "SegmentationClass" / f"{ids[3]}.png", np.full((H, W), 30), palette=True)
    with pytest.raises(DataError, match=rf"{ids[3]}\.png has value\(s\) \[30\].*21 classes"):
        check_bundle(build_data("voc", str(base)), log=lambda *a: None)
    city = tmp_path / "cs"
    for split in ("train", "val"):
        _rgb(city / "leftImg8bit" / split / "bonn" / "bonn_0_leftImg8bit.png", 0)
        _mask(city / "gtFine" / split / "bonn" / "bonn_0_gtFine_labelIds.png", np.full((H, W + 1), 7))
    with pytest.raises(DataError, match=r"bonn_0_gtFine_labelIds\.png is 20x31 but its image .* is 20x30"):
        check_bundle(build_data("cityscapes", str(city)), log=lambda *a: None)
