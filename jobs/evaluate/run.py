"""Batch G-Eval: eval examples x systems -> answers -> judgments per metric x repeat -> DuckDB.

`run_evaluation` is one thread job (kind "evaluate"); the CLI (`python -m jobs.evaluate`) starts
the same job through a JobRunner, so both write identical rows, the jobs row included.

- The run's id is the job's id: eval_runs, answers and judgments all carry it, and a resumed job
  finds its run, its evaluation steps and its items again.
- Answers: items in batches; local systems grouped by base model, ONE generate call per group and
  batch with per-row adapters; OpenAI-compatible systems concurrently beside it. A batch's rows
  are written as soon as its call returns.
- Judgments: per metric and repeat, items in batches; each judgment is written as it completes.
- Resume skips every key already stored (inserts never overwrite), so nothing is redone.
- A failing call (judge or answering endpoint) is retried with exponential backoff, then the job
  fails with a sentence saying so; everything stored stays, and resume continues from there.
- Repeats with `logprobs`: the slot probabilities are deterministic (one forward pass; reasoning,
  if on, is greedy), so repeating them would store the same number ten times and shrink nothing
  but disk. Such runs store one judgment per (item, system, metric), repeat 0, and the run's spec
  records `effective_repeats` = 1 with the reason. Repeats apply to `sampling`, where each repeat
  is a fresh set of n samples with its own seed.
"""
from __future__ import annotations

import hashlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, TypeVar

from core.evalstats import summarize_run
from core.geval import FormInput, Metric, get_steps, judge_batch, make_judge, metric_from
from core.generation import GenParams, Generation
from core.models import ModelHub
from core.openai_backend import OpenAIBackend
from core.schema import InputError, QAExample
from core.secrets import Secret, endpoint
from core.store import Store
from core.systems import BASE, System
from core.testhooks import gate
from jobs.evaluate.spec import KIND, REPEATS_NOTE, EvalSpec, EvalSpecError
from jobs.runner import JobCancelled, JobContext, JobRunner
from pipelines.compare import closed_book_messages
from pipelines.query import build_prompt, retrieve
from pipelines.spec import PipelineSpec, load_spec

T = TypeVar("T")


class RetriesExhaustedError(RuntimeError):
    """An endpoint kept failing; the job stops with its work stored, ready to resume."""


# ---------------------------------------------------------------- preflight


@dataclass
class EvalResources:
    """The few things an evaluation uses from the app, wired in jobs/services.py."""

    store: Store
    hub: ModelHub
    eval_examples: Callable[[str], list[QAExample]]  # dataset id -> its eval split
    index: Callable[[str], Any]  # pipeline name -> its built index (DocumentStoreHandle)
    adapter_paths: Callable[[], dict[str, str]]  # adapter name -> folder
    training_ids: Callable[[str], tuple[str | None, set[str]]]  # adapter -> (dataset, train ids)


def select_examples(res: EvalResources, spec: EvalSpec) -> list[QAExample]:
    """The eval examples of the dataset, all or a seeded sample, in id order."""
    try:
        examples = sorted(res.eval_examples(spec.dataset_id), key=lambda e: e.id)
    except InputError as exc:
        raise EvalSpecError(str(exc)) from exc
    if not examples:
        raise EvalSpecError(f"The dataset '{spec.dataset_id}' has no eval examples to judge.")
    missing = [e.id for e in examples if not (e.answer or "").strip()]
    if missing:
        raise EvalSpecError(f"{len(missing)} of {len(examples)} eval examples of "
                            f"'{spec.dataset_id}' have no reference answer (e.g. '{missing[0]}'): "
                            "G-Eval compares every answer with its reference answer.")
    if spec.n_items is not None and spec.n_items < len(examples):
        examples = sorted(random.Random(spec.seed).sample(examples, spec.n_items), key=lambda e: e.id)
    return examples


@dataclass
class Plan:
    """What a run needs besides the spec: checked once before the job starts and again inside."""

    examples: list[QAExample]
    systems: list[System]  # the spec's systems, each RAG one with its pipeline filled in
    pipelines: dict[str, tuple[PipelineSpec, Any]] = field(default_factory=dict)  # name -> (spec, index)


def preflight(res: EvalResources, spec: EvalSpec) -> Plan:
    """Every check a user can fix, before any model runs (the spec checked itself when built):
    dataset, pipelines, adapters, and that no adapter was trained on an item this run would judge."""
    plan = Plan(select_examples(res, spec), [s.with_pipeline(spec.pipeline) for s in spec.systems])
    for name in dict.fromkeys(s.pipeline for s in plan.systems if s.rag):
        plan.pipelines[name] = (load_spec(name), res.index(name))
    known = set(res.adapter_paths())
    for model, adapter in _local_adapters(plan.systems, spec):
        if adapter not in known and adapter not in res.hub.list_adapters(model):
            raise EvalSpecError(f"Unknown adapter '{adapter}': train it in the Fine-tune tab or "
                                "load it from a folder or the Hub first.")
    check_no_leakage(res, spec, plan)
    return plan


