"""The job runner: thread and subprocess jobs, progress, cancel, resume, the events-file protocol,
and the clean-up of a child that a previous app left running. Jobs are stopped at known points
with core.testhooks gates, never raced with sleeps."""
import logging
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from core.store import Store
from core.testhooks import GATE_ENV, gate
from jobs.desk import JobDesk
from jobs.events import JOB_ENV, EventReader, parse_event
from jobs.runner import JobError, JobKind, JobRunner, job_dir
from tests.gates import Gate


def counting_job(ctx):
    """Counts to spec['n'], remembering how far it got in its log so a resume continues; stops at
    the gate "count" before step spec['gate_at']."""
    done = int(ctx.spec.get("start", 0))
    if ctx.resume and ctx.log_path.exists():
        done = sum(line.startswith("step") for line in ctx.log_path.read_text().splitlines())
    for i in range(done, ctx.spec["n"]):
        if i == ctx.spec.get("gate_at"):
            gate("count")
        ctx.log(f"step {i}")
        ctx.progress((i + 1) / ctx.spec["n"], f"step {i + 1}/{ctx.spec['n']}")
    return {"steps": ctx.spec["n"]}


def failing_job(ctx):
    ctx.progress(0.5, "half")
    raise ValueError("the judge endpoint went away")


KINDS = {"count": JobKind(thread=counting_job), "fail": JobKind(thread=failing_job)}


