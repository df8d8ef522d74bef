"""The study as one job: the spec's refusals, the plan's steps, reuse of what exists and the
pre-flight refusals (no model). The tiny spec here (TINY) is the one study the suite runs end to
end on the 135M model, once, through the app and the CLI, killed -9 mid-fine-tune and
mid-evaluation (tests/test_study_app.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.model_files import SMOLLM2
from core.schema import SplitSetting
from jobs.finetune import adapter_dir
from jobs.services import build_services
from jobs.study import StudySpec, StudySpecError
from jobs.study.cli import main as cli_main
from jobs.study.report import verdict
from pipelines import indexing
from pipelines.spec import save_spec
from tests.gates import Gate

REPO = Path(__file__).resolve().parent.parent
ACCURACY = {"name": "accuracy", "steps": "1. Compare the facts of the answer with the reference "
                                         "answer.\n2. Score 5 if they agree, 1 if they contradict."}
COMPLETENESS = {"name": "completeness", "steps": "1. List the key points of the reference answer."
                                                 "\n2. Score by the share the answer covers."}
TINY = {"name": "tiny", "base_models": [SMOLLM2], "datasets": ["sample:nq"], "sizes": [4, 8],
        "finetune": {"epochs": 1, "micro_batch_size": 2, "grad_accum": 1, "max_length": 160,
                     "lora_r": 4, "lora_alpha": 8.0, "val_size": 2, "val_every": 2,
                     "checkpoint_every": 2},
        "pipeline": {"name": "tiny", "retriever": "bm25", "top_k": 1},
        "evaluation": {"n_items": 2, "metrics": [ACCURACY, COMPLETENESS], "method": "logprobs",
                       "repeats": 1, "decoding": {"max_new_tokens": 16}, "batch_size": 8,
                       "retry_delays": [0.05]}}


def tiny(**changes) -> StudySpec:
    return StudySpec.from_dict({**TINY, **changes})


@pytest.fixture
def services(tmp_path, monkeypatch):
    """Services on a data dir of the test's own (adapters, indexes and DuckDB start empty)."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return build_services(warm_up=False)


def fake_adapter(name: str, dataset_id: str, trained: list[str]) -> None:
    """A finished adapter folder as a fine-tune leaves it (metrics.json last), no weights."""
    folder = adapter_dir(name)
    folder.mkdir(parents=True)
    spec = {"base_model": SMOLLM2, "dataset": "nq", "name": name}
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "train_ids.json").write_text(json.dumps({"dataset_id": dataset_id, "train": trained}))
    metrics = dict.fromkeys(("final_train_loss", "final_val_loss", "steps", "n_train", "n_val",
                             "train_tokens_per_s", "wall_seconds", "truncated_answers",
                             "resumed_from"))
    (folder / "metrics.json").write_text(json.dumps(metrics))


# ---------------------------------------------------------------- the spec (no model)


@pytest.mark.parametrize("changes, message", [
    ({"systems": []}, r"^Choose at least one system per cell: base, base\+rag, finetuned or "
                      r"finetuned\+rag\.$"),
    ({"datasets": ["sample:wiki"]}, r"^Unknown dataset 'sample:wiki': a study fine-tunes and "
                                    r"evaluates on the presets, one of sample:bioasq, "),
    ({"sizes": [4, 4]}, r"^sizes lists 4 more than once\.$"),
    ({"sizes": [0]}, r"^sizes\[0\]: must be a whole number of at least 1 \(got 0\)\.$"),
    ({"finetune": {"lr": 0.5}}, r"^fine-tune of smollm2-135m-instruct on sample:nq \(4 pairs, "
                                r"seed 0\): A learning rate of 0.5 is absurd"),
    ({"finetune": {"n_train": 4}}, r"^Unknown field\(s\) in finetune: n_train\.$"),
    ({"evaluation": {"judge": {"kind": "oracle"}}},
     r"^evaluation\.judge\.kind: must be one of local, openai \(got 'oracle'\)\.$"),
    ({"evaluation": {"metrics": []}}, r"^evaluation of smollm2-135m-instruct on sample:nq: "
                                      r"Choose at least one metric"),
    ({"pipelines": {"sample:qasper": {"name": "q"}}},
     r"^pipelines names dataset\(s\) the study does not use: sample:qasper\.$"),
    ({"name": "../x"}, r"^Study name '\.\./x' is not allowed"),
])
def test_bad_study_specs_are_refused_with_one_sentence(changes, message):
    with pytest.raises(StudySpecError, match=message):
        tiny(**changes)


