"""`charlm bench`: a speed benchmark anyone can rerun, in one process, on one device.

This package owns the benchmark's contenders, its timing and its report:

- training tokens/s of a full char-LM step (embedding -> 2 recurrent layers -> head ->
  cross-entropy -> backward -> gradient clip -> AdamW step, as `charlm train` does it) with a
  `charlm.cells` body against a `torch.nn` body of identical shape and identical weights
  inside the same `RecurrentLM` wrapper, so the recurrent body is the only difference; in
  float32 and, where the CPU multiplies bf16 natively, again with both under bf16 autocast
  (`--precision`), where charlm in bf16 is also measured against itself in float32;
- sampling characters/s (batch 1, one character at a time, state carried, the per-step work
  of `charlm.sample.generate`) for the same pairs;
- the Transformer baseline's training tokens/s, and its sampling with the KV cache against
  recomputing the whole context every character;
- peak memory where the device reports it.

Contenders that are compared run round-robin across repeats (A, B, A, B, ...) so that drift in
machine load hits both alike; medians over repeats are reported, their ratio, and an A/A
stability figure (median of the odd repeats / median of the even ones, ~1.0 when stable).
It knows nothing of the CLI: bad options are ValueErrors naming the flag.

Its files: `models.py` (shapes and models), `timing.py` (what is timed, and how), `groups.py`
(the contenders, grouped), `run.py` (running them, the result) and `report.py` (the table).
"""

from .models import make_shape, parse_cells, quick_shape, reference_shape
from .report import format_table
from .run import SCHEMA, bench_precisions, cpu_features, kv_cache_target, run_bench

__all__ = ["SCHEMA", "bench_precisions", "cpu_features", "format_table", "kv_cache_target",
           "make_shape", "parse_cells", "quick_shape", "reference_shape", "run_bench"]