def wait_for(predicate, timeout=60):
    """Poll a condition the code under test makes true (never a fixed sleep)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "jobs.duckdb")


@pytest.fixture
def gates(tmp_path, monkeypatch):
    """Gate(name) for this test; the variable reaches thread jobs and children alike."""
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gates"))
    return lambda name: Gate(tmp_path / "gates", name)


def test_thread_job_reports_progress_eta_and_result(store, gates):
    runner = JobRunner(store, KINDS)
    count = gates("count").arm()
    job_id = runner.start("count", {"n": 20, "gate_at": 10})
    count.wait_reached()
    job = store.get_job(job_id)  # visible while the job runs, not only at the end
    assert job.status == "running" and 0 < job.progress < 1 and job.eta_seconds > 0
    count.release()
    job = runner.wait(job_id)
    assert job.status == "done" and job.progress == 1.0 and job.eta_seconds is None
    assert job.result == {"steps": 20}
    assert "step 19" in runner.log_tail(job_id)


def test_no_eta_before_a_rate_is_known(store, gates):
    runner = JobRunner(store, KINDS)
    count = gates("count").arm()
    job_id = runner.start("count", {"n": 20, "gate_at": 1})
    count.wait_reached()  # one step done: a fraction, but no rate yet
    job = store.get_job(job_id)
    assert job.progress == pytest.approx(0.05) and job.eta_seconds is None
    count.release()
    assert runner.wait(job_id).status == "done"


def test_the_desk_names_the_running_job_a_reloaded_page_follows(store, gates):
    desk = JobDesk(JobRunner(store, KINDS))
    assert desk.active("count") is None
    count = gates("count").arm()
    job_id = desk.admit("count", None, lambda: desk.runner.start("count", {"n": 5, "gate_at": 2}))
    count.wait_reached()
    assert desk.active("count").id == job_id and desk.active("fail") is None
    count.release()
    assert desk.runner.wait(job_id).status == "done" and desk.active("count") is None


def test_cancel_stops_a_thread_job(store, gates):
    runner = JobRunner(store, KINDS)
    count = gates("count").arm()
    job_id = runner.start("count", {"n": 1000, "gate_at": 5})
    count.wait_reached()
    runner.cancel(job_id)
    count.release()
    job = runner.wait(job_id, timeout=10)
    assert job.status == "cancelled"
    assert 0 < job.progress < 1
    with pytest.raises(JobError, match="already ended"):
        runner.cancel(job_id)


def test_failure_is_recorded_with_message_and_traceback(store, caplog):
    caplog.set_level(logging.INFO, logger="jobs.runner")
    runner = JobRunner(store, KINDS)
    job_id = runner.start("fail", {})
    job = runner.wait(job_id)
    assert job.status == "failed"
    assert job.error == "the judge endpoint went away"  # what users see: one line
    assert "Traceback" in runner.log_tail(job_id)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if job_id in r.getMessage()]
    assert logged[0] == ("INFO", f"job {job_id} (fail) started, attempt 1")
    assert logged[1] == ("ERROR", f"job {job_id} (fail) failed")
    assert re.fullmatch(rf"job {job_id} \(fail\) ended failed after \d+\.\d s", logged[2][1])
    failure = next(r for r in caplog.records if r.levelname == "ERROR")
    assert failure.exc_info[0] is ValueError  # the server log has the traceback


def test_reads_of_a_job_without_a_folder_create_nothing(store):
    runner = JobRunner(store, KINDS)
    job_id = store.create_job("count", {"n": 1})  # recorded, never launched
    assert runner.log_tail(job_id) == "" and runner.metrics(job_id) == []
    started = runner.start("count", {"n": 1})
    runner.wait(started)
    assert job_dir(started).is_dir() and not job_dir(job_id).exists()


def test_running_job_is_interrupted_on_restart_and_resumes(tmp_path):
    path = tmp_path / "jobs.duckdb"
    store = Store(path)
    # A job the previous app left running halfway (as after a crash or a restart).
    job_id = store.create_job("count", {"n": 10})
    store.update_job(job_id, status="running", progress=0.4)
    runner = JobRunner(store, KINDS)
    assert runner.interrupted_on_start == [job_id] and runner.stopped_on_start == []
    assert store.get_job(job_id).status == "interrupted"
    runner.resume(job_id)
    job = runner.wait(job_id)
    assert job.status == "done" and job.attempts == 1


def test_resume_continues_after_cancel(store, gates):
    runner = JobRunner(store, KINDS)
    count = gates("count").arm()
    job_id = runner.start("count", {"n": 200, "gate_at": 20})
    count.wait_reached()
    runner.cancel(job_id)
    count.release()
    runner.wait(job_id)
    assert runner.log_tail(job_id, 10_000).count("step ") == 21  # step 20 ran, then the cancel
    runner.resume(job_id)
    job = runner.wait(job_id, timeout=30)
    assert job.status == "done" and job.attempts == 2
    log = runner.log_tail(job_id, 10_000)
    assert log.count("step ") == 200, "resume must not redo finished steps"


def test_unknown_kind_and_id_give_clear_errors(store):
    runner = JobRunner(store, KINDS)
    with pytest.raises(JobError, match="Unknown job kind"):
        runner.start("nope", {})
    with pytest.raises(JobError, match="No job with id"):
        runner.cancel("missing")


def test_jobs_queue_behind_the_concurrency_limit(store, gates):
    runner = JobRunner(store, KINDS, max_concurrent=1)
    count = gates("count").arm()
    first = runner.start("count", {"n": 3, "gate_at": 0})
    second = runner.start("count", {"n": 3})
    count.wait_reached()
    assert store.get_job(first).status == "running"
    assert store.get_job(second).status == "queued"
    count.release()
    assert runner.wait(second, timeout=30).status == "done"


def test_jobs_that_wait_for_jobs_take_no_slot_so_they_cannot_deadlock(store, gates):
    """Two coordinators (like studies) each start a job and wait for it, with ONE slot: had they
    held it, neither child could ever run."""
    def coordinate(ctx):
        child = runner.start("count", {"n": 2})
        return {"child": runner.wait(child).status}

    runner = JobRunner(store, {**KINDS, "coord": JobKind(thread=coordinate, slot=False)},
                       max_concurrent=1)
    count = gates("count").arm()
    blocker = runner.start("count", {"n": 1, "gate_at": 0})  # holds the only slot for now
    count.wait_reached()
    coordinators = [runner.start("coord", {}), runner.start("coord", {})]
    assert wait_for(lambda: all(store.get_job(c).status == "running" for c in coordinators))
    count.release()
    assert runner.wait(blocker, timeout=30).status == "done"
    for coordinator in coordinators:
        job = runner.wait(coordinator, timeout=30)
        assert (job.status, job.result) == ("done", {"child": "done"})


# ---------------------------------------------------------------- subprocess jobs

CHILD = """
import os, sys
from core.testhooks import gate
from jobs.events import Reporter
r = Reporter()
n, mode = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print("training line", i, flush=True)
    r.progress((i + 1) / n, f"step {i + 1}")
    r.metric(step=i + 1, loss=10.0 / (i + 1))
    gate("child")
    if mode == "garbage" and i == 0:
        with open(os.environ["LAB_JOB_EVENTS"], "a") as fh:
            fh.write('not json\\n{"progress": "half"}\\n{"progress": 0.5, "metric": {}}\\n[1]\\n')
