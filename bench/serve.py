"""Visitors batched together: V simulated visitors send compare requests (base and a LoRA adapter,
closed-book; with --rag the 2x2 grid with BM25 retrieval) within --spread seconds, answered with
merging on (BATCH_WINDOW_MS=--window, core/batcher.py) vs one request at a time (BATCH_WINDOW_MS=0,
as before merging), each mode in a fresh process on the embedded 135M model, in the same run.

    .venv/bin/python -m bench.serve [--threads N] [--visitors 8] [--spread 1] [--new-tokens 32]
                                    [--window 50] [--rag]

Reported per mode: total seconds from the first request to the last answer, wall and CPU seconds
(process time, all threads) of that span, and time to first token per visitor (from its request
to the first text of any of its columns, seen at the compare stream's 0.1 s polling), p50/p95.
Greedy answers must be the same in both modes (checked). Target: merged >= 2x the throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def visitor_questions(n: int) -> list[str]:
    from core.datasets import load_preset

    return [e.question for e in load_preset("nq").examples[:n]]


def child(args: argparse.Namespace) -> None:
    """One mode (BATCH_WINDOW_MS set by the parent): answer the visitors, print JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.generate import make_adapters
    from core.generation import GenParams
    from core.model_files import SMOLLM2
    from core.models import get_hub
    from core.systems import BASE, System
    from pipelines.compare import compare

    spec = index = None
    if args.rag:
        from core.datasets import load_preset
        from pipelines.indexing import build_index
        from pipelines.spec import PipelineSpec

        spec = PipelineSpec(name="bench-serve", retriever="bm25", top_k=3)
        index = build_index(spec, load_preset("nq").corpus, persist=False)
    get_hub().load(SMOLLM2)
    params = GenParams(max_new_tokens=args.new_tokens)
    questions = visitor_questions(args.visitors)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tuned": str(make_adapters(Path(tmp), 1)[0])}
        systems = [System(adapter=BASE), System(adapter="tuned")]
        if args.rag:
            systems += [System(adapter=BASE, rag=True), System(adapter="tuned", rag=True)]
        for _ in compare(questions[0], systems, params, spec, index, adapter_paths=paths):
            pass  # warm-up: adapter attached, first-call costs paid
        results: list[dict] = [{} for _ in questions]
        t0 = time.perf_counter() + 0.2
        c0 = time.process_time()

        def visit(i: int) -> None:
            time.sleep(max(0.0, t0 + i * args.spread / len(questions) - time.perf_counter()))
            sent = time.perf_counter()
            first = None
            for state in compare(questions[i], systems, params, spec, index, adapter_paths=paths):
                if first is None and any(c.text for c in state.columns):
                    first = time.perf_counter()
            assert all(c.error is None for c in state.columns), [c.error for c in state.columns]
            results[i] = {"sent": sent - t0, "ttft": (first or time.perf_counter()) - sent,
                          "done": time.perf_counter() - t0, "texts": [c.text for c in state.columns]}

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(questions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = time.process_time() - c0
    print(json.dumps({"visitors": results, "cpu": cpu, "threads": torch.get_num_threads()}))


def run_mode(args: argparse.Namespace, window: float) -> dict:
    argv = [sys.executable, "-m", "bench.serve", "--child", "--visitors", str(args.visitors),
            "--spread", str(args.spread), "--new-tokens", str(args.new_tokens),
            "--threads", str(args.threads)] + (["--rag"] if args.rag else [])
    env = dict(os.environ, BATCH_WINDOW_MS=str(window))
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the window {window} ms run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--visitors", type=int, default=8)
    parser.add_argument("--spread", type=float, default=1.0, help="seconds over which visitors arrive")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--window", type=float, default=50.0, help="BATCH_WINDOW_MS of the merged run")
    parser.add_argument("--rag", action="store_true", help="the 2x2 grid with retrieval, not 1x2 closed-book")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("MODELS_DIR", str(Path(__file__).resolve().parent.parent / "data" / "runtime" / "models"))
    load = os.getloadavg()[0]
    modes = {"one at a time (window 0)": run_mode(args, 0.0),
             f"merged (window {args.window:g} ms)": run_mode(args, args.window)}
    print(f"{args.visitors} visitors within {args.spread:g} s, {'2x2 with RAG' if args.rag else '1x2 closed-book'} "
          f"compare, {args.new_tokens} new tokens max, greedy; threads "
          f"{next(iter(modes.values()))['threads']}; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    print(f"{'mode':28} {'total wall s':>12} {'CPU s':>7} {'TTFT p50 s':>10} {'TTFT p95 s':>10}")
    totals = {}
    for label, mode in modes.items():
        visitors = mode["visitors"]
        ttft = [v["ttft"] for v in visitors]
        totals[label] = max(v["done"] for v in visitors) - min(v["sent"] for v in visitors)
        print(f"{label:28} {totals[label]:12.2f} {mode['cpu']:7.1f} {statistics.median(ttft):10.2f} "
              f"{p95(ttft):10.2f}")
    seq, merged = modes.values()
    same = sum(a["texts"] == b["texts"] for a, b in zip(seq["visitors"], merged["visitors"]))
    wall_seq, wall_merged = totals.values()
    print(f"throughput merged / one at a time: {wall_seq / wall_merged:.2f}x (target >= 2x); "
          f"CPU seconds {seq['cpu'] / merged['cpu']:.2f}x fewer; same answers for {same}/{args.visitors} visitors")


if __name__ == "__main__":
    main()
