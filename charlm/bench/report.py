"""The terminal report of a benchmark result: one row per contender, and a legend of
what was run, in which precision, and which checks failed."""

from __future__ import annotations

from .models import SAME_FUNCTION_TOL


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def format_table(result: dict) -> str:
    """The terminal report: a header line, one row per contender, and a legend."""
    s, d = result["shape"], result["device"]
    header = ["task", "contender", "median", "unit", "ratio", "vs", "A/A", "peak mem"]
    body = []
    for r in result["contenders"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        aa = "" if r["stability"] is None else f"{r['stability']:.3f}"
        body.append([r["task"], r["name"], f"{r['median']:,.0f}", r["unit"], ratio,
                     r["reference"] or "", aa, _mib(r["peak_mem_bytes"])])
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    right = {2, 4, 6, 7}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    kv = result["kv_cache"]
    legend = [
        f"{d['name']} ({d['type']}, {d['threads']} threads), torch {result['torch_version']}; "
        f"batch {s['batch_size']} x seq {s['seq_len']}, hidden {','.join(map(str, s['hidden']))}"
        f" x {s['num_layers']} layers, vocab {s['vocab_size']}; {result['repeats']} repeats x "
        f"{result['steps']} steps; sampling {s['sample_chars']} chars",
    ]
    notes = ["ratio: median / median of 'vs' (charlm/nn; KV cache/recompute); A/A: median of "
             "odd / even repeats (~1.000 = stable)"]
    p = result.get("precision")
    if p:
        m = p["math"]
        pairs = " and ".join(f"both {q}" + (" (no autocast)" if q == "fp32" else " (autocast)")
                             for q in p["recurrent"].split("+"))
        registry = p.get("registry", p["transformer"]).replace("+", " and ")
        notes.append(f"precision: charlm vs torch.nn {pairs}; Transformer {p['transformer']}, "
                     f"min cells {registry}, sampling and layer variants fp32; TF32 matmul "
                     f"{m['matmul_allow_tf32']}, cuDNN TF32 {m['cudnn_allow_tf32']}")
        own = [f"{r['contender']} {r['ratio']:.2f}x" for r in result["ratios"]
               if r["contender"] == r["reference"] + "-bf16"]
        if own:
            notes.append(f"charlm bf16 / charlm fp32 (same group): {', '.join(own)}")
    if kv["speedup"] is not None and kv["target"] is None:
        why = "a smoke-test shape" if s.get("smoke") else f"no target for {d['type']}"
        notes.append(f"KV cache speedup {kv['speedup']:.1f}x at context {s['kv_context']} "
                     f"({why}: no target is judged)")
    elif kv["speedup"] is not None:
        verdict = "meets" if kv["meets_target"] else "MISSES"
        notes.append(f"KV cache speedup {kv['speedup']:.1f}x at context {s['kv_context']} "
                     f"({verdict} the {kv['target']:g}x target)")
    if d["type"] != "cuda":
        notes.append(f"peak memory: process max RSS {_mib(result['process_max_rss_bytes'])}")
    ran = result["contenders"]
    if any(r.get("cell") in ("rnn", "lstm", "gru") and r["name"].startswith("charlm")
           for r in ran):
        checks = result["checks"]  # (files from before 2026-12-01 name it compiled_lstm_step)
        compiled = checks.get("compiled_steps", checks.get("compiled_lstm_step"))
        how = "compiled kernels" if compiled else "eager torch ops"
        notes.append(f"charlm RNN/LSTM/GRU steps: {how} (charlm/cells/fused/inductor.py; "
                     "CHARLM_COMPILE=0 for eager)")
    backends = list(d.get("gemm_backends", {}).values())
    if backends:
        counts = ", ".join(f"{backends.count(b)} on {b}" for b in ("torch", "onednn", "mkl")
                           if b in backends)
        notes.append(f"charlm GEMMs, timed per product shape: {counts} (--json: "
                     "device.gemm_backends; CHARLM_GEMM=torch|onednn|mkl to force)")
    checks = result["checks"]
    bad = [f"{name} logits differ by {diff:.2g}" for name, diff in checks["max_logit_diff"].items()
           if not diff <= SAME_FUNCTION_TOL]
    if not checks.get("kv_cache_greedy", {}).get("matches_recompute", True):
        bad.append("KV-cache greedy text differs from recompute")
    if bad:
        notes.append(f"CHECK FAILED: {', '.join(bad)}")
    notes += [f"FAILED {f['group']}: {f['error']}" for f in result["failures"]]
    return "\n".join([*legend, line(header), line(["-" * w for w in widths]),
                      *map(line, body), *notes])
