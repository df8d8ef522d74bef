"""The fine-tune spec and everything between a dataset and a padded batch of token ids.

jobs/finetune.py holds the training loop; this module holds what it consumes:
- FinetuneSpec: every knob, checked by validate() before anything is loaded;
- the train/validation sample, drawn from the TRAIN split only (an eval example can never be
  trained on), nested across sizes (the n=200 sample is a prefix of the n=500 one for a seed);
- tokenization with the loss on the answer only, and the batch plan (which examples form each
  micro-batch of each optimizer step), a pure function of the seed so a resumed run sees the
  same batches as an uninterrupted one;
- prepare_data, which runs all of that and raises every user-fixable problem before training;
- the CLI flags, one per spec field.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from core import config
from core.datasets import QADataset, load_preset, load_upload
from core.dataset_presets import PRESETS
from core.schema import InputError, Passage, QAExample, unknown_fields

IGNORE = -100  # label value that cross-entropy skips (prompt and padding positions)
CONTEXT_MODES = ("none", "gold", "retrieved")
SCHEDULES = ("cosine", "linear", "constant")
SOURCES = ("sample", "hub")
MAX_SANE_LR = 1e-2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # also a valid ModelHub adapter name


class FinetuneError(InputError):
    """A fine-tune request that cannot work; the message says what to change."""


@dataclass
class FinetuneSpec:
    """What to train. Defaults follow the study (LoRA r 16, alpha 32, 3 epochs, lr 2e-4, batch 16)."""

    base_model: str = config.DEFAULT_CHAT_MODEL
    dataset: str = "bioasq"  # a preset name, or the path of an uploaded .jsonl/.json/.csv/.parquet
    source: str = "sample"  # presets only: the shipped sample or the Hugging Face Hub
    n_train: int = 200
    context: str = "none"  # what the training prompts carry: none | gold passages | retrieved
    pipeline: str = ""  # saved pipeline: its prompt template (and retriever for "retrieved")
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    qlora: bool = False
    epochs: int = 3
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    micro_batch_size: int = 4
    grad_accum: int = 4
    max_length: int = 1024
    max_grad_norm: float = 1.0
    seed: int = 0
    split_seed: int = 0  # the train/eval split: must match the one evaluation uses
    eval_fraction: float = 0.3
    val_size: int = 16  # train-split examples held out of training for a validation loss
    val_every: int = 25  # optimizer steps between validation losses (also at the end)
    checkpoint_every: int = 25  # optimizer steps between checkpoints
    name: str = ""  # adapter folder name; empty: derived from the spec

    @classmethod
    def cpu_preset(cls) -> "FinetuneSpec":
        """Small enough to finish in minutes on a 2-core laptop with the embedded 135M model."""
        return cls(dataset="nq", context="gold", n_train=32, epochs=1, micro_batch_size=4,
                   grad_accum=2, max_length=384, lora_r=8, lora_alpha=16.0, val_size=8,
                   val_every=2, checkpoint_every=2)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum

    @property
    def output_name(self) -> str:
        if self.name:
            return self.name
        dataset = Path(self.dataset).stem if self.is_file else self.dataset
        raw = f"{Path(self.base_model).name}-{dataset}-n{self.n_train}-{self.context}-r{self.lora_r}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64]

    @property
    def is_file(self) -> bool:
        return self.dataset not in PRESETS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneSpec":
        if not isinstance(data, dict):
            raise FinetuneError("A fine-tune spec must be a JSON object.")
        unknown = unknown_fields(cls, data)
        if unknown:
            raise FinetuneError(f"Unknown field(s) in the fine-tune spec: {', '.join(unknown)}.")
        values = dict(data)
        if isinstance(values.get("target_modules"), str):
            values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
        return cls(**values)

    def validate(self) -> None:
        """Raise FinetuneError on the first problem, before any model or data is loaded."""
        _check_text(self.base_model, "base_model", "a model alias, folder or hub id")
        self._validate_data()
        self._validate_lora()
        self._validate_optimization()
        if not _NAME.match(self.output_name):
            raise FinetuneError(f"Adapter name {self.output_name!r} is not allowed: use 1-64 letters, "
                                "digits, '_' or '-', starting with a letter or digit.")

    def _validate_data(self) -> None:
        _check_text(self.dataset, "dataset", f"a preset ({', '.join(PRESETS)}) or an uploaded file")
        if self.is_file and not Path(self.dataset).is_file():
            raise FinetuneError(f"Dataset '{self.dataset}' is neither a preset ({', '.join(PRESETS)}) "
                                "nor an existing file.")
        if not self.is_file and self.source not in SOURCES:
            raise FinetuneError(f"A preset is loaded from 'sample' or 'hub', not {self.source!r}.")
        _check_int(self.n_train, "n_train", 1)
        _check_int(self.val_size, "val_size", 0)
        if self.context not in CONTEXT_MODES:
            raise FinetuneError(f"Unknown context mode {self.context!r}; choose one of: "
                                f"{', '.join(CONTEXT_MODES)}.")
        if self.context == "retrieved" and not self.pipeline:
            raise FinetuneError("Context 'retrieved' needs the name of a saved pipeline to retrieve with.")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 < self.eval_fraction < 1:
            raise FinetuneError(f"eval_fraction must be between 0 and 1, not {self.eval_fraction!r}.")
        _check_int(self.split_seed, "split_seed", 0)

    def _validate_lora(self) -> None:
        _check_int(self.lora_r, "LoRA rank r", 1)
        _check_number(self.lora_alpha, "LoRA alpha", low=0.0, low_inclusive=False)
        _check_number(self.lora_dropout, "LoRA dropout", low=0.0, high=1.0)
        if (not isinstance(self.target_modules, list) or not self.target_modules
                or not all(isinstance(m, str) and m.strip() for m in self.target_modules)):
            raise FinetuneError("target_modules must be a non-empty list of module names, "
                                "e.g. q_proj,k_proj,v_proj,o_proj.")
        if self.qlora:
            check_qlora_possible()

    def _validate_optimization(self) -> None:
        _check_int(self.epochs, "epochs", 1)
        _check_number(self.lr, "learning rate", low=0.0, low_inclusive=False)
        if self.lr > MAX_SANE_LR:
            raise FinetuneError(f"A learning rate of {self.lr:g} is absurd for LoRA (it would destroy the "
                                f"model); use at most {MAX_SANE_LR:g}, typically 1e-4 to 3e-4.")
        if self.lr_schedule not in SCHEDULES:
            raise FinetuneError(f"Unknown lr schedule {self.lr_schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
        _check_number(self.warmup_ratio, "warmup_ratio", low=0.0, high=1.0)
        _check_int(self.micro_batch_size, "micro_batch_size", 1)
        _check_int(self.grad_accum, "grad_accum", 1)
        _check_int(self.max_length, "max_length", 8)
        _check_number(self.max_grad_norm, "max_grad_norm", low=0.0, low_inclusive=False)
        _check_int(self.seed, "seed", 0)
        _check_int(self.val_every, "val_every", 1)
        _check_int(self.checkpoint_every, "checkpoint_every", 1)


def check_qlora_possible() -> None:
    import importlib.util

    if not torch.cuda.is_available():
        raise FinetuneError("QLoRA needs a CUDA GPU (4-bit weights through bitsandbytes) and this "
                            "machine has none; turn QLoRA off to train plain LoRA on the CPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError("QLoRA needs the bitsandbytes package: pip install bitsandbytes.")


def _check_text(value: Any, what: str, expected: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise FinetuneError(f"{what} is empty; give {expected}.")


def _check_int(value: Any, what: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FinetuneError(f"{what} must be a whole number of at least {minimum}, not {value!r}.")


def _check_number(value: Any, what: str, low: float, high: float | None = None,
                  low_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value < high)
    if not ok:
        bounds = f"{'at least' if low_inclusive else 'above'} {low:g}" + (f" and below {high:g}" if high else "")
        raise FinetuneError(f"{what} must be a number {bounds}, not {value!r}.")


# ---------------------------------------------------------------- the sample


@dataclass
class Sample:
    dataset_id: str  # the dataset's catalog id (QADataset.source), recorded with the train ids
    train: list[QAExample]
    val: list[QAExample]
    train_split_size: int
    eval_split_size: int


def load_dataset(spec: FinetuneSpec) -> QADataset:
    return load_upload(spec.dataset) if spec.is_file else load_preset(spec.dataset, spec.source)


def draw_sample(spec: FinetuneSpec, dataset: QADataset) -> Sample:
    """val_size + n_train examples of the train split, shuffled with the seed (sorted by id first,
    so the sample depends on the ids, not on the file order)."""
    train_split, eval_split = dataset.split(spec.split_seed, spec.eval_fraction)
    needed = spec.n_train + spec.val_size
    if needed > len(train_split):
        raise FinetuneError(
            f"{dataset.source} has {len(train_split)} examples in its train split "
            f"({len(eval_split)} more are held out for evaluation), but n_train={spec.n_train} plus "
            f"val_size={spec.val_size} needs {needed}. Lower n_train to at most "
            f"{max(len(train_split) - spec.val_size, 0)} (or val_size), or load a larger dataset.")
    shuffled = sorted(train_split, key=lambda ex: ex.id)
    random.Random(spec.seed).shuffle(shuffled)
    return Sample(dataset_id=dataset.source, train=shuffled[spec.val_size:needed],
                  val=shuffled[:spec.val_size],
                  train_split_size=len(train_split), eval_split_size=len(eval_split))


# ---------------------------------------------------------------- tokens


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; the answer tokens and the end-of-turn token kept
    truncated: bool = False  # the answer did not fit max_length and was cut

    @property
    def n_answer(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def end_of_turn(tokenizer: Any) -> str:
    """The text the chat template puts after an assistant reply (e.g. '<|im_end|>'): the model must
    learn to emit it, or generation would run on past the answer."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token
    probe = [{"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": "ANSWER"}],
                                         tokenize=False)
    if not full.startswith(prompt + "ANSWER"):
        raise FinetuneError("This model's chat template renders an assistant reply differently from "
                            "its generation prompt, so answer-only training cannot be lined up with it.")
    suffix = full[len(prompt) + len("ANSWER"):].strip()
    if tokenizer.eos_token and tokenizer.eos_token in suffix:
        return tokenizer.eos_token
    return suffix or tokenizer.eos_token


