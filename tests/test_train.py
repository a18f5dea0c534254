"""The training loop, config, checkpoints, resume and evaluation, on tiny synthetic runs (33x33 crops, a few steps)."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import fastadvseg.train as train_mod
from fastadvseg import evaluate as evaluate_mod
from fastadvseg.config import ConfigError, TrainConfig, load_config, parse_overrides, shipped_configs
from fastadvseg.utils import checkpoint as ckpt_mod
from fastadvseg.utils.log import read_metrics


def tiny(tmp_path, name="run", **kw):
    values = dict(run_root=str(tmp_path), name=name, crop_size="33,33", batch_size=2, steps=3, val_limit=4,
                  eval_batch_size=4, ndf=8, log_every=1, checkpoint_every=2, eval_every=0, plots=False,
                  num_vis_images=2, semi_start=1, loss_backend="reference", device="cpu")
    values.update(kw)
    return load_config(None, values)


def last_state(run):
    """The run's checkpoints/last.pt as ``--resume`` reads it: found from the run directory, loaded with
    weights_only, a complete training state with finite weights (a CheckpointError otherwise)."""
    return ckpt_mod.read_training_state(ckpt_mod.resolve_checkpoint(str(run)))


def _finite(records, key):
    vals = [r[key] for r in records if r.get(key) is not None]
    return vals and all(math.isfinite(v) for v in vals)


@pytest.mark.parametrize("mode", ["baseline", "adv", "semi", "selftrain", "mean_teacher"])
def test_every_mode_runs_and_writes_a_run_directory(tmp_path, mode):
    cfg = tiny(tmp_path, mode=mode, plots=(mode in ("semi", "mean_teacher")))
    out = train_mod.train(cfg)
    run = out["run_dir"]
    assert not out["interrupted"] and 0.0 <= out["miou"] <= 1.0
    for f in ("config.yaml", "split.json", "metrics.jsonl", "eval.md", "eval.json", "summary.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert os.path.isfile(os.path.join(run, f)), f
    records = read_metrics(os.path.join(run, "metrics.jsonl"))
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert [r["kind"] for r in records].count("val") == 1
    assert _finite(train_recs, "loss_ce") and _finite(train_recs, "lr")
    assert train_recs[0]["lr"] == pytest.approx(cfg.lr) and train_recs[1]["lr"] < train_recs[0]["lr"]
    if mode in ("baseline", "mean_teacher"):
        assert all("loss_d" not in r and "loss_adv" not in r and "loss_semi_adv" not in r for r in train_recs)
    else:
        assert _finite(train_recs, "loss_d") and _finite(train_recs, "loss_adv")
    if mode in ("semi", "selftrain"):
        assert _finite(train_recs, "loss_semi_adv")
        assert "loss_semi" not in train_recs[0] and _finite(train_recs, "loss_semi")  # semi_start=1
    if mode == "mean_teacher":
        assert "loss_cutmix" not in train_recs[0] and _finite(train_recs, "loss_cutmix")
    if mode in ("semi", "selftrain", "mean_teacher"):  # the kept fraction of the pseudo-labels, from semi_start on
        assert "semi_ratio" not in train_recs[0]
        assert all(0.0 <= r["semi_ratio"] <= 1.0 for r in train_recs[1:])
    else:
        assert all("semi_ratio" not in r for r in train_recs)
    if cfg.plots:
        for png in ("losses.png", "miou.png", "samples.png"):
            assert os.path.getsize(os.path.join(run, png)) > 1000, png
    state = last_state(run)
    assert ("teacher" in state) == (mode == "mean_teacher")
    assert state["step"] == 3 and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["config"] == load_config(os.path.join(run, "config.yaml")).to_dict() == cfg.to_dict()
    assert (state["config"]["ignore_index"], state["config"]["batchnorm"]) == (255, "live")
    assert state["config"]["mode"] == mode and state["opt_g"]["param_groups"][1]["lr_mult"] == cfg.head_lr_mult
    table = open(os.path.join(run, "eval.md")).read()
    assert "| background |" in table and "**mean**" in table


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    from fastadvseg.data import build_data
    from fastadvseg.utils.builders import build_models, build_optimizers
    from fastadvseg.utils.step import Nets, train_step

    cfg = tiny(tmp_path, mode="adv", lr=2.5e-3)
    bundle = build_data("synthetic", crop_size=(33, 33), val_limit=1)
    images = torch.stack([bundle.labelled[i][0] for i in range(4)])
    labels = torch.stack([bundle.labelled[i][1] for i in range(4)])
    G, D = build_models(cfg, bundle, torch.device("cpu"), log=lambda *a: None)
    opt_g, opt_d = build_optimizers(cfg, G, D)
    nets = Nets(G, D, D, opt_g, opt_d)
    ce = [float(train_step(cfg, nets, s, images, labels, num_classes=bundle.num_classes)["loss_ce"])
          for s in range(6)]
    assert all(math.isfinite(v) for v in ce) and ce[-1] < ce[0]


def _paper_step_in_float64(G, D, cfg, num_classes, images, labels, images_u):
    """One iteration of the paper's method written out in plain PyTorch and float64 from the definitions in
    tests/oracle.py: the losses, the kept fraction, D's confidences, and the gradients of G (its step) and D (its
    step) as torch.autograd.grad gives them."""
    import oracle
    import torch.nn.functional as F

    ignore, C = cfg.ignore_index, num_classes
    x, y = images.double(), labels
    size = tuple(y.shape[-2:])
    seg = lambda im: F.interpolate(G(im), size=size, mode="bilinear", align_corners=True)
    net_d = D
    # the paper's D upsamples its map to its input's size (identity when the net already does)
    D = lambda maps: F.interpolate(net_d(maps), size=size, mode="bilinear", align_corners=True)
    d_in = lambda maps, im: torch.cat([maps, im], 1) if cfg.d_image else maps
    logits = seg(x)
    total, ce, adv, _, _ = oracle.generator_loss(logits, D(d_in(oracle.softmax2d(logits), x))[:, 0], y,
                                                 cfg.lambda_adv, 0.0, ignore_index=ignore)
    out = {"loss_ce": ce, "loss_adv": adv}
    if images_u is not None:
        xu = images_u.double()
        logits_u = seg(xu)
        total_u, _, adv_u, semi, ratio = oracle.generator_loss(
            logits_u, D(d_in(oracle.softmax2d(logits_u), xu))[:, 0], None, cfg.lambda_semi_adv, cfg.lambda_semi,
            threshold=cfg.semi_threshold)
        if cfg.mode == "selftrain":  # L_semi on G's own confident argmax instead of where D is confident
            confidence, pseudo = torch.softmax(logits_u.detach(), 1).max(1)
            keep = confidence >= cfg.selftrain_threshold
            semi = F.cross_entropy(logits_u, torch.where(keep, pseudo, ignore), ignore_index=ignore)
            ratio = keep.double().mean()
            total_u = cfg.lambda_semi_adv * adv_u + cfg.lambda_semi * semi
        total = total + total_u
        out.update(loss_semi_adv=adv_u, loss_semi=semi, semi_ratio=ratio)
    grads_g = torch.autograd.grad(total, list(G.parameters()))
    out["grad_norm_g"] = torch.cat([g.flatten() for g in grads_g]).norm()

    fake, fake_images, fake_ignore = logits.detach(), x, y == ignore
    if images_u is not None and cfg.d_unlabelled:
        fake, fake_images = torch.cat([fake, logits_u.detach()]), torch.cat([x, xu])
        fake_ignore = torch.cat([fake_ignore, torch.zeros_like(fake_ignore)])
    real = oracle.one_hot2d(y, C, ignore)
    if cfg.d_real_smoothing:
        real = real * (1 - cfg.d_real_smoothing) + cfg.d_real_smoothing / C * (y != ignore).unsqueeze(1)
    d_fake = D(d_in(oracle.softmax2d(fake), fake_images))[:, 0]
    d_real = D(d_in(real, x))[:, 0]
    loss_d = oracle.discriminator_loss(d_fake, d_real, fake_ignore, y == ignore) / 2
    grads_d = torch.autograd.grad(loss_d, list(net_d.parameters()))
    out.update(loss_d=loss_d, grad_norm_d=torch.cat([g.flatten() for g in grads_d]).norm(),
               d_conf_fake=torch.sigmoid(d_fake)[~fake_ignore].mean(),
               d_conf_real=torch.sigmoid(d_real)[y != ignore].mean())
    return out, grads_g, grads_d


@pytest.mark.parametrize("case", [
    dict(mode="semi", ignore_index=255),
    dict(mode="semi", ignore_index=6, d_image=True, d_real_smoothing=0.1, d_unlabelled=False),
    dict(mode="adv", ignore_index=9),
    dict(mode="selftrain", ignore_index=255, d_strides=3),
    dict(mode="selftrain", ignore_index=7, d_image=True, d_unlabelled=False),
    dict(mode="semi", ignore_index=255, fused_upsampling=False),
    dict(mode="selftrain", ignore_index=255, fused_upsampling=False),
])
def test_train_step_is_the_papers_iteration_in_plain_pytorch(tmp_path, case):
    """train_step's losses and the updates it makes equal the paper's iteration written out in float64, with the
    class count given to it and the config's ignore_index (a value other than 255 included); selftrain is the same
    iteration with L_semi's pixels those where G's own max softmax >= selftrain_threshold."""
    from fastadvseg.models import FCDiscriminator
    from fastadvseg.utils.step import Nets, train_step

    import copy

    C, N, H, W, lr = 5, 2, 35, 41, 0.5
    cfg = tiny(tmp_path, semi_start=0, **case)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    G = torch.nn.Conv2d(3, C, 3, stride=2, padding=1)  # logits at half the label's size, as a segmenter's are smaller
    # as the pipeline builds it: with fused upsampling D returns its own map and the losses upsample G's and D's
    D = FCDiscriminator(C + (3 if cfg.d_image else 0), ndf=4, strides=cfg.d_strides, upsample=not cfg.fused_upsampling)
    G64, D64 = copy.deepcopy(G).double(), copy.deepcopy(D).double()
    G0, D0 = [p.detach().clone() for p in G.parameters()], [p.detach().clone() for p in D.parameters()]
    images, images_u = torch.randn(N, 3, H, W, generator=gen), torch.randn(N, 3, H, W, generator=gen)
    labels = torch.randint(0, C, (N, H, W), generator=gen)
    labels[torch.rand(N, H, W, generator=gen) < 0.2] = cfg.ignore_index
    nets = Nets(G, D, D_raw=D, opt_g=torch.optim.SGD(G.parameters(), lr=lr),
                opt_d=torch.optim.SGD(D.parameters(), lr=lr))
    unlabelled = images_u if cfg.mode in ("semi", "selftrain") else None
    with torch.no_grad():  # T_semi at the median confidence: L_semi keeps about half of the unlabelled pixels
        maps = torch.softmax(torch.nn.functional.interpolate(G(images_u), size=(H, W), mode="bilinear",
                                                             align_corners=True), 1)
        cfg.semi_threshold = float(torch.sigmoid(D(torch.cat([maps, images_u], 1) if cfg.d_image else maps)).median())
        # selftrain's threshold halfway between two neighbouring confidences at the median: no pixel sits on it
        confidence = maps.max(1).values.flatten().sort().values.double()
        k = len(confidence) // 2
        cfg.selftrain_threshold = float((confidence[k] + confidence[k + 1]) / 2)

    got = train_step(cfg, nets, 0, images, labels, unlabelled, num_classes=C)
    want, grads_g, grads_d = _paper_step_in_float64(G64, D64, cfg, C, images, labels, unlabelled)

    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-4, atol=1e-6, msg=key)
    if cfg.mode in ("semi", "selftrain"):
        assert 0.3 < float(want["semi_ratio"]) < 0.7
    for net, before, grads in (("G", G0, grads_g), ("D", D0, grads_d)):  # each net took one SGD step on its loss
        params = list((G if net == "G" else D).parameters())
        for i, (p, p0, g) in enumerate(zip(params, before, grads)):
            torch.testing.assert_close(p.detach().double(), p0.double() - lr * g, rtol=1e-4, atol=1e-6,
                                       msg=f"{net} parameter {i}")


def _segmenter_with_batchnorm(C):
    """Logits at half the label's size, with BatchNorm statistics for the teacher to average."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.BatchNorm2d(6),
                               torch.nn.ReLU(), torch.nn.Conv2d(6, C, 1))


