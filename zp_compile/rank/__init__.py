"""The rank side of ``zp-compile serve``: one process per device, run under torchrun.

- ``worker.py``: the rank's life (rendezvous, load, warm-up, the step loop) and ``python -m zp_compile.rank``;
- ``warmup.py``: making a loaded rank ready (packed or padded, the compiles a first request would pay);
- ``step.py``: the step function (``run_step``) and the readouts;
- ``kv_cache.py``: the rank's prefix KV cache and the packed step's inputs;
- ``packed.py``: packed variable-length attention (one row of tokens per step, no padding).

It talks to the front end only through ``zp_compile.contract`` and ``zp_compile.prefix``.
"""
