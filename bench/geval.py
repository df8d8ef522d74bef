"""G-Eval on the embedded 135M judge, measured in one run:

1. the same judgments scored by `logprobs` (one forward pass at the score slot) and by `sampling`
   (10 samples at temperature 1, batched): time ratio (target >= 8x) and the Pearson correlation
   between the weighted score and the 10-sample mean (items where both exist);
2. `logprobs` on the cached shared prefix (instructions, criteria and steps prefilled once, each
   item's suffix only, several per forward pass; the first prefill counted) vs every prompt
   prefilled whole, one per pass: time ratio (target >= 3x), the same with one item per pass
   (caching alone), and the largest score difference (must stay below 1e-4); with the bench's
   short fixed steps and with steps the judge writes itself (what an evaluation uses when a
   metric brings none);
3. end-to-end batch evaluation (the evaluate job: answers batched across items and systems with
   per-row adapters, then judgments) vs the same work one item at a time (batch_size=1, the same
   code path), in judgments (items x systems x metrics) per minute (target >= 4x).

    .venv/bin/python -m bench.geval [--items 8] [--new-tokens 48] [--threads N] [--dataset bioasq]
                                    [--skip-end-to-end | --only-end-to-end]

The judged answers in parts 1-2 are each item's reference answer and the next item's (a wrong
answer), so the scores have something to separate. On 2 shared CPU cores the absolute times move
with the load; both halves of each comparison run back to back, and CPU seconds (this process,
all threads) are printed beside wall seconds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.geval import ACCURACY, FormInput, generate_steps, judge_batch
from core.judges import LocalJudge
from core.model_files import SMOLLM2
from core.models import get_hub
from core.threads import configure_threads


def _timed(fn):
    """fn's result, wall seconds and CPU seconds (this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def methods(judge: LocalJudge, steps: str, items: list[FormInput], samples: int) -> dict:
    by_logprobs, t_logprobs, c_logprobs = _timed(
        lambda: dict(judge_batch(judge, ACCURACY, steps, items, "logprobs")))
    by_sampling, t_sampling, c_sampling = _timed(
        lambda: dict(judge_batch(judge, ACCURACY, steps, items, "sampling", samples=samples, seed=1)))
    pairs = [(by_logprobs[i].score, by_sampling[i].score) for i in range(len(items))
             if by_sampling[i].score is not None]
    failures = sum(j.parse_failures for j in by_sampling.values())
    r = float(np.corrcoef(np.array(pairs).T)[0, 1]) if len(pairs) > 2 else float("nan")
    return {"judgments": len(items), "t_logprobs": t_logprobs, "c_logprobs": c_logprobs,
            "t_sampling": t_sampling, "c_sampling": c_sampling, "ratio": t_sampling / t_logprobs,
            "pearson": r, "paired": len(pairs), "sample_failure_rate": failures / (samples * len(items))}


def prefix_cache(steps: str, items: list[FormInput], rows: int) -> dict:
    """Cached (`rows` items per pass, then one per pass) vs uncached logprobs on the same items.
    Each cached run uses steps of its own, so its first prefill of the head is part of its time."""
    def run(judge: LocalJudge, variant: str) -> tuple[dict, float, float]:
        return _timed(lambda: dict(judge_batch(judge, ACCURACY, f"{steps}{variant}", items, "logprobs")))

    many, one = "\n4. Be strict.", "\n4. Be fair."  # not STEPS: no head of theirs is cached yet
    uncached = {variant: run(LocalJudge(SMOLLM2, prefix_cache=False), variant) for variant in (many, one)}
    batched = run(LocalJudge(SMOLLM2, score_rows=rows), many)
    single = run(LocalJudge(SMOLLM2, score_rows=1), one)
    diff = max(abs(a[i].score - b[i].score) for a, b in ((batched[0], uncached[many][0]),
                                                         (single[0], uncached[one][0])) for i in a)
    return {"uncached": uncached[many][1:], "batched": batched[1:], "single": single[1:],
            "ratio": uncached[many][1] / batched[1], "cpu_ratio": uncached[many][2] / batched[2],
            "ratio_single": uncached[one][1] / single[1], "max_diff": diff}