def check_no_leakage(res: EvalResources, spec: EvalSpec, plan: Plan) -> None:
    """Refuse a local adapter whose recorded training ids include an item of this run (the study
    planner calls it too, with the training ids of adapters it has yet to train)."""
    items = {e.id for e in plan.examples}
    for adapter in dict.fromkeys(s.adapter for s in plan.systems if not s.is_base and s.kind == "local"):
        dataset_id, trained = res.training_ids(adapter)
        if dataset_id not in (None, spec.dataset_id):
            continue
        overlap = sorted(items & trained)
        if overlap:
            shown = ", ".join(overlap[:5]) + (", …" if len(overlap) > 5 else "")
            raise EvalSpecError(
                f"Adapter '{adapter}' was trained on {len(overlap)} of this run's {len(items)} eval "
                f"items ({shown}): it would be judged on questions it learned. Evaluate it on "
                "items outside its training set (the dataset's split keeps them apart), or drop it.")


def start_evaluation(res: EvalResources, runner: JobRunner, spec: EvalSpec,
                     keys: Mapping[str, Secret] | None = None) -> str:
    """Check the request, then start it as a background job; returns the job id (= run id).
    `keys` (endpoint -> the visitor's key) travel in memory with this run only; the job gets
    those of the endpoints the spec talks to."""
    preflight(res, spec)
    return runner.start(KIND, spec.to_dict(), secrets=keys_for(spec, keys))


def keys_for(spec: EvalSpec, keys: Mapping[str, Secret] | None) -> dict[str, Secret]:
    """The visitor's keys for the endpoints this spec talks to (judge and OpenAI systems)."""
    wanted = {endpoint(s.base_url) for s in spec.systems if s.kind == "openai"}
    if spec.judge.kind == "openai":
        wanted.add(endpoint(spec.judge.base_url))
    return {e: key for e, key in (keys or {}).items() if e in wanted}


def evaluation_job(res: EvalResources) -> Callable[[JobContext], dict[str, Any]]:
    """The runner's entry point for kind "evaluate"."""
    return lambda ctx: run_evaluation(ctx, res, EvalSpec.from_dict(ctx.spec))


# ---------------------------------------------------------------- the run


def run_evaluation(ctx: JobContext, res: EvalResources, spec: EvalSpec) -> dict[str, Any]:
    plan = preflight(res, spec)
    store = res.store
    judge = make_judge(spec.judge.kind, spec.judge.model, spec.judge.base_url,
                       spec.judge.adapter or BASE, ctx.secrets.get(endpoint(spec.judge.base_url)))
    paths = res.adapter_paths()
    for model, adapter in _local_adapters(plan.systems, spec):
        if adapter not in res.hub.list_adapters(model):
            res.hub.load_adapter(model, paths[adapter], adapter)
    store.save_systems(plan.systems)
    metrics = spec.metric_list()
    run = store.get_eval_run(ctx.job_id)
    if run is None:
        ctx.progress(0.0, "writing the evaluation steps (once per metric and judge)")
        steps = {m.name: _retry(ctx, spec.retry_delays, f"The judge {judge.id}",
                                lambda m=m: get_steps(store, m, judge, spec.steps_max_new_tokens))
                 for m in metrics}
        run = store.create_eval_run(ctx.job_id, ctx.job_id, spec.name or _default_name(spec),
                                    spec.dataset_id, _run_record(spec, judge.id, steps, plan))
    else:  # a resume keeps the steps and items it started with
        wanted = set(run.spec["example_ids"])
        plan.examples = [e for e in plan.examples if e.id in wanted]
        if len(plan.examples) != len(wanted):
            raise EvalSpecError(f"The dataset '{spec.dataset_id}' no longer has every item this "
                                "run started with; start a new run.")
    store.set_eval_run_status(ctx.job_id, "running")
    try:
        tracker = _Tracker(ctx, store, spec, len(plan.examples), len(metrics))
        _answer_all(ctx, res, spec, plan, tracker)
        _judge_all(ctx, store, spec, plan, judge, metrics, run.spec["steps"], tracker)
    except JobCancelled:
        store.set_eval_run_status(ctx.job_id, "cancelled")
        raise
    except Exception:
        store.set_eval_run_status(ctx.job_id, "failed")
        raise
    store.set_eval_run_status(ctx.job_id, "done")
    summary = summarize_run(store, ctx.job_id)
    return {"run_id": ctx.job_id, "answers": tracker.answers, "judgments": tracker.judgments,
            "means": [{k: row[k] for k in ("system_id", "system", "metric", "mean", "n",
                                           "parse_failures")} for row in summary]}