def test_mean_teacher_step_in_plain_pytorch(tmp_path):
    """One mean_teacher iteration against its definition in float64: L_ce on the labelled batch; the teacher's
    argmax and max softmax on the unmixed unlabelled crops, each crop blended with its neighbour inside the box of
    the step (written out here with slices), the student's CE on the blended images against the blended
    pseudo-labels where the blended confidence >= teacher_threshold; the student's SGD step on the sum; then the
    teacher's EMA update, teacher <- decay teacher + (1 - decay) student, weights and BatchNorm statistics alike.
    D takes no step."""
    import copy

    import torch.nn.functional as F

    from fastadvseg.models import FCDiscriminator
    from fastadvseg.utils import step as step_mod
    from fastadvseg.utils.builders import build_teacher

    C, N, H, W, lr, step = 5, 3, 35, 41, 0.3, 4
    cfg = tiny(tmp_path, mode="mean_teacher", semi_start=step, teacher_decay=0.9, lambda_cutmix=0.7, ignore_index=9)
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    G, D = _segmenter_with_batchnorm(C), FCDiscriminator(C, ndf=4)
    teacher = build_teacher(cfg, G)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # a teacher that has drifted from the student, as after some steps
        for t in teacher.state_dict().values():
            if t.is_floating_point():
                t.add_(0.3 * torch.rand(t.shape, generator=gen))
    images, images_u = torch.randn(N, 3, H, W, generator=gen), torch.randn(N, 3, H, W, generator=gen)
    labels = torch.randint(0, C, (N, H, W), generator=gen)
    labels[torch.rand(N, H, W, generator=gen) < 0.2] = cfg.ignore_index
    seg = lambda net, im: F.interpolate(net(im), size=(H, W), mode="bilinear", align_corners=True)
    G64, T64 = copy.deepcopy(G).double(), copy.deepcopy(teacher).double()
    with torch.no_grad():
        confidence, pseudo = torch.softmax(seg(T64, images_u.double()), 1).max(1)
    sorted_conf = confidence.flatten().sort().values
    k = len(sorted_conf) // 2  # the threshold between two neighbouring confidences: no pixel sits on it
    cfg.teacher_threshold = float((sorted_conf[k] + sorted_conf[k + 1]) / 2)
    G0, D0 = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    T0 = {k: v.double() for k, v in teacher.state_dict().items()}
    nets = step_mod.Nets(G, D, D_raw=D, opt_g=torch.optim.SGD(G.parameters(), lr=lr),
                         opt_d=torch.optim.SGD(D.parameters(), lr=lr), teacher=teacher)

    got = step_mod.train_step(cfg, nets, step, images, labels, images_u, num_classes=C)

    boxes = step_mod.cutmix_boxes(N, (H, W), step_mod._cutmix_generator(cfg, step))
    mixed, mixed_conf, mixed_label = images_u.double().clone(), confidence.clone(), pseudo.clone()
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        j = (i - 1) % N
        rows, cols = slice(top, top + h), slice(left, left + w)
        mixed[i, :, rows, cols] = images_u.double()[j, :, rows, cols]
        mixed_conf[i, rows, cols], mixed_label[i, rows, cols] = confidence[j, rows, cols], pseudo[j, rows, cols]
    keep = mixed_conf >= cfg.teacher_threshold
    ce = F.cross_entropy(seg(G64, images.double()), labels, ignore_index=cfg.ignore_index)
    cutmix = F.cross_entropy(seg(G64, mixed), torch.where(keep, mixed_label, cfg.ignore_index),
                             ignore_index=cfg.ignore_index)
    grads = torch.autograd.grad(ce + cfg.lambda_cutmix * cutmix, list(G64.parameters()))
    want = {"loss_ce": ce, "loss_cutmix": cutmix, "semi_ratio": keep.double().mean(),
            "grad_norm_g": torch.cat([g.flatten() for g in grads]).norm()}
    assert set(got) == set(want) and 0.2 < float(want["semi_ratio"]) < 0.8
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-4, atol=1e-6, msg=key)
    for (name, p), p0, g in zip(G.named_parameters(), [G0[n] for n, _ in G.named_parameters()], grads):
        torch.testing.assert_close(p.detach().double(), p0.double() - lr * g, rtol=1e-4, atol=1e-6, msg=name)
    buffers64 = dict(G64.named_buffers())
    for name, v in G.named_buffers():  # BatchNorm statistics of both student passes, in float64 too
        torch.testing.assert_close(v.double(), buffers64[name].double(), rtol=1e-4, atol=1e-6, msg=name)
    student = G.state_dict()
    for name, t in teacher.state_dict().items():
        if t.is_floating_point():
            want_t = cfg.teacher_decay * T0[name] + (1 - cfg.teacher_decay) * student[name].double()
            torch.testing.assert_close(t.double(), want_t, rtol=1e-6, atol=1e-7, msg=f"teacher {name}")
        else:
            assert torch.equal(t, student[name]), name  # BatchNorm's batch count: the student's
    assert all(torch.equal(v, D0[k]) for k, v in D.state_dict().items())  # no adversarial terms, no D step


