"""MODEL_QUANT=fp16 against float32 on the embedded 135M model, in one run:

1. batch-1 decode speed: tokens/s by wall clock and by CPU seconds (this process), fp32, fp16
   and fp16 with the LM head left fp32 (what packing the head adds), the three taking turns in
   every round; each against the copy-bandwidth bound of bench.generate (bytes a decode step
   reads: every Linear weight, the tied LM head once, the norms), by wall clock, since the copy
   is timed by wall clock;
2. greedy agreement: closed-book answers to the eval questions of the shipped samples (all three
   datasets, seed 0, eval fraction 0.3), identical answers / total, fp16 (and fp16 with an fp32
   head) against fp32, the same batches on both;
3. the judge: G-Eval logprobs scores (accuracy and completeness) by the same 135M judge in fp32 and
   in fp16 on the same fp32 answers, mean and largest absolute difference;
4. the answers' quality: each variant's answers scored by the fp32 judge, mean score and the mean
   paired difference to the fp32 answers' scores (identical answers add about 0).

`--int8` adds the alternative that was dropped: torch's dynamic int8 quantization
(torch.ao.quantization.quantize_dynamic, qint8 weights, activations quantized per call), in all
three parts.

    .venv/bin/python -m bench.quant [--threads 1] [--new-tokens 64] [--repeats 3]
                                    [--answer-tokens 48] [--rows 8] [--int8]

Targets (issue 12): fp16 decode nearer the memory bound (0.7 of it), answers and scores unchanged.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from bench.generate import PROMPTS, copy_bandwidth, timed_rounds
from bench.geval import STEPS
from core import quant
from core.datasets import load_preset
from core.dataset_presets import PRESETS
from core.generation import GenParams
from core.geval import ACCURACY, COMPLETENESS, FormInput, judge_batch
from core.judges import LocalJudge
from core.model_files import SMOLLM2
from core.models import ModelHub
from core.threads import configure_threads
from pipelines.compare import closed_book_messages

FP32, FP16, HEAD32, INT8 = "fp32", "fp16", "fp16, LM head fp32", "int8 dynamic"


def hubs(int8: bool) -> dict[str, ModelHub]:
    """One hub per variant, merging off (every call is its own batch)."""
    made = {FP32: ModelHub(batch_window_ms=0, quantization="none"),
            FP16: ModelHub(batch_window_ms=0, quantization="fp16"),
            HEAD32: ModelHub(batch_window_ms=0, quantization="none")}
    if int8:
        made[INT8] = ModelHub(batch_window_ms=0, quantization="none")
    for hub in made.values():
        hub.load(SMOLLM2)
    quant.quantize(made[HEAD32].load(SMOLLM2).model, skip=("lm_head",))
    if int8:
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(made[INT8].load(SMOLLM2).model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return made


def step_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every Linear (fp16 packed: 2 per weight), the norms;
    embeddings only where they are the (tied) LM head, since a lookup reads one row."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        if isinstance(module, quant.Fp16Linear):
            total += 2 * module.in_features * module.out_features
            seen.add(module.weight.data_ptr())
            continue
        if isinstance(module, DynamicLinear):  # int8: 1 byte per weight
            total += module.in_features * module.out_features
            continue
        for param in module.parameters(recurse=False):
            if param.data_ptr() not in seen:
                seen.add(param.data_ptr())
                total += param.numel() * param.element_size()
    return total


def decode_speed(made: dict[str, ModelHub], new_tokens: int, repeats: int) -> dict[str, dict]:
    """Tokens/s after the first token: wall from each answer's own timings; CPU from the call's
    CPU seconds minus those of the same call stopped after its first token."""
    full, first = GenParams(max_new_tokens=new_tokens), GenParams(max_new_tokens=1)
    cases = {}
    for label, hub in made.items():
        cases[label] = lambda hub=hub: hub.generate(SMOLLM2, PROMPTS[:1], params=full)[0]
        cases[f"{label} (prefill)"] = lambda hub=hub: hub.generate(SMOLLM2, PROMPTS[:1], params=first)[0]
    results = timed_rounds(cases, repeats)
    out = {}
    for label in made:
        answer = results[label][3]
        steps = answer.new_tokens - 1
        out[label] = {"wall": steps / (answer.seconds - answer.first_token_seconds),
                      "cpu": steps / (results[label][2] - results[f"{label} (prefill)"][2]),
                      "steps": steps}
    return out


def answers(hub: ModelHub, questions: list[str], tokens: int, rows: int) -> list[str]:
    params = GenParams(max_new_tokens=tokens)
    texts: list[str] = []
    for start in range(0, len(questions), rows):
        prompts = [closed_book_messages(q) for q in questions[start:start + rows]]
        texts += [g.text for g in hub.generate(SMOLLM2, prompts, params=params)]
    return texts


def judge_scores(hub: ModelHub, items: list[FormInput]) -> dict[str, list[float | None]]:
    judge = LocalJudge(SMOLLM2, hub=hub)
    return {metric.name: [j.score for _, j in sorted(judge_batch(judge, metric, STEPS, items, "logprobs"))]
            for metric in (ACCURACY, COMPLETENESS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode length in part 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=48, help="answer length in part 2")
    parser.add_argument("--rows", type=int, default=8, help="questions per batch in part 2")
    parser.add_argument("--int8", action="store_true", help="add torch's dynamic int8 quantization")
    args = parser.parse_args()
    configure_threads(args.threads)
    load_average = os.getloadavg()[0]
    made = hubs(args.int8)
    models = {label: hub.load(SMOLLM2).model for label, hub in made.items()}

    speed = decode_speed(made, args.new_tokens, args.repeats)
    bandwidth = copy_bandwidth()

    examples = [e for name in PRESETS for e in load_preset(name, source="sample").split(0, 0.3)[1]]
    questions = [e.question for e in examples]
    texts, seconds = {}, {}
    for label, hub in made.items():
        wall, cpu = time.perf_counter(), time.process_time()
        texts[label] = answers(hub, questions, args.answer_tokens, args.rows)
        seconds[label] = (time.perf_counter() - wall, time.process_time() - cpu)

    items = [FormInput(e.question, e.answer, text) for e, text in zip(examples, texts[FP32])]
    judged = [label for label in made if label != HEAD32]
    scores = {label: judge_scores(made[label], items) for label in judged}
    quality = {label: judge_scores(made[FP32], [FormInput(e.question, e.answer, text)
                                                 for e, text in zip(examples, texts[label])])
               for label in made if label != FP32}

    print(f"\nMODEL_QUANT bench · {SMOLLM2} · torch threads {args.threads} · load average at start "
          f"{load_average:.1f} on {os.cpu_count()} CPUs · copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"1. batch-1 decode, {args.new_tokens} new tokens, median of {args.repeats} rounds")
    print(f"{'model':22} {'tok/s wall':>10} {'tok/s CPU':>10} {'vs fp32 (CPU)':>14} {'MB/step':>8} "
          f"{'bound tok/s':>11} {'of bound':>8}")
    for label, s in speed.items():
        read = step_bytes(models[label])
        bound = bandwidth / read
        print(f"{label:22} {s['wall']:10.1f} {s['cpu']:10.1f} "
              f"{s['wall'] / speed[FP32]['wall']:6.2f}x ({s['cpu'] / speed[FP32]['cpu']:4.2f}x) "
              f"{read / 1e6:8.0f} {bound:11.1f} {s['wall'] / bound:8.2f}")
    print(f"2. greedy closed-book answers, {len(questions)} eval questions of "
          f"{', '.join(PRESETS)}, {args.answer_tokens} new tokens, {args.rows} per batch")
    for label in made:
        same = sum(a == b for a, b in zip(texts[label], texts[FP32]))
        agreement = "(the reference)" if label == FP32 else (
            f"identical to fp32: {same}/{len(questions)} ({same / len(questions):.0%})")
        print(f"{label:22} {agreement:32} {seconds[label][0]:.1f} s wall, {seconds[label][1]:.1f} s CPU")
    print(f"3. G-Eval logprobs by the {SMOLLM2} judge on the {len(items)} fp32 answers, against the fp32 judge")
    for label in judged[1:]:
        for metric, fp32_scores in scores[FP32].items():
            pairs = paired(fp32_scores, scores[label][metric])
            diffs = [abs(a - b) for a, b in pairs]
            print(f"{label + ' judge, ' + metric:34} mean |diff| {statistics.mean(diffs):.4f}, max |diff| "
                  f"{max(diffs):.4f} (n={len(diffs)}; mean score fp32 {statistics.mean(a for a, _ in pairs):.3f}, "
                  f"{label} {statistics.mean(b for _, b in pairs):.3f})")
    print("4. each variant's answers scored by the fp32 judge, against the fp32 answers' scores")
    for label, by_metric in quality.items():
        for metric, fp32_scores in scores[FP32].items():
            pairs = paired(fp32_scores, by_metric[metric])
            diffs = [b - a for a, b in pairs]
            print(f"{label + ' answers, ' + metric:34} mean {statistics.mean(b for _, b in pairs):.3f} "
                  f"(fp32 {statistics.mean(a for a, _ in pairs):.3f}), mean diff {statistics.mean(diffs):+.4f}, "
                  f"mean |diff| {statistics.mean(abs(d) for d in diffs):.4f}, max |diff| "
                  f"{max(abs(d) for d in diffs):.4f} (n={len(diffs)})")


def paired(first: list[float | None], second: list[float | None]) -> list[tuple[float, float]]:
    return [(a, b) for a, b in zip(first, second) if a is not None and b is not None]


if __name__ == "__main__":
    main()
