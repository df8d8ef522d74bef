"""Multi-adapter generation on the embedded 135M model: K prompts with K different LoRA adapters in
ONE mixed batch vs one answer and vs the K answered one after another; the mixed batch's LoRA
terms by the per-row path (core.mixed_lora) vs peft's own loop over the adapters; memory of base
+ K adapters vs base alone; batch-1 decode speed against the memory-bandwidth bound, measured in
the same run.

    .venv/bin/python -m bench.generate [--threads N] [--new-tokens 64] [--repeats 3]

Targets: mixed K=4 <= 1.5x one answer; mixed K=4 <= 1.3x `__base__` x K per decode step; RSS with
4 adapters <= 1.1x base alone. "One answer" is the mean time of the K answers run alone, so
mixed/one = K * mixed/sequential. A batch's decode CPU seconds are its CPU seconds minus those of
the same call stopped after its first token (prefill only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from core.generation import GenParams
from core.mixed_lora import install, uninstall
from core.model_files import SMOLLM2, model_path
from core.models import ModelHub
from core.systems import BASE
from core.threads import configure_threads

K = 4
MIXED = f"mixed batch, {K} adapters"
PREFILL = "(prefill only)"
# Different lengths on purpose (left padding), and answers long enough to use all new tokens.
PROMPTS = [
    "Explain in detail how a bicycle gear system works.",
    "Context: The Eiffel Tower was completed in 1889 for the World's Fair in Paris, as the "
    "entrance arch.\n\nQuestion: When was the Eiffel Tower completed, and why was it built? "
    "Answer in a long paragraph.",
    "Write a long story about a lighthouse keeper.",
    "List the steps to bake bread at home, with two sentences on each step.",
]


def make_adapters(root: Path, k: int) -> list[Path]:
    """Random-init LoRA folders (r=8 on q_proj/v_proj), like a small fine-tune produces."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path(SMOLLM2), dtype=torch.float32)
    folders = []
    for i in range(k):
        torch.manual_seed(i)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
        peft_model.save_pretrained(root / f"a{i}")
        folders.append(root / f"a{i}")
        base = peft_model.unload()
    return folders


def timed_rounds(cases: dict, repeats: int) -> dict[str, tuple[float, float, float, object]]:
    """Median and min wall seconds, median CPU seconds (this process) per case, and its last
    result. The cases take turns in every round, so a change in background load hits all of them
    alike; one warm-up round first."""
    times: dict[str, list[float]] = {label: [] for label in cases}
    cpu: dict[str, list[float]] = {label: [] for label in cases}
    results = {label: fn() for label, fn in cases.items()}
    for _ in range(repeats):
        for label, fn in cases.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[label] = fn()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    return {label: (statistics.median(t), min(t), statistics.median(cpu[label]), results[label])
            for label, t in times.items()}


def on_peft_loop(entry, fn):
    """fn run with peft's own mixed-adapter loop in every LoRA layer instead of core.mixed_lora."""
    def run():
        uninstall(entry.model)
        try:
            return fn()
        finally:
            install(entry.model)
    return run


