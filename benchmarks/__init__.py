"""The benchmark suite of qlora-ref (``pytest benchmarks/``; on a GPU ``python -m benchmarks.run_gpu``).

Modules: ``adapters`` (each registry provider's native calls), ``cases`` (what is timed, its
check against the oracle, its bytes and FLOPs), ``checks`` (the comparisons), ``ceilings`` (a
copy and a matmul measured in the same run), ``memory_model`` (stored bytes and one layer's
memory), ``timing`` (timers), ``results`` (the JSON format), ``run_gpu`` (the GPU script),
``kernel_report`` (the Triton kernels compiled for sm_80/sm_90 without a GPU: SASS counts),
``kernel_model`` (the performance model over those counts), and the pytest cases ``test_*.py``. ``docs/scripts/benchmark_pages.py`` turns the JSON into
``docs/benchmarks.md``.

Commands (from a source checkout): ``python -m benchmarks`` runs the suite and prints a summary
(``summary``); ``python -m benchmarks.quality`` runs the quality experiment;
``python -m benchmarks.cuda_check`` the CUDA checks and kernel timings;
``python -m benchmarks.kernel_report --all --out benchmarks/results/kernels.json`` the compiled
kernels' report (``docs/kernels.md``).
"""