def test_cutmix_blends_images_labels_and_confidences_with_the_same_box():
    from fastadvseg.utils.step import box_masks, cutmix, cutmix_boxes

    gen = torch.Generator().manual_seed(3)
    N, H, W = 4, 7, 9
    boxes = torch.tensor([[0, 0, 4, 5], [3, 4, 4, 5], [2, 1, 1, 9], [0, 0, 7, 9]])  # corners, a full row, everything
    x, conf = torch.randn(N, 2, H, W, generator=gen), torch.rand(N, H, W, generator=gen)
    label = torch.randint(0, 5, (N, H, W), generator=gen)
    inside = box_masks(boxes, (H, W))
    for t in (x, conf, label):
        want = t.clone()
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            want[i, ..., top:top + h, left:left + w] = t[i - 1, ..., top:top + h, left:left + w]
        assert torch.equal(cutmix(t, inside), want)

    # French et al.'s box: half the crop (up to rounding), aspect ratios of 1:2 to 2:1, inside the crop
    H, W = 64, 48
    draws = cutmix_boxes(500, (H, W), torch.Generator().manual_seed(5))
    top, left, h, w = draws.unbind(1)
    assert ((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W)).all()
    area = (h * w).double() / (H * W)
    assert (area - 0.5).abs().max() < (H + W) / (H * W) and abs(float(area.mean()) - 0.5) < 0.01
    assert float(h.min()) <= 0.55 * H and float(h.max()) >= 0.95 * H  # the aspect ratio varies
    assert len({(int(a), int(b)) for a, b in zip(top, left)}) > 100  # and so does the place
    again = cutmix_boxes(500, (H, W), torch.Generator().manual_seed(5))
    assert torch.equal(draws, again)