def copy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a 1 GiB tensor copy, best of 3."""
    src = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def child_rss(adapters: list[Path], threads: int) -> None:
    """Run in a fresh process: load, attach adapters, answer one batch; print peak RSS."""
    configure_threads(threads)
    hub = ModelHub()
    hub.load(SMOLLM2)
    names = [hub.load_adapter(SMOLLM2, str(a)) for a in adapters]
    hub.generate(SMOLLM2, PROMPTS, names or [BASE] * K, GenParams(max_new_tokens=8))
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "after": psutil.Process().memory_info().rss}))


def rss(adapters: list[Path], threads: int) -> dict[str, int]:
    """Peak and final RSS of a fresh process that loads the model, these adapters, answers once."""
    args = [sys.executable, "-m", "bench.generate", "--child-rss", json.dumps([str(a) for a in adapters]),
            "--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def phases(result: object) -> tuple[float, float]:
    """Prefill seconds (to the first token) and decode ms per step, from one call's Generations."""
    generations = result if isinstance(result, list) else [result]
    first = max(g.first_token_seconds for g in generations)
    last = max(g.seconds for g in generations)
    steps = max(g.new_tokens for g in generations)
    return first, 1000 * (last - first) / max(steps - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss is not None:
        child_rss([Path(a) for a in json.loads(args.child_rss)], args.threads)
        return
    configure_threads(args.threads)
    load_average = os.getloadavg()[0]
    params = GenParams(max_new_tokens=args.new_tokens)
    start = time.perf_counter()
    hub = ModelHub()
    entry = hub.load(SMOLLM2)
    first_load = time.perf_counter() - start
    start = time.perf_counter()
    ModelHub().load(SMOLLM2)  # a second copy: the load itself, without one-time imports
    second_load = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in entry.model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp), K)
        names = [hub.load_adapter(SMOLLM2, str(f)) for f in folders]
        first = GenParams(max_new_tokens=1)  # prefill only: a batch's CPU without its decode
        mixed, peft_mixed = MIXED, f"{MIXED}, peft loop"
        base, peft_base = f"{BASE} x{K} (batch)", f"{BASE} x{K}, peft loop"
        cases = {
            mixed: lambda: hub.generate(SMOLLM2, PROMPTS, names, params),
            peft_mixed: on_peft_loop(entry, lambda: hub.generate(SMOLLM2, PROMPTS, names, params)),
            f"same adapter x{K} (batch)": lambda: hub.generate(SMOLLM2, PROMPTS, names[:1] * K, params),
            base: lambda: hub.generate(SMOLLM2, PROMPTS, [BASE] * K, params),
            peft_base: on_peft_loop(entry, lambda: hub.generate(SMOLLM2, PROMPTS, [BASE] * K, params)),
            f"sequential, {K} adapters": lambda: [hub.generate(SMOLLM2, [p], [n], params)[0]
                                                  for p, n in zip(PROMPTS, names)],
            f"{mixed} {PREFILL}": lambda: hub.generate(SMOLLM2, PROMPTS, names, first),
            f"{peft_mixed} {PREFILL}": on_peft_loop(entry, lambda: hub.generate(SMOLLM2, PROMPTS, names, first)),
            f"{base} {PREFILL}": lambda: hub.generate(SMOLLM2, PROMPTS, [BASE] * K, first),
            f"{peft_base} {PREFILL}": on_peft_loop(entry, lambda: hub.generate(SMOLLM2, PROMPTS, [BASE] * K, first)),
        }
        results = timed_rounds(cases, args.repeats)
        rss_base = rss([], args.threads)
        rss_adapters = rss(folders, args.threads)

    decode = hub.generate(SMOLLM2, PROMPTS[:1], [BASE], GenParams(max_new_tokens=64))[0]
    tokens_per_s = (decode.new_tokens - 1) / (decode.seconds - decode.first_token_seconds)
    bandwidth = copy_bandwidth()
    bound = bandwidth / model_bytes

    print(f"torch threads {args.threads}, new tokens {args.new_tokens}, median of {args.repeats}, "
          f"load average at start {load_average:.1f} on {os.cpu_count()} CPUs")
    print(f"model load from the converted folder: {first_load:.2f} s first in this process "
          f"(with one-time imports), {second_load:.2f} s for a second copy")
    print(f"{'case':42} {'median s':>8} {'min s':>6} {'CPU s':>6} {'tokens':>7} {'prefill s':>10} "
          f"{'ms/step':>8}")
    steps = {}
    for label, (seconds, fastest, cpu, result) in results.items():
        generations = result if isinstance(result, list) else [result]
        prefill, steps[label] = phases(result) if "sequential" not in label else (
            statistics.mean(phases(g)[0] for g in result), statistics.mean(phases(g)[1] for g in result))
        shown = f"{steps[label]:8.0f}" if PREFILL not in label else f"{'':8}"
        print(f"{label:42} {seconds:8.2f} {fastest:6.2f} {cpu:6.2f} "
              f"{sum(g.new_tokens for g in generations):7d} {prefill:10.2f} {shown}")
    sequential = results[f"sequential, {K} adapters"][0]
    one = sequential / K  # the mean time of one of these answers alone
    print(f"one answer (mean of the {K} alone): {one:.2f} s")
    fastest_ratio = results[mixed][1] / results[f"sequential, {K} adapters"][1]
    print(f"mixed / one answer:   {results[mixed][0] / one:.2f}x median, {K * fastest_ratio:.2f}x min   "
          "(target <= 1.5x)")
    print(f"mixed / sequential:   {results[mixed][0] / sequential:.2f}x median, {fastest_ratio:.2f}x min")
    print(f"per decode step, mixed / {BASE} x{K}: per-row LoRA {steps[mixed] / steps[base]:.2f}x, "
          f"peft loop {steps[peft_mixed] / steps[peft_base]:.2f}x   (target <= 1.3x); "
          f"peft loop / per-row, mixed: {steps[peft_mixed] / steps[mixed]:.2f}x")
    decode_cpu = {label: results[label][2] - results[f"{label} {PREFILL}"][2]
                  for label in (mixed, peft_mixed, base, peft_base)}
    print(f"{K}-row decode CPU s (batch minus its prefill only): "
          + ", ".join(f"{label} {cpu:.2f}" for label, cpu in decode_cpu.items()))
    print(f"decode CPU, mixed / {BASE} x{K}: per-row LoRA {decode_cpu[mixed] / decode_cpu[base]:.2f}x, "
          f"peft loop {decode_cpu[peft_mixed] / decode_cpu[peft_base]:.2f}x   (target <= 1.3x; "
          "CPU seconds do not count waits on a busy machine)")
    for kind in ("peak", "after"):
        print(f"RSS {kind:5}: base alone {rss_base[kind] / 2**20:.0f} MiB, base + {K} adapters "
              f"{rss_adapters[kind] / 2**20:.0f} MiB, ratio {rss_adapters[kind] / rss_base[kind]:.3f}   (target <= 1.1x)")
    print(f"decode at batch 1: {tokens_per_s:.1f} tokens/s over {decode.new_tokens} tokens; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read + write), model {model_bytes / 1e6:.0f} MB")
    print(f"bandwidth bound {bound:.1f} tokens/s: decode reaches {tokens_per_s / bound:.2f} of it")


if __name__ == "__main__":
    main()
