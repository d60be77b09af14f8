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

A run writes ``benchmarks/out/<device>[-<preset>].json`` (cpu, h100, h200, ...) with a PNG beside
it; benchmarks/out/ is git-ignored. The committed results are ``benchmarks/results/<device>.json``,
written only on request (``--commit-results``, or ``--out`` naming them);
``python -m benchmarks --report`` turns those into the README's performance section.
"""
