"""The Study tab's pure helpers (the grid of cells from a plan and job states, the figure's rows,
the spec box's refusals), a study that cannot deadlock the job runner, and the public-mode
refusals of a visitor's spec. No model is loaded."""
from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from core import config
from core.model_files import SMOLLM2
from core.records import JobRecord
from jobs.services import build_services
from jobs.study import StudySpecError
from tests.gates import Gate
from tests.test_study import TINY, tiny
from ui.study_tab import GRID_COLUMNS, figure_rows, grid_frame, spec_of, step_status, verdict_frame

T0 = datetime(2026, 12, 1, 12, 0)


def job(status: str, minutes: int = 0, progress: float = 0.0, kind: str = "study") -> JobRecord:
    """A job record created `minutes` after T0."""
    created = T0 + timedelta(minutes=minutes)
    return JobRecord(id=f"{kind}-{status}-{minutes}", kind=kind, status=status, progress=progress,
                     message=None, eta_seconds=None, spec={}, result=None, error=None, attempts=1,
                     created_at=created, started_at=created, updated_at=created,
                     finished_at=None, pid=None, pgid=None)


@pytest.fixture
def services(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return build_services(warm_up=False)


@pytest.mark.parametrize("done, step_job, study, shown", [
    (False, None, None, "to do"),  # planned, nothing started
    (True, None, None, "reused"),  # found made (an imported adapter: no job)
    (True, job("done", -5), job("running"), "reused"),  # made before this study began
    (True, job("done", 5), job("running"), "done"),  # made by this study
    (False, job("running", 5, 0.4), job("running"), "running 40%"),
    (False, job("queued", 5), job("running"), "queued"),
    (False, None, job("running"), "queued"),  # the study has not reached it yet
    (False, job("failed", 5), job("failed"), "failed"),
    (False, job("cancelled", -5), job("running"), "queued"),  # an older study's: resumed later
    (False, None, job("cancelled"), "not run"),
])
def test_a_cell_says_what_its_step_is_doing(done, step_job, study, shown):
    assert step_status(done, step_job, study) == shown


def test_the_grid_has_a_row_per_cell_with_each_steps_status(services):
    """The tiny spec (one dataset, sizes 4 and 8): its index was built before the study started,
    the 4-pair adapter is done by it, the 8-pair one is training, the evaluation waits."""
    plan = services.studies.plan(tiny())
    index, small, large, evaluation = plan.steps
    index.done = small.done = True
    jobs = {index.key: job("done", -10, kind="index"), small.key: job("done", 2, kind="finetune"),
            large.key: job("running", 3, 0.25, kind="finetune")}
    grid = grid_frame(plan, jobs, job("running"))
    assert list(grid.columns) == GRID_COLUMNS
    assert grid.to_dict("records") == [
        {"dataset": "sample:nq", "model": SMOLLM2, "pairs": 4, "seed": 0, "index": "reused",
         "fine-tune": "done", "evaluation": "queued"},
        {"dataset": "sample:nq", "model": SMOLLM2, "pairs": 8, "seed": 0, "index": "reused",
         "fine-tune": "running 25%", "evaluation": "queued"}]
    # the plan alone (no study job): what exists is reused, the rest is to do
    assert grid_frame(plan, {}, None)["fine-tune"].tolist() == ["reused", "to do"]
    # a study of the base model only has one row per dataset and model, without a fine-tune
    base_only = services.studies.plan(tiny(systems=["base", "base+rag"]))
    assert grid_frame(base_only, {}, None).to_dict("records") == [
        {"dataset": "sample:nq", "model": SMOLLM2, "pairs": "–", "seed": "–", "index": "to do",
         "fine-tune": "–", "evaluation": "to do"}]


def report_row(size, seed, rag, mean, adapter=None, **more):
    return {"dataset": "sample:nq", "model": SMOLLM2, "system": "fine-tuned" if adapter else "base",
            "adapter": adapter, "size": size, "seed": seed, "rag": rag, "metric": "accuracy",
            "mean": mean, "ci_low": None, "ci_high": None, "n": 2, "run_id": "r1",
            "run_status": "done", "base_mean": None, "diff": None, "diff_ci_low": None,
            "diff_ci_high": None, "n_paired": 0, "verdict": None, **more}


def test_figure_rows_repeat_the_base_model_beside_each_seed_and_keep_the_numbers():
    spec = tiny(finetune_seeds=[0, 1])
    rows = [report_row(0, None, True, 3.5),
            report_row(4, 0, True, 3.0, "a0", base_mean=3.5, diff=-0.5, diff_ci_low=-0.9,
                       diff_ci_high=-0.1, verdict="fine-tuning on 4 pairs (seed 0) lowered ..."),
            report_row(4, 1, True, 4.0, "a1", base_mean=3.5, diff=0.5)]
    drawn = figure_rows(spec, rows)
    assert sorted((r["dataset"], r["system"], r["n_train"], r["mean"]) for r in drawn) == [
        ("sample:nq · seed 0", "base", 0, 3.5), ("sample:nq · seed 0", "fine-tuned", 4, 3.0),
        ("sample:nq · seed 1", "base", 0, 3.5), ("sample:nq · seed 1", "fine-tuned", 4, 4.0)]
    assert {(r["score_min"], r["score_max"], r["run"]) for r in drawn} == {(1, 5, "r1")}
    assert [r["dataset"] for r in figure_rows(tiny(), rows[:2])] == ["sample:nq", "sample:nq"]
    table = verdict_frame(rows)
    assert table["difference [95% CI]"].tolist() == ["-0.50 [-0.90, -0.10]", "+0.50"]
    assert table["base"].tolist() == ["3.50", "3.50"] and len(table) == 2


@pytest.mark.parametrize("text, message", [
    ("", r"^Pick a shipped spec or paste a study spec \(JSON\) first\.$"),
    ("{not json", r"^The spec is not valid JSON: "),
    ("[1, 2]", r"^The spec must hold one object \(the study spec\)\.$"),
    (json.dumps({**TINY, "sizes": [4, 4]}), r"^sizes lists 4 more than once\.$"),
    (json.dumps({**TINY, "junk": "x" * 30_000}), r"^The spec is \d+ characters long"),
])
def test_the_spec_box_refuses_bad_specs_with_one_sentence(text, message):
    with pytest.raises(StudySpecError, match=message):
        spec_of(text)


def test_a_study_takes_no_job_slot_so_its_steps_run(tmp_path, monkeypatch):
    """With ONE slot for all jobs, the study's first step (its index) still runs: the study
    waits at its next step (a test gate), which it reaches only after the index job finished.
    Had the study held the slot while waiting for the index job, neither could go on."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LAB_TEST_GATE_DIR", str(tmp_path / "gates"))
    monkeypatch.setattr("jobs.services.MAX_CONCURRENT_JOBS", 1)
    services = build_services(warm_up=False)
    gate = Gate(tmp_path / "gates", "study-finetune").arm()
    job_id = services.studies.start(tiny())
    gate.wait_reached(timeout=120, alive=lambda: services.runner.get(job_id).status in (
        "queued", "running"))
    assert [j.status for j in services.runner.jobs("index")] == ["done"]
    services.studies.cancel(job_id)
    gate.release()
    assert services.runner.wait(job_id).status == "cancelled"


def test_a_visitor_cannot_name_other_models_or_pin_another_split(services, monkeypatch):
    monkeypatch.setattr(config, "PUBLIC_MODE", True)
    with pytest.raises(StudySpecError, match=r"^On this public server sample:nq uses split seed 0 "
                                             r"and eval fraction 0.3"):
        services.studies.plan(tiny(split_seed=7))
    with pytest.raises(ValueError, match=r"^Model '/srv/models/x' is not available on this "
                                         r"public server"):
        services.studies.plan(tiny(base_models=["/srv/models/x"]))
    assert services.studies.plan(tiny()).steps  # the default split and the embedded model


def test_a_job_that_is_not_a_study_is_refused_by_the_study_endpoints(services):
    from jobs.runner import JobError

    other = services.store.create_job("evaluate", {})
    with pytest.raises(JobError, match=rf"^Job {other} is not a study job \(its kind is "
                                       r"evaluate\)\.$"):
        services.studies.cancel(other)


def test_every_study_action_is_a_named_endpoint_with_named_parameters(services):
    from app import build_app

    endpoints = build_app(services).get_api_info()["named_endpoints"]
    parameters = {name: [p["parameter_name"] for p in endpoints[name]["parameters"]]
                  for name in endpoints if "stud" in name and name != "/study_view"}
    assert parameters == {"/study_spec": ["name"], "/study_plan": ["spec_json"],
                          "/start_study": ["spec_json"], "/study_status": ["job_id"],
                          "/cancel_study": ["job_id"], "/resume_study": ["spec_json"],
                          "/study_report": ["spec_json", "fmt"]}
