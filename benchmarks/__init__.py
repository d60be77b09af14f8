"""fusedbn benchmark suite: providers x modes x shapes x dtypes x layouts, in one process.

Run ``python -m benchmarks --help``. The modules, in the order a sweep uses them:

* ``cases``       -- shape sets, the Case of one measurement, its inputs
* ``providers``   -- fusedbn, torch eager (cuDNN on/off on CUDA), torch.compile; the callables of
                     each mode (fwd, bwd, fwdbwd, infer)
* ``verify``      -- the --check correctness gate (float64 reference) and memory accounting
* ``timing``      -- timers (CUDA events, perf_counter), cache flush, interleaved repeats,
                     statistics, copy bandwidth
* ``runner``      -- the sweep loop and its progress line
* ``environment`` -- machine, software and commit recorded with the results
* ``report``      -- table, summary, JSON, Markdown (--report); ``plot`` -- the PNG

Results live in ``benchmarks/results/<device>.json`` (cpu, h100, h200, ...), with a PNG beside
each; ``python -m benchmarks --report`` turns the committed files into the README's performance
section.
"""
