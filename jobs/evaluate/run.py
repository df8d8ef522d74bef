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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from core.evalstats import summarize_run
from core.geval import FormInput, Metric, get_steps, judge_batch, make_judge, metric_from
from core.models import GenParams, Generation
from core.openai_backend import OpenAIBackend
from core.schema import InputError, QAExample
from core.systems import BASE, System
from jobs.evaluate.spec import KIND, REPEATS_NOTE, EvalSpec, EvalSpecError
from jobs.runner import JobCancelled, JobContext
from pipelines.compare import closed_book_messages
from pipelines.query import build_prompt, retrieve
from pipelines.spec import PipelineSpec, load_spec

if TYPE_CHECKING:
    from jobs.services import Services

T = TypeVar("T")


class RetriesExhaustedError(RuntimeError):
    """An endpoint kept failing; the job stops with its work stored, ready to resume."""


# ---------------------------------------------------------------- preflight

_SESSION_KEYS: dict[str, str] = {}


def set_session_api_key(base_url: str | None, api_key: str) -> None:
    """Keep an API key in this process's memory for evaluations against `base_url` (None: OpenAI).
    It is never written to the spec, the database or a log; OPENAI_API_KEY is the fallback."""
    _SESSION_KEYS[base_url or ""] = api_key


def _api_key(base_url: str | None) -> str | None:
    return _SESSION_KEYS.get(base_url or "")


def select_examples(services: "Services", spec: EvalSpec) -> list[QAExample]:
    """The eval examples of the dataset, all or a seeded sample, in id order."""
    examples = sorted(_eval_examples(services, spec.dataset_id), key=lambda e: e.id)
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


def _eval_examples(services: "Services", dataset_id: str) -> list[QAExample]:
    try:
        return list(services.eval_examples(dataset_id))
    except InputError:
        # Not loaded in this process (e.g. the CLI): the examples table has every loaded dataset.
        rows = services.store.query("SELECT id, question, answer, contexts FROM examples WHERE "
                                    "dataset_id = ? AND split = 'eval'", [dataset_id])
        if not rows and not services.store.query("SELECT 1 FROM datasets WHERE id = ?", [dataset_id]):
            raise EvalSpecError(f"The dataset '{dataset_id}' is not loaded: load it in the Data "
                                "tab first.") from None
        return [QAExample(r["id"], r["question"], r["answer"] or "", list(r["contexts"] or []))
                for r in rows]


@dataclass
class Plan:
    """What a run needs besides the spec: checked once before the job starts and again inside."""

    examples: list[QAExample]
    pipeline: PipelineSpec | None = None
    index: Any = None


def preflight(services: "Services", spec: EvalSpec) -> Plan:
    """Every check a user can fix, before any model runs: spec, dataset, pipeline, adapters."""
    spec.validate()
    plan = Plan(select_examples(services, spec))
    if any(s.rag for s in spec.systems):
        plan.pipeline = load_spec(spec.pipeline)
        plan.index = services.index(spec.pipeline)
    known = set(services.adapter_paths())
    wanted = [(s.model, s.adapter) for s in spec.systems if s.kind == "local"]
    if spec.judge.kind == "local":
        wanted.append((spec.judge.model, spec.judge.adapter or BASE))
    for model, adapter in wanted:
        if adapter != BASE and adapter not in known and adapter not in services.hub.list_adapters(model):
            raise EvalSpecError(f"Unknown adapter '{adapter}': train it in the Fine-tune tab or "
                                "load it from a folder or the Hub first.")
    return plan


def start_evaluation(services: "Services", spec: EvalSpec) -> str:
    """Check the request, then start it as a background job; returns the job id (= run id)."""
    preflight(services, spec)
    return services.runner.start(KIND, spec.to_dict())


def evaluation_job(ctx: JobContext, services: "Services") -> dict[str, Any]:
    """The runner's entry point for kind "evaluate"."""
    return run_evaluation(ctx, services, EvalSpec.from_dict(ctx.spec))


