"""The paper-table sweep (python -m fastadvseg.experiments.table) on a tiny sweep: outputs, skip, resume, crashes."""
import json
import os
import signal

import pytest

import fastadvseg.train as train_mod
from fastadvseg.config import load_config, parse_overrides
from fastadvseg.experiments import table
from fastadvseg.utils.checkpoint import read_checkpoint, resolve_checkpoint
from fastadvseg.utils.log import read_metrics

TINY = ["--crop_size", "33,33", "--batch_size", "2", "--val_limit", "4", "--eval_batch_size", "4", "--ndf", "8",
        "--eval_every", "0", "--checkpoint_every", "1", "--plots", "false", "--log_every", "1"]
STEPS = 3


def _commands_run(log_path):
    if not os.path.isfile(log_path):
        return 0
    with open(log_path, encoding="utf-8") as f:
        return sum(line.startswith("$ ") for line in f)


def _interrupted_cell(out, cell, monkeypatch):
    """Train ``cell`` exactly as the sweep would, stopped by SIGTERM after its first step (a checkpoint, no result)."""
    overrides = {"dataset": "synthetic", **parse_overrides(TINY), "num_threads": "1", "semi_start": str(STEPS // 4),
                 "eval_test": "true"}
    args = table.train_args(cell, STEPS, overrides, os.path.join(out, "cells"))
    cfg = load_config(None, parse_overrides(args))
    real = train_mod.train_step

    def step_then_signal(cfg, nets, step, *a, **k):
        result = real(cfg, nets, step, *a, **k)
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    res = train_mod.train(cfg)
    monkeypatch.undo()
    assert res["interrupted"] and res["step"] == 1
    return res["run_dir"]


def test_tiny_sweep_writes_table_skips_done_cells_and_resumes_a_partial_one(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--out", out, "--modes", "baseline", "semi", "--fractions", "1/8", "1/2", "--seeds", "1",
            "--steps", str(STEPS), "--jobs", "2", *TINY]
    partial = _interrupted_cell(out, table.Cell("semi", "1/8", 0), monkeypatch)
    assert table.cell_state(partial) == "partial"

    assert table.main(argv) == 0
    logs = os.path.join(out, "logs")
    names = ["baseline_1-8_s0", "semi_1-8_s0", "baseline_1-2_s0", "semi_1-2_s0"]
    assert all(table.cell_state(os.path.join(out, "cells", n)) == "done" for n in names)
    # the partial cell continued from its checkpoint instead of starting again
    with open(os.path.join(logs, "semi_1-8_s0.log"), encoding="utf-8") as f:
        assert "--resume" in f.read()
    assert read_checkpoint(resolve_checkpoint(partial))["step"] == STEPS
    steps = [r["step"] for r in read_metrics(os.path.join(partial, "metrics.jsonl")) if r.get("kind") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS

    # outputs exist and parse
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["done"] == res["total"] == 4 and "--jobs 2" in res["command"]
    assert {r["cell"] for r in res["cells"]} == set(names)
    assert all(0 <= r["miou"] <= 1 and r["split_seed"] == 0 and r["train_seed"] == 1234 for r in res["cells"])
    assert res["aggregate"]["cells"]["semi"]["1/2"]["n"] == 1
    # the reported score is the final model's on the held-out test split; the val scores stay beside it
    assert all(0 <= r["test_miou"] <= 1 for r in res["cells"]) and res["aggregate_test"]["cells"]["semi"]["1/2"]["n"] == 1
    semi = next(r for r in res["cells"] if r["cell"] == "semi_1-8_s0")
    assert all(set(d) == set(table.DIAG_KEYS) for d in semi["diagnostics"].values())
    with open(os.path.join(out, "table.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| baseline (L_ce) |" in md and "66.0" in md and "(n=1)" in md and res["command"] in md
    assert md.index("held-out test split") < md.index("on the val set") and "D conf. on predictions" in md
    with open(os.path.join(out, "table.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a re-run starts no training process
    before = {n: _commands_run(os.path.join(logs, n + ".log")) for n in names}
    capsys.readouterr()
    assert table.main(argv) == 0
    assert "4 done" in capsys.readouterr().out
    assert {n: _commands_run(os.path.join(logs, n + ".log")) for n in names} == before

    # --report-only rewrites the table from what is on disk
    os.remove(os.path.join(out, "table.md"))
    assert table.main(argv + ["--report-only"]) == 0
    assert os.path.isfile(os.path.join(out, "table.md"))


def test_a_crashing_cell_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    rc = table.main(["--out", out, "--modes", "baseline", "--fractions", "1/8", "1/4", "--seeds", "1",
                     "--steps", "2", "--jobs", "2", *TINY, "--pretrained", str(tmp_path / "missing.pt")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED: baseline_1-8_s0" in err and "FAILED: baseline_1-4_s0" in err
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["done"] == 0 and all(r["last_status"].startswith("failed") for r in res["cells"])
    assert "–" in open(os.path.join(out, "table.md"), encoding="utf-8").read()


def test_sweep_options():
    assert table.parse_fraction("0.125") == "1/8" and table.parse_fraction("1") == "1"
    with pytest.raises(ValueError):
        table.parse_fraction("1.5")
    cells = table.build_cells(["baseline", "adv", "semi"], ["1/8", "1"], range(2))
    assert len(cells) == 10  # semi at fraction 1 has no unlabelled images: it would repeat adv
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major: whole tables first
    args = table.train_args(table.Cell("adv", "1/4", 2), 50, {"ndf": "8"}, "d")
    cfg = load_config(None, parse_overrides(args))
    assert (cfg.seed, cfg.split_seed, cfg.labelled_fraction, cfg.mode, cfg.steps, cfg.ndf) == (1236, 2, 0.25, "adv", 50, 8)
    rows = [{"mode": "baseline", "fraction": "1/8", "seed": s, "miou": v} for s, v in ((0, 0.2), (1, 0.3))]
    rows += [{"mode": "semi", "fraction": "1/8", "seed": s, "miou": v} for s, v in ((0, 0.25), (1, 0.33))]
    agg = table.aggregate(rows, ["baseline", "semi"], ["1/8"])
    assert agg["cells"]["baseline"]["1/8"]["mean"] == pytest.approx(25.0)
    assert agg["cells"]["baseline"]["1/8"]["std"] == pytest.approx(7.0710678)
    assert agg["delta_vs_baseline"]["semi"]["1/8"]["mean"] == pytest.approx(4.0)
    assert table.main(["--seed", "3"]) == 2  # set per cell by the sweep
