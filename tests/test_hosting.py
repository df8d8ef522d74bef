"""Public hosting at the service level: ids and names from a request are refused before anything
is touched, the job caps (MAX_RUNNING_JOBS, one fine-tune per visitor), who may cancel or resume a
job, the config they read, and a UI error that shows one line while its traceback goes to the log."""
from __future__ import annotations

import json
import logging
import os
import re
import threading

import gradio as gr
import pytest

from core import config
from core.model_files import AdapterError
from core.names import InvalidNameError, check_hub_id, check_id, new_id
from core.store import Store
from jobs.desk import JobLimitError, JobOwnerError
from jobs.finetune import _SUMMARY
from jobs.finetune_data import FinetuneError, FinetuneSpec
from jobs.runner import JobError, JobKind
from jobs.services import build_services
from ui.common import user_errors

BAD = ["../x", "a/b", "/etc/passwd", "", "x" * 300, "a\x00b"]


def tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data dir one level below tmp_path, so tmp_path shows anything written beside it."""
    path = tmp_path / "data"
    monkeypatch.setenv("DATA_DIR", str(path))
    return path


def plant_adapter(data_dir, name: str) -> None:
    """A finished adapter folder as a fine-tune leaves it; build_services registers it (sync)."""
    folder = data_dir / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(FinetuneSpec(name=name).to_dict()))
    (folder / "metrics.json").write_text(json.dumps({k: 0 for k in _SUMMARY}))


def services_for(data_dir, monkeypatch, public: bool, max_running: int | None = None):
    monkeypatch.setattr(config, "PUBLIC_MODE", public)
    monkeypatch.setattr(config, "MAX_RUNNING_JOBS", max_running)
    data_dir.mkdir(exist_ok=True)
    return build_services(warm_up=False, store=Store(data_dir / "app.duckdb"))


# ---------------------------------------------------------------- ids and names


def test_ids_have_the_shape_new_id_gives():
    job_id = new_id("finetune")
    assert check_id(job_id, "Job id") == job_id
    for bad in [*BAD, "..", "finetune-20250101-120000-A1B2C3", job_id + "/..", None]:
        with pytest.raises(InvalidNameError, match=r"^Job id .* is not valid: ids look like"):
            check_id(bad, "Job id")
    with pytest.raises(ValueError, match="is not valid"):
        new_id("two-parts")  # a job kind with a dash would make ids that check_id refuses


def test_hub_ids_are_owner_slash_name_without_dots_climbing():
    assert check_hub_id(" someone/some-qa ", "Dataset id") == "someone/some-qa"
    for bad in ["../x", "/etc/passwd", "", "x" * 300, "a\x00b/b", "a/..", "a/../b", "a/b/c",
                ".a/b", "squad", None]:
        with pytest.raises(InvalidNameError, match="is not a Hugging Face Hub id"):
            check_hub_id(bad, "Dataset id")


@pytest.mark.parametrize("bad", BAD + ["..", "../.."])
def test_job_requests_refuse_bad_ids_without_touching_folders(data_dir, monkeypatch, bad):
    services = services_for(data_dir, monkeypatch, public=True)
    (data_dir.parent / "log.txt").write_text("canary")
    before = tree(data_dir.parent)
    for call in (services.jobs.log_tail, services.jobs.metrics, services.jobs.cancel,
                 services.jobs.resume, services.jobs.get):
        with pytest.raises(InvalidNameError, match="Job id .* is not valid"):
            call(bad)
    unknown = new_id("finetune")
    with pytest.raises(JobError, match=f"No job with id '{unknown}'"):
        services.jobs.log_tail(unknown)
    assert tree(data_dir.parent) == before  # no jobs/<id> folder made for an unknown id


@pytest.mark.parametrize("bad", BAD + ["../escaped-adapter"])
def test_adapter_requests_refuse_bad_names_and_move_nothing(data_dir, monkeypatch, bad):
    plant_adapter(data_dir, "planted")
    services = services_for(data_dir, monkeypatch, public=True)
    before = tree(data_dir.parent)
    with pytest.raises(AdapterError, match="New adapter name .* is not allowed"):
        services.adapters.rename("planted", bad)
    for call in (services.adapters.delete, services.adapters.zip, services.adapters.get):
        with pytest.raises(AdapterError, match="Adapter name .* is not allowed"):
            call(bad)
    with pytest.raises(AdapterError, match="Adapter name .* is not allowed"):
        services.adapters.push(bad, "owner/repo", "token")
    if bad != "a/b":  # a well-formed Hub id: refused later, by the (offline) Hub
        with pytest.raises(ValueError, match="Target repo .* is not a Hugging Face Hub id"):
            services.adapters.push("planted", bad, "token")
        with pytest.raises(AdapterError, match="Adapter source .* is not a Hugging Face Hub id"):
            services.adapters.import_(bad or "/etc", config.DEFAULT_CHAT_MODEL)
    assert tree(data_dir.parent) == before
    assert [a.name for a in services.adapters.rows()] == ["planted"]


def test_run_ids_are_checked_before_queries_and_export_files(data_dir, monkeypatch):
    services = services_for(data_dir, monkeypatch, public=False)
    before = tree(data_dir.parent)
    for bad in BAD:
        for call in (services.evaluations.summary, services.evaluations.items,
                     lambda r: services.evaluations.export(r, "csv"),
                     lambda r: services.evaluations.compare(r, new_id("evaluate"))):
            with pytest.raises(InvalidNameError, match="Run (id|A) .* is not valid"):
                call(bad)
    assert tree(data_dir.parent) == before


def test_public_mode_trains_on_presets_only(data_dir, monkeypatch, tmp_path):
    services = services_for(data_dir, monkeypatch, public=True, max_running=3)
    upload = tmp_path / "mine.jsonl"
    upload.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(FinetuneError, match=r"fine-tunes on the presets \(bioasq, qasper, nq\) "
                                            "only, not on a file on the server"):
        services.adapters.train(FinetuneSpec(dataset=str(upload)), visitor="v1")


# ---------------------------------------------------------------- job caps


@pytest.fixture
def gate():
    """A stand-in job body that stays running until the test opens the gate (then ends cancelled
    if it was cancelled meanwhile)."""
    opened = threading.Event()

    def run(ctx):
        opened.wait(60)
        ctx.check_cancelled()
        return {}
    yield run, opened
    opened.set()


def test_public_caps_one_finetune_per_visitor_and_the_running_total(data_dir, monkeypatch, gate):
    run, opened = gate
    services = services_for(data_dir, monkeypatch, public=True, max_running=2)
    services.runner.register("finetune", JobKind(thread=run))  # the fine-tune kind, gated
    spec = FinetuneSpec.cpu_preset()
    first = services.adapters.train(spec, visitor="visitor-a")
    with pytest.raises(JobLimitError, match=f"You already have a finetune job running \\({first}\\)"):
        services.adapters.train(spec, visitor="visitor-a")
    services.adapters.train(spec, visitor="visitor-b")
    with pytest.raises(JobLimitError, match="The server is busy: 2 jobs are queued or running"):
        services.adapters.train(spec, visitor="visitor-c")
    opened.set()
    for job in services.jobs.jobs():
        services.runner.wait(job.id)
    third = services.adapters.train(spec, visitor="visitor-a")  # finished jobs free their places
    assert services.runner.wait(third).status == "done"


def test_locally_the_caps_are_off(data_dir, monkeypatch, gate):
    run, opened = gate
    services = services_for(data_dir, monkeypatch, public=False, max_running=None)
    services.runner.register("finetune", JobKind(thread=run))
    ids = [services.adapters.train(FinetuneSpec.cpu_preset()) for _ in range(4)]
    assert len(set(ids)) == 4
    opened.set()
    assert all(services.runner.wait(i).status == "done" for i in ids)


def test_public_visitors_cancel_and_resume_only_their_own_jobs(data_dir, monkeypatch, gate):
    run, opened = gate
    services = services_for(data_dir, monkeypatch, public=True)
    services.runner.register("finetune", JobKind(thread=run))
    mine = services.adapters.train(FinetuneSpec.cpu_preset(), visitor="visitor-a")
    operators = services.runner.start("finetune", FinetuneSpec.cpu_preset().to_dict())  # the CLI's
    for job_id, who in ((mine, "visitor-b"), (mine, None), (operators, "visitor-a")):
        with pytest.raises(JobOwnerError, match=f"You can cancel only the jobs you started in this "
                                                f"browser session; {job_id} is not one of them"):
            services.jobs.cancel(job_id, who)
    services.jobs.cancel(mine, "visitor-a")
    opened.set()
    assert services.runner.wait(mine).status == "cancelled"
    assert services.runner.wait(operators).status == "done"  # the refusals stopped nothing
    with pytest.raises(JobOwnerError, match=f"You can resume only the jobs .*; {mine} is not"):
        services.jobs.resume(mine, "visitor-b")
    assert services.jobs.resume(f" {mine} ", "visitor-a") == mine
    assert services.runner.wait(mine).status == "done"


def test_locally_anyone_cancels_and_resumes_any_job(data_dir, monkeypatch, gate):
    run, opened = gate
    services = services_for(data_dir, monkeypatch, public=False)
    services.runner.register("finetune", JobKind(thread=run))
    theirs = services.adapters.train(FinetuneSpec.cpu_preset(), visitor="visitor-a")
    operators = services.runner.start("finetune", FinetuneSpec.cpu_preset().to_dict())
    for job_id in (theirs, operators):
        services.jobs.cancel(job_id, "visitor-b")
    opened.set()
    assert [services.runner.wait(j).status for j in (theirs, operators)] == ["cancelled"] * 2
    services.jobs.resume(operators)
    assert services.runner.wait(operators).status == "done"


@pytest.mark.parametrize("env, expected", [({}, None), ({"SPACE_ID": "me/lab"}, 3),
                                           ({"PUBLIC_MODE": "1", "MAX_RUNNING_JOBS": "5"}, 5),
                                           ({"MAX_RUNNING_JOBS": "2"}, 2)])
def test_max_running_jobs_default_is_a_cap_in_public_mode_only(env, expected):
    assert config.max_running_jobs(env) == expected


def test_max_running_jobs_must_be_a_positive_whole_number():
    with pytest.raises(ValueError, match="MAX_RUNNING_JOBS must be a whole number of at least 1, "
                                         "not 'lots'"):
        config.max_running_jobs({"MAX_RUNNING_JOBS": "lots"})


# ---------------------------------------------------------------- UI errors


def test_a_bug_shows_one_line_and_logs_the_traceback(caplog):
    @user_errors
    def handler():
        raise KeyError("/srv/secret/path\nsecond line")

    @user_errors
    def refusing():
        raise InvalidNameError("Adapter name '../x' is not allowed.\nnot shown")

    with caplog.at_level(logging.INFO, logger="ui.common"):
        with pytest.raises(gr.Error) as bug:
            handler()
        with pytest.raises(gr.Error) as refusal:
            refusing()
    assert bug.value.message == ("Something went wrong on the server (KeyError); the details are "
                                 "in its log.")
    assert refusal.value.message == "Adapter name '../x' is not allowed."
    error, info = caplog.records
    assert error.levelname == "ERROR" and error.exc_info[0] is KeyError
    assert "/srv/secret/path" in caplog.text and "Traceback" in caplog.text
    assert info.levelname == "INFO" and re.search(r"refused refusing: Adapter name", info.message)


@pytest.mark.parametrize("path", ["x" * 300, "a\x00b", "../missing.jsonl"])
def test_a_dataset_path_the_file_system_cannot_take_is_refused_not_a_crash(monkeypatch, path):
    monkeypatch.setattr(config, "PUBLIC_MODE", False)
    with pytest.raises(FinetuneError, match="is neither a preset .* nor an existing file"):
        FinetuneSpec(dataset=path).check_runnable()