# ---------------------------------------------------------------- the run


def run_evaluation(ctx: JobContext, services: "Services", spec: EvalSpec) -> dict[str, Any]:
    plan = preflight(services, spec)
    store = services.store
    judge = make_judge(spec.judge.kind, spec.judge.model, spec.judge.base_url,
                       spec.judge.adapter or BASE, _api_key(spec.judge.base_url))
    for model, adapter in _local_adapters(spec):
        _attach(services, model, adapter)
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
        wanted = set(run["spec"]["example_ids"])
        plan.examples = [e for e in plan.examples if e.id in wanted]
        if len(plan.examples) != len(wanted):
            raise EvalSpecError(f"The dataset '{spec.dataset_id}' no longer has every item this "
                                "run started with; start a new run.")
    store.set_eval_run_status(ctx.job_id, "running")
    try:
        tracker = _Tracker(ctx, store, spec, len(plan.examples), len(metrics))
        _answer_all(ctx, services, spec, plan, tracker)
        _judge_all(ctx, store, spec, plan, judge, metrics, run["spec"]["steps"], tracker)
    except JobCancelled:
        store.set_eval_run_status(ctx.job_id, "cancelled")
        raise
    except Exception:
        store.set_eval_run_status(ctx.job_id, "failed")
        raise
    store.set_eval_run_status(ctx.job_id, "done")
    summary = summarize_run(store, ctx.job_id)
    return {"run_id": ctx.job_id, "answers": tracker.answers, "judgments": tracker.judgments,
            "means": [{k: row[k] for k in ("system", "metric", "mean", "n", "parse_failures")}
                      for row in summary]}


def _local_adapters(spec: EvalSpec) -> list[tuple[str, str]]:
    pairs = [(s.model, s.adapter) for s in spec.systems if s.kind == "local"]
    if spec.judge.kind == "local":
        pairs.append((spec.judge.model, spec.judge.adapter or BASE))
    return [(m, a) for m, a in dict.fromkeys(pairs) if a != BASE]


def _attach(services: "Services", model: str, adapter: str) -> None:
    if adapter not in services.hub.list_adapters(model):
        services.hub.load_adapter(model, services.adapter_paths()[adapter], adapter)


def _default_name(spec: EvalSpec) -> str:
    metrics = ", ".join(metric_from(m).name for m in spec.metrics)
    return f"{spec.dataset_id} · {len(spec.systems)} system(s) · {metrics}"


def _run_record(spec: EvalSpec, judge_id: str, steps: dict[str, str], plan: Plan) -> dict[str, Any]:
    """The eval_runs.spec: the request plus what it resolved to (labels, judge, steps, items)."""
    record = spec.to_dict()
    record["systems"] = [{**asdict(s), "label": s.label} for s in spec.systems]
    record.update(judge_id=judge_id, steps=steps, example_ids=[e.id for e in plan.examples],
                  effective_repeats=spec.effective_repeats)
    if spec.method == "logprobs":
        record["repeats_note"] = REPEATS_NOTE
    return record


class _Tracker:
    """Counts work units (answers + judgments), reports progress and running means."""

    def __init__(self, ctx: JobContext, store: Any, spec: EvalSpec, n_items: int, n_metrics: int):
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
            self.ctx.metric(system=row["system"], metric=row["metric"], mean=row["mean"], n=row["n"])
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


