"""The name rule, paths kept inside their root, the Spec base (one-sentence errors, strict numbers,
stored JSON read back unchanged) and the CLI flags generated from spec fields. No model."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, ValidationError, model_validator

from core.names import InvalidNameError, OutsideRootError, check_name, inside
from core.schema import InputError
from core.spec_cli import add_spec_arguments, spec_overrides
from core.specs import CommaList, Number, Spec, Text, WholeNumber, name_of
from jobs.evaluate import EvalSpec
from jobs.evaluate import cli as evaluate_cli
from jobs.finetune_data import FinetuneSpec, build_parser
from jobs.finetune_data import spec_from_args as finetune_spec_from_args
from pipelines.spec import PipelineSpec, SpecError

REPO = Path(__file__).resolve().parent.parent
DemoName = name_of("Demo name")
OptionalDemoName = name_of("Demo name", blank_ok=True)
RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit."


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "my-adapter_v1", "Qwen2_5-0_5B", "x" * 64, "7b"])
def test_good_names_pass_unchanged(name):
    assert check_name(name, "Adapter name") == name


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", "x" * 65, "x" * 300, "a\x00b", "__base__",
                                  ".hidden", "..", "a b", "name\n", "naïve", "v1.2", None, 5])
def test_bad_names_are_refused_with_the_rule(name):
    with pytest.raises(InvalidNameError, match=re.escape(RULE)) as caught:
        check_name(name, "Adapter name")
    message = str(caught.value)
    assert message.startswith("Adapter name ") and "\n" not in message and len(message) < 200
    assert isinstance(caught.value, InputError)


def test_name_message_quotes_the_value_and_can_use_the_callers_error():
    with pytest.raises(InvalidNameError) as caught:
        check_name("../x", "Adapter name")
    assert str(caught.value) == f"Adapter name '../x' is not allowed: {RULE}"
    with pytest.raises(SpecError, match="Pipeline name 'a/b' is not allowed"):
        check_name("a/b", "Pipeline name", SpecError)


def test_inside_keeps_paths_below_their_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert inside(root, "a.json") == (root / "a.json").resolve()
    assert inside(root, "sub", "b") == (root / "sub" / "b").resolve()
    for parts in (("..",), ("../x",), ("/etc/passwd",), ("a", "..", "..", "x"), (".",), ("a\x00b",)):
        with pytest.raises(OutsideRootError):
            inside(root, *parts)


def test_inside_follows_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "local").symlink_to(root / "real", target_is_directory=True)
    with pytest.raises(OutsideRootError, match="does not stay below"):
        inside(root, "escape", "x.json")
    assert inside(root, "local", "x.json") == (root / "real" / "x.json").resolve()


# ---------------------------------------------------------------- the Spec base


class DemoError(InputError):
    pass


class Inner(Spec):
    noun = "inner part"
    error = DemoError

    kind: Literal["a", "b"] = Field("a", description="which kind")
    model: Text = Field("m", description="the model")


class Demo(Spec):
    noun = "demo spec"
    error = DemoError

    count: WholeNumber = Field(1, ge=1, description="how many")
    share: Number = Field(0.5, ge=0, lt=1, description="a share")
    limit: WholeNumber | None = Field(None, ge=1, le=10, description="optional cap")
    flag: bool = Field(False, description="a switch")
    tags: CommaList = Field(["x"], min_length=1, description="tags")
    delays: list[Number] = Field([1.0], description="seconds")
    label: OptionalDemoName = Field("", description="a name")
    inner: Inner = Field(default_factory=Inner, description="nested")

    @model_validator(mode="after")
    def _rule(self) -> "Demo":
        if self.flag and self.count > 5:
            raise DemoError("With flag on, count must stay at 5 or below.")
        return self


@pytest.mark.parametrize("data, message", [
    ({"count": 0}, "count: must be a whole number of at least 1 (got 0)."),
    ({"count": True}, "count: must be a whole number of at least 1 (got True)."),
    ({"count": 2.5}, "count: must be a whole number of at least 1 (got 2.5)."),
    ({"count": "3"}, "count: must be a whole number of at least 1 (got '3')."),
    ({"share": 1}, "share: must be a number of at least 0 and below 1 (got 1)."),
    ({"share": True}, "share: must be a number of at least 0 and below 1 (got True)."),
    ({"share": float("inf")}, "share: must be a number of at least 0 and below 1 (got inf)."),
    ({"limit": 11}, "limit: must be a whole number from 1 to 10 or null (got 11)."),
    ({"flag": "perhaps"}, "flag: must be true or false (got 'perhaps')."),
    ({"tags": []}, "tags: must be a non-empty list (got [])."),
    ({"tags": ["a", " "]}, "tags[1]: must be text that is not empty (got ' ')."),
    ({"delays": [1, "x"]}, "delays[1]: must be a number (got 'x')."),
    ({"label": "../x"}, f"Demo name '../x' is not allowed: {RULE}"),
    ({"inner": {"kind": "c"}}, "inner.kind: must be one of a, b (got 'c')."),
    ({"inner": "a"}, "inner: must be a JSON object (got 'a')."),
    ({"inner": {"colour": 1, "size": 2}}, "Unknown field(s) in inner: colour, size."),
    ({"colour": 1, "count": 0}, "Unknown field(s) in the demo spec: colour."),
    ({"flag": True, "count": 6}, "With flag on, count must stay at 5 or below."),
])
def test_every_failure_is_one_sentence_in_the_specs_error_class(data, message):
    with pytest.raises(DemoError) as caught:
        Demo(**data)
    assert str(caught.value) == message
    with pytest.raises(DemoError) as again:
        Demo.from_dict(data)
    assert str(again.value) == message


def test_missing_field_and_non_object_input():
    class Named(Spec):
        noun = "named spec"
        error = DemoError
        name: DemoName

    with pytest.raises(DemoError, match=r"^Missing field\(s\) in the named spec: name\.$"):
        Named.from_dict({})
    with pytest.raises(DemoError, match=r"^The demo spec must be a JSON object, not list\.$"):
        Demo.from_dict([1])


def test_whole_floats_become_ints_lists_read_commas_and_json_round_trips():
    spec = Demo.from_dict({"count": 3.0, "limit": 2.0, "tags": "a, b", "share": 0})
    assert (spec.count, spec.limit, spec.tags, spec.share) == (3, 2, ["a", "b"], 0.0)
    assert type(spec.count) is int and type(spec.share) is float
    data = spec.to_dict()
    assert data == {"count": 3, "share": 0.0, "limit": 2, "flag": False, "tags": ["a", "b"],
                    "delays": [1.0], "label": "", "inner": {"kind": "a", "model": "m"}}
    assert Demo.from_dict(json.loads(json.dumps(data))) == spec


def test_specs_are_frozen_and_replace_checks_the_copy():
    spec = Demo()
    with pytest.raises(ValidationError, match="frozen"):
        spec.count = 0
    assert spec.replace(count=4).count == 4 and spec.count == 1
    with pytest.raises(DemoError, match="count: must be a whole number of at least 1"):
        spec.replace(count=0)


# The JSON the dataclass specs wrote (spec.json files, DuckDB rows, job specs) reads back unchanged.
STORED_FINETUNE = {
    "base_model": "smollm2-135m-instruct", "dataset": "nq", "source": "sample", "n_train": 32,
    "context": "gold", "pipeline": "", "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "qlora": False, "epochs": 1,
    "lr": 0.0002, "lr_schedule": "cosine", "warmup_ratio": 0.03, "micro_batch_size": 4,
    "grad_accum": 2, "max_length": 384, "max_grad_norm": 1.0, "seed": 0, "split_seed": 0,
    "eval_fraction": 0.3, "val_size": 8, "val_every": 2, "checkpoint_every": 2, "name": ""}
STORED_PIPELINE = {
    "name": "nq-bm25", "splitter": {"split_by": "word", "split_length": 150, "split_overlap": 30},
    "embedder": "all-minilm-l6-v2", "retriever": "bm25", "top_k": 3, "ranker": None,
    "prompt_template": '{% message role="user" %}{{ question }}{% endmessage %}',
    "generator": {"kind": "local", "model": "smollm2-135m-instruct", "base_url": None,
                  "max_new_tokens": 128, "temperature": 0.0}}
STORED_EVAL = {
    "dataset_id": "sample:bioasq",
    "systems": [{"kind": "local", "model": "smollm2-135m-instruct", "adapter": "__base__", "rag": True,
                 "base_url": None, "pipeline": "nq-bm25"}],
    "judge": {"kind": "local", "model": "smollm2-135m-instruct", "base_url": None, "adapter": "__base__"},
    "metrics": ["accuracy", {"name": "faithfulness", "criteria": "Supported?", "uses_context": True}],
    "n_items": 2, "seed": 0, "pipeline": "nq-bm25", "repeats": 10, "method": "logprobs", "samples": 10,
    "reasoning": False, "decoding": {"max_new_tokens": 16}, "name": "", "batch_size": 8,
    "retry_delays": [1.0, 2.0, 4.0], "steps_max_new_tokens": 256}


@pytest.mark.parametrize("spec, stored", [(FinetuneSpec, STORED_FINETUNE),
                                          (PipelineSpec, STORED_PIPELINE), (EvalSpec, STORED_EVAL)])
def test_stored_json_reads_back_to_the_same_json(spec, stored):
    assert spec.from_dict(stored).to_dict() == stored
    assert list(spec.from_dict(stored).to_dict()) == list(stored)  # same key order as before


def test_stored_systems_keep_their_derived_keys_out():
    with_derived = {**STORED_EVAL, "systems": [{**STORED_EVAL["systems"][0], "label": "x", "id": "sys-1"}]}
    assert EvalSpec.from_dict(with_derived).to_dict() == STORED_EVAL


# ---------------------------------------------------------------- CLI flags from the fields


def demo_parser(**options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    add_spec_arguments(parser, Demo, **options)
    return parser


def test_flags_carry_help_defaults_and_bounds():
    text = demo_parser(aliases={"count": "--n"}).format_help()
    for flag in ("--count", "--n", "--share", "--limit", "--flag", "--no-flag", "--tags", "--delays",
                 "--label", "--inner-kind", "--inner-model"):
        assert flag in text
    assert "how many: a whole number of at least 1 (default: 1)" in " ".join(text.split())
    assert "{a,b}" in text


def test_only_the_flags_given_override_and_nested_keys_merge():
    args = demo_parser().parse_args(["--count", "4", "--tags", "p,q", "--no-flag", "--inner-model", "z",
                                     "--delays", "0.5,1"])
    base = {"share": 0.25, "inner": {"kind": "b"}}
    values = spec_overrides(args, Demo, base)
    assert values == {"share": 0.25, "count": 4, "tags": ["p", "q"], "flag": False,
                      "delays": [0.5, 1.0], "inner": {"kind": "b", "model": "z"}}
    assert base == {"share": 0.25, "inner": {"kind": "b"}}  # the caller's dict is not changed
    assert spec_overrides(demo_parser().parse_args([]), Demo) == {}


def test_a_field_without_a_flag_form_must_be_excluded():
    class WithDict(Spec):
        extra_settings: dict[str, int] = Field(default_factory=dict)
        size: WholeNumber = 1

    with pytest.raises(TypeError, match="extra_settings has no flag form"):
        add_spec_arguments(argparse.ArgumentParser(), WithDict)
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser, WithDict, exclude=("extra_settings",))
    assert spec_overrides(parser.parse_args(["--size", "2"]), WithDict) == {"size": 2}


def test_finetune_flags_override_the_preset_and_the_json():
    args = build_parser().parse_args(["--cpu-preset", "--spec-json", '{"lr": 0.001, "seed": 3}',
                                      "--seed", "5", "--target-modules", "q_proj,v_proj", "--qlora",
                                      "--no-qlora"])
    spec = finetune_spec_from_args(args)
    assert spec == FinetuneSpec.cpu_preset().replace(lr=0.001, seed=5, target_modules=["q_proj", "v_proj"])


def test_evaluate_flags_build_the_spec_with_systems_metrics_judge_and_decoding():
    args = evaluate_cli._parser().parse_args([
        "--spec-json", '{"judge": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"}, "samples": 3}',
        "--dataset", "sample:nq", "--system", "smollm2-135m-instruct", "--system", "smollm2-135m-instruct:ft:rag",
        "--pipeline", "p", "--metric", "accuracy", "--metric", '{"name": "style", "criteria": "Clear?"}',
        "--judge-model", "gpt-x", "--reasoning", "--retry-delays", "0.5,1", "--temperature", "0.2"])
    spec = evaluate_cli.spec_from_args(args)
    assert spec.dataset_id == "sample:nq" and spec.pipeline == "p" and spec.samples == 3
    assert [(s.adapter, s.rag) for s in spec.systems] == [("__base__", False), ("ft", True)]
    assert spec.metrics == ["accuracy", {"name": "style", "criteria": "Clear?"}]
    assert (spec.judge.kind, spec.judge.model, spec.judge.base_url) == ("openai", "gpt-x", "http://127.0.0.1:1/v1")
    assert spec.reasoning is True and spec.retry_delays == [0.5, 1.0] and spec.decoding == {"temperature": 0.2}


@pytest.mark.parametrize("module, spec, own_flags", [
    ("jobs.finetune", FinetuneSpec, ["--spec-json", "--cpu-preset", "--resume"]),
    ("jobs.evaluate", EvalSpec, ["--spec-json", "--resume", "--system", "--metric", "--dataset",
                                 "--judge-kind", "--judge-model", "--judge-base-url", "--judge-adapter",
                                 "--max-new-tokens", "--temperature", "--top-p"]),
])
def test_cli_help_runs_and_lists_a_flag_per_field(module, spec, own_flags):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    fields = [name for name in spec.model_fields if name not in ("systems", "metrics", "decoding", "judge")]
    for flag in own_flags + ["--" + name.replace("_", "-") for name in fields]:
        assert flag in out, flag