def encode(tokenizer: Any, prompt_text: str, answer: str, eot: str, max_length: int) -> Encoded:
    """Prompt and answer are tokenized separately, as at generation time: the model reads the
    prompt's tokens and produces the answer's. The answer is cut (end-of-turn first) if too long."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer.strip() + eot, add_special_tokens=False)["input_ids"]
    room = max(max_length - len(prompt), 0)
    kept = answer_ids[:room]
    return Encoded(prompt + kept, [IGNORE] * len(prompt) + kept, truncated=len(answer_ids) > room)


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding to the longest row of this micro-batch: every answer then ends at the right
    edge, so the loss needs logits for the last `keep` positions only (see n_logits)."""
    width = max(len(it.input_ids) for it in items)
    ids, mask, labels = [], [], []
    for it in items:
        pad = width - len(it.input_ids)
        ids.append([pad_id] * pad + it.input_ids)
        mask.append([0] * pad + [1] * len(it.input_ids))
        labels.append([IGNORE] * pad + it.labels)
    mask_t = torch.tensor(mask)
    # Positions count real tokens only, as in left-padded generation.
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": torch.tensor(ids), "attention_mask": mask_t, "position_ids": positions,
            "labels": torch.tensor(labels)}


def n_logits(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: the longest labelled tail plus the one position
    that predicts its first token."""
    labelled = labels != IGNORE
    first = torch.where(labelled.any(-1), labelled.int().argmax(-1), labels.shape[1])
    return int(labels.shape[1] - first.min()) + 1


# ---------------------------------------------------------------- batch plan


def plan_epoch(n_examples: int, epoch: int, seed: int, micro_batch: int, grad_accum: int,
               rank: int = 0, world: int = 1) -> list[list[list[int]]]:
    """Optimizer steps of one epoch for one process: steps -> micro-batches -> example indices.

    Every process gets the same number of micro-batches (several GPUs wrap around to the first
    examples, like DistributedSampler), so they all reach each gradient sync together.
    """
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_micro = micro_batch * world
    n_micro = math.ceil(n_examples / per_micro)
    if world > 1:
        order = (order * math.ceil(n_micro * per_micro / n_examples))[: n_micro * per_micro]
    micros = [order[i * per_micro:(i + 1) * per_micro][rank::world] for i in range(n_micro)]
    return [micros[i:i + grad_accum] for i in range(0, n_micro, grad_accum)]


def steps_per_epoch(n_examples: int, micro_batch: int, grad_accum: int, world: int = 1) -> int:
    return math.ceil(math.ceil(n_examples / (micro_batch * world)) / grad_accum)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- prompts


def prompt_messages(spec: FinetuneSpec, examples: list[QAExample], dataset: QADataset,
                    progress: Any = None) -> list[list[dict[str, str]]]:
    """Chat messages per example, built by the RAG query pipeline's own build_prompt, so the model
    is trained on exactly the prompt layout it will answer in (template of `spec.pipeline`, else
    the default one). Documents: none, the gold passages, or what the pipeline retrieves."""
    # Imported here: haystack is a heavy import that spec validation and the CLI's --help skip.
    from pipelines.indexing import load_index, passage_documents
    from pipelines.query import build_prompt, retrieve
    from pipelines.spec import PipelineSpec, load_spec

    pipeline = load_spec(spec.pipeline) if spec.pipeline else PipelineSpec(name="default")
    store = load_index(spec.pipeline) if spec.context == "retrieved" else None
    if spec.context == "gold":
        missing = [ex.id for ex in examples if not ex.contexts]
        if missing:
            raise FinetuneError(f"Context 'gold' needs gold passages, but {len(missing)} of the "
                                f"{len(examples)} sampled examples have none (e.g. id {missing[0]}); "
                                "choose context 'none' or a dataset with contexts.")
    corpus = {p.text: p for p in dataset.corpus}  # gold passages get the titles the index gives them
    messages = []
    for number, ex in enumerate(examples, start=1):
        if spec.context == "gold":
            documents = passage_documents([corpus.get(c) or Passage(id="", text=c) for c in ex.contexts])
        elif spec.context == "retrieved":
            documents = retrieve(pipeline, store, ex.question)
        else:
            documents = []
        messages.append(build_prompt(pipeline, ex.question, documents))
        if progress is not None and (number % 50 == 0 or number == len(examples)):
            progress(number, len(examples))
    # No store.release(): the loaded index shares Haystack's in-process storage with any other
    # handle of the same index (e.g. the app's), which must keep its documents.
    return messages


# ---------------------------------------------------------------- data for the loop


@dataclass
class TrainData:
    sample: Sample
    train_messages: list[list[dict[str, str]]]  # the chat prompts of sample.train
    train: list[Encoded]
    val: list[Encoded]
    truncated_answers: int
    longest_prompt: int


def prepare_data(spec: FinetuneSpec, tokenizer: Any, log: Any) -> TrainData:
    """Sample, prompts, tokens; every user-fixable problem is raised here, before the model loads."""
    dataset = load_dataset(spec)
    sample = draw_sample(spec, dataset)
    log(f"{dataset.source}: train split {sample.train_split_size}, eval split {sample.eval_split_size} "
        f"(never trained on); training on {len(sample.train)}, validating on {len(sample.val)}")
    examples = sample.train + sample.val
    messages = prompt_messages(spec, examples, dataset,
                               progress=lambda done, total: log(f"prompts built: {done}/{total}"))
    from core.models import _chat_text  # the exact prompt text ModelHub generates from

    prompts = [_chat_text(tokenizer, m) for m in messages]
    eot = end_of_turn(tokenizer)
    encoded = [encode(tokenizer, p, ex.answer, eot, spec.max_length) for p, ex in zip(prompts, examples)]
    prompt_lengths = [len(e.input_ids) - e.n_answer for e in encoded]
    longest = max(range(len(encoded)), key=prompt_lengths.__getitem__)
    if prompt_lengths[longest] >= spec.max_length:
        need = prompt_lengths[longest] + 1
        raise FinetuneError(
            f"max_length={spec.max_length} is too short: the prompt of example {examples[longest].id} "
            f"alone is {prompt_lengths[longest]} tokens, so no answer token would fit "
            f"({need - spec.max_length} short). Raise max_length to at least {need}, more to fit whole "
            f"answers, or use context 'none' or fewer passages.")
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        log(f"warning: {truncated} answers were cut to fit max_length={spec.max_length}")
    n = len(sample.train)
    return TrainData(sample, messages[:n], encoded[:n], encoded[n:], truncated, prompt_lengths[longest])


# ---------------------------------------------------------------- CLI flags (one per spec field)

_HELP = {
    "base_model": "model alias, local folder or hub id",
    "dataset": "preset (bioasq, qasper, nq) or the path of a .jsonl/.json/.csv/.parquet file",
    "source": "for presets: 'sample' (shipped, offline) or 'hub'",
    "n_train": "training examples, sampled with --seed from the train split only",
    "context": "what training prompts carry: none | gold (gold passages) | retrieved (by --pipeline)",
    "pipeline": "saved pipeline whose prompt template (and, for 'retrieved', retriever) is used",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout, in [0, 1)",
    "target_modules": "comma-separated module names LoRA adapts",
    "qlora": "4-bit base weights (needs CUDA and bitsandbytes)",
    "epochs": "passes over the training examples", "lr": "peak learning rate (at most 1e-2)",
    "lr_schedule": "cosine | linear | constant (all after a linear warm-up)",
    "warmup_ratio": "share of the steps spent warming up",
    "micro_batch_size": "examples per forward pass", "grad_accum": "micro-batches per optimizer step",
    "max_length": "tokens per example; must exceed the longest prompt",
    "max_grad_norm": "gradient clipping norm", "seed": "sampling, shuffling and dropout seed",
    "split_seed": "seed of the train/eval split (keep it equal to evaluation's)",
    "eval_fraction": "share of examples in the eval split (never trained on)",
    "val_size": "train-split examples held out for the validation loss",
    "val_every": "optimizer steps between validation losses",
    "checkpoint_every": "optimizer steps between checkpoints",
    "name": "adapter folder name (default: derived from the spec)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description="Fine-tune a LoRA adapter on QA pairs "
        "(loss on the answer tokens only). Settings: --spec-json, then the flags given, override "
        "the defaults (or --cpu-preset).")
    parser.add_argument("--spec-json", help="the whole spec as a JSON object, or a .json file holding one")
    parser.add_argument("--cpu-preset", action="store_true",
                        help="start from the small CPU preset instead of the study's defaults: "
                        "nq sample, gold context, n_train 32, 1 epoch, micro batch 4 x 2, max_length "
                        "384, r 8")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    defaults = FinetuneSpec()
    for f in fields(FinetuneSpec):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{_HELP[f.name]} (default: {default})")
        else:
            kind = str if isinstance(default, list) else type(default)
            shown = ",".join(default) if isinstance(default, list) else default
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=_HELP[f.name] + (f" (default: {shown})" if shown != "" else ""))
    return parser


def spec_from_args(args: argparse.Namespace) -> FinetuneSpec:
    values = FinetuneSpec.cpu_preset().to_dict() if args.cpu_preset else {}
    if args.spec_json:
        text = args.spec_json
        if not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise FinetuneError(f"--spec-json: {text} is neither a JSON object nor a file.")
            text = Path(text).read_text(encoding="utf-8")
        try:
            values.update(json.loads(text))
        except json.JSONDecodeError as err:
            raise FinetuneError(f"--spec-json is not valid JSON: {err.msg} (column {err.colno}).") from err
    names = {f.name for f in fields(FinetuneSpec)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return FinetuneSpec.from_dict(values)
