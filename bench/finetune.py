"""LoRA fine-tuning throughput on the embedded 135M model: our loop (jobs.finetune.train) vs a bare
PyTorch loop vs TRL's SFTTrainer with its default config, on the same examples, in training tokens
per second (non-padding tokens through forward + backward), and the achieved GFLOP/s against this
CPU's float32 matmul rate measured in the same run.

    .venv/bin/python -m bench.finetune [--steps 3] [--trl-steps 2] [--threads N] [--skip-trl]

Data: the CPU preset (NQ sample, gold passage in the RAG prompt, max_length 384, LoRA r 8 on
q/k/v/o, micro batch 4 x 2 accumulation = 8 examples per optimizer step). The first step of every
method is a warm-up and is not timed (oneDNN picks kernels on first use of each shape).

Every rate is given per wall second and per CPU second (process time, all threads). On a quiet
machine they agree up to the thread count; when other processes share the cores, wall rates drop
and the per-CPU-second rates (compared with the matmul's, also per CPU second) still show how well
the loop uses the cores it gets.

FLOPs convention: 6 * N * T, N = the base model's parameters (embeddings included: the tied
embedding is also the output projection), T = non-padding tokens: forward plus a full backward.
For LoRA this overstates the real work (frozen weights need no weight gradients, and our loop
projects only the answer positions onto the vocabulary), so the executed FLOPs of our loop are
also estimated: 4 * N_body * T + 4 * N_emb * T_logits (forward + input gradients).
Target: our loop >= 60% of the matmul rate (6NT convention).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import config

MODEL = config.DEFAULT_CHAT_MODEL


@dataclass
class Rate:
    """Work per wall second and per CPU second."""

    work: float
    wall: float
    cpu: float

    @property
    def per_wall(self) -> float:
        return self.work / self.wall

    @property
    def per_cpu(self) -> float:
        return self.work / self.cpu


def matmul_rate(size: int = 2048, repeats: int = 8) -> Rate:
    """FLOPs of the fastest of a few large float32 square products (the CPU's practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return Rate(2 * size**3, *best)


def steady(step_times: list[dict[str, float]]) -> tuple[Rate, int]:
    """(tokens per second, timed steps) over the steps after the warm-up step."""
    timed = step_times[1:]
    return Rate(sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed),
                sum(s["cpu_seconds"] for s in timed)), len(timed)


def lora_config(spec: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=spec.target_modules, task_type="CAUSAL_LM")


def run_ours(spec: Any) -> list[dict[str, float]]:
    from jobs.finetune import SilentReporter, train

    result = train(spec, reporter=SilentReporter())
    return json.loads((Path(result["path"]) / "metrics.json").read_text())["step_times"]


def run_bare(spec: Any, data: Any, path: str, pad_id: int) -> list[dict[str, float]]:
    """The textbook loop: right padding, the model's own loss over full logits, same batches."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs.finetune_data import IGNORE, plan_epoch

    torch.manual_seed(spec.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora_config(spec))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    times = []
    steps = plan_epoch(len(data.train), 0, spec.seed, spec.micro_batch_size, spec.grad_accum)
    for number, step in enumerate(steps, start=1):
        t0, c0, tokens = time.perf_counter(), time.process_time(), 0
        for micro in step:
            items = [data.train[i] for i in micro]
            width = max(len(it.input_ids) for it in items)
            pad = [width - len(it.input_ids) for it in items]
            ids = torch.tensor([it.input_ids + [pad_id] * p for it, p in zip(items, pad)])
            mask = torch.tensor([[1] * len(it.input_ids) + [0] * p for it, p in zip(items, pad)])
            labels = torch.tensor([it.labels + [IGNORE] * p for it, p in zip(items, pad)])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / len(step)).backward()
            tokens += int(mask.sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append({"step": number, "tokens": tokens, "seconds": time.perf_counter() - t0,
                      "cpu_seconds": time.process_time() - c0})
    return times


def run_trl(spec: Any, data: Any, path: str, steps: int) -> list[dict[str, float]]:
    """SFTTrainer with SFTConfig's defaults (bf16, gradient checkpointing, batch 8, lr 2e-5, ...);
    only output, logging and the step count are set, plus token counting (no effect on training)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": m, "completion": [{"role": "assistant", "content": ex.answer}]}
            for m, ex in zip(data.train_messages, data.sample.train)]
    times: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.c0, self.seen = time.perf_counter(), time.process_time(), state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append({"step": state.global_step, "tokens": state.num_input_tokens_seen - self.seen,
                          "seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0})

    with tempfile.TemporaryDirectory() as out:
        # use_cpu: without it a CPU-only machine refuses the default bf16=True.
        args = SFTConfig(output_dir=out, max_steps=steps, use_cpu=not torch.cuda.is_available(),
                         report_to="none", save_strategy="no",
                         logging_strategy="no", include_num_input_tokens_seen="non_padding",
                         disable_tqdm=True)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                             args=args, train_dataset=Dataset.from_list(rows),
                             peft_config=lora_config(spec), callbacks=[Timer()])
        trainer.train()
    return times


def n_params(path: str) -> int:
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as weights:
        return sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())


