"""Evaluate tab: batch G-Eval runs, their summary and charts, a per-item drill-down, exports, run
comparison, and a read-only SQL box over the DuckDB tables."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import charts
from core import config
from core.geval import BUILTIN
from core.systems import BASE, System
from core.schema import InputError
from jobs.evaluate import KIND, EvalSpec, JudgeSpec
from jobs.services import Services
from ui import tables
from ui.common import (START_JOB, STATS, empty_note, follow_job, job_status, on_show,
                       restyle, user_errors, visitor)
from ui.keys import KeyRing, remember
from ui.served import listing

STUDY_COLUMNS = ["dataset", "n_train", "system", "rag", "metric", "n", "mean", "ci_low", "ci_high",
                 "run"]


def candidate_systems(services: Services, model_ref: str,
                      served: dict[str, System] | None = None) -> dict[str, System]:
    """The systems a run may pick, by label: the base model and its adapters here, each with and
    without RAG, then `served` (the models a listed server serves, ui.served)."""
    systems = {}
    for adapter in [BASE, *services.adapters.names(model_ref)]:
        for rag in (False, True):
            s = System("local", model_ref, adapter, rag)
            systems[s.label] = s
    return {**systems, **(served or {})}


def served_systems(names: list[str], base_url: str | None) -> dict[str, System]:
    url = (base_url or "").strip() or None
    systems = [System("openai", name, rag=rag, base_url=url) for name in names for rag in (False, True)]
    return {s.label: s for s in systems}


def runs_choices(services: Services) -> list[tuple[str, str]]:
    return [(f"{r.name or r.id} · {r.dataset_id} · {r.status}", r.id)
            for r in services.evaluations.runs()]


# Widths for a 1280 px screen: labels and intervals get room, counts stay narrow.
SUMMARY_WIDTHS = ["22%", "10%", "5%", "7%", "12%", "7%", "12%", "13%", "6%", "6%"]
ITEM_WIDTHS = ["16%", "9%", "6%", "25%", "18%", "18%", "8%"]
NO_RUN = ("Choose a run above (or start one) to see its summary: the mean, its interval and the "
          "difference to the base system.")


def build(services: Services, keys: gr.State, page: gr.Blocks, tab: gr.Tab) -> None:
    """`keys`: the visitor's session keyring (ui.keys), shared with the Compare tab."""
    gr.Markdown("Batch G-Eval, as in the study: every answer is judged for accuracy and "
                "completeness against the reference answer (1-5), repeated and averaged. "
                "**The embedded 135M judge works offline but is a weak judge**: for real "
                "conclusions point the judge at a strong model on an OpenAI-compatible endpoint.")
    with gr.Accordion("New run", open=True):
        with gr.Row():
            dataset = gr.Dropdown(services.datasets.ids(), value="sample:bioasq",
                                  allow_custom_value=True, label="Dataset (eval split)")
            n_items = gr.Number(value=5, precision=0, label="Items (empty = all eval items)")
            seed = gr.Number(value=0, precision=0, label="Seed")
            run_name = gr.Textbox(label="Run name")
        with gr.Row():
            model = gr.Textbox(config.DEFAULT_CHAT_MODEL, label="Base model")
            pipeline = gr.Dropdown(services.indexes.names(), value=None, allow_custom_value=True,
                                   label="RAG pipeline (for RAG systems)")
            max_new_tokens = gr.Number(value=48, precision=0, label="Max new tokens (answers)")
        # A dropdown, not checkboxes: its values are checked against the adapters stored when
        # the run starts (do_start), so one trained after the page loaded is accepted.
        systems = gr.Dropdown(list(candidate_systems(services, config.DEFAULT_CHAT_MODEL)),
                              value=[], multiselect=True, allow_custom_value=True,
                              label="Systems (base model or adapter, with or without RAG)")
        with gr.Accordion("Systems on an OpenAI-compatible server (e.g. vLLM serving the "
                          "adapters: python -m jobs.vllm_command)", open=False):
            with gr.Row():
                server_url = gr.Textbox(label="Base URL (empty = the app's endpoint)",
                                        placeholder="http://127.0.0.1:8000/v1")
                server_key = gr.Textbox(label="API key (kept for this browser session only)",
                                        type="password")
            list_models = gr.Button("List server models (adds each to the systems)")
            served_table = gr.Dataframe(label="Served models", interactive=False)
            empty_note(served_table, "Give the server's base URL and click the button to list "
                       "its models.")
            served = gr.State({})
        with gr.Row():
            judge_kind = gr.Radio(["local", "openai"], value="local", label="Judge")
            judge_model = gr.Textbox(config.DEFAULT_CHAT_MODEL, label="Judge model")
            judge_url = gr.Textbox(label="Judge base URL (OpenAI-compatible; empty = the app's "
                                   "endpoint)", visible=False)
            judge_key = gr.Textbox(label="API key (kept for this browser session only)",
                                   type="password", visible=False)
        with gr.Row():
            metrics = gr.CheckboxGroup(list(BUILTIN), value=list(BUILTIN), label="Metrics")
            method = gr.Radio(["logprobs", "sampling"], value="logprobs", label="Scoring")
            repeats = gr.Number(value=10, precision=0, label="Repeats")
            samples = gr.Number(value=10, precision=0, label="Samples (sampling)",
                                visible=False)
            reasoning = gr.Checkbox(False, label="Judge reasons first")
        with gr.Accordion("Your own metric (optional)", open=False):
            with gr.Row():
                custom_name = gr.Textbox(label="Name", placeholder="faithfulness")
                custom_criteria = gr.Textbox(label="Criteria", lines=2)
                custom_steps = gr.Textbox(label="Evaluation steps (empty: the judge writes them)",
                                          lines=2)
        start = gr.Button("Start evaluation", variant="primary")
    start_status = gr.Markdown()

    with gr.Row():
        run = gr.Dropdown(runs_choices(services), label="Run", scale=3, allow_custom_value=True)
        refresh = gr.Button("Refresh", scale=1)
        cancel = gr.Button("Cancel", variant="stop", scale=1)
        resume = gr.Button("Resume", scale=1)
    run_status = gr.Markdown()
    summary = gr.Dataframe(label="Summary: mean with its 95% CI (t) over items; diff: paired "
                           "difference to the base system ('vs') with a paired bootstrap 95% CI",
                           interactive=False, wrap=True, column_widths=SUMMARY_WIDTHS,
                           elem_id="eval-summary")
    empty_note(summary, NO_RUN)
    chart = gr.Plot(charts.evaluation_summary([]), label="Mean score by system, 95% interval",
                    elem_id="eval-chart")
    with gr.Accordion("Study view: all runs by dataset and training-set size", open=False):
        study_btn = gr.Button("Draw")
        study_chart = gr.Plot(charts.study([]), label="Base vs fine-tuned, with and without "
                              "RAG (newest run per system)")
        study_table = gr.Dataframe(interactive=False, wrap=True)
        empty_note(study_table, "Click Draw to tabulate every finished run by dataset and "
                   "training-set size.")
    with gr.Accordion("Per-item drill-down", open=False):
        items = gr.Dataframe(interactive=False, wrap=True, label="Items (click a row)",
                             column_widths=ITEM_WIDTHS)
        empty_note(items, "Choose a run: its judged items appear here as they are scored.")
        item_detail = gr.JSON(label="Judgments of the item (replies, scores, distributions)",
                              visible=False)
    with gr.Row():
        export_fmt = gr.Radio(["csv", "parquet"], value="csv", label="Export")
        export_btn = gr.Button("Export answers and judgments")
        export_files = gr.File(file_count="multiple", interactive=False, visible=False,
                               label="Exported files")
    with gr.Accordion("Compare two runs", open=False):
        with gr.Row():
            run_a = gr.Dropdown(runs_choices(services), label="Run A", allow_custom_value=True)
            run_b = gr.Dropdown(runs_choices(services), label="Run B", allow_custom_value=True)
            compare_btn = gr.Button("Compare (B − A)")
        compared = gr.Dataframe(interactive=False, wrap=True)
        empty_note(compared, "Choose two runs scored on the same items (e.g. by two judges) "
                   "and click Compare.")
    with gr.Accordion("SQL (read-only: the app's tables only, one SELECT, time and row limits)",
                      open=False):
        queries = services.evaluations.example_queries
        example = gr.Dropdown(list(queries), label="Example queries")
        sql = gr.Code(language="sql", lines=4, value=queries["Runs with counts"])
        sql_btn = gr.Button("Run query")
        sql_result = gr.Dataframe(interactive=False, wrap=True)
        empty_note(sql_result, "Pick an example or write a SELECT, then click Run query.")
        sql_note = gr.Markdown()

    @user_errors
    def do_start(ring: KeyRing, served_by_label, request: gr.Request, *, dataset, n_items, seed,
                 run_name=None, base_model, pipeline=None, max_new_tokens, systems, judge_kind,
                 judge_model, judge_url=None, judge_api_key=None, metrics, method, repeats,
                 samples, reasoning, custom_name=None, custom_criteria=None, custom_steps=None):
        # Keyword-only: these names are the API's; a default of None makes a parameter optional.
        candidates = candidate_systems(services, base_model, served_by_label)
        unknown = [label for label in systems or [] if label not in candidates]
        if unknown:
            raise InputError(f"Unknown system '{unknown[0]}' for base model '{base_model}': "
                             f"choose from {', '.join(candidates)}.")
        picked = [candidates[label] for label in systems or []]
        metric_list: list = list(metrics or [])
        if (custom_name or "").strip():
            metric_list.append({"name": custom_name.strip(), "criteria": custom_criteria or "",
                                "steps": (custom_steps or "").strip() or None})
        judge_url_value = (judge_url or "").strip() or None
        ring, _ = remember(ring, judge_url_value, judge_api_key)
        spec = EvalSpec(
            dataset_id=dataset, systems=picked, name=(run_name or "").strip(),
            judge=JudgeSpec(kind=judge_kind, model=(judge_model or "").strip(),
                            base_url=judge_url_value),
            metrics=metric_list, n_items=int(n_items) if n_items else None, seed=int(seed or 0),
            pipeline=pipeline or None, repeats=int(repeats or 1), method=method,
            samples=int(samples or 1), reasoning=bool(reasoning),
            decoding={"max_new_tokens": int(max_new_tokens or 48)})
        job_id = services.evaluations.start(spec, visitor(request), ring)
        return (f"Started run `{job_id}`: {len(picked)} systems × {len(metric_list)} metrics.",
                gr.update(choices=runs_choices(services), value=job_id), ring)

    def show_run(run_id):
        empty = tables.summary_table([])
        if not run_id:
            return "", empty, charts.evaluation_summary([]), None
        job, status = job_status(services.jobs, run_id)
        if job is None:  # a malformed or unknown id: said in the status, not a popup
            return status, empty, charts.evaluation_summary([]), None
        rows = services.evaluations.summary(run_id, n_boot=1000)
        item_rows = tables.items_table(services.evaluations.items(run_id))
        return status, tables.summary_table(rows), charts.evaluation_summary(rows), item_rows

    def pick_item(evt: gr.SelectData, run_id, table):
        row = table.iloc[evt.index[0]]
        system_id = next(r["system_id"] for r in services.evaluations.items(run_id)
                         if r["system"] == row["system"])
        return gr.update(value=services.evaluations.item(run_id, row["example_id"], system_id,
                                                         row["metric"]), visible=True)

    @user_errors
    def do_export(run_id, file_format):
        if not run_id:
            raise gr.Error("Choose a run first.")
        return [str(p) for p in services.evaluations.export(run_id, file_format)]

    @user_errors
    def do_compare(run_a, run_b):
        if not (run_a and run_b):
            raise gr.Error("Choose two runs.")
        rows = services.evaluations.compare(run_a, run_b, n_boot=1000)
        if rows:
            return tables.run_comparison(rows)
        return tables.run_systems({f"A: {run_a}": services.evaluations.items(run_a),
                                   f"B: {run_b}": services.evaluations.items(run_b)})

    def compared_label(table):
        if list(table.columns) == tables.RUN_SYSTEMS_COLUMNS:
            return gr.update(label="Nothing to compare: the runs have no system and metric in "
                             "common. What each run scored:")
        return gr.update(label="Run B − run A")

    @user_errors
    def do_sql(query):
        result = services.evaluations.sql(query)
        return pd.DataFrame(result.rows, columns=result.columns), result.note()

    @user_errors
    def do_cancel(run_id, request: gr.Request):
        services.jobs.cancel(run_id or "", visitor(request))
        return "Cancel requested; finished answers and judgments stay stored."

    @user_errors
    def do_resume(ring: KeyRing, run_id, request: gr.Request):
        services.evaluations.resume(run_id or "", visitor(request), ring)
        return "Resumed: finished (item, system, metric, repeat) keys are not redone."

    def study():
        rows = services.evaluations.study_rows()
        return charts.study(rows), tables.rounded(pd.DataFrame(rows, columns=STUDY_COLUMNS))

    start.click(do_start, inputs=[keys, served], inputs_kwargs=dict(
                    dataset=dataset, n_items=n_items, seed=seed, run_name=run_name,
                    base_model=model, pipeline=pipeline, max_new_tokens=max_new_tokens,
                    systems=systems, judge_kind=judge_kind, judge_model=judge_model,
                    judge_url=judge_url, judge_api_key=judge_key, metrics=metrics, method=method,
                    repeats=repeats, samples=samples, reasoning=reasoning,
                    custom_name=custom_name, custom_criteria=custom_criteria,
                    custom_steps=custom_steps),
                outputs=[start_status, run, keys], api_name="start_eval", **START_JOB)
    run.change(show_run, inputs=run, outputs=[run_status, summary, chart, items],
               api_name="eval_summary", **STATS)
    refresh.click(lambda: gr.update(choices=runs_choices(services)), outputs=run,
                  api_name="list_runs")
    gr.Timer(3.0).tick(show_run, inputs=run, outputs=[run_status, summary, chart, items],
                       api_name=False, show_progress="hidden")
    cancel.click(do_cancel, inputs=run, outputs=run_status, api_name="cancel_eval")
    resume.click(do_resume, inputs=[keys, run], outputs=run_status, api_name="resume_eval")
    items.select(pick_item, inputs=[run, items], outputs=item_detail, api_name=False)
    restyle(export_btn.click(do_export, inputs=[run, export_fmt], outputs=export_files,
                             api_name="export_eval"), export_files)
    restyle(compare_btn.click(do_compare, inputs=[run_a, run_b], outputs=compared,
                              api_name="compare_runs", **STATS), compared, compared_label)
    sql_btn.click(do_sql, inputs=sql, outputs=[sql_result, sql_note], api_name="sql")
    example.change(lambda name: queries.get(name, ""), inputs=example, outputs=sql,
                   api_name=False)
    study_btn.click(study, outputs=[study_chart, study_table], api_name="study_view")
    def refresh_systems(model_ref, served_by_label):
        return gr.update(choices=list(candidate_systems(services, model_ref, served_by_label)))

    @user_errors
    def do_list(ring: KeyRing, base_url=None, api_key=None):
        table, names, ring = listing(ring, base_url, api_key)
        return table, served_systems(names, base_url), ring

    model.blur(refresh_systems, inputs=[model, served], outputs=systems, api_name=False)
    list_models.click(do_list, inputs=[keys, server_url, server_key],
                      outputs=[served_table, served, keys], api_name="list_eval_server_models").then(
        refresh_systems, inputs=[model, served], outputs=systems, api_name=False)
    method.change(lambda m: gr.update(visible=m == "sampling"), inputs=method, outputs=samples,
                  api_name=False, queue=False)
    judge_kind.change(lambda k: [gr.update(visible=k == "openai")] * 2, inputs=judge_kind,
                      outputs=[judge_url, judge_key], api_name=False, queue=False)
    for dd in (run_a, run_b):
        dd.focus(lambda: gr.update(choices=runs_choices(services)), outputs=dd, api_name=False)

    def show(model_ref, served_by_label, run_id):
        runs = runs_choices(services)
        return (gr.update(choices=services.datasets.ids()),
                gr.update(choices=services.indexes.names()), refresh_systems(model_ref, served_by_label),
                follow_job(services.jobs, KIND, run_id, choices=runs), gr.update(choices=runs),
                gr.update(choices=runs))

    on_show(page, tab, show, inputs=[model, served, run],
            outputs=[dataset, pipeline, systems, run, run_a, run_b])