def _local_adapters(systems: list[System], spec: EvalSpec) -> list[tuple[str, str]]:
    """(model, adapter) pairs the run attaches: the systems' and the local judge's."""
    pairs = [(s.model, s.adapter) for s in systems if s.kind == "local"]
    if spec.judge.kind == "local":
        pairs.append((spec.judge.model, spec.judge.adapter or BASE))
    return [(m, a) for m, a in dict.fromkeys(pairs) if a != BASE]


def _default_name(spec: EvalSpec) -> str:
    metrics = ", ".join(metric_from(m).name for m in spec.metrics)
    return f"{spec.dataset_id} · {len(spec.systems)} system(s) · {metrics}"


def _run_record(spec: EvalSpec, judge_id: str, steps: dict[str, str], plan: Plan) -> dict[str, Any]:
    """The eval_runs.spec: the request plus what it resolved to (system ids, judge, steps, items)."""
    record = spec.to_dict()
    record["systems"] = [{**s.fields(), "id": s.id, "label": s.label} for s in plan.systems]
    record.update(judge_id=judge_id, steps=steps, example_ids=[e.id for e in plan.examples],
                  effective_repeats=spec.effective_repeats)
    if spec.method == "logprobs":
        record["repeats_note"] = REPEATS_NOTE
    return record


class _Tracker:
    """Counts work units (answers + judgments), reports progress and running means."""

    def __init__(self, ctx: JobContext, store: Store, spec: EvalSpec, n_items: int, n_metrics: int):
        self.ctx, self.store, self.run_id = ctx, store, ctx.job_id
        self.total_answers = n_items * len(spec.systems)
        self.total_judgments = self.total_answers * n_metrics * spec.effective_repeats
        self.answers = len(store.answer_keys(self.run_id))
        self.judgments = len(store.judgment_keys(self.run_id))
        self.means = ""

    def answered(self) -> None:
        self.answers += 1
        self.report()

    def judged(self) -> None:
        self.judgments += 1
        self.report()

    def report(self) -> None:
        done = self.answers + self.judgments
        total = self.total_answers + self.total_judgments
        message = (f"answers {self.answers}/{self.total_answers} · judgments "
                   f"{self.judgments}/{self.total_judgments}" + (f" · {self.means}" if self.means else ""))
        self.ctx.progress(done / total, message)

    def publish_means(self) -> None:
        rows = self.store.eval_running_means(self.run_id)
        for row in rows:
            self.ctx.metric(system_id=row["system_id"], system=row["system"], metric=row["metric"],
                            mean=row["mean"], n=row["n"])
        self.means = " · ".join(f"{r['system']} {r['metric']} {r['mean']:.2f} (n={r['n']})" for r in rows)
        self.report()


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _retry(ctx: JobContext, delays: list[float], what: str, fn: Callable[[], T]) -> T:
    """fn(), retried after each delay in turn (exponential backoff by default: 1, 2, 4 s)."""
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except JobCancelled:
            raise
        except Exception as exc:
            ctx.check_cancelled()
            if attempt == len(delays):
                raise RetriesExhaustedError(
                    f"{what} failed {attempt + 1} time(s), last with: {exc}. Everything finished so "
                    "far is stored; resume the job once the problem is fixed.") from exc
            ctx.log(f"{what} failed ({exc}); retry {attempt + 1} in {delays[attempt]:g} s")
            end = time.monotonic() + delays[attempt]
            while time.monotonic() < end:
                ctx.check_cancelled()
                time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    raise AssertionError("unreachable")


@contextmanager
def _cancel_event(ctx: JobContext) -> Iterator[threading.Event]:
    """An Event set when the job is cancelled, so a long generate call stops early."""
    event, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if ctx.cancelled:
                event.set()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield event
    finally:
        stop.set()


# ---------------------------------------------------------------- answers


def _system_groups(systems: list[System]) -> list[list[System]]:
    """Local systems grouped by base model (one batch each); every OpenAI system on its own."""
    local: dict[str, list[System]] = {}
    remote = []
    for system in systems:
        if system.kind == "local":
            local.setdefault(system.model, []).append(system)
        else:
            remote.append([system])
    return list(local.values()) + remote


def _retrieved_json(documents: list[Any]) -> list[dict[str, Any]]:
    return [{"passage_id": d.meta.get("passage_id"), "title": d.meta.get("title"),
             "content": d.content, "score": d.score} for d in documents]


