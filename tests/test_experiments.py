"""The paper-table sweep (python -m fastadvseg.experiments.table) on a tiny sweep: outputs, skip, resume, crashes."""
import json
import math
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
    # D's loss is recorded in every phase (the balance of D and G is read from it), a finite BCE
    logged = [d for d in semi["diagnostics"].values() if d["d_conf_fake"] is not None]
    assert logged and all(d["loss_d"] is not None and 0 <= d["loss_d"] < 10 for d in logged), semi["diagnostics"]
    with open(os.path.join(out, "table.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| baseline (L_ce) |" in md and "66.0" in md and "(n=1)" in md and res["command"] in md
    assert md.index("held-out test split") < md.index("on the val set") and "D conf. on predictions" in md
    assert "| adv+semi − baseline | 2 |" in md  # pooled over the two fractions, on test and on val
    assert [(p["a"], p["b"], p["n"]) for p in res["pooled_test"]] == [("semi", "baseline", 2)]
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


def test_the_controls_run_in_a_sweep_with_their_own_overrides(tmp_path):
    """selftrain and mean_teacher cells train, take the sweep's overrides (new keys included), log their kept
    fraction into the diagnostics, and are compared with the baseline in the pooled differences."""
    out = str(tmp_path / "sweep")
    argv = ["--out", out, "--modes", "baseline", "selftrain", "mean_teacher", "--fractions", "1/8", "--seeds", "1",
            "--steps", "4", "--jobs", "2", "--d_strides", "3", "--teacher_decay", "0.9", *TINY]
    assert table.main(argv) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["done"] == res["total"] == 3
    for mode in ("selftrain", "mean_teacher"):
        cfg = load_config(os.path.join(out, "cells", f"{mode}_1-8_s0", "config.yaml"))
        assert (cfg.mode, cfg.d_strides, cfg.teacher_decay, cfg.semi_start) == (mode, 3, 0.9, 1)
        row = next(r for r in res["cells"] if r["mode"] == mode)
        kept = [d["semi_ratio"] for d in row["diagnostics"].values() if d["semi_ratio"] is not None]
        assert kept and all(0 <= k <= 1 for k in kept)
        shares = [d["semi_share"] for d in row["diagnostics"].values() if d["semi_share"] is not None]
        assert shares and all(0 <= v < 1 for v in shares)
    teacher_diag = next(r for r in res["cells"] if r["mode"] == "mean_teacher")["diagnostics"]
    assert all(d["d_conf_fake"] is None for d in teacher_diag.values())  # no discriminator step in this mode
    assert [(p["a"], p["b"], p["n"]) for p in res["pooled_test"]] == [("selftrain", "baseline", 1),
                                                                      ("mean_teacher", "baseline", 1)]
    md = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert "| adv+selftrain (" in md and "| CutMix mean teacher (" in md and "| Δ mean_teacher − baseline" in md
    assert "| CutMix mean teacher | 1/8 |" in md  # its diagnostics rows


def test_pooled_differences_against_a_hand_computed_example():
    # test mIoU of baseline and adv at two fractions x 3 seeds, adv+semi at 1/8 for two seeds
    scores = {("baseline", "1/8"): (0.30, 0.32, 0.28), ("baseline", "1/4"): (0.35, 0.36, 0.34),
              ("adv", "1/8"): (0.31, 0.34, 0.27), ("adv", "1/4"): (0.38, 0.355, 0.35), ("semi", "1/8"): (0.33, 0.30)}
    rows = [{"mode": m, "fraction": f, "seed": s, "test_miou": v}
            for (m, f), vals in scores.items() for s, v in enumerate(vals)]
    pooled = table.pooled_differences(rows, ["baseline", "adv", "semi", "mean_teacher"], "test_miou")
    assert [(p["a"], p["b"]) for p in pooled] == [("adv", "baseline"), ("semi", "adv"), ("semi", "baseline"),
                                                 ("mean_teacher", "baseline"), ("mean_teacher", "semi")]
    adv = pooled[0]  # differences 1, 2, -1, 3, -0.5, 1 points
    mean, var = 5.5 / 6, 11.208333333 / 5
    half = 2.5705818 * math.sqrt(var / 6)  # t(0.975, 5 degrees of freedom), from a table
    assert (adv["n"], adv["positive"]) == (6, 4)
    assert adv["mean"] == pytest.approx(mean) and adv["std"] == pytest.approx(math.sqrt(var))
    assert adv["ci95"] == pytest.approx((mean - half, mean + half), abs=1e-6)
    semi = pooled[1]  # differences 2, -4: the seeds adv+semi lacks are left out
    assert (semi["n"], semi["positive"], semi["mean"]) == (2, 1, pytest.approx(-1.0))
    assert semi["ci95"] == pytest.approx((-1 - 12.7062047 * 3, -1 + 12.7062047 * 3), abs=1e-5)  # t(0.975, 1)
    assert pooled[3]["n"] == 0 and pooled[3]["ci95"] is None
    lines = table._pooled_rows(pooled)
    assert "| adv − baseline | 6 | +0.92 | [-0.65, +2.49] | 4 of 6 |" in lines
    assert "| CutMix mean teacher − baseline | 0 | – | – | – |" in lines
    for df, t in ((1, 12.7062047), (4, 2.7764451), (14, 2.1447867), (60, 2.0002978)):  # a t table's values
        assert table.t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)


def test_sweep_options():
    assert table.parse_fraction("0.125") == "1/8" and table.parse_fraction("1") == "1"
    with pytest.raises(ValueError):
        table.parse_fraction("1.5")
    cells = table.build_cells(["baseline", "adv", "semi"], ["1/8", "1"], range(2))
    assert len(cells) == 10  # semi at fraction 1 has no unlabelled images: it would repeat adv
    cells = table.build_cells(["baseline", "selftrain", "mean_teacher"], ["1/8", "1"], range(1))
    assert [c.name for c in cells] == ["baseline_1-8_s0", "selftrain_1-8_s0", "mean_teacher_1-8_s0", "baseline_1_s0"]
    assert table.build_parser().parse_args([]).modes == ["baseline", "adv", "semi"]  # the paper's table
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
