"""What makes a training run trustworthy, kept out of the loop itself (``fastadvseg/train.py``):

* ``builders``    - config -> data, networks, optimisers, poly schedule, autocast; the shared forward pass
* ``sampling``    - batches and augmentation derived from (seed, step): exact resume, any number of workers
* ``step``        - one G + D iteration of the paper's method
* ``checkpoint``  - complete checkpoints (models, optimisers, RNG, step, best mIoU), written atomically, checked
  before use (readable, finite, of this run, resume overrides that keep their meaning)
* ``lock``        - one process per run directory
* ``log``         - metrics.jsonl, the progress line (window means), optional TensorBoard
* ``plots``       - loss / mIoU curves and the prediction + discriminator-confidence figure
* ``distributed`` - torchrun / DDP setup and a clean teardown
* ``allocator``   - the memory allocator of the programs' own processes (freed buffers reused, not faulted in anew)
"""
