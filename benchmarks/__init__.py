"""fastadvseg's benchmark suite: fused losses vs the eager PyTorch composition and torch.compile.

* ``python -m benchmarks.report``      -- run a shape set, write ``results/<machine>-<date>.{md,json,png}``;
* ``pytest benchmarks/ --benchmark-only`` -- the same cases as a pytest-benchmark suite;
* ``python -m benchmarks.readme_table`` -- print the README summary: the newest run of each machine;
* ``python -m benchmarks.render FILE.json`` -- rewrite a results file's Markdown and PNG.

Modules: ``shapes`` (shape sets), ``reference_ops`` (the eager composition a user writes today), ``cases`` (inputs,
implementations and the byte model of every op), ``timing`` (timers, peak memory, copy bandwidth), ``env`` (the
machine and versions recorded with every result), ``targets`` (the performance targets, met / not met),
``quality`` (the run's load and spread, ratios the spreads cannot decide), ``e2e`` (one training iteration,
images/s). Importing this package imports neither fastadvseg nor triton, so ``report`` can set
``TRITON_INTERPRET`` first.
"""