def logit_positions(data: Any, spec: Any) -> int:
    """Positions our loop projects onto the vocabulary over one epoch (its answer tails)."""
    from jobs.finetune_data import collate, n_logits, plan_epoch

    total = 0
    for step in plan_epoch(len(data.train), 0, spec.seed, spec.micro_batch_size, spec.grad_accum):
        for micro in step:
            total += len(micro) * n_logits(collate([data.train[i] for i in micro], 0)["labels"])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of our and the bare loop")
    parser.add_argument("--trl-steps", type=int, default=2, help="SFTTrainer steps (slow by default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Throwaway adapters go to a temporary data dir; the converted model cache stays shared.
    os.environ.setdefault("MODELS_DIR", str(config.models_dir()))
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="bench-finetune-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoConfig

    from jobs.finetune import load_tokenizer
    from jobs.finetune_data import FinetuneSpec, prepare_data

    spec = FinetuneSpec.cpu_preset().replace(n_train=args.steps * 8, val_size=0, name="bench",
                                             val_every=10_000, checkpoint_every=10_000)
    tokenizer, path = load_tokenizer(MODEL)
    data = prepare_data(spec, tokenizer, log=lambda line: None)
    cfg = AutoConfig.from_pretrained(path)
    n, n_emb = n_params(path), cfg.vocab_size * cfg.hidden_size

    load_before = os.getloadavg()[0]
    matmul_before = matmul_rate()
    rows = [("ours: jobs.finetune (left pad, answer logits)", *steady(run_ours(spec))),
            ("bare PyTorch loop (full logits, HF loss)", *steady(run_bare(spec, data, path, tokenizer.pad_token_id)))]
    if not args.skip_trl:
        rows.append(("TRL SFTTrainer, default SFTConfig", *steady(run_trl(spec, data, path, args.trl_steps))))
    matmul_after = matmul_rate()
    matmul = Rate(matmul_before.work, min(matmul_before.wall, matmul_after.wall),
                  min(matmul_before.cpu, matmul_after.cpu))

    print(f"\nthreads {torch.get_num_threads()} | OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')} | "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after | N = {n / 1e6:.1f}M params")
    print(f"float32 matmul 2048^3 (best of 8, before and after): {matmul.per_wall / 1e9:.0f} GFLOP/s per wall s, "
          f"{matmul.per_cpu / 1e9:.0f} per CPU s")
    print(f"{'method':46} {'steps':>5} {'tokens':>6} {'tok/s':>6} {'tok/CPU-s':>9} {'GFLOP/s 6NT':>11} "
          f"{'% matmul':>8} {'% (CPU s)':>9} {'vs ours':>7}")
    ours = rows[0][1]
    for name, rate, steps in rows:
        wall, cpu = 6 * n * rate.per_wall / 1e9, 6 * n * rate.per_cpu / 1e9
        print(f"{name:46} {steps:5d} {rate.work:6.0f} {rate.per_wall:6.0f} {rate.per_cpu:9.0f} {wall:11.0f} "
              f"{wall * 1e9 / matmul.per_wall:8.0%} {cpu * 1e9 / matmul.per_cpu:9.0%} "
              f"{rate.per_wall / ours.per_wall:6.2f}x")
    per_token = (4 * (n - n_emb) * sum(len(e.input_ids) for e in data.train)
                 + 4 * n_emb * logit_positions(data, spec)) / sum(len(e.input_ids) for e in data.train)
    print(f"ours, executed-FLOPs estimate (4*N_body*T + 4*N_emb*T_logits = {per_token / 1e6:.0f} MFLOP/token "
          f"vs 6N = {6 * n / 1e6:.0f}): {per_token * ours.per_wall / 1e9:.0f} GFLOP/s = "
          f"{per_token * ours.per_wall / matmul.per_wall:.0%} of matmul "
          f"({per_token * ours.per_cpu / matmul.per_cpu:.0%} per CPU s)")


if __name__ == "__main__":
    main()