if mode == "no-result-event":  # a result that reached result.json but not the events file
    from jobs.events import result_path, write_result
    write_result(result_path(r.events), {"final_loss": 1.25})
else:
    r.result({"final_loss": 1.25})
"""


def child_argv(spec, resume):
    return [sys.executable, "-c", CHILD, str(spec["n"]), spec.get("mode", "plain")]


def test_subprocess_job_streams_progress_log_and_result(store):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    job_id = runner.start("child", {"n": 5})
    job = runner.wait(job_id, timeout=60)
    assert job.status == "done", runner.log_tail(job_id)
    assert job.result == {"final_loss": 1.25}
    assert job.pid is None and job.pgid is None  # forgotten once the child ended
    tail = runner.log_tail(job_id)
    assert "training line 4" in tail and "step 5" not in tail  # events stay out of the log
    assert runner.metrics(job_id) == [{"step": i, "loss": 10.0 / i} for i in range(1, 6)]
    names = {p.name for p in job_dir(job_id).iterdir()}
    assert {"events.jsonl", "result.json", "log.txt", "metrics.jsonl"} <= names


def test_malformed_event_lines_are_logged_and_skipped(store, caplog):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    with caplog.at_level(logging.WARNING, logger="jobs.events"):
        job = runner.wait(runner.start("child", {"n": 3, "mode": "garbage"}), timeout=60)
    assert job.status == "done", runner.log_tail(job.id)
    assert job.result == {"final_loss": 1.25} and job.progress == 1.0
    assert [p["step"] for p in runner.metrics(job.id)] == [1, 2, 3]
    problems = [r.getMessage() for r in caplog.records if "skipped a job event" in r.getMessage()]
    assert len(problems) == 4, problems
    assert "not a JSON object" in problems[0] and "progress must be a number" in problems[1]
    assert "exactly one of progress, metric, result" in problems[2]


def test_lost_result_event_is_recovered_from_result_json(store):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    job = runner.wait(runner.start("child", {"n": 2, "mode": "no-result-event"}), timeout=60)
    assert job.status == "done" and job.result == {"final_loss": 1.25}


@pytest.mark.parametrize("line, problem", [
    ('{"progress": true}', "progress must be a number"),
    ('{"progress": NaN}', "progress must be a number"),
    ('{"progress": 0.5, "message": 3}', "message must be text"),
    ('{"progress": 0.5, "extra": 1}', "unexpected keys"),
    ('{"metric": [1]}', "metric must be an object"),
    ('{"result": "ok", "metric": {}}', "exactly one of"),
    ('{"result": null}', "result must be an object"),
])
def test_event_checks_name_the_problem(line, problem, caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.events"):
        assert parse_event(line) is None
    assert problem in caplog.text
    assert parse_event('{"progress": 1, "message": "done"}') == {"progress": 1, "message": "done"}


def test_event_reader_waits_for_whole_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"metric": {"a": 1}}\n')
    reader = EventReader(path)  # starts at the end: earlier attempts' events are not replayed
    with path.open("a") as fh:
        fh.write('{"metric": {"b": 2}}\n{"metric": {"c"')
    assert reader.read() == [{"metric": {"b": 2}}]
    with path.open("a") as fh:
        fh.write(': 3}}')
    assert reader.read() == []
    assert reader.read(final=True) == [{"metric": {"c": 3}}]


def test_subprocess_job_cancel_kills_the_child(store, gates):
    runner = JobRunner(store, {"child": JobKind(argv=child_argv)})
    child = gates("child").arm()
    job_id = runner.start("child", {"n": 1000})
    pid = child.wait_reached()
    runner.cancel(job_id)
    job = runner.wait(job_id, timeout=30)
    assert job.status == "cancelled" and job.progress < 1
    assert gone(pid)


@pytest.mark.parametrize("code, error", [
    ("print('loading tokenizer and data', flush=True); raise SystemExit('error: n_train is too big')",
     "n_train is too big (exit code 1)"),
    ("raise ValueError('bad value')", "ValueError: bad value (exit code 1)"),
    ("import os; os._exit(9)", "The process exited with code 9; its log has the details."),
])
def test_failed_child_row_says_one_sentence(store, code, error):
    """The row shows the child's own last sentence: no command line, spec JSON or traceback
    frames, and its message is the outcome, not the last progress step."""
    argv = lambda spec, resume: [sys.executable, "-c", code]
    runner = JobRunner(store, {"bad": JobKind(argv=argv)})
    job = runner.wait(runner.start("bad", {"knob": 1}), timeout=60)
    assert (job.status, job.message, job.error) == ("failed", "failed", error)


def test_subprocess_failure_carries_exit_code(store):
    argv = lambda spec, resume: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    runner = JobRunner(store, {"bad": JobKind(argv=argv)})
    job = runner.wait(runner.start("bad", {}), timeout=60)
    assert job.status == "failed" and "code 3" in job.error and "boom" in job.error


# ---------------------------------------------------------------- children an app left behind


def test_restarted_app_stops_the_orphan_child_and_marks_the_job_interrupted(store, gates):
    """The first runner stands for an app that died while its child waited at a gate; a second
    runner on the same database is the restarted app."""
    kinds = {"child": JobKind(argv=child_argv)}
    dead_app = JobRunner(store, kinds)
    child = gates("child").arm()
    job_id = dead_app.start("child", {"n": 1000})
    pid = child.wait_reached()
    assert wait_for(lambda: store.get_job(job_id).pgid == pid)
    restarted = JobRunner(store, kinds)
    assert restarted.stopped_on_start == [job_id] and restarted.interrupted_on_start == [job_id]
    assert gone(pid)
    dead_app.wait(job_id, timeout=30)  # its thread sees the child gone and leaves the record be
    job = store.get_job(job_id)
    assert job.status == "interrupted" and job.pid is None and job.pgid is None


def stranger(job_id: str | None = None) -> subprocess.Popen:
    """A process in its own group, optionally claiming to run `job_id`."""
    env = {k: v for k, v in os.environ.items() if k != JOB_ENV}
    if job_id:
        env[JOB_ENV] = job_id
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                            start_new_session=True)


@pytest.mark.parametrize("claims", [None, "other-job"])
def test_a_recycled_pid_is_never_killed(store, claims):
    job_id = store.create_job("child", {})
    proc = stranger(claims)  # the recorded pid now belongs to a process that is not this job's
    try:
        store.update_job(job_id, status="running", pid=proc.pid, pgid=proc.pid)
        runner = JobRunner(store, {})
        assert runner.stopped_on_start == [] and runner.interrupted_on_start == [job_id]
        assert proc.poll() is None, "a process that is not ours was killed"
        assert store.get_job(job_id).pgid is None
    finally:
        proc.kill()
        proc.wait()


def test_resume_first_stops_a_child_still_running_the_job(store):
    kinds = {"child": JobKind(argv=child_argv)}
    runner = JobRunner(store, kinds)
    job_id = store.create_job("child", {"n": 2})
    proc = stranger(job_id)  # e.g. a trainer that outlived a failed clean-up
    store.update_job(job_id, status="interrupted", pid=proc.pid, pgid=proc.pid)
    runner.resume(job_id)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert runner.wait(job_id, timeout=60).status == "done"


def test_child_dies_with_the_app(tmp_path):
    """PR_SET_PDEATHSIG: SIGKILL the process that spawned the child; the kernel stops the child."""
    app = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from jobs import procs\n"
        "child = procs.spawn([sys.executable, '-c', 'import time; time.sleep(600)'], {}, "
        "Path('.'), sys.stdout)\n"
        "print(child.pid, flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(app.stdout.readline())
    try:
        assert not gone(child)
        app.kill()
        app.wait()
        assert wait_for(lambda: gone(child), timeout=30)
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)

