"""G-Eval on the embedded 135M judge, measured in one run:

1. the same judgments scored by `logprobs` (one forward pass at the score slot) and by `sampling`
   (10 samples at temperature 1, batched): time ratio (target >= 8x) and the Pearson correlation
   between the weighted score and the 10-sample mean (items where both exist);
2. end-to-end batch evaluation (the evaluate job: answers batched across items and systems with
   per-row adapters, then judgments) vs the same work one item at a time (batch_size=1, the same
   code path), in judgments (items x systems x metrics) per minute (target >= 4x).

    .venv/bin/python -m bench.geval [--items 8] [--new-tokens 48] [--threads N]

The judged answers in part 1 are each item's reference answer and the next item's (a wrong
answer), so the scores have something to separate. On 2 shared CPU cores the absolute times move
with the load; both halves of each comparison run back to back.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.geval import ACCURACY, FormInput, judge_batch
from core.judges import LocalJudge
from core.model_files import SMOLLM2
from core.models import get_hub


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def methods(judge: LocalJudge, steps: str, items: list[FormInput], samples: int) -> dict:
    judge_batch(judge, ACCURACY, steps, items[:1], "logprobs").__next__()  # warm-up
    by_logprobs, t_logprobs = _timed(lambda: dict(judge_batch(judge, ACCURACY, steps, items, "logprobs")))
    by_sampling, t_sampling = _timed(lambda: dict(judge_batch(judge, ACCURACY, steps, items, "sampling",
                                                              samples=samples, seed=1)))
    pairs = [(by_logprobs[i].score, by_sampling[i].score) for i in range(len(items))
             if by_sampling[i].score is not None]
    failures = sum(j.parse_failures for j in by_sampling.values())
    r = float(np.corrcoef(np.array(pairs).T)[0, 1]) if len(pairs) > 2 else float("nan")
    return {"judgments": len(items), "t_logprobs": t_logprobs, "t_sampling": t_sampling,
            "ratio": t_sampling / t_logprobs, "pearson": r, "paired": len(pairs),
            "sample_failure_rate": failures / (samples * len(items))}


def end_to_end(n_items: int, new_tokens: int, adapter_dir: Path) -> dict:
    """The evaluate job on a throwaway database: batch_size=n_items vs batch_size=1."""
    from core.store import Store
    from jobs.evaluate import EvalSpec
    from jobs.services import build_services

    store = Store(Path(tempfile.mkdtemp(prefix="bench-geval-")) / "b.duckdb")
    services = build_services(warm_up=False, store=store)
    store.upsert_adapter("bench-lora", SMOLLM2, str(adapter_dir))
    results = {}
    for label, batch in (("one at a time", 1), ("batched", n_items)):
        spec = EvalSpec.from_dict({
            "dataset_id": "sample:bioasq", "n_items": n_items, "seed": 0,
            "systems": [{"model": SMOLLM2}, {"model": SMOLLM2, "adapter": "bench-lora"}],
            "metrics": [{"name": "accuracy", "steps": STEPS}, {"name": "completeness", "steps": STEPS}],
            "decoding": {"max_new_tokens": new_tokens}, "batch_size": batch, "name": label})
        job_id, seconds = _timed(lambda: _run(services, spec))
        work = n_items * 2 * 2
        results[label] = {"seconds": seconds, "judgments": work, "per_minute": work / seconds * 60,
                          "job": job_id}
    results["ratio"] = results["batched"]["per_minute"] / results["one at a time"]["per_minute"]
    return results


def _run(services, spec) -> str:
    job_id = services.runner.start("evaluate", spec.to_dict())
    job = services.runner.wait(job_id)
    if job.status != "done":
        raise RuntimeError(f"bench run {job_id} ended {job.status}: {job.error}")
    return job_id


STEPS = ("1. Read the question and the reference answer.\n2. Compare the answer with the reference "
         "answer.\n3. Give a high score when they agree and a low one when they do not.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8, help="eval items (part 1 judges 2 per item)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=48, help="answer length in part 2")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.datasets import load_preset

    examples = load_preset("bioasq", source="sample").split(0, 0.3)[1][:args.items]
    items = [FormInput(e.question, e.answer, answer) for i, e in enumerate(examples)
             for answer in (e.answer, examples[(i + 1) % len(examples)].answer)]
    get_hub().load(SMOLLM2)
    judge = LocalJudge(SMOLLM2)
    part1 = methods(judge, STEPS, items, args.samples)

    from bench.generate import make_adapters

    adapter = make_adapters(Path(tempfile.mkdtemp(prefix="bench-geval-lora-")), 1)[0]
    part2 = end_to_end(args.items, args.new_tokens, adapter)

    print(f"\nG-Eval bench · judge {SMOLLM2} · torch threads {torch.get_num_threads()}")
    print(f"{'measure':<52} {'value':>12}")
    print("-" * 65)
    rows = [
        (f"logprobs: {part1['judgments']} judgments (s)", f"{part1['t_logprobs']:.1f}"),
        (f"sampling x{args.samples}: {part1['judgments']} judgments (s)", f"{part1['t_sampling']:.1f}"),
        ("sampling / logprobs time (target >= 8x)", f"{part1['ratio']:.1f}x"),
        (f"Pearson r, weighted vs {args.samples}-sample mean (n={part1['paired']})", f"{part1['pearson']:.2f}"),
        ("sampled replies that did not parse", f"{part1['sample_failure_rate']:.0%}"),
        (f"one item at a time: {part2['one at a time']['judgments']} judgments (s)",
         f"{part2['one at a time']['seconds']:.1f}"),
        (f"batched ({args.items} items/batch): same work (s)", f"{part2['batched']['seconds']:.1f}"),
        ("one at a time, judgments/min", f"{part2['one at a time']['per_minute']:.1f}"),
        ("batched, judgments/min", f"{part2['batched']['per_minute']:.1f}"),
        ("batched / one at a time throughput (target >= 4x)", f"{part2['ratio']:.1f}x"),
    ]
    for name, value in rows:
        print(f"{name:<52} {value:>12}")


if __name__ == "__main__":
    main()
