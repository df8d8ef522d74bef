"""The fine-tune spec and everything between a dataset and a padded batch of token ids.

jobs/finetune.py holds the training loop; this module holds what it consumes:
- FinetuneSpec: every knob with its help and bounds, checked when the spec is built; what depends
  on the machine (the dataset file, CUDA for QLoRA) is checked by check_runnable() before training;
- the train/validation sample, drawn from the TRAIN split only (an eval example can never be
  trained on), nested across sizes (the n=200 sample is a prefix of the n=500 one for a seed);
- tokenization with the loss on the answer only, and the batch plan (which examples form each
  micro-batch of each optimizer step), a pure function of the seed so a resumed run sees the
  same batches as an uninterrupted one;
- prepare_data, which runs all of that and raises every user-fixable problem before training;
- the CLI flags, generated from the spec's fields (core.spec_cli).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from core import config
from core.datasets import QADataset, load_preset, load_upload
from core.dataset_presets import PRESETS
from core.names import check_name
from core.schema import InputError, Passage, QAExample
from core.spec_cli import add_spec_arguments, spec_overrides
from core.specs import AdapterNameOrDerived, CommaList, Number, PipelineRef, Spec, Text, WholeNumber

IGNORE = -100  # label value that cross-entropy skips (prompt and padding positions)
MAX_SANE_LR = 1e-2


class FinetuneError(InputError):
    """A fine-tune request that cannot work; the message says what to change."""


class FinetuneSpec(Spec):
    """What to train. Defaults follow the study (LoRA r 16, alpha 32, 3 epochs, lr 2e-4, batch 16)."""

    noun = "fine-tune spec"
    error = FinetuneError

    base_model: Text = Field(config.DEFAULT_CHAT_MODEL, description="model alias, local folder or hub id")
    dataset: Text = Field("bioasq", description="preset (bioasq, qasper, nq) or the path of a "
                          ".jsonl/.json/.csv/.parquet file")
    source: Literal["sample", "hub"] = Field(
        "sample", description="for presets: 'sample' (shipped, offline) or 'hub'")
    n_train: WholeNumber = Field(200, ge=1, description="training examples, sampled with --seed from "
                                 "the train split only")
    context: Literal["none", "gold", "retrieved"] = Field(
        "none", description="what training prompts carry: none | gold (gold passages) | retrieved "
        "(by --pipeline)")
    pipeline: PipelineRef = Field(
        "", description="saved pipeline whose prompt template (and, for 'retrieved', retriever) is used")
    lora_r: WholeNumber = Field(16, ge=1, description="LoRA rank")
    lora_alpha: Number = Field(32.0, gt=0, description="LoRA alpha")
    lora_dropout: Number = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: CommaList = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                      description="module names LoRA adapts")
    qlora: bool = Field(False, description="4-bit base weights (needs CUDA and bitsandbytes)")
    epochs: WholeNumber = Field(3, ge=1, description="passes over the training examples")
    lr: Number = Field(2e-4, gt=0, description=f"peak learning rate (at most {MAX_SANE_LR:g})")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after a linear warm-up")
    warmup_ratio: Number = Field(0.03, ge=0, lt=1, description="share of the steps spent warming up")
    micro_batch_size: WholeNumber = Field(4, ge=1, description="examples per forward pass")
    grad_accum: WholeNumber = Field(4, ge=1, description="micro-batches per optimizer step")
    max_length: WholeNumber = Field(1024, ge=8, description="tokens per example; must exceed the "
                                    "longest prompt")
    max_grad_norm: Number = Field(1.0, gt=0, description="gradient clipping norm")
    seed: WholeNumber = Field(0, ge=0, description="sampling, shuffling and dropout seed")
    split_seed: WholeNumber = Field(0, ge=0, description="seed of the train/eval split (keep it equal "
                                    "to evaluation's)")
    eval_fraction: Number = Field(0.3, gt=0, lt=1, description="share of examples in the eval split "
                                  "(never trained on)")
    val_size: WholeNumber = Field(16, ge=0, description="train-split examples held out for the "
                                  "validation loss")
    val_every: WholeNumber = Field(25, ge=1, description="optimizer steps between validation losses "
                                   "(also at the end)")
    checkpoint_every: WholeNumber = Field(25, ge=1, description="optimizer steps between checkpoints")
    name: AdapterNameOrDerived = Field(
        "", description="adapter folder name (default: derived from the spec)")

    @field_validator("lr")
    @classmethod
    def _sane_lr(cls, lr: float) -> float:
        if lr > MAX_SANE_LR:
            raise FinetuneError(f"A learning rate of {lr:g} is absurd for LoRA (it would destroy the "
                                f"model); use at most {MAX_SANE_LR:g}, typically 1e-4 to 3e-4.")
        return lr

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneSpec":
        if self.context == "retrieved" and not self.pipeline:
            raise FinetuneError("Context 'retrieved' needs the name of a saved pipeline to retrieve with.")
        check_name(self.output_name, "Adapter name")  # a derived name must pass too
        return self

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

    def check_runnable(self) -> "FinetuneSpec":
        """What depends on this machine, checked right before training (not when a stored spec is
        read back): the dataset file still exists, and QLoRA has CUDA and bitsandbytes. A public
        server trains on the presets only: a visitor's path is refused before it is looked at."""
        if self.is_file and config.PUBLIC_MODE:
            raise FinetuneError(f"This public server fine-tunes on the presets ({', '.join(PRESETS)}) "
                                "only, not on a file on the server.")
        if self.is_file and not _exists(self.dataset):
            raise FinetuneError(f"Dataset '{self.dataset}' is neither a preset ({', '.join(PRESETS)}) "
                                "nor an existing file.")
        if self.qlora:
            check_qlora_possible()
        return self


def _exists(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def check_qlora_possible() -> None:
    import importlib.util

    if not torch.cuda.is_available():
        raise FinetuneError("QLoRA needs a CUDA GPU (4-bit weights through bitsandbytes) and this "
                            "machine has none; turn QLoRA off to train plain LoRA on the CPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError("QLoRA needs the bitsandbytes package: pip install bitsandbytes.")


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


def sample_data(spec: FinetuneSpec, log: Any) -> tuple[QADataset, "Sample"]:
    """The dataset and the drawn sample: checked before the tokenizer (or the model) loads."""
    dataset = load_dataset(spec)
    sample = draw_sample(spec, dataset)
    log(f"{dataset.source}: train split {sample.train_split_size}, eval split {sample.eval_split_size} "
        f"(never trained on); training on {len(sample.train)}, validating on {len(sample.val)}")
    return dataset, sample


def prepare_data(spec: FinetuneSpec, tokenizer: Any, log: Any,
                 sampled: tuple[QADataset, "Sample"] | None = None) -> TrainData:
    """Sample (unless `sampled` is given), prompts, tokens; every user-fixable problem is raised
    here, before the model loads."""
    dataset, sample = sampled or sample_data(spec, log)
    examples = sample.train + sample.val
    messages = prompt_messages(spec, examples, dataset,
                               progress=lambda done, total: log(f"prompts built: {done}/{total}"))
    from core.generation import chat_text  # the exact prompt text ModelHub generates from

    prompts = [chat_text(tokenizer, m) for m in messages]
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
    add_spec_arguments(parser, FinetuneSpec)
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
    return FinetuneSpec.from_dict(spec_overrides(args, FinetuneSpec, values))
