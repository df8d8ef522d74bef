"""Fine-tune a LoRA adapter on QA pairs: `python -m jobs.finetune --help`.

Read top to bottom: spec -> data (sample, prompts, tokens, checks) -> model + LoRA -> the loop
(micro-batches, gradient accumulation, validation, checkpoints) -> outputs.

- The loss covers the answer tokens (and the end-of-turn token) only; prompts and padding are
  labelled -100. Batches are left-padded, so logits are computed for the answer tail only: the
  49k-wide vocabulary projection of every prompt position would cost more than the LoRA itself.
- float32 on CPU (bf16 is many times slower there, see STACK.md), bf16 autocast on CUDA; a plain
  PyTorch loop, no gradient checkpointing.
- `accelerate launch -m jobs.finetune ...` trains on several GPUs (`torchrun --nproc_per_node N
  -m jobs.finetune ...` on several CPU processes): Accelerator wraps the model for DDP (a no-op in
  one process), each process takes its share of every batch, only the main process writes files.
- Checkpoints (adapter, optimizer, scheduler, RNG, step, loss history) go to
  <adapter>/checkpoints/step-NNNNNN, written to a temporary folder and renamed, so a killed run
  leaves only complete ones; `--resume` continues from the newest.
- Outputs in config.subdir("adapters")/<name>/: adapter_model.safetensors, adapter_config.json,
  spec.json, train_ids.json, metrics.json (written last: its presence means the run finished;
  the checkpoints are then deleted).
Run by the job runner (jobs.runner), it reports through Reporter (jobs.events) and never opens
DuckDB; the app records the adapter from the Reporter result.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import config
from core.datasets import DatasetError
from core.names import check_name, inside
from core.schema import InputError
from core.testhooks import gate
from jobs.finetune_data import (
    Encoded, FinetuneError, FinetuneSpec, TrainData, build_parser, collate, n_logits, plan_epoch,
    prepare_data, read_json, sample_data, spec_from_args, steps_per_epoch,
)
from jobs.events import Reporter

__all__ = ["FinetuneSpec", "FinetuneError", "SilentReporter", "finetune_argv", "train", "adapter_dir", "main"]

CHECKPOINTS_KEPT = 2


def finetune_argv(spec: dict[str, Any], resume: bool) -> list[str]:
    """The job runner's command for a fine-tune job (JobKind(argv=finetune_argv))."""
    argv = [sys.executable, "-m", "jobs.finetune", "--spec-json", json.dumps(spec)]
    return argv + ["--resume"] if resume else argv


def adapter_dir(name: str) -> Path:
    """The folder of the adapter this app trains under `name` (resolved; never outside adapters/)."""
    return inside(config.subdir("adapters"), check_name(name, "Adapter name"))


# ---------------------------------------------------------------- model