def test_spec_round_trips_and_names_what_it_builds_by_content():
    spec = tiny()
    assert StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    a = spec.finetune_spec(SMOLLM2, "sample:nq", 4, 0)
    assert a.name == spec.finetune_spec(SMOLLM2, "sample:nq", 4, 0).name  # stable
    assert a.name != tiny(finetune={**TINY["finetune"], "lr": 1e-4}).finetune_spec(
        SMOLLM2, "sample:nq", 4, 0).name  # any setting changes the adapter's name
    assert (a.split_seed, a.pipeline) == (0, spec.pipeline_for("sample:nq").name)


# ---------------------------------------------------------------- planning (no model)


def test_a_spec_expands_into_indexes_fine_tunes_and_one_paired_evaluation(services):
    spec = tiny(finetune_seeds=[0, 1], datasets=["sample:nq", "sample:bioasq"])
    plan = services.studies.plan(spec)
    kinds = [s.kind for s in plan.steps]
    assert kinds == ["index"] + ["finetune"] * 4 + ["evaluate"] + ["index"] + ["finetune"] * 4 + [
        "evaluate"]
    assert not any(s.done for s in plan.steps)
    evaluation = plan.steps[5]
    # every system of a cell on the same items: base and 4 adapters, each with and without RAG
    assert len(evaluation.spec["systems"]) == 10 and evaluation.spec["n_items"] == 2
    assert sorted((s["size"], s["seed"], s["rag"]) for s in evaluation.systems) == sorted(
        [(0, None, r) for r in (False, True)]
        + [(n, seed, r) for n in (4, 8) for seed in (0, 1) for r in (False, True)])
    assert {len(ids) for ids in plan.items.values()} == {2}
    assert plan.counts == {"finetunes": 8, "answers": 40, "judgments": 80, "indexes": 2}
    assert plan.seconds > 0
    assert services.datasets.split("sample:nq") == SplitSetting(0, 0.3)


def test_what_exists_is_reused_not_planned_again(services):
    spec = tiny()
    first = services.studies.plan(spec)
    index, small = first.steps[0], first.steps[1]
    pipeline = spec.pipeline_for("sample:nq")
    indexing.build_index(pipeline, services.datasets.get("sample:nq").corpus)
    save_spec(pipeline, store=services.store)
    fake_adapter(small.key, "sample:nq", [])
    evaluation = first.steps[3]
    job_id = services.store.create_job("evaluate", evaluation.spec)
    services.store.create_eval_run(job_id, job_id, "done before", "sample:nq", evaluation.spec)
    services.store.set_eval_run_status(job_id, "done")
    again = services.studies.plan(spec)
    assert [(s.key, s.done) for s in again.steps] == [
        (index.key, True), (small.key, True), (first.steps[2].key, False), (evaluation.key, True)]
    assert again.counts == {"finetunes": 1, "answers": 0, "judgments": 0, "indexes": 0}
    assert small.key in services.adapters.paths()  # the finished folder was registered


def test_a_size_beyond_the_train_split_is_refused(services):
    with pytest.raises(StudySpecError, match=r"^Size 60 does not fit sample:nq: sample:nq has 50 "
                                             r"examples in its train split .* Lower n_train to at "
                                             r"most 48"):
        services.studies.plan(tiny(sizes=[4, 60]))


def test_an_adapter_trained_on_the_eval_items_is_refused(services):
    spec = tiny()
    items = services.studies.plan(spec).items["sample:nq"]
    name = spec.finetune_spec(SMOLLM2, "sample:nq", 8, 0).name
    fake_adapter(name, "sample:nq", [items[1], "x-1"])
    with pytest.raises(StudySpecError, match=rf"^evaluation of sample:nq: Adapter '{name}' was "
                                             rf"trained on 1 of this run's 2 eval items \({items[1]}\)"):
        services.studies.plan(spec)


