"""fastadvseg's benchmark suite: fused losses vs the eager PyTorch composition and torch.compile.

* ``python -m benchmarks.report`` -- the runner: write ``results/<machine>-<date>.{md,json,png}``;
* ``pytest benchmarks/ --benchmark-only`` -- the report's per-op cases under pytest-benchmark;
* ``python -m benchmarks.render`` -- rewrite a results file's Markdown and PNG, or print the README's summary.

Modules: ``shapes``, ``reference_ops`` (the eager composition a user writes today), ``cases`` (inputs, impls and
byte model of every op), ``timing``, ``env`` (the machine and versions), ``targets`` (how far a run can
be trusted, the targets met or not), ``overhead`` (per-call cost), ``memory`` (CPU peak RSS),
``train_step`` (training iterations: the pipeline's step, allocators, the authors' loop of ``authors_loop``).
Importing this package imports neither fastadvseg nor triton, so ``report`` can set ``TRITON_INTERPRET`` first.
"""
