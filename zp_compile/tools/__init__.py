"""Tools around the library, not the library itself: the load generator (``bench_serve``, behind
``zp-compile bench-serve``), the paper-like request mix (``workloads``), trace analysis for the overlap
benchmark (``profiling``) and the end-to-end demo (``torchrun -m zp_compile.tools.demo``)."""