def test_a_dataset_recorded_with_another_split_is_refused(services):
    from core.datasets import load_preset

    services.datasets.add(load_preset("nq", "sample"), SplitSetting(seed=3, eval_fraction=0.3))
    with pytest.raises(StudySpecError, match=r"^sample:nq is recorded with split seed 3 and eval "
                                             r"fraction 0.3 .* set the study's split_seed"):
        services.studies.plan(tiny())
    assert services.studies.plan(tiny(split_seed=3)).steps


def test_a_cancelled_study_stops_between_steps_and_keeps_what_it_built(services, tmp_path,
                                                                        monkeypatch):
    """Cancelled while it waits at the first fine-tune (a test gate): the index it built stays
    and is reused by the next plan, and no fine-tune job was started."""
    monkeypatch.setenv("LAB_TEST_GATE_DIR", str(tmp_path / "gates"))
    gate = Gate(tmp_path / "gates", "study-finetune").arm()
    spec = tiny()
    job_id = services.studies.start(spec)
    gate.wait_reached(timeout=120, alive=lambda: services.runner.get(job_id).status in (
        "queued", "running"))
    with pytest.raises(StudySpecError, match=rf"^Study 'tiny' with this spec is already running "
                                             rf"\(job {job_id}\)\.$"):
        services.studies.start(spec)
    services.jobs.cancel(job_id)
    gate.release()
    assert services.runner.wait(job_id).status == "cancelled"
    assert [j.status for j in services.runner.jobs("index")] == ["done"]
    assert services.runner.jobs("finetune") == []
    assert [s.done for s in services.studies.plan(spec).steps] == [True, False, False, False]


def test_verdicts_say_worse_better_or_no_difference():
    row = {"size": 200, "seed": 0, "rag": True, "metric": "accuracy", "n_paired": 30}
    assert verdict({**row, "diff": -0.42, "diff_ci_low": -0.71, "diff_ci_high": -0.15}) == (
        "fine-tuning on 200 pairs lowered accuracy with RAG by 0.42 [0.15, 0.71]: worse")
    assert verdict({**row, "rag": False, "diff": 0.3, "diff_ci_low": 0.1, "diff_ci_high": 0.5}) == (
        "fine-tuning on 200 pairs raised accuracy without RAG by 0.30 [0.10, 0.50]: better")
    assert verdict({**row, "diff": 0.1, "diff_ci_low": -0.2, "diff_ci_high": 0.4}).endswith(
        "by +0.10 [-0.20, +0.40]: no significant difference")
    assert verdict({**row, "diff": 0.1, "diff_ci_low": None, "diff_ci_high": None}).endswith(
        "on 30 paired item(s): too few items to tell")


def test_cli_refuses_a_missing_or_bad_spec_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    assert cli_main(["plan", str(tmp_path / "nope.json")]) == 2
    assert "error: No study spec file at" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert cli_main(["plan", str(bad)]) == 2
    assert f"error: {bad} is not valid YAML" in capsys.readouterr().err
    good = tmp_path / "tiny.yaml"
    import yaml

    good.write_text(yaml.safe_dump(TINY))
    assert cli_main(["plan", str(good), "--sizes", "4", "--evaluation-n-items", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 steps, 0 already done" in out and "12 answers, 24 judgments" in out
    assert cli_main(["report", str(good), "--out", str(tmp_path / "report.md")]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# Study: tiny\n")
    assert "No evaluation has run yet." in (tmp_path / "report.md").read_text()


def test_the_shipped_cpu_mini_spec_is_valid_and_fits_the_samples(services):
    spec = StudySpec.from_dict(json.loads((REPO / "studies" / "cpu-mini.json").read_text()))
    plan = services.studies.plan(spec)
    assert spec.base_models == [SMOLLM2] and len(spec.datasets) == 3
    assert plan.counts["finetunes"] == 6 and spec.evaluation.method == "logprobs"
