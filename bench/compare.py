"""The 2x2 comparison ({base, adapter} x {closed-book, RAG}) on the embedded 135M model and a
shipped sample, measured in one run, rounds interleaved:

- the Compare tab's batch (prompts of similar length prefilled together, closed-book first, then
  every row decoded together: core.batch_prefill);
- the same four rows as one padded generate call (what the tab did before), for reference;
- the four systems answered one after another;
- each distinct (prompt, adapter) prefilled alone (one forward pass).

    .venv/bin/python -m bench.compare [--dataset nq|bioasq|qasper] [--new-tokens 16] [--repeats 3]
                                      [--threads N]

Targets: batch / 4 sequential <= 0.6; batch / (sum of the prefills alone + the batch's own
decode phase, from its last first token to its end) <= 1.2; the closed-book columns' first token
<= 1.5x a closed-book answer's first token alone. The question is the first eval item of the
sample; retrieval runs once, outside the timings. Wall and CPU seconds (this process, all
threads) are medians over the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.generate import make_adapters
from core.datasets import load_preset
from core.generation import GenParams, chat_text, encode, generate_batch
from core.model_files import SMOLLM2
from core.models import get_hub
from core.systems import BASE, System
from core.threads import configure_threads
from pipelines.compare import closed_book_messages, compare
from pipelines.indexing import build_index
from pipelines.query import build_prompt, retrieve
from pipelines.spec import PipelineSpec

GRID = [System(adapter=BASE), System(adapter=BASE, rag=True),
        System(adapter="tuned"), System(adapter="tuned", rag=True)]


def run(question, systems, params, spec, index, docs):
    # A short poll, so that waiting for compare's last yield adds little to the timings.
    *_, state = compare(question, systems, params, spec, index, documents=docs, poll_seconds=0.01)
    assert all(c.error is None for c in state.columns), [c.error for c in state.columns]
    return state.columns


def padded_batch(prompts, params):
    """The four rows as one left-padded generate call (the path before grouped prefill)."""
    entry = get_hub().load(SMOLLM2)
    with entry.lock:
        return generate_batch(entry.model, entry.tokenizer, encode(entry.tokenizer, prompts, entry.device),
                              entry.eos_ids, params, {"adapter_names": [s.adapter for s in GRID]},
                              None, threading.Event())


def prefills_alone(prompts):
    """Seconds of one forward pass over each distinct (prompt, adapter), run one after another."""
    entry = get_hub().load(SMOLLM2)
    seconds = []
    with entry.lock, torch.inference_mode():
        for prompt, system in zip(prompts, GRID):
            ids = entry.tokenizer(chat_text(entry.tokenizer, prompt), return_tensors="pt",
                                  add_special_tokens=False)["input_ids"]
            start = time.perf_counter()
            entry.model(input_ids=ids, logits_to_keep=1, adapter_names=[system.adapter])
            seconds.append(time.perf_counter() - start)
    return seconds


def rounds(cases: dict, repeats: int) -> dict[str, dict]:
    """Median wall and CPU seconds per case and its last result; cases take turns in every round,
    so a change in background load hits all of them alike."""
    out: dict[str, dict] = {label: {"wall": [], "cpu": []} for label in cases}
    for _ in range(repeats):
        for label, fn in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out[label]["result"] = fn()
            out[label]["wall"].append(time.perf_counter() - wall)
            out[label]["cpu"].append(time.process_time() - cpu)
    for entry in out.values():
        entry["wall"], entry["cpu"] = statistics.median(entry["wall"]), statistics.median(entry["cpu"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="nq", help="preset whose shipped sample is used")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: TORCH_THREADS or the probe")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    params = GenParams(max_new_tokens=args.new_tokens)
    dataset = load_preset(args.dataset)
    question = dataset.split()[1][0].question
    spec = PipelineSpec(name="bench-compare", retriever="bm25", top_k=3)
    index = build_index(spec, dataset.corpus, persist=False)
    docs = retrieve(spec, index, question)
    prompts = [build_prompt(spec, question, docs) if s.rag else closed_book_messages(question)
               for s in GRID]
    hub = get_hub()
    tokenizer = hub.load(SMOLLM2).tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        hub.load_adapter(SMOLLM2, str(make_adapters(Path(tmp), 1)[0]), "tuned")
        run(question, GRID, GenParams(max_new_tokens=2), spec, index, docs)  # warm-up
        load = os.getloadavg()[0]
        res = rounds({
            "2x2 batch (grouped prefill)": lambda: run(question, GRID, params, spec, index, docs),
            "2x2 padded batch (before)": lambda: padded_batch(prompts, params),
            "4 systems one after another": lambda: [run(question, [s], params, spec, index, docs)[0]
                                                    for s in GRID],
            "4 prefills alone": lambda: prefills_alone(prompts),
        }, args.repeats)
    batch, padded = res["2x2 batch (grouped prefill)"], res["2x2 padded batch (before)"]
    seq, pre = res["4 systems one after another"], res["4 prefills alone"]
    cols, alone = batch["result"], seq["result"]
    assert [c.text for c in cols] == [c.text for c in alone], "batch answers differ from solo answers"
    decode = max(c.seconds for c in cols) - max(c.first_token_seconds for c in cols)
    tokens = [len(tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"])
              for p in prompts]
    print(f"\n2x2 compare · {args.dataset} sample · '{question[:60]}' · {args.new_tokens} new tokens "
          f"max, greedy · median of {args.repeats} · torch threads {threads} · load average "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'column':34} {'prompt tok':>10} {'TTFT batch':>10} {'TTFT padded':>11} "
          f"{'TTFT alone':>10} {'prefill alone':>13} {'new tok':>7}")
    for col, gen, solo, n, p in zip(cols, padded["result"], alone, tokens, pre["result"]):
        print(f"{col.system.label:34} {n:10d} {col.first_token_seconds:10.2f} "
              f"{gen.first_token_seconds:11.2f} {solo.first_token_seconds:10.2f} {p:13.2f} "
              f"{col.new_tokens:7d}")
    print(f"\n{'case':34} {'wall s':>8} {'CPU s':>8}")
    for label, r in res.items():
        print(f"{label:34} {r['wall']:8.2f} {r['cpu']:8.2f}")
    parts = sum(pre["result"]) + decode
    closed = [i for i, s in enumerate(GRID) if not s.rag]
    ttft = max(cols[i].first_token_seconds for i in closed)
    ttft_alone = statistics.mean(alone[i].first_token_seconds for i in closed)
    print(f"\nbatch / 4 sequential: wall {batch['wall'] / seq['wall']:.2f}x, CPU "
          f"{batch['cpu'] / seq['cpu']:.2f}x (target <= 0.6); padded batch / 4 sequential: wall "
          f"{padded['wall'] / seq['wall']:.2f}x, CPU {padded['cpu'] / seq['cpu']:.2f}x")
    print(f"batch / (prefills alone {sum(pre['result']):.2f} s + its decode phase {decode:.2f} s): "
          f"{batch['wall'] / parts:.2f}x (target <= 1.2)")
    print(f"closed-book first token: {ttft:.2f} s in the batch vs {ttft_alone:.2f} s alone = "
          f"{ttft / ttft_alone:.2f}x (target <= 1.5x); padded batch "
          f"{max(padded['result'][i].first_token_seconds for i in closed):.2f} s")


if __name__ == "__main__":
    main()
