import sys
import threading
import time

import pytest

from core.store import Store
from jobs.runner import JobError, JobKind, JobRunner


def counting_job(ctx):
    """Counts to spec['n'], remembering how far it got in its log so a resume continues."""
    done = int(ctx.spec.get("start", 0))
    if ctx.resume and ctx.log_path.exists():
        done = sum(line.startswith("step") for line in ctx.log_path.read_text().splitlines())
    for i in range(done, ctx.spec["n"]):
        if ctx.spec.get("gated"):
            GATE.wait(5)
        time.sleep(ctx.spec.get("sleep", 0.01))
        ctx.log(f"step {i}")
        ctx.progress((i + 1) / ctx.spec["n"], f"step {i + 1}/{ctx.spec['n']}")
    return {"steps": ctx.spec["n"]}


def failing_job(ctx):
    ctx.progress(0.5, "half")
    raise ValueError("the judge endpoint went away")


GATE = threading.Event()
KINDS = {"count": JobKind(thread=counting_job), "fail": JobKind(thread=failing_job)}


def wait_for(pred, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "jobs.duckdb")


def test_thread_job_reports_progress_and_result(store):
    runner = JobRunner(store, KINDS)
    job_id = runner.start("count", {"n": 20, "sleep": 0.02})
    seen = set()
    while store.get_job(job_id)["status"] != "done":
        job = store.get_job(job_id)
        seen.add(round(job["progress"], 2))
        time.sleep(0.01)
    job = runner.wait(job_id)
    assert job["status"] == "done" and job["progress"] == 1.0
    assert job["result"] == {"steps": 20}
    assert len(seen) >= 3, "progress must be visible while the job runs"
    assert "step 19" in runner.log_tail(job_id)


def test_eta_is_reported_while_running(store):
    runner = JobRunner(store, KINDS)
    job_id = runner.start("count", {"n": 30, "sleep": 0.05})
    assert wait_for(lambda: (store.get_job(job_id)["eta_seconds"] or 0) > 0)
    runner.wait(job_id)
    assert store.get_job(job_id)["eta_seconds"] is None


def test_cancel_stops_a_thread_job(store):
    runner = JobRunner(store, KINDS)
    job_id = runner.start("count", {"n": 1000, "sleep": 0.01})
    assert wait_for(lambda: store.get_job(job_id)["progress"] > 0)
    runner.cancel(job_id)
    job = runner.wait(job_id, timeout=10)
    assert job["status"] == "cancelled"
    assert 0 < job["progress"] < 1
    with pytest.raises(JobError, match="already ended"):
        runner.cancel(job_id)


def test_failure_is_recorded_with_message_and_traceback(store):
    runner = JobRunner(store, KINDS)
    job_id = runner.start("fail", {})
    job = runner.wait(job_id)
    assert job["status"] == "failed"
    assert job["error"] == "the judge endpoint went away"
    assert "Traceback" in runner.log_tail(job_id)


def test_running_job_is_interrupted_on_restart_and_resumes(tmp_path):
    path = tmp_path / "jobs.duckdb"
    store = Store(path)
    # A job the previous app left running halfway (as after a crash or a restart).
    job_id = store.create_job("count", {"n": 10})
    store.update_job(job_id, status="running", progress=0.4)
    runner = JobRunner(store, KINDS)
    assert runner.interrupted_on_start == [job_id]
    assert store.get_job(job_id)["status"] == "interrupted"
    runner.resume(job_id)
    job = runner.wait(job_id)
    assert job["status"] == "done" and job["attempts"] == 1


def test_resume_continues_after_cancel(store):
    runner = JobRunner(store, KINDS)
    job_id = runner.start("count", {"n": 200, "sleep": 0.01})
    assert wait_for(lambda: store.get_job(job_id)["progress"] >= 0.1)
    runner.cancel(job_id)
    runner.wait(job_id)
    steps_before = runner.log_tail(job_id, 10_000).count("step ")
    runner.resume(job_id)
    job = runner.wait(job_id, timeout=30)
    assert job["status"] == "done" and job["attempts"] == 2
    log = runner.log_tail(job_id, 10_000)
    assert log.count("step ") == 200, "resume must not redo finished steps"
    assert steps_before > 0


def test_unknown_kind_and_id_give_clear_errors(store):
    runner = JobRunner(store, KINDS)
    with pytest.raises(JobError, match="Unknown job kind"):
        runner.start("nope", {})
    with pytest.raises(JobError, match="No job with id"):
        runner.cancel("missing")


CHILD = """
import sys, time
from jobs.runner import Reporter
r = Reporter()
n = int(sys.argv[1])
for i in range(n):
    time.sleep(float(sys.argv[2]))
    print("training line", i, flush=True)
    r.progress((i + 1) / n, f"step {i + 1}")
    r.metric(step=i + 1, loss=10.0 / (i + 1))
r.result({"final_loss": 1.25})
"""


def child_argv(spec, resume):
    return [sys.executable, "-c", CHILD, str(spec["n"]), str(spec["sleep"])]


def test_subprocess_job_streams_progress_log_and_result(store):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    job_id = runner.start("child", {"n": 5, "sleep": 0.05})
    job = runner.wait(job_id, timeout=60)
    assert job["status"] == "done", runner.log_tail(job_id)
    assert job["result"] == {"final_loss": 1.25}
    tail = runner.log_tail(job_id)
    assert "training line 4" in tail and "@@job" not in tail
    assert runner.metrics(job_id) == [{"step": i, "loss": 10.0 / i} for i in range(1, 6)]


def test_subprocess_job_cancel_kills_the_child(store):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    job_id = runner.start("child", {"n": 1000, "sleep": 0.05})
    assert wait_for(lambda: store.get_job(job_id)["progress"] > 0, timeout=30)
    runner.cancel(job_id)
    job = runner.wait(job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert job["progress"] < 1


def test_subprocess_failure_carries_exit_code(store):
    argv = lambda spec, resume: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    runner = JobRunner(store, {"bad": JobKind(argv=argv)})
    job = runner.wait(runner.start("bad", {}), timeout=60)
    assert job["status"] == "failed" and "code 3" in job["error"] and "boom" in job["error"]


def test_jobs_queue_behind_the_concurrency_limit(store):
    runner = JobRunner(store, KINDS, max_concurrent=1)
    first = runner.start("count", {"n": 3, "gated": True})
    second = runner.start("count", {"n": 3})
    assert wait_for(lambda: store.get_job(first)["status"] == "running")
    assert store.get_job(second)["status"] == "queued"
    GATE.set()
    assert runner.wait(second, timeout=30)["status"] == "done"
