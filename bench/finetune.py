"""LoRA fine-tuning throughput on the embedded 135M model: our loop (jobs.finetune.train) vs a bare
PyTorch loop vs TRL's SFTTrainer with its default config, on the same examples, in training tokens
per second (non-padding tokens through forward + backward), and the achieved GFLOP/s against this
CPU's float32 matmul rate measured in the same run.

    .venv/bin/python -m bench.finetune [--steps 3] [--trl-steps 2] [--threads N] [--skip-trl]

Data: the CPU preset (NQ sample, gold passage in the RAG prompt, max_length 384, LoRA r 8 on
q/k/v/o, micro batch 4 x 2 accumulation = 8 examples per optimizer step). The first step of every
method is a warm-up and is not timed (oneDNN picks kernels on first use of each shape).

FLOPs convention: 6 * N * T per step, N = the base model's parameters (embeddings included: the
tied embedding is also the output projection), T = non-padding tokens. It counts forward plus a
full backward. For LoRA it overstates the real work (frozen weights need no weight gradients, and
our loop projects only the answer positions onto the vocabulary), so the executed FLOPs of our
loop are also estimated: 4 * N_body * T + 4 * N_emb * T_logits (forward + input gradients).
Target: our loop >= 60% of the matmul rate (6NT convention).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core import config

MODEL = config.DEFAULT_CHAT_MODEL


def matmul_gflops(size: int = 2048, repeats: int = 8) -> float:
    """Best float32 matmul rate of a few large square products (the CPU's practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def steady(step_times: list[dict[str, float]]) -> tuple[float, int, int]:
    """(tokens/s, tokens, steps) over the steps after the warm-up step."""
    timed = step_times[1:]
    tokens = sum(s["tokens"] for s in timed)
    return tokens / sum(s["seconds"] for s in timed), tokens, len(timed)


def run_ours(spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from jobs.finetune import SilentReporter, train

    result = train(spec, reporter=SilentReporter())
    metrics = json.loads((Path(result["path"]) / "metrics.json").read_text())
    return result, metrics


def run_bare(spec: Any, data: Any, path: str, tokenizer: Any) -> list[dict[str, float]]:
    """The textbook loop: right padding, the model's own loss over full logits, same batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs.finetune_data import IGNORE, plan_epoch

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha,
                                             lora_dropout=spec.lora_dropout,
                                             target_modules=spec.target_modules, task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    times = []
    for number, step in enumerate(plan_epoch(len(data.train), 0, spec.seed, spec.micro_batch_size,
                                             spec.grad_accum), start=1):
        t0, tokens = time.perf_counter(), 0
        for micro in step:
            items = [data.train[i] for i in micro]
            width = max(len(it.input_ids) for it in items)
            ids = torch.tensor([it.input_ids + [tokenizer.pad_token_id] * (width - len(it.input_ids)) for it in items])
            mask = torch.tensor([[1] * len(it.input_ids) + [0] * (width - len(it.input_ids)) for it in items])
            labels = torch.tensor([it.labels + [IGNORE] * (width - len(it.labels)) for it in items])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / len(step)).backward()
            tokens += int(mask.sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append({"step": number, "tokens": tokens, "seconds": time.perf_counter() - t0})
    return times


def run_trl(spec: Any, data: Any, path: str, steps: int) -> list[dict[str, float]]:
    """SFTTrainer with SFTConfig's defaults (bf16, gradient checkpointing, batch 8, lr 2e-5, ...);
    only output, logging and the step count are set, plus token counting (no effect on training)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": m, "completion": [{"role": "assistant", "content": ex.answer}]}
            for m, ex in zip(data.train_messages, data.sample.train)]
    times: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append({"step": state.global_step, "tokens": state.num_input_tokens_seen - self.seen,
                          "seconds": time.perf_counter() - self.t0})

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, report_to="none", save_strategy="no",
                         logging_strategy="no", include_num_input_tokens_seen="non_padding",
                         disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             peft_config=LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha,
                                                    lora_dropout=spec.lora_dropout,
                                                    target_modules=spec.target_modules,
                                                    task_type="CAUSAL_LM"),
                             callbacks=[Timer()])
        trainer.train()
    return times


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

    from jobs.finetune import load_tokenizer
    from jobs.finetune_data import FinetuneSpec, prepare_data

    spec = replace(FinetuneSpec.cpu_preset(), n_train=args.steps * 8, val_size=0, name="bench",
                   val_every=10_000, checkpoint_every=10_000)
    tokenizer, path = load_tokenizer(MODEL)
    data = prepare_data(spec, tokenizer, log=lambda line: None)

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    n_emb = cfg.vocab_size * cfg.hidden_size
    n_params = _n_params(path)
    load_before = os.getloadavg()[0]
    rate_before = matmul_gflops()
    rows = []
    _, metrics = run_ours(spec)
    rows.append(("ours: jobs.finetune (left pad, answer logits)", *steady(metrics["step_times"])))
    rows.append(("bare PyTorch loop (full logits, HF loss)", *steady(run_bare(spec, data, path, tokenizer))))
    if not args.skip_trl:
        rows.append(("TRL SFTTrainer, default SFTConfig", *steady(run_trl(spec, data, path, args.trl_steps))))

    rate = max(rate_before, matmul_gflops())  # the better of before and after all runs
    # Other processes on these cores distort every figure (OpenMP threads wait for each other).
    print(f"\nthreads {torch.get_num_threads()} | load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after | N = {n_params / 1e6:.1f}M params | "
          f"float32 matmul {rate:.0f} GFLOP/s (2048^3, best of 8, before and after)")
    print(f"{'method':48} {'steps':>5} {'tokens':>7} {'tok/s':>7} {'GFLOP/s 6NT':>12} {'% matmul':>9} {'vs ours':>8}")
    ours_speed = rows[0][1]
    for name, speed, tokens, steps in rows:
        gflops = 6 * n_params * speed / 1e9
        print(f"{name:48} {steps:5d} {tokens:7d} {speed:7.0f} {gflops:12.0f} {gflops / rate:9.0%} "
              f"{speed / ours_speed:7.2f}x")
    logits = _logit_positions(data, spec)
    tokens = sum(len(e.input_ids) for e in data.train)
    executed = 4 * (n_params - n_emb) * tokens + 4 * n_emb * logits
    print(f"ours, executed-FLOPs estimate (4*N_body*T + 4*N_emb*T_logits): "
          f"{executed / tokens * ours_speed / 1e9:.0f} GFLOP/s = {executed / tokens * ours_speed / 1e9 / rate:.0%} of matmul")


def _n_params(path: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as weights:
        return sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())


def _logit_positions(data: Any, spec: Any) -> int:
    """Positions our loop projects onto the vocabulary over one epoch (its answer tails)."""
    from jobs.finetune_data import collate, n_logits, plan_epoch

    total = 0
    for step in plan_epoch(len(data.train), 0, spec.seed, spec.micro_batch_size, spec.grad_accum):
        for micro in step:
            batch = collate([data.train[i] for i in micro], 0)
            total += len(micro) * n_logits(batch["labels"])
    return total


if __name__ == "__main__":
    main()