def _answer_all(ctx: JobContext, res: EvalResources, spec: EvalSpec, plan: Plan,
                tracker: _Tracker) -> None:
    store, params = res.store, spec.gen_params()
    done = store.answer_keys(ctx.job_id)
    todo = [e for e in plan.examples if any((e.id, s.id) not in done for s in plan.systems)]
    for batch in _chunks(todo, spec.batch_size):
        ctx.check_cancelled()
        # Retrieval once per (pipeline, item): every RAG system on a pipeline reads the same chunks.
        retrieved = {(name, e.id): retrieve(pipeline, index, e.question)
                     for name, (pipeline, index) in plan.pipelines.items() for e in batch}
        calls = []
        for group in _system_groups(plan.systems):
            rows = [(e, s) for e in batch for s in group if (e.id, s.id) not in done]
            if rows:
                prompts = [build_prompt(plan.pipelines[s.pipeline][0], e.question,
                                        retrieved[(s.pipeline, e.id)]) if s.rag
                           else closed_book_messages(e.question) for e, s in rows]
                calls.append((rows, prompts))
        errors: list[BaseException] = []
        with _cancel_event(ctx) as cancel, ThreadPoolExecutor(len(calls)) as pool:
            futures = [(rows, prompts, pool.submit(_retry, ctx, spec.retry_delays,
                                                   f"Answering with {rows[0][1].model}",
                                                   lambda r=rows, p=prompts: _generate(ctx, res.hub, r, p, params, cancel)))
                       for rows, prompts in calls]
            for rows, prompts, future in futures:
                try:
                    generations = future.result()
                except BaseException as exc:  # the other groups' answers are still written
                    errors.append(exc)
                    continue
                ctx.check_cancelled()  # a cancelled generate returns cut answers: never store them
                for (example, system), prompt, gen in zip(rows, prompts, generations):
                    docs = _retrieved_json(retrieved[(system.pipeline, example.id)]) if system.rag else None
                    store.save_answer(ctx.job_id, example.id, system.id, gen.text, prompt, docs,
                                      gen.prompt_tokens, gen.new_tokens, gen.seconds)
                    tracker.answered()
        if errors:
            raise errors[0]


def _generate(ctx: JobContext, hub: ModelHub, rows: list[tuple[QAExample, System]],
              prompts: list[Any], params: GenParams, cancel: threading.Event) -> list[Generation]:
    system = rows[0][1]
    if system.kind == "openai":
        backend = OpenAIBackend(system.base_url or None, ctx.secrets.get(endpoint(system.base_url)),
                                system.model, max_retries=0)
        return backend.generate(prompts, params)
    return hub.generate(system.model, prompts, [s.adapter for _, s in rows], params, cancel)


# ---------------------------------------------------------------- judgments


def _context_text(answer: dict[str, Any]) -> str | None:
    docs = answer.get("retrieved") or []
    return "\n".join(f"[{i}] {(d.get('title') + ': ') if d.get('title') else ''}{d.get('content', '')}"
                     for i, d in enumerate(docs, start=1)) or None


def _batch_seed(seed: int, metric: str, repeat: int, first_key: str) -> int:
    digest = hashlib.sha256(f"{seed}|{metric}|{repeat}|{first_key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _judge_all(ctx: JobContext, store: Store, spec: EvalSpec, plan: Plan, judge: Any,
               metrics: list[Metric], steps: dict[str, str], tracker: _Tracker) -> None:
    answers = {(a["example_id"], a["system_id"]): a for a in store.eval_answers(ctx.job_id)}
    done = store.judgment_keys(ctx.job_id)
    for metric in metrics:
        for repeat in range(spec.effective_repeats):
            todo = [(e, s.id) for e in plan.examples for s in plan.systems
                    if (e.id, s.id, metric.name, repeat) not in done]
            for batch in _chunks(todo, spec.batch_size):
                ctx.check_cancelled()
                items = [FormInput(e.question, e.answer, answers[(e.id, sid)]["answer"] or "",
                                   _context_text(answers[(e.id, sid)])) for e, sid in batch]
                seed = _batch_seed(spec.seed, metric.name, repeat, f"{batch[0][0].id}|{batch[0][1]}")
                written: set[int] = set()

                def attempt() -> None:
                    left = [i for i in range(len(batch)) if i not in written]
                    for k, judgment in judge_batch(judge, metric, steps[metric.name],
                                                   [items[i] for i in left], spec.method,
                                                   spec.samples, spec.reasoning, seed):
                        example, sid = batch[left[k]]
                        store.save_judgment(ctx.job_id, example.id, sid, repeat, judgment.to_row())
                        written.add(left[k])
                        tracker.judged()
                        gate("eval-judgment")  # tests stop a run here (core.testhooks)

                _retry(ctx, spec.retry_delays, f"The judge {judge.id}", attempt)
                tracker.publish_means()


