"""Experiments built on ``fastadvseg.train``: ``python -m fastadvseg.experiments.table`` sweeps the paper's table
(baseline / adv / adv+semi x label fraction x seed) and writes table.md, table.png and results.json."""
