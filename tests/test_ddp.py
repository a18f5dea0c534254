"""torchrun with 2 CPU processes (gloo): DistributedDataParallel training and all-reduced evaluation."""
import json
import os
import subprocess
import sys

import torch

from fastadvseg.config import load_config
from fastadvseg.evaluate import evaluate
from fastadvseg.train import train
from fastadvseg.utils.builders import build_bundle, build_segmenter_for_eval
from fastadvseg.utils.checkpoint import read_training_state, resolve_checkpoint
from fastadvseg.utils.log import read_metrics

ARGS = {"crop_size": "33,33", "batch_size": "2", "steps": "2", "val_limit": "6", "eval_batch_size": "2", "ndf": "8",
        "log_every": "1", "eval_every": "0", "plots": "false", "device": "cpu", "loss_backend": "reference",
        "mode": "semi", "semi_start": "1", "batchnorm": "frozen", "lr": "2.5e-4", "head_lr_mult": "10"}


def test_two_process_gloo_matches_one_process(tmp_path):
    argv = [f"--{k}={v}" for k, v in ARGS.items()] + [f"--run_root={tmp_path}", "--name=ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastadvseg.train", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert proc.stdout.count("| background |") == 1  # only rank 0 reports
    ddp_eval = json.load(open(run / "eval.json"))

    # The all-reduced confusion matrix of 2 ranks (3 val images each) == one process scoring all 6 images.
    cfg = load_config(str(run / "config.yaml"))
    bundle = build_bundle(cfg)
    G = build_segmenter_for_eval(cfg, bundle, str(run / "checkpoints" / "last.pt"), torch.device("cpu"))
    single = evaluate(G, bundle.val, bundle.num_classes, device="cpu", batch_size=2, cfg=cfg)
    assert single.to_dict(bundle.class_names) == {k: ddp_eval[k] for k in single.to_dict(bundle.class_names)}

    # Training: each rank takes half of the global batch and DDP averages the gradients, so one process with the
    # same global batch reaches nearly the same model. Not bit-identical: DDP averages the two shards' loss means,
    # one process takes the mean over all pixels (the shards have different numbers of ignored pixels). SGD moves
    # G by lr x that small gradient difference; Adam moves each D weight by at most ~lr_d per step whatever the
    # gradient, so near-zero D gradients may step differently: bound D by 2 * lr_d * steps.
    one = train(load_config(None, {**ARGS, "run_root": str(tmp_path), "name": "one"}))
    a, b = (read_training_state(resolve_checkpoint(str(r))) for r in (run, one["run_dir"]))
    for k, v in a["G"].items():
        torch.testing.assert_close(v, b["G"][k], rtol=0, atol=2e-5, msg=f"G.{k}")
    for k, v in a["D"].items():
        torch.testing.assert_close(v, b["D"][k], rtol=0, atol=2 * 1e-4 * 2 + 1e-6, msg=f"D.{k}")
    la = [r["loss_ce"] for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "train"]
    lb = [r["loss_ce"] for r in read_metrics(os.path.join(one["run_dir"], "metrics.jsonl")) if r["kind"] == "train"]
    assert len(la) == len(lb) == 2
    # rank 0 logs its own shard's loss; the two shards' mean is the one-process loss
    assert all(abs(x - y) < 0.5 for x, y in zip(la, lb))