def load_tokenizer(ref: str) -> tuple[Any, str]:
    """(tokenizer, the path from_pretrained reads); an unknown model fails here, before any work."""
    from transformers import AutoTokenizer

    from core.model_files import ModelNotFoundError, model_path

    path = model_path(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"Base model '{ref}' is not a built-in alias, not a local model "
                                 "folder, and could not be loaded from the Hugging Face Hub "
                                 f"(offline?): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, path


def load_lora_model(spec: FinetuneSpec, path: str, device: Any, local_index: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False,
                                  dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if spec.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": local_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if spec.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=spec.target_modules, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules the architecture does not have
        raise FinetuneError(f"LoRA cannot be applied to '{spec.base_model}': {err}") from err
    model.peft_config["default"].base_model_name_or_path = spec.base_model
    return model


def answer_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed cross-entropy over the labelled (answer) tokens of a left-padded batch."""
    import torch.nn.functional as F

    keep = n_logits(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
    targets = batch["labels"][:, -(keep - 1):]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                           ignore_index=-100, reduction="sum")


def validation_loss(model: Any, items: list[Encoded], spec: FinetuneSpec, pad_id: int,
                    accelerator: Any) -> float | None:
    """Mean loss per answer token over the validation examples (sharded across processes)."""
    import torch

    if not items:
        return None
    mine = items[accelerator.process_index::accelerator.num_processes]
    totals = torch.zeros(2, device=accelerator.device)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(mine), spec.micro_batch_size):
            batch = {k: v.to(accelerator.device)
                     for k, v in collate(mine[start:start + spec.micro_batch_size], pad_id).items()}
            totals[0] += answer_loss_sum(model, batch)
            totals[1] += (batch["labels"] != -100).sum()
    model.train()
    totals = accelerator.reduce(totals, "sum")
    return float(totals[0] / totals[1])


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Everything about progress that a resumed run continues (stored in each checkpoint)."""

    step: int = 0
    train: list[dict[str, float]] = field(default_factory=list)  # {step, loss} per optimizer step
    val: list[dict[str, float]] = field(default_factory=list)
    train_tokens: int = 0  # non-padding tokens through forward+backward
    step_times: list[dict[str, float]] = field(default_factory=list)  # {step, tokens, seconds, cpu_seconds}
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> Path:
    import torch

    root = folder / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    # Tensors and plain containers only: the resume loads it with weights_only=True (no pickled code).
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted((folder / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, device: Any) -> TrainState:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors", device=str(device)))
    blob = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["rng"]["cuda"])
    return TrainState(**read_json(checkpoint / "state.json"))


def prepare_folder(spec: FinetuneSpec, resume: bool) -> tuple[Path, bool]:
    """(adapter folder, whether a previous attempt left something to resume)."""
    folder = adapter_dir(spec.output_name)
    spec_file = folder / "spec.json"
    if not resume:
        if folder.exists() and any(folder.iterdir()):
            raise FinetuneError(f"An adapter named '{spec.output_name}' already exists ({folder}); "
                                "choose another name, or pass --resume to continue its training.")
        return folder, False
    if not spec_file.is_file():
        return folder, False
    saved = read_json(spec_file)
    changed = sorted(k for k, v in spec.to_dict().items() if saved.get(k) != v)
    if changed:
        raise FinetuneError(f"Cannot resume '{spec.output_name}': the spec differs from the one it "
                            f"was started with in {', '.join(changed)}. Resume with the same spec, "
                            "or train under a new name.")
    return folder, True


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- training


def train(spec: FinetuneSpec, resume: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train (or continue) the adapter `spec` describes; returns the Reporter result."""
    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    started = time.perf_counter()
    spec.check_runnable()
    cuda = torch.cuda.is_available()
    # cpu=True on a CPU-only machine lets torchrun start several CPU processes (gloo).
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    main_process = accelerator.is_main_process
    # Several processes train together; only the main one reports and writes files.
    reporter = (reporter or Reporter()) if main_process else SilentReporter()

    def log(line: str) -> None:
        if main_process:
            print(line, flush=True)

    folder, has_previous = prepare_folder(spec, resume)
    if has_previous and (folder / "metrics.json").is_file():
        log(f"'{spec.output_name}' already finished; nothing to resume")
        result = result_of(spec, folder, read_json(folder / "metrics.json"))
        reporter.result(result)
        return result

    reporter.progress(0.0, "loading data and tokenizer")
    sampled = sample_data(spec, log)  # a bad dataset fails before any model file is touched
    tokenizer, path = load_tokenizer(spec.base_model)
    data = prepare_data(spec, tokenizer, log, sampled)
    accelerator.wait_for_everyone()  # every process has checked the folder before it is written
    if main_process:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "spec.json", spec.to_dict())
        write_json(folder / "train_ids.json", {
            "dataset_id": data.sample.dataset_id,
            "train": [ex.id for ex in data.sample.train], "validation": [ex.id for ex in data.sample.val],
            "split_seed": spec.split_seed, "eval_fraction": spec.eval_fraction})

    reporter.progress(0.0, f"loading {spec.base_model}")
    torch.manual_seed(spec.seed + accelerator.process_index)
    model = load_lora_model(spec, path, accelerator.device, accelerator.local_process_index)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    per_epoch = steps_per_epoch(len(data.train), spec.micro_batch_size, spec.grad_accum,
                                accelerator.num_processes)
    total_steps = per_epoch * spec.epochs
    schedule = "constant_with_warmup" if spec.lr_schedule == "constant" else spec.lr_schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=round(spec.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # The scheduler stays outside prepare(): it steps once per optimizer step on every process.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    checkpoint = latest_checkpoint(folder) if has_previous else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler,
                                accelerator.device)
        state.resumed_from.append(state.step)
        log(f"resumed from {checkpoint.name}: step {state.step}/{total_steps}")
    pad_id = tokenizer.pad_token_id
    log(f"{len(data.train)} examples x {spec.epochs} epochs = {total_steps} optimizer steps of "
        f"{spec.effective_batch * accelerator.num_processes} examples; "
        f"trainable params {sum(p.numel() for p in params):,}; device {accelerator.device}")

    if state.step == 0 and not state.val:  # the base model's loss: the curve's starting point
        state.val.append({"step": 0, "loss": validation_loss(model, data.val, spec, pad_id, accelerator)})
    wall_before = state.wall_seconds
    plans: dict[int, list] = {}
    for step in range(state.step, total_steps):
        epoch, index = divmod(step, per_epoch)
        if epoch not in plans:
            plans[epoch] = plan_epoch(len(data.train), epoch, spec.seed, spec.micro_batch_size,
                                      spec.grad_accum, accelerator.process_index, accelerator.num_processes)
        micro_batches = [[data.train[i] for i in micro] for micro in plans[epoch][index]]
        # Normalising by the answer tokens of the whole step makes accumulation exact.
        step_tokens = sum(item.n_answer for micro in micro_batches for item in micro)
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum, tokens = 0.0, 0
        for i, items in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate(items, pad_id).items()}
            last = i == len(micro_batches) - 1
            with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                loss = answer_loss_sum(model, batch)
                accelerator.backward(loss / step_tokens)
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        accelerator.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds
        state.train_tokens += tokens * accelerator.num_processes
        # cpu_seconds / seconds well below the thread count: other processes had the cores.
        state.step_times.append({"step": step + 1, "tokens": tokens * accelerator.num_processes,
                                 "seconds": round(seconds, 4),
                                 "cpu_seconds": round(time.process_time() - cpu0, 4)})
        state.step = step + 1
        loss_mean = accelerator.reduce(torch.tensor(loss_sum / step_tokens, device=accelerator.device), "mean")
        state.train.append({"step": state.step, "loss": round(float(loss_mean), 5)})
        if state.step % spec.val_every == 0 or state.step == total_steps:
            state.val.append({"step": state.step,
                              "loss": validation_loss(model, data.val, spec, pad_id, accelerator)})
        state.wall_seconds = wall_before + time.perf_counter() - started
        if state.step % spec.checkpoint_every == 0 and state.step < total_steps and main_process:
            save_checkpoint(folder, accelerator.unwrap_model(model), optimizer, scheduler, state)
        reporter.progress(state.step / total_steps, step_message(state, total_steps))
        if main_process:  # one point per step for the live loss chart
            val = state.val[-1]["loss"] if state.val and state.val[-1]["step"] == state.step else None
            reporter.metric(step=state.step, train_loss=state.train[-1]["loss"], val_loss=val)
        if reporter.under_runner:  # by hand, the progress line above already printed it
            log(step_message(state, total_steps))
        gate(f"finetune-step-{state.step}")  # tests stop a run here (core.testhooks)

    accelerator.wait_for_everyone()
    metrics = final_metrics(spec, data, state, total_steps)
    if main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, safe_serialization=True)
        write_json(folder / "metrics.json", metrics)
        # A finished adapter is never resumed, and optimizer states weigh twice the adapter.
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    result = result_of(spec, folder, metrics)
    reporter.result(result)
    return result


class SilentReporter(Reporter):
    """For the processes other than the main one, and for callers that want no output."""

    def progress(self, fraction: float, message: str = "") -> None:
        pass

    def result(self, result: dict[str, Any]) -> None:
        pass


def step_message(state: TrainState, total_steps: int) -> str:
    val = state.val[-1]["loss"] if state.val and state.val[-1]["loss"] is not None else None
    speed = state.train_tokens / state.train_seconds if state.train_seconds else 0.0
    return (f"step {state.step}/{total_steps} · loss {state.train[-1]['loss']:.4f}"
            + (f" · val {val:.4f}" if val is not None else "") + f" · {speed:.0f} tok/s")


def final_metrics(spec: FinetuneSpec, data: TrainData, state: TrainState, total_steps: int) -> dict[str, Any]:
    val = [v for v in state.val if v["loss"] is not None]
    return {
        "train_loss": state.train, "val_loss": val,
        "final_train_loss": state.train[-1]["loss"] if state.train else None,
        "final_val_loss": val[-1]["loss"] if val else None,
        "steps": total_steps, "epochs": spec.epochs,
        "n_train": len(data.train), "n_val": len(data.val),
        "train_split_size": data.sample.train_split_size,
        "effective_batch": spec.effective_batch,
        "train_tokens": state.train_tokens,
        "train_tokens_per_s": round(state.train_tokens / state.train_seconds, 2) if state.train_seconds else None,
        "train_seconds": round(state.train_seconds, 2), "wall_seconds": round(state.wall_seconds, 2),
        "step_times": state.step_times,
        "truncated_answers": data.truncated_answers, "longest_prompt_tokens": data.longest_prompt,
        "resumed_from": state.resumed_from,
    }


_SUMMARY = ("final_train_loss", "final_val_loss", "steps", "n_train", "n_val", "train_tokens_per_s",
            "wall_seconds", "truncated_answers", "resumed_from")


def result_of(spec: FinetuneSpec, folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the app stores as the adapters-table row."""
    return {"name": spec.output_name, "base_model": spec.base_model, "path": str(folder),
            "spec": spec.to_dict(), "metrics": {k: metrics[k] for k in _SUMMARY}}


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.model_files import ModelNotFoundError, UnsupportedModelError

    try:
        result = train(spec_from_args(args), resume=args.resume)
    except (InputError, DatasetError, ModelNotFoundError, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    # One row per adapter: under torchrun/accelerate only rank 0 records it.
    if not Reporter().under_runner and os.environ.get("RANK", "0") == "0":
        record_adapter(result)
    return 0


def record_adapter(result: dict[str, Any]) -> None:
    """Run by hand, the CLI writes the same adapters row the app writes for a UI job. When the app
    holds the database, the app registers the folder itself at its next start."""
    from core.store import Store, StoreLockedError

    try:
        store = Store()
    except StoreLockedError:
        print(f"adapter saved in {result['path']}; the app holds the database and will list it "
              "when it next starts", flush=True)
        return
    store.upsert_adapter(**result)
    store.close()
    print(f"adapter '{result['name']}' saved in {result['path']} and recorded", flush=True)


if __name__ == "__main__":
    sys.exit(main())