def test_a_mean_teacher_checkpoint_without_its_teacher_is_refused(tmp_path):
    run = train_mod.train(tiny(tmp_path, mode="mean_teacher", steps=1))["run_dir"]
    path = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(path, weights_only=True)
    del state["teacher"]
    torch.save(state, path)
    cfg, resume = train_mod.parse_cli(["--resume", run, "--steps", "2"])
    with pytest.raises(ConfigError, match="holds no mean teacher"):
        train_mod.train(cfg, resume)


def _interrupt_at(monkeypatch, at_step):
    real = train_mod.train_step

    def step_then_signal(cfg, nets, step, *a, **k):
        out = real(cfg, nets, step, *a, **k)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the loop must finish the step and save
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


@pytest.mark.parametrize("mode, stop_after", [("semi", 1), ("mean_teacher", 2)])
def test_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch, mode, stop_after):
    kw = dict(mode=mode, steps=4, eval_every=2, checkpoint_every=3)
    full = train_mod.train(tiny(tmp_path, "full", **kw))
    _interrupt_at(monkeypatch, stop_after - 1)
    part = train_mod.train(tiny(tmp_path, "part", **kw))
    assert part["interrupted"] and part["step"] == stop_after
    assert last_state(part["run_dir"])["step"] == stop_after
    monkeypatch.undo()
    cfg, resume = train_mod.parse_cli(["--resume", part["run_dir"]])
    resumed = train_mod.train(cfg, resume)
    a, b = last_state(full["run_dir"]), last_state(part["run_dir"])
    assert a["step"] == b["step"] == 4
    nets = ("G", "D", "teacher") if mode == "mean_teacher" else ("G", "D")
    for net in nets:
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"
    if mode == "mean_teacher":  # the teacher is an average of the student's past, not a copy of it
        assert not all(torch.equal(v, a["G"][k]) for k, v in a["teacher"].items())
    for k, v in a["opt_g"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["opt_g"]["state"][k]["momentum_buffer"])
    for k, v in a["opt_d"]["state"].items():
        assert torch.equal(v["exp_avg"], b["opt_d"]["state"][k]["exp_avg"])
    assert resumed["miou"] == full["miou"] and a["best_miou"] == b["best_miou"]
    strip = lambda recs: [{k: v for k, v in r.items()} for r in recs]
    ra = strip(read_metrics(os.path.join(full["run_dir"], "metrics.jsonl")))
    rb = strip(read_metrics(os.path.join(part["run_dir"], "metrics.jsonl")))
    assert ra == rb  # the resumed run's log reads like the uninterrupted one (no duplicated steps)