def _answer_all(ctx: JobContext, services: "Services", spec: EvalSpec, plan: Plan,
                tracker: _Tracker) -> None:
    store, params = services.store, spec.gen_params()
    done = store.answer_keys(ctx.job_id)
    todo = [e for e in plan.examples if any((e.id, s.label) not in done for s in spec.systems)]
    for batch in _chunks(todo, spec.batch_size):
        ctx.check_cancelled()
        retrieved = {e.id: retrieve(plan.pipeline, plan.index, e.question) for e in batch} \
            if plan.pipeline is not None else {}
        calls = []
        for group in _system_groups(spec.systems):
            rows = [(e, s) for e in batch for s in group if (e.id, s.label) not in done]
            if rows:
                prompts = [build_prompt(plan.pipeline, e.question, retrieved[e.id]) if s.rag
                           else closed_book_messages(e.question) for e, s in rows]
                calls.append((rows, prompts))
        errors: list[BaseException] = []
        with _cancel_event(ctx) as cancel, ThreadPoolExecutor(len(calls)) as pool:
            futures = [(rows, prompts, pool.submit(_retry, ctx, spec.retry_delays,
                                                   f"Answering with {rows[0][1].model}",
                                                   lambda r=rows, p=prompts: _generate(r, p, params, cancel)))
                       for rows, prompts in calls]
            for rows, prompts, future in futures:
                try:
                    generations = future.result()
                except BaseException as exc:  # the other groups' answers are still written
                    errors.append(exc)
                    continue
                ctx.check_cancelled()  # a cancelled generate returns cut answers: never store them
                for (example, system), prompt, gen in zip(rows, prompts, generations):
                    store.save_answer(ctx.job_id, example.id, system.label, gen.text, prompt,
                                      _retrieved_json(retrieved[example.id]) if system.rag else None,
                                      gen.prompt_tokens, gen.new_tokens, gen.seconds)
                    tracker.answered()
        if errors:
            raise errors[0]


def _generate(rows: list[tuple[QAExample, System]], prompts: list[Any], params: GenParams,
              cancel: threading.Event) -> list[Generation]:
    system = rows[0][1]
    if system.kind == "openai":
        backend = OpenAIBackend(system.base_url or None, _api_key(system.base_url), system.model,
                                max_retries=0)
        return backend.generate(prompts, params)
    from core.models import get_hub

    return get_hub().generate(system.model, prompts, [s.adapter for _, s in rows], params, cancel)


# ---------------------------------------------------------------- judgments


def _context_text(answer: dict[str, Any]) -> str | None:
    docs = answer.get("retrieved") or []
    return "\n".join(f"[{i}] {(d.get('title') + ': ') if d.get('title') else ''}{d.get('content', '')}"
                     for i, d in enumerate(docs, start=1)) or None


def _batch_seed(seed: int, metric: str, repeat: int, first_key: str) -> int:
    digest = hashlib.sha256(f"{seed}|{metric}|{repeat}|{first_key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _judge_all(ctx: JobContext, store: Any, spec: EvalSpec, plan: Plan, judge: Any,
               metrics: list[Metric], steps: dict[str, str], tracker: _Tracker) -> None:
    answers = {(a["example_id"], a["system"]): a for a in store.eval_answers(ctx.job_id)}
    done = store.judgment_keys(ctx.job_id)
    for metric in metrics:
        for repeat in range(spec.effective_repeats):
            todo = [(e, s.label) for e in plan.examples for s in spec.systems
                    if (e.id, s.label, metric.name, repeat) not in done]
            for batch in _chunks(todo, spec.batch_size):
                ctx.check_cancelled()
                items = [FormInput(e.question, e.answer, answers[(e.id, label)]["answer"] or "",
                                   _context_text(answers[(e.id, label)])) for e, label in batch]
                seed = _batch_seed(spec.seed, metric.name, repeat, f"{batch[0][0].id}|{batch[0][1]}")
                written: set[int] = set()

                def attempt() -> None:
                    left = [i for i in range(len(batch)) if i not in written]
                    for k, judgment in judge_batch(judge, metric, steps[metric.name],
                                                   [items[i] for i in left], spec.method,
                                                   spec.samples, spec.reasoning, seed):
                        example, label = batch[left[k]]
                        store.save_judgment(ctx.job_id, example.id, label, repeat, judgment.to_row())
                        written.add(left[k])
                        tracker.judged()

                _retry(ctx, spec.retry_delays, f"The judge {judge.id}", attempt)
                tracker.publish_means()


