"""Speed and memory of :func:`kernels.attention` against PyTorch SDPA and an eager pattern path.

What is measured
----------------
Three suites of causal attention problems (``--suites``), each row built from fresh
``torch.randn`` inputs of batch ``B`` and ``H`` query heads:

``mha``
    Self-attention, ``Nq = Nk = N``, for each head dim ``D`` (``--dims``) and length ``N``
    (``--lengths``), ``Hkv = H``.
``gqa``
    The same with grouped-query attention: ``Hkv`` in ``--kv-heads`` (default 8 and 4 of 32
    query heads: groups of 4 and 8). K and V are never repeated in memory; SDPA gets
    ``enable_gqa=True``.
``decode``
    Decoding shapes: ``Nq`` in ``--queries`` (default 1, 4, 16) new queries against ``N``
    cached keys (bottom-right causal; SDPA gets ``causal_lower_right``), ``Hkv`` =
    ``--decode-kv-heads`` (default 8), ``D`` = 128. The kernel splits the keys across
    programs and merges (flash-decoding); ``unsplit`` is the same kernel with one program per
    key/value head, to show what the split buys.

These variants run on each row:

``sdpa``
    ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``; PyTorch
    picks its fastest backend. Baseline of the ratios and reference output of the checks.
``plain``
    ``kernels.attention(q, k, v, stats=None, backend="triton")``.
``rowstats``
    ``kernels.attention`` with every row statistic (:data:`ROW_STATS`,
    ``StatsSpec.every_row_statistic()``: entropy, max_prob, argmax, sink mass of 1 token,
    local mass of a 64-key window, mean distance, mass at offset 1).
``keymass``
    The same plus ``key_mass=True``; the whole call (forward kernel and key-mass pass).
``keymass_last`` (mha and gqa suites)
    ``keymass`` with the key mass summed over the last 64 query rows only
    (``key_mass_queries=64``, :data:`KEY_MASS_LAST`), SnapKV's observation window.
``unsplit`` (decode suite)
    ``plain`` without key splitting.
``graphed`` (decode suite, CUDA)
    ``rowstats`` captured once in a CUDA graph and replayed: the call's latency without host
    time, as a decoding loop that captures its steps would see it. Its outputs are checked
    like the others', so the row also shows that the call is capturable.
``eager`` (mha suite)
    What TransformerLens does to expose the pattern: ``q`` and ``k`` upcast to float32,
    ``scores = q @ k^T * scale``, ``torch.where(causal_mask, scores, -inf)``, softmax,
    NaN -> 0, the pattern cast back to the input dtype and multiplied by ``v``; plus the row
    entropy from the float32 pattern. Its peak memory above what was allocated before the
    call is reported as well. It is skipped, reported as ``OOM (est. X GiB)``, when the
    float32 ``[B, H, N, N]`` matrix alone (X) exceeds the device memory; a real
    out-of-memory error is reported as ``OOM``.

Columns: ``<variant>_ms`` (median time per call), ``eager_peak_gib``, ``<variant>/sdpa``
(throughput relative to SDPA, ``sdpa_ms / variant_ms``: 1.0 is as fast as SDPA, higher is
faster), ``<variant>_TFLOP/s`` (causal FLOPs ``4 * B * H * D`` per visible query-key pair;
``N * N * D / 2`` pairs for self-attention), for decoding ``<variant>_GB/s`` (bytes of K
and V read per second), ``max_err`` (largest ``||out - sdpa|| / ||sdpa||`` over the
variants) and ``check``. Each suite prints its own table. Decode rows add
``<variant>_gpu_ms``: the GPU time of the call's kernels alone (PyTorch profiler), since at
these sizes a call's latency is mostly host time (Python, launches) rather than GPU work.

Method
------
* Before any timing, each variant runs once on the row's inputs. That call autotunes the
  Triton kernels for the new shape, and its outputs are checked: every output against SDPA
  by relative error (bf16 tolerance 2e-2), at every length; for ``Nq * N <= 4096^2`` also the
  statistics against the exact ``backend="reference"`` implementation; and ``key_mass``
  must add up to one per query row. A failed check prints ``FAIL`` in the ``check`` column
  (the variant is still timed).
* On CUDA, times come from ``triton.testing.do_bench(..., return_mode="median")``, which
  flushes the L2 cache before every timed call; its warm-up and repetition windows shrink
  as ``N`` grows, so the default sweep should take about 5 minutes on an H100 (an
  estimate, autotuning included). Rows that would end after ``--time-budget`` seconds
  (default 450; the duration of rows from 32k on is extrapolated as N^2) are skipped and
  marked, so the table is always printed.
* ``--smoke``: a tiny CPU-only run (D=32, H=4, N in 64 and 128, float32, the kernel rows on
  ``backend="reference"``, or Triton's interpreter under ``TRITON_INTERPRET=1``), timed by
  the median of a few ``time.perf_counter`` runs. It proves the script works end to end.

Output: a header (device, versions, dtype, exact command), one progress line per variant,
then the table, always printed last. ``--out PATH`` also writes ``PATH.csv`` (the table)
and ``PATH.json`` (metadata, table and every check).

Run::

    python -m kernels.benchmark                       # every suite (CUDA)
    python -m kernels.benchmark --suites mha --dims 128 --lengths 4k,32k --no-eager
    python -m kernels.benchmark --suites gqa --kv-heads 8
    python -m kernels.benchmark --suites decode --queries 1 --lengths 128k
    python -m kernels.benchmark --out results/h100    # + results/h100.csv, results/h100.json
    python -m kernels.benchmark --smoke               # tiny CPU check

A ``--out`` whose folder is a file (or whose ``PATH.csv`` / ``PATH.json`` is a folder) is
refused with argparse's error before any row runs (:func:`out_problem`).

To add a variant, return one more :class:`~kernels.benchmark.variants.Variant`, a named
zero-arg callable, from :func:`~kernels.benchmark.variants.build_variants`; the runner,
checks and table pick it up.

Modules: :mod:`~kernels.benchmark.config` (constants, rows, command line),
:mod:`~kernels.benchmark.environment` (device, versions, header),
:mod:`~kernels.benchmark.measure` (timing one variant), :mod:`~kernels.benchmark.checks`,
:mod:`~kernels.benchmark.variants`, :mod:`~kernels.benchmark.report` (rows, tables, CSV,
JSON) and :mod:`~kernels.benchmark.runner` (the main loop). The kernels never import this
package.
"""

from kernels.benchmark.config import (
    KEY_STATS,
    ROW_STATS,
    SUITES,
    build_parser,
    out_problem,
    parse_size,
    parse_sizes,
    resolve_config,
)
from kernels.benchmark.runner import main
from kernels.benchmark.variants import Variant, build_variants

__all__ = [
    "KEY_STATS",
    "ROW_STATS",
    "SUITES",
    "Variant",
    "build_parser",
    "build_variants",
    "main",
    "out_problem",
    "parse_size",
    "parse_sizes",
    "resolve_config",
]
