"""Data at scale: preparing, reopening and training on a 100 MB corpus, with 1 and 2 processes.

This script owns the figures behind charlm's scale claims: a 100 MB text file is encoded into
the token cache in <= 10 s the first time and reopened (hashed + memory-mapped) in <= 2 s after,
and training on it keeps peak RSS <= 1.2 GB. It also reports training throughput on CPU with
world size 1 and 2 (torchrun, gloo).

Each phase runs in its own process, which reports its own peak RSS (ru_maxrss):
  prepare  load_dataset with an empty token cache (read, hash, decode, encode, write)
  reopen   load_dataset again (hash the file, memory-map the cache)
  train    `charlm train` on the corpus, starting from an empty token cache (the worst case
           for memory): a 2x128 LSTM, batch 32, seq 128, ~30 steps; once with
           one process and once under `torchrun --nproc_per_node 2`, each rank with
           --threads-per-rank threads (default 1: on a busy machine more threads than free
           cores make OpenMP spin); tokens/s (all ranks together) is read from metrics.csv.

The corpus is synthetic (random words, some non-ASCII up to 4-byte UTF-8), generated once with a
fixed seed and reused from --corpus. CPU numbers are indicative on a shared machine.

Run from the repository root:  python benchmarks/data_scale.py [--size-mb 100] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a plain checkout

WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on",
         "café", "naïve", "über", "señor", "façade", "Straße", "中文", "日本語", "🙂"]


def make_corpus(path: Path, size_mb: int) -> Path:
    """Write (once) a synthetic corpus of about `size_mb` MB: shuffled lines of random words."""
    target = size_mb * 1_000_000
    if path.is_file() and abs(path.stat().st_size - target) < 2_000_000:
        return path
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = WORDS + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
                     for _ in range(2000)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
             + rng.choice([".", ",", "!", "?", ""]) for _ in range(20000)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    size = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        while size < target:
            rng.shuffle(lines)  # a new order of the same lines: about 1 MB per block
            block = "\n".join(lines) + "\n"
            f.write(block)
            size += len(block.encode("utf-8"))
    os.replace(tmp, path)
    return path


def _max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ---------------------------------------------------------------------------- child phases


def phase_load(corpus: str) -> dict:
    from charlm.config import DataConfig
    from charlm.data import load_dataset

    start = time.perf_counter()
    ds = load_dataset(DataConfig(source=corpus))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "max_rss_mb": _max_rss_mb(), "chars": ds.num_chars,
            "vocab": len(ds.vocab), "dtype": str(ds.train.dtype).removeprefix("torch.")}


def phase_train(args: list[str]) -> dict:
    from charlm.cli import app

    code = app(["train", *args], prog_name="charlm", standalone_mode=False)
    if code:  # the error was printed on stderr
        sys.exit(code)
    return {"rank": int(os.environ.get("RANK", 0)), "max_rss_mb": _max_rss_mb()}


def run_phase(argv: list[str], env: dict, torchrun_nproc: int = 0) -> list[dict]:
    """Run this script as a child phase (under torchrun if asked); its JSON result lines."""
    script = [str(Path(__file__).resolve())]
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun_nproc}", *script, *argv]
    else:
        cmd = [sys.executable, *script, *argv]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"phase {argv[:2]} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
            if line.startswith("RESULT ")]


def tokens_per_s(run_dir: Path) -> float:
    """Median training throughput over the logged windows after the first (warm-up)."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir())
                        / "charlm-bench" / "corpus-100mb.txt")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--phase", choices=["load", "train"], help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()

    if args.phase == "load":
        print("RESULT " + json.dumps(phase_load(rest[0])), flush=True)
        return
    if args.phase == "train":
        print("RESULT " + json.dumps(phase_train(rest)), flush=True)
        return

    corpus = make_corpus(args.corpus, args.size_mb)
    work = Path(tempfile.mkdtemp(prefix="charlm-scale-"))  # caches and runs: removed at the end
    try:
        results = measure(args, corpus, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, corpus, results)


def measure(args: argparse.Namespace, corpus: Path, work: Path) -> dict:
    """Run every phase in its own process; the figures as one dict."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "CHARLM_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    results: dict = {"corpus": str(corpus), "corpus_mb": corpus.stat().st_size / 1e6,
                     "cpu_cores": cores, "threads_per_rank": args.threads_per_rank}
    results["prepare"] = run_phase(["--phase", "load", str(corpus)], env)[0]
    results["reopen"] = run_phase(["--phase", "load", str(corpus)], env)[0]

    train_args = ["--config", "lstm", "--device", "cpu", "--runs-dir", str(work / "runs"),
                  "--quiet", "--set", f"data.source={corpus}", "--set", "model.hidden_size=128",
                  "--set", "model.num_layers=2", "--set", "train.batch_size=32", "--set",
                  "train.seq_len=128", "--set", f"train.max_steps={args.steps}", "--set",
                  "train.max_time=null", "--set", "train.log_interval=5", "--set",
                  f"train.eval_interval={args.steps}", "--set", "train.eval_steps=5", "--set",
                  "train.sample_length=0"]
    for ws in (1, 2):
        # An empty token cache: the worst case for memory, the first run on a new corpus.
        env_ws = {**env, "OMP_NUM_THREADS": str(args.threads_per_rank),
                  "CHARLM_CACHE_DIR": str(work / f"cache-ws{ws}")}
        name = f"ws{ws}"
        start = time.perf_counter()
        ranks = run_phase(["--phase", "train", *train_args, "--name", name], env_ws,
                          torchrun_nproc=ws if ws > 1 else 0)
        results[f"train_ws{ws}"] = {
            "tokens_per_s": tokens_per_s(work / "runs" / name),
            "max_rss_mb": max(r["max_rss_mb"] for r in ranks),  # the largest rank
            "wall_s": time.perf_counter() - start}
    return results


def report(args: argparse.Namespace, corpus: Path, results: dict) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    p, r = results["prepare"], results["reopen"]
    print(f"corpus: {corpus} ({results['corpus_mb']:.1f} MB, {p['chars']:,} chars, vocab "
          f"{p['vocab']}, {p['dtype']}); {results['cpu_cores']} CPU cores, {args.threads_per_rank} "
          "thread(s) per rank")
    print(f"{'phase':<28}{'time':>10}{'peak RSS':>12}{'tokens/s':>12}")
    print(f"{'prepare (empty cache)':<28}{p['seconds']:>9.2f}s{p['max_rss_mb']:>9.0f} MB")
    print(f"{'reopen (cached)':<28}{r['seconds']:>9.2f}s{r['max_rss_mb']:>9.0f} MB")
    for ws in (1, 2):
        t = results[f"train_ws{ws}"]
        label = f"train, world size {ws}"
        print(f"{label:<28}{t['wall_s']:>9.1f}s{t['max_rss_mb']:>9.0f} MB"
              f"{t['tokens_per_s']:>12,.0f}")


if __name__ == "__main__":
    main()