def test_refuses_to_overwrite_a_run(tmp_path):
    train_mod.train(tiny(tmp_path, "same", steps=1, mode="baseline"))
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train_mod.train(tiny(tmp_path, "same", steps=1, mode="baseline"))


def test_checkpoint_write_failing_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt_mod.atomic_save({"step": 1, "w": torch.arange(10)}, path)
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        ckpt_mod.atomic_save({"step": 2, "w": torch.zeros(10)}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    state = torch.load(path, weights_only=False)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(10))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_checkpoint_killed_during_write_keeps_a_loadable_file(tmp_path):
    path = str(tmp_path / "last.pt")
    child = textwrap.dedent(f"""
        import sys, torch
        from fastadvseg.utils.checkpoint import atomic_save
        big = torch.randn(4_000_000)
        atomic_save({{"step": 0, "w": big}}, {path!r})
        print("ready", flush=True)
        step = 1
        while True:
            atomic_save({{"step": step, "w": big}}, {path!r})
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    state = torch.load(path, weights_only=False)
    assert state["w"].numel() == 4_000_000 and state["step"] >= 0


# ---- config ----

def test_config_file_overrides_and_errors(tmp_path):
    cfg = load_config("voc_1_8")
    assert (cfg.model, cfg.batch_size, cfg.crop_size, cfg.steps) == ("deeplabv2_resnet101", 10, (321, 321), 20000)
    assert (cfg.lambda_adv, cfg.lambda_semi, cfg.lambda_semi_adv, cfg.semi_threshold) == (0.01, 0.1, 0.001, 0.2)
    assert (cfg.semi_start, cfg.labelled_fraction, cfg.val_pad, cfg.mode) == (5000, 0.125, 505, "semi")
    assert (cfg.lr, cfg.lr_d, cfg.betas_d, cfg.power, cfg.momentum) == (2.5e-4, 1e-4, (0.9, 0.99), 0.9, 0.9)
    assert (cfg.head_lr_mult, cfg.weight_decay, cfg.ndf) == (10.0, 5e-4, 64)
    assert all(load_config(name).batchnorm == "frozen_affine" for name in ("voc_1_8", "voc_1_4", "voc_1_2", "voc_full"))
    cs = load_config("cityscapes_1_4")
    assert (cs.crop_size, cs.batch_size, cs.steps, cs.labelled_fraction) == ((512, 1024), 2, 40000, 0.25)
    assert cs.batchnorm == "frozen" and TrainConfig().batchnorm == "live" and TrainConfig().ignore_index == 255
    assert set(shipped_configs()) >= {"voc_1_8", "voc_1_4", "voc_1_2", "voc_full", "cityscapes_1_8",
                                      "cityscapes_1_4", "synthetic"}
    assert load_config("synthetic") == TrainConfig()  # the shipped file documents the no-argument default
    path = tmp_path / "my.yaml"
    path.write_text("steps: 7\nmode: adv\ncrop_size: [65, 97]\n")
    ov = parse_overrides(["--steps", "9", "--mirror=false", "--val_pad", "none", "--channels_last", "--lr", "1e-3"])
    cfg = load_config(str(path), ov)
    assert (cfg.steps, cfg.mode, cfg.crop_size, cfg.mirror, cfg.val_pad, cfg.channels_last, cfg.lr) == \
        (9, "adv", (65, 97), False, None, True, 1e-3)
    assert load_config(None, {"crop_size": "65"}).crop_size == (65, 65)
    with pytest.raises(ConfigError, match="unknown config key 'stpes'.*steps"):
        parse_overrides(["--stpes", "3"])
    with pytest.raises(ConfigError, match="steps.*'many'"):
        load_config(None, {"steps": "many"})
    with pytest.raises(ConfigError, match="mode='semisup'"):
        load_config(None, {"mode": "semisup"})
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(str(path), {"bogus": 1})
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config("voc_1_16")


def test_settings_of_an_earlier_version_keep_their_meaning(tmp_path):
    from fastadvseg.config import from_dict

    old = tmp_path / "old.yaml"
    old.write_text("freeze_bn: true\nsteps: 7\n")
    assert load_config(str(old)).batchnorm == "frozen"
    assert load_config(None, parse_overrides(["--freeze_bn"])).batchnorm == "frozen"
    assert load_config(str(old), parse_overrides(["--freeze_bn", "false"])).batchnorm == "live"
    assert load_config(str(old), {"batchnorm": "frozen_affine"}).batchnorm == "frozen_affine"  # later layers win
    with pytest.raises(ConfigError, match="freeze_bn and batchnorm: .*give only batchnorm"):
        from_dict({"freeze_bn": True, "batchnorm": "live"})
    with pytest.raises(ConfigError, match="freeze_bn: cannot use 'sometimes' as bool"):
        load_config(None, {"freeze_bn": "sometimes"})
    # a checkpoint's config written with the old key is the same run as the config.yaml written with the new one
    assert ckpt_mod.config_differences({"freeze_bn": True}, {"batchnorm": "frozen"}) == {}
    assert ckpt_mod.config_differences({"freeze_bn": False}, {}) == {}
    assert ckpt_mod.config_differences({"freeze_bn": False}, {"batchnorm": "frozen_affine"}) == \
        {"batchnorm": ("live", "frozen_affine")}


def test_cli_reports_a_bad_key(capsys):
    assert train_mod.main(["--learning_rate", "0.1"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_evaluate_cli_on_a_run(tmp_path, capsys):
    out = train_mod.train(tiny(tmp_path, "ev", steps=2, mode="baseline"))
    capsys.readouterr()
    assert evaluate_mod.main(["--run", out["run_dir"], "--out", str(tmp_path / "ev_out")]) == 0
    printed = capsys.readouterr().out
    assert "| background |" in printed and "mIoU" in printed
    report = json.load(open(tmp_path / "ev_out" / "eval.json"))
    assert report["miou"] == pytest.approx(out["miou"], abs=0) and "background" in report["iou"]
    assert evaluate_mod.main(["--checkpoint", os.path.join(out["run_dir"], "checkpoints", "last.pt"),
                              "--config", os.path.join(out["run_dir"], "config.yaml"),
                              "--out", str(tmp_path / "ev2")]) == 0
    assert json.load(open(tmp_path / "ev2" / "eval.json"))["miou"] == report["miou"]


def test_bf16_autocast_channels_last_workers_and_auto_backend(tmp_path):
    out = train_mod.train(tiny(tmp_path, "fast", steps=2, amp="bf16", channels_last=True, num_workers=1,
                               loss_backend="auto"))
    records = read_metrics(os.path.join(out["run_dir"], "metrics.jsonl"))
    assert _finite([r for r in records if r["kind"] == "train"], "loss_d") and 0.0 <= out["miou"] <= 1.0


def test_data_order_does_not_depend_on_workers_or_resume_point():
    from fastadvseg.data import build_data
    from fastadvseg.utils.sampling import StepBatches, step_loader

    bundle = build_data("synthetic", crop_size=(33, 33), val_limit=1)
    batches = StepBatches(bundle.labelled, 4, seed=7, stream="labelled")
    straight = [b for b in step_loader(batches, 0, 4)]
    resumed = [b for b in step_loader(batches, 2, 4, num_workers=1)]
    for a, b in zip(straight[2:], resumed):
        assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a rank's share of the global batch: the two halves make up the one-process batch
    halves = [StepBatches(bundle.labelled, 4, 7, "labelled", rank=r, world_size=2)[3] for r in (0, 1)]
    assert halves[0][2] + halves[1][2] == straight[3][2]
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), straight[3][0])


def test_val_pad_protocol_scores_like_unpadded_images():
    from fastadvseg.data import build_data
    from fastadvseg.evaluate import evaluate
    from fastadvseg.models import build_segmenter

    torch.manual_seed(0)
    G = build_segmenter("deeplabv2_compact", 8)
    plain = build_data("synthetic", val_limit=3).val
    padded = build_data("synthetic", val_pad=121, val_limit=3).val
    assert padded[0][0].shape[-1] == 121 and plain[0][0].shape[-1] == 96
    cfg_pad = load_config(None, {"val_pad": 121})
    a = evaluate(G, plain, 8, device="cpu", batch_size=1)
    b = evaluate(G, padded, 8, device="cpu", batch_size=3, cfg=cfg_pad)
    assert a.num_pixels == b.num_pixels  # the padding is never scored
    assert abs(a.miou - b.miou) < 0.05  # the net sees a padded image, but scores only the original extent


def test_cli_sigint_saves_and_resume_finishes(tmp_path):
    args = [sys.executable, "-m", "fastadvseg.train", "--run_root", str(tmp_path), "--name", "cli", "--crop_size", "33",
            "--batch_size", "2", "--steps", "200", "--val_limit", "2", "--ndf", "8", "--log_every", "1",
            "--eval_every", "0", "--checkpoint_every", "0", "--plots", "false", "--loss_backend", "reference"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/200"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 130, rest  # 128 + SIGINT, after saving
    finally:
        proc.kill()
    assert "SIGINT: finishing this step" in rest and "--resume" in rest
    run = tmp_path / "cli"
    step = last_state(str(run))["step"]
    assert 2 <= step < 200
    done = subprocess.run([sys.executable, "-m", "fastadvseg.train", "--resume", str(run), "--steps", str(step + 2)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {run} at step {step}" in done.stdout and "| background |" in done.stdout
    assert last_state(str(run))["step"] == step + 2


def test_runs_saved_before_fused_upsampling_resume_without_it():
    """A checkpoint written before the fused_upsampling setting existed ran the losses on upsampled logits: it
    resumes with fused_upsampling false (bit-identical to its own past), the resume is not refused as a change,
    and new runs default to the fused path."""
    from fastadvseg.config import TrainConfig, saved_config
    from fastadvseg.utils.checkpoint import config_differences

    old = TrainConfig().to_dict()
    del old["fused_upsampling"]
    resumed = saved_config(old)
    assert resumed.fused_upsampling is False and TrainConfig().fused_upsampling is True
    assert config_differences(old, resumed.to_dict()) == {}
    assert config_differences(old, TrainConfig().to_dict()) == {"fused_upsampling": (None, True)}