def end_to_end(dataset: str, n_items: int, new_tokens: int, adapter_dir: Path) -> dict:
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
            "dataset_id": f"sample:{dataset}", "n_items": n_items, "seed": 0,
            "systems": [{"model": SMOLLM2}, {"model": SMOLLM2, "adapter": "bench-lora"}],
            "metrics": [{"name": "accuracy", "steps": STEPS}, {"name": "completeness", "steps": STEPS}],
            "decoding": {"max_new_tokens": new_tokens}, "batch_size": batch, "name": label})
        job_id, seconds, cpu = _timed(lambda: _run(services, spec))
        work = n_items * 2 * 2
        results[label] = {"seconds": seconds, "cpu": cpu, "judgments": work,
                          "per_minute": work / seconds * 60, "job": job_id}
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
    parser.add_argument("--items", type=int, default=8, help="eval items (parts 1-2 judge 2 per item)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--rows", type=int, default=8, help="items per forward pass on the cached prefix")
    parser.add_argument("--new-tokens", type=int, default=48, help="answer length in part 3")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dataset", default="bioasq", help="preset whose shipped sample gives the items")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--skip-end-to-end", action="store_true", help="parts 1-2 only")
    parts.add_argument("--only-end-to-end", action="store_true", help="part 3 only")
    args = parser.parse_args()
    if args.threads:
        configure_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.datasets import load_preset

    examples = load_preset(args.dataset, source="sample").split(0, 0.3)[1][:args.items]
    items = [FormInput(e.question, e.answer, answer) for i, e in enumerate(examples)
             for answer in (e.answer, examples[(i + 1) % len(examples)].answer)]
    get_hub().load(SMOLLM2)
    part1, part2, part3 = None, {}, None
    if not args.only_end_to_end:
        judge = LocalJudge(SMOLLM2)
        dict(judge_batch(judge, ACCURACY, STEPS, items[:2], "logprobs"))  # warm-up; caches the head
        part1 = methods(judge, STEPS, items, args.samples)
        part2 = {"fixed steps": prefix_cache(STEPS, items, args.rows),
                 "judge's steps": prefix_cache(generate_steps(judge, ACCURACY), items, args.rows)}
    if not args.skip_end_to_end:
        from bench.generate import make_adapters

        adapter = make_adapters(Path(tempfile.mkdtemp(prefix="bench-geval-lora-")), 1)[0]
        part3 = end_to_end(args.dataset, args.items, args.new_tokens, adapter)

    print(f"\nG-Eval bench · judge {SMOLLM2} · {args.dataset} sample · "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'measure':<66} {'wall s':>8} {'CPU s':>8}")
    print("-" * 84)
    rows, ratios = [], []
    if part1:
        n = part1["judgments"]
        rows += [(f"logprobs, cached prefix: {n} judgments", part1["t_logprobs"], part1["c_logprobs"]),
                 (f"sampling x{args.samples}, cached prefix: {n} judgments", part1["t_sampling"],
                  part1["c_sampling"])]
        ratios += [
            ("sampling / logprobs time (target >= 8x)", f"{part1['ratio']:.1f}x"),
            (f"Pearson r, weighted vs {args.samples}-sample mean (n={part1['paired']})",
             f"{part1['pearson']:.2f}"),
            ("sampled replies that did not parse", f"{part1['sample_failure_rate']:.0%}"),
        ]
    for label, part in part2.items():
        rows += [(f"{label}: logprobs uncached, one prompt per pass", *part["uncached"]),
                 (f"{label}: cached, {args.rows} suffixes per pass (+ first prefill)", *part["batched"]),
                 (f"{label}: cached, one suffix per pass", *part["single"])]
    if part3:
        rows += [(f"one item at a time: {part3['one at a time']['judgments']} judgments",
                  part3["one at a time"]["seconds"], part3["one at a time"]["cpu"]),
                 (f"batched ({args.items} items/batch): same work", part3["batched"]["seconds"],
                  part3["batched"]["cpu"])]
    for name, wall, cpu in rows:
        print(f"{name:<66} {wall:>8.1f} {cpu:>8.1f}")
    print("-" * 84)
    for label, part in part2.items():
        ratios += [(f"{label}: uncached / cached wall (CPU) time (target >= 3x)",
                    f"{part['ratio']:.1f}x ({part['cpu_ratio']:.1f}x)"),
                   (f"{label}: uncached / cached, one suffix per pass", f"{part['ratio_single']:.1f}x"),
                   (f"{label}: largest score difference, cached vs uncached", f"{part['max_diff']:.1e}")]
    if part3:
        ratios += [("one at a time, judgments/min", f"{part3['one at a time']['per_minute']:.1f}"),
                   ("batched, judgments/min", f"{part3['batched']['per_minute']:.1f}"),
                   ("batched / one at a time throughput (target >= 4x)", f"{part3['ratio']:.1f}x"),
                   ("one at a time / batched CPU seconds",
                    f"{part3['one at a time']['cpu'] / part3['batched']['cpu']:.1f}x")]
    for name, value in ratios:
        print(f"{name:<66} {value:>17}")


if __name__ == "__main__":
    main()
