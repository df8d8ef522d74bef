"""Fine-tuning: spec checks, the train/eval boundary, answer-only labels, a real short LoRA run of the
135M model that changes its answers, and resume after a SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.datasets import DatasetError, load_preset
from core.generation import GenParams
from core.model_files import ModelNotFoundError
from core.models import get_hub
from core.schema import split_of
from core.store import Store
from core.systems import BASE
from core.testhooks import GATE_ENV
from jobs.finetune import adapter_dir, finetune_argv, load_tokenizer, train
from jobs.runner import JobKind, JobRunner
from jobs.finetune_data import (
    IGNORE, FinetuneError, FinetuneSpec, collate, draw_sample, encode, end_of_turn, n_logits, plan_epoch,
    prepare_data,
)
from tests.gates import Gate

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def tiny_spec(**overrides) -> FinetuneSpec:
    """A few optimizer steps on short prompts: seconds per step on 2 CPU cores."""
    base = FinetuneSpec(dataset="nq", context="none", n_train=8, val_size=4, epochs=1,
                        micro_batch_size=4, grad_accum=1, max_length=256, lora_r=8, lora_alpha=16.0,
                        lr=5e-3, warmup_ratio=0.0, lr_schedule="constant", val_every=100,
                        checkpoint_every=100)
    return base.replace(**overrides)


# ---------------------------------------------------------------- spec


def test_spec_round_trips_through_json():
    spec = FinetuneSpec.cpu_preset()
    again = FinetuneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.effective_batch == 8 and FinetuneSpec().effective_batch == 16
    assert FinetuneSpec.from_dict({"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("overrides, message", [
    ({"lora_r": 0}, r"lora_r: must be a whole number of at least 1 \(got 0\)"),
    ({"lr": -1.0}, r"lr: must be a number above 0 \(got -1.0\)"),
    ({"lr": 5.0}, "absurd"),
    ({"lora_dropout": 1.0}, r"lora_dropout: must be a number of at least 0 and below 1 \(got 1.0\)"),
    ({"context": "web"}, r"context: must be one of none, gold, retrieved \(got 'web'\)"),
    ({"context": "retrieved"}, "needs the name of a saved pipeline"),
    ({"lr_schedule": "step"}, r"lr_schedule: must be one of cosine, linear, constant \(got 'step'\)"),
    ({"name": "../escape"}, "Adapter name '../escape' is not allowed"),
    ({"target_modules": []}, r"target_modules: must be a non-empty list \(got \[\]\)"),
    ({"n_train": True}, r"n_train: must be a whole number of at least 1 \(got True\)"),
    ({"n_train": 3.5}, r"n_train: must be a whole number of at least 1 \(got 3.5\)"),
    ({"lora_alpha": float("nan")}, "lora_alpha: must be a number above 0"),
    ({"base_model": " "}, "base_model: must be text that is not empty"),
])
def test_spec_names_the_problem_when_built(overrides, message):
    with pytest.raises(FinetuneError, match=message):
        FinetuneSpec(**overrides)
    with pytest.raises(FinetuneError, match=message):
        FinetuneSpec().replace(**overrides)


def test_form_floats_are_whole_numbers_and_specs_are_frozen():
    spec = FinetuneSpec.from_dict({"n_train": 3.0, "epochs": 2.0, "lora_alpha": 16})
    assert (spec.n_train, spec.epochs, spec.lora_alpha) == (3, 2, 16.0)
    assert isinstance(spec.n_train, int)
    with pytest.raises(ValidationError, match="frozen"):
        spec.n_train = 5  # a spec is checked once, when built: it cannot change afterwards


def test_missing_dataset_file_is_refused_when_training_not_when_read_back():
    spec = FinetuneSpec(dataset="no/such/file.jsonl")  # a stored spec.json must still load
    with pytest.raises(FinetuneError, match="neither a preset"):
        spec.check_runnable()


def test_unknown_spec_field_is_refused():
    with pytest.raises(FinetuneError, match="Unknown field.*learning_rate"):
        FinetuneSpec.from_dict({"learning_rate": 1e-4})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only message")
def test_qlora_without_cuda_says_why():
    with pytest.raises(FinetuneError, match="QLoRA needs a CUDA GPU"):
        FinetuneSpec(qlora=True).check_runnable()


def test_finetune_argv_runs_the_module():
    argv = finetune_argv(FinetuneSpec.cpu_preset().to_dict(), resume=True)
    assert argv[:3] == [sys.executable, "-m", "jobs.finetune"] and argv[-1] == "--resume"
    assert FinetuneSpec.from_dict(json.loads(argv[argv.index("--spec-json") + 1])) == FinetuneSpec.cpu_preset()


def test_cli_help_lists_every_knob():
    out = subprocess.run([sys.executable, "-m", "jobs.finetune", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for name in FinetuneSpec().to_dict():
        assert "--" + name.replace("_", "-") in out
    assert "--spec-json" in out and "--resume" in out


def test_cli_bad_value_is_a_message_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "jobs.finetune", "--lr", "5"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "absurd" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- data


def test_sample_comes_from_the_train_split_only():
    dataset = load_preset("nq")
    spec = FinetuneSpec(dataset="nq", n_train=30, val_size=8)
    sample = draw_sample(spec, dataset)
    _, eval_split = dataset.split(spec.split_seed, spec.eval_fraction)
    used = [ex.id for ex in sample.train + sample.val]
    assert len(used) == len(set(used)) == 38
    assert not set(used) & {ex.id for ex in eval_split}
    assert all(split_of(i, spec.split_seed, spec.eval_fraction) == "train" for i in used)
    # Smaller samples are prefixes of larger ones with the same seed (nested study sizes).
    smaller = draw_sample(spec.replace(n_train=10), dataset)
    assert [ex.id for ex in smaller.train] == [ex.id for ex in sample.train[:10]]


def test_n_train_beyond_the_train_split_says_how_many_exist():
    dataset = load_preset("nq")
    train_size = len(dataset.split()[0])
    with pytest.raises(FinetuneError, match=f"has {train_size} examples in its train split"):
        draw_sample(FinetuneSpec(dataset="nq", n_train=1000, val_size=8), dataset)


def test_plan_epoch_uses_every_example_once_and_balances_processes():
    steps = plan_epoch(10, epoch=0, seed=1, micro_batch=3, grad_accum=2)
    flat = [i for step in steps for micro in step for i in micro]
    assert sorted(flat) == list(range(10)) and [len(s) for s in steps] == [2, 2]
    assert plan_epoch(10, 1, 1, 3, 2) != steps  # reshuffled each epoch
    ranks = [plan_epoch(10, 0, 1, 3, 2, rank=r, world=2) for r in (0, 1)]
    assert [len(m) for s in ranks[0] for m in s] == [len(m) for s in ranks[1] for m in s]
    assert {i for r in ranks for s in r for m in s for i in m} == set(range(10))


def test_dataset_without_answers_is_refused_before_training(tmp_path):
    upload = tmp_path / "questions.jsonl"
    upload.write_text('{"question": "what is rag"}\n{"question": "why lora"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="answer"):
        train(tiny_spec(dataset=str(upload), name="no-answers"))
    assert not adapter_dir("no-answers").exists()


def test_unknown_base_model_is_refused_before_training():
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        train(tiny_spec(base_model="no-such-org/no-such-model", name="unknown-model"))
    assert not adapter_dir("unknown-model").exists()


# ---------------------------------------------------------------- tokens (real tokenizer)


@pytest.mark.integration
def test_labels_cover_exactly_the_answer_and_end_of_turn():
    tokenizer, _ = load_tokenizer(MODEL)
    spec = tiny_spec(context="gold", max_length=512)
    data = prepare_data(spec, tokenizer, log=lambda line: None)
    example, encoded = data.sample.train[0], data.train[0]
    kept = [t for t in encoded.labels if t != IGNORE]
    assert tokenizer.decode(kept) == example.answer.strip() + "<|im_end|>"
    assert encoded.labels[:len(encoded.labels) - len(kept)] == [IGNORE] * (len(encoded.labels) - len(kept))
    prompt = tokenizer.decode(encoded.input_ids[:len(encoded.input_ids) - len(kept)])
    assert example.question in prompt and example.contexts[0][:80] in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    batch = collate(data.train[:3], tokenizer.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding never counts
    assert int((batch["labels"] != IGNORE).sum()) == sum(e.n_answer for e in data.train[:3])
    assert n_logits(batch["labels"]) == max(e.n_answer for e in data.train[:3]) + 1


@pytest.mark.integration
def test_max_length_below_the_prompt_names_the_shortfall():
    with pytest.raises(FinetuneError, match=r"max_length=64 is too short.*Raise max_length to at least"):
        train(tiny_spec(context="gold", max_length=64, name="too-short"))
    assert not adapter_dir("too-short").exists()


@pytest.mark.integration
def test_long_answers_are_cut_to_max_length():
    tokenizer, _ = load_tokenizer(MODEL)
    eot = end_of_turn(tokenizer)
    cut = encode(tokenizer, "question", "word " * 100, eot, max_length=20)
    assert len(cut.input_ids) == 20 and cut.truncated and cut.n_answer == 20 - len(tokenizer("question")["input_ids"])


# ---------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def trained() -> dict:
    return train(tiny_spec(epochs=2, val_every=2, name="tiny"))


@pytest.mark.integration
def test_training_writes_a_complete_adapter_folder(trained):
    folder = Path(trained["path"])
    assert folder == adapter_dir("tiny")
    for name in ("adapter_model.safetensors", "adapter_config.json", "spec.json", "metrics.json",
                 "train_ids.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    assert not (folder / "checkpoints").exists()  # removed once the run finished
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4]
    assert [p["step"] for p in metrics["val_loss"]] == [0, 2, 4]
    assert metrics["n_train"] == 8 and metrics["train_tokens_per_s"] > 0
    assert metrics["final_train_loss"] == metrics["train_loss"][-1]["loss"]
    # lr 5e-3 on 8 examples: the training loss must come down.
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert trained["metrics"]["final_val_loss"] == metrics["val_loss"][-1]["loss"]
    assert FinetuneSpec.from_dict(json.loads((folder / "spec.json").read_text())) == tiny_spec(
        epochs=2, val_every=2, name="tiny")


@pytest.mark.integration
def test_training_ids_contain_no_eval_id(trained):
    ids = json.loads((Path(trained["path"]) / "train_ids.json").read_text())
    _, eval_split = load_preset("nq").split(ids["split_seed"], ids["eval_fraction"])
    assert len(ids["train"]) == 8 and len(ids["validation"]) == 4
    assert not set(ids["train"] + ids["validation"]) & {ex.id for ex in eval_split}


@pytest.mark.integration
def test_adapter_loads_in_the_hub_and_changes_greedy_answers(trained):
    hub = get_hub()
    name = hub.load_adapter(MODEL, trained["path"], "tiny")
    train_ids = set(json.loads((Path(trained["path"]) / "train_ids.json").read_text())["train"])
    questions = [ex.question for ex in load_preset("nq").examples if ex.id in train_ids][:3]
    from pipelines.query import build_prompt  # haystack: a heavy import the fast tests skip
    from pipelines.spec import PipelineSpec

    prompts = [build_prompt(PipelineSpec(name="default"), q, []) for q in questions]
    answers = hub.generate(MODEL, prompts * 2, [BASE] * 3 + [name] * 3, GenParams(max_new_tokens=16))
    base, tuned = [a.text for a in answers[:3]], [a.text for a in answers[3:]]
    assert base != tuned


@pytest.mark.integration
def test_existing_adapter_is_refused_without_resume_and_kept_with_it(trained):
    spec = tiny_spec(epochs=2, val_every=2, name="tiny")
    with pytest.raises(FinetuneError, match="already exists.*--resume"):
        train(spec)
    assert train(spec, resume=True) == trained  # finished: resuming returns the stored result
    with pytest.raises(FinetuneError, match="differs from the one it was started with in lr"):
        train(spec.replace(lr=1e-3), resume=True)


@pytest.mark.integration
def test_resume_after_sigkill_continues_step_count_and_loss_history(tmp_path, trained, monkeypatch):
    """The job runner runs the CLI (finetune_argv); the run stops at a test gate after step 2 (its
    checkpoint written) and is SIGKILLed there, then resumed. Same spec as `trained` but for the
    name and checkpoints, so the curves must match it."""
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gates"))
    after_step_2 = Gate(tmp_path / "gates", "finetune-step-2").arm()
    runner = JobRunner(Store(tmp_path / "jobs.duckdb"), {"finetune": JobKind(argv=finetune_argv)})
    spec = tiny_spec(epochs=2, val_every=2, checkpoint_every=1, name="killed")
    job_id = runner.start("finetune", spec.to_dict())
    trainer = after_step_2.wait_reached(
        timeout=300, alive=lambda: runner.get(job_id).status in ("queued", "running"))
    os.kill(trainer, signal.SIGKILL)
    assert runner.wait(job_id, timeout=60).status == "failed"
    checkpoints = adapter_dir("killed") / "checkpoints"
    saved = sorted(checkpoints.glob("step-*"))
    assert [p.name for p in saved] == ["step-000001", "step-000002"]
    assert not (adapter_dir("killed") / "metrics.json").exists()  # really killed mid-run
    state = json.loads((saved[-1] / "state.json").read_text())
    done = state["step"]
    assert done == 2 and [p["step"] for p in state["train"]] == [1, 2]

    runner.resume(job_id)
    job = runner.wait(job_id, timeout=300)
    assert job.status == "done", runner.log_tail(job_id)
    assert f"resumed from {saved[-1].name}: step {done}/4" in runner.log_tail(job_id, lines=200)
    assert job.progress == 1.0 and job.result["path"] == str(adapter_dir("killed"))
    assert job.result["metrics"]["resumed_from"] == [done]
    metrics = json.loads((adapter_dir("killed") / "metrics.json").read_text())
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4]
    assert metrics["train_loss"][:done] == state["train"]  # history kept, not restarted
    assert [p["step"] for p in metrics["val_loss"]] == [0, 2, 4]
    # Adapter, optimizer, scheduler and RNG were restored: the run equals the uninterrupted one.
    uninterrupted = json.loads((Path(trained["path"]) / "metrics.json").read_text())
    for resumed, straight in zip(metrics["train_loss"] + metrics["val_loss"],
                                 uninterrupted["train_loss"] + uninterrupted["val_loss"]):
        assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-4)


@pytest.mark.integration
def test_retrieved_context_comes_from_the_saved_pipeline():
    from pipelines.indexing import build_index  # haystack: a heavy import the fast tests skip
    from pipelines.spec import PipelineSpec, save_spec

    dataset = load_preset("nq")
    pipeline = PipelineSpec(name="ft-bm25", retriever="bm25", top_k=2)
    save_spec(pipeline)
    build_index(pipeline, dataset.corpus)
    tokenizer, _ = load_tokenizer(MODEL)
    spec = tiny_spec(context="retrieved", pipeline="ft-bm25", max_length=1024)
    data = prepare_data(spec, tokenizer, log=lambda line: None)
    for messages, example in zip(data.train_messages, data.sample.train):
        user = next(m["content"] for m in messages if m["role"] == "user")
        assert example.question in user and "[1]" in user and "[2]" in user and "[3]" not in user
    # BM25 on these questions finds the gold passage for most of them.
    found = sum(ex.contexts[0][:60] in str(m) for m, ex in zip(data.train_messages, data.sample.train))
    assert found >= len(data.sample.train) // 2
