"""The 2x2 comparison ({base, adapter} x {no RAG, RAG}) on the embedded 135M model and the shipped
NQ sample: answered as one mixed batch (what the Compare tab does) vs four sequential calls, with
the time to first token of each column, measured in the same run.

    .venv/bin/python -m bench.compare [--new-tokens 48] [--repeats 3]

Target: the 2x2 batch in <= 1.5x the time of one answer.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.generate import make_adapters, timed_rounds
from core.datasets import load_preset
from core.generation import GenParams
from core.model_files import SMOLLM2
from core.models import get_hub
from core.systems import BASE, System
from pipelines.compare import compare
from pipelines.indexing import build_index
from pipelines.spec import PipelineSpec

QUESTION = "who wrote the novel frankenstein"


def run(systems, params, spec, index, adapter_paths):
    *_, state = compare(QUESTION, systems, params, spec, index, adapter_paths=adapter_paths)
    assert all(c.error is None for c in state.columns), [c.error for c in state.columns]
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = GenParams(max_new_tokens=args.new_tokens)
    spec = PipelineSpec(name="bench-nq", retriever="bm25", top_k=3)
    index = build_index(spec, load_preset("nq").corpus, persist=False)
    get_hub().load(SMOLLM2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_adapters(Path(tmp), 1)[0]
        paths = {"tuned": str(folder)}
        grid = [System(adapter=BASE), System(adapter=BASE, rag=True),
                System(adapter="tuned"), System(adapter="tuned", rag=True)]
        cases = {
            "2x2 in one batch": lambda: run(grid, params, spec, index, paths),
            "2x2 as 4 sequential calls": lambda: [run([s], params, spec, index, paths)
                                                  for s in grid],
        }
        results = timed_rounds(cases, args.repeats)
    batch_s, _, batch_state = results["2x2 in one batch"]
    seq_s, _, seq_states = results["2x2 as 4 sequential calls"]
    one = seq_s / len(grid)
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{args.new_tokens} new tokens max, greedy, median of {args.repeats}")
    print(f"{'column':42} {'TTFT batch s':>12} {'TTFT alone s':>12} {'tokens':>7}")
    for col, alone in zip(batch_state.columns, seq_states):
        print(f"{col.system.label:42} {col.first_token_seconds:12.2f} "
              f"{alone.columns[0].first_token_seconds:12.2f} {col.new_tokens:7d}")
    print(f"2x2 batch {batch_s:.2f} s, 4 sequential {seq_s:.2f} s, one answer {one:.2f} s")
    print(f"batch / one answer: {batch_s / one:.2f}x   (target <= 1.5x)")
    print(f"batch / sequential: {batch_s / seq_s:.2f}x")


if __name__ == "__main__":
    main()
