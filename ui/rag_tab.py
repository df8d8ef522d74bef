"""RAG tab: choose a corpus, set the pipeline spec, build the index, try queries, see quality."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import charts
from core import config
from jobs.indexes import KIND
from jobs.runner import TERMINAL
from jobs.services import Services
from pipelines import spec as pspec
from pipelines.graph import pipeline_mermaid
from pipelines.query import build_query_pipeline, retrieval_metrics, retrieve
from ui.common import (INDEX, STATS, empty_note, fmt_seconds, follow_job, job_status, on_show,
                       restyle, user_errors, visitor)
from ui.tables import CHUNK_COLUMNS, chunk_widths, chunks_table

QUALITY_KS = (1, 3, 5, 10)

def build(services: Services, page: gr.Blocks, tab: gr.Tab) -> None:
    gr.Markdown("Build a Haystack RAG pipeline: split and embed a corpus into an index, then "
                "retrieve the top-k chunks for a question and put them into the prompt.")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("#### Corpus")
            dataset = gr.Dropdown(services.datasets.ids(), value="sample:bioasq",
                                  label="A dataset's passages", allow_custom_value=True)
            files = gr.File(label="…or upload documents (.txt, .md, .pdf, .html)",
                            file_count="multiple", file_types=[".txt", ".md", ".pdf", ".html"])
            gr.Markdown("#### Saved pipelines")
            saved = gr.Dropdown(services.indexes.names(), label="Saved pipelines", value=None,
                                allow_custom_value=True)  # built after the page loaded
            with gr.Row():
                load_btn = gr.Button("Load")
                delete_btn = gr.Button("Delete", variant="stop")
        with gr.Column(scale=2):
            gr.Markdown("#### Pipeline spec")
            with gr.Row():
                name = gr.Textbox(value="bioasq-hybrid", label="Name")
                retriever = gr.Radio(list(pspec.RETRIEVERS), value="hybrid", label="Retriever")
                top_k = gr.Slider(1, 20, value=5, step=1, label="Top-k")
            with gr.Row():
                split_by = gr.Radio(list(pspec.SPLIT_BY), value="word", label="Split by")
                split_length = gr.Number(value=150, precision=0, label="Split length")
                split_overlap = gr.Number(value=20, precision=0, label="Overlap")
            with gr.Row():
                embedder = gr.Textbox(value=config.DEFAULT_EMBEDDER, label="Embedder")
                ranker = gr.Textbox(value="", label="Ranker (optional cross-encoder)")
            template = gr.Code(value=pspec.DEFAULT_TEMPLATE, language="jinja2", lines=10,
                               label="Prompt template (question, documents)")
    with gr.Row():
        build_btn = gr.Button("Build index", variant="primary")
        cancel_btn = gr.Button("Cancel indexing")
    job_id = gr.Textbox(label="Indexing job", interactive=True)
    build_status = gr.Markdown()
    poll_timer = gr.Timer(1.0, active=False)  # runs while a build does
    with gr.Row():
        with gr.Column(scale=2):
            question = gr.Textbox(label="Try a query", placeholder="Which gene is mutated in …?")
            retrieve_btn = gr.Button("Retrieve")
            chunks = gr.Dataframe(headers=CHUNK_COLUMNS, label="Retrieved chunks", wrap=True,
                                  interactive=False)
            empty_note(chunks, "Build or load a pipeline, type a question and click Retrieve to "
                       "see the chunks it finds, best first.")
        with gr.Column(scale=1):
            graph = gr.Markdown("_The pipeline graph appears here once an index is built or a "
                                "saved pipeline is loaded._", label="Pipeline graph")
            quality_btn = gr.Button("Retrieval quality on the eval split")
            quality = gr.Dataframe(label="recall@k / MRR", interactive=False)
            empty_note(quality, "Measured on the dataset's eval split once you click the button.")
            quality_plot = gr.Plot(charts.retrieval_quality(pd.DataFrame()),
                                   label="Retrieval quality")

    spec_inputs = [name, split_by, split_length, split_overlap, embedder, retriever, top_k,
                   ranker, template]
    # The API's names of the spec's fields (keyword arguments of the handlers below).
    spec_kwargs = dict(zip(["name", "split_by", "split_length", "split_overlap", "embedder",
                            "retriever", "top_k", "ranker", "prompt_template"], spec_inputs))

    def make_spec(name, split_by, split_length, split_overlap, embedder, retriever, top_k,
                  ranker, prompt_template) -> pspec.PipelineSpec:
        return pspec.PipelineSpec(
            name=(name or "").strip(),
            splitter=pspec.SplitterSpec(split_by=split_by, split_length=split_length or 0,
                                        split_overlap=split_overlap or 0),
            embedder=(embedder or "").strip() or config.DEFAULT_EMBEDDER, retriever=retriever,
            top_k=int(top_k), ranker=(ranker or "").strip() or None,
            prompt_template=prompt_template)

    @user_errors
    def do_build(request: gr.Request, dataset, files=None, **fields):
        """Start the build and return its job id at once (the status poll follows it)."""
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        return services.indexes.start(make_spec(**fields), dataset, paths, visitor(request))

    @user_errors
    def do_status(job_id):
        """The build's state; once it is done also the saved list and the graph. The poll timer
        runs while the job does."""
        jid = (job_id or "").strip()
        if not jid:
            return gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        job, text = job_status(services.jobs, jid)
        running = job is not None and job.status not in TERMINAL
        if job is None or job.status != "done":
            return text, gr.update(), gr.update(), gr.Timer(active=running)
        r = job.result
        text = (f"Index **{r['pipeline']}** built: {r['passages']} passages → {r['chunks']} "
                f"chunks in {fmt_seconds(r['seconds'])} (job `{jid}`).")
        return (text, gr.update(choices=services.indexes.names(), value=r["pipeline"]),
                show_graph(r["pipeline"]), gr.Timer(active=False))

    def show_graph(pipeline_name: str) -> str:
        handle = services.indexes.get(pipeline_name)
        return f"```mermaid\n{pipeline_mermaid(build_query_pipeline(handle.spec, handle))}\n```"

    @user_errors
    def do_cancel(job_id, request: gr.Request):
        if not (job_id or "").strip():
            raise gr.Error("No indexing job is running from this page.")
        services.jobs.cancel(job_id.strip(), visitor(request))
        return "Cancel requested."

    @user_errors
    def do_retrieve(question, **fields):
        spec = make_spec(**fields)
        return chunks_table(retrieve(spec, services.indexes.get(spec.name), question))

    @user_errors
    def do_quality(dataset, progress=gr.Progress(), **fields):
        spec = make_spec(**fields)
        handle = services.indexes.get(spec.name)
        examples = services.datasets.eval_examples(dataset)
        rows = []
        for k in [k for k in QUALITY_KS if k <= max(spec.top_k, 1)] or [spec.top_k]:
            progress(len(rows) / len(QUALITY_KS), desc=f"k = {k}")
            m = retrieval_metrics(spec, handle, examples, top_k=k)
            rows.append({"k": k, "recall": round(m["recall"], 3), "hit_rate": round(m["hit_rate"], 3),
                         "mrr": round(m["mrr"], 3), "n": m["n"], "skipped": m["skipped"]})
        table = pd.DataFrame(rows)
        return table, charts.retrieval_quality(table)

    @user_errors
    def do_load(pipeline):
        s = pspec.load_spec(pipeline)
        return (s.name, s.splitter.split_by, s.splitter.split_length, s.splitter.split_overlap,
                s.embedder, s.retriever, s.top_k, s.ranker or "", s.prompt_template,
                show_graph(s.name))

    @user_errors
    def do_delete(pipeline):
        services.indexes.delete(pipeline)
        return gr.update(choices=services.indexes.names(), value=None), f"Deleted `{pipeline}`."

    build_btn.click(do_build, inputs=[dataset, files], inputs_kwargs=spec_kwargs, outputs=job_id,
                    api_name="build_index", **INDEX)
    status_outputs = [build_status, saved, graph, poll_timer]
    job_id.change(do_status, inputs=job_id, outputs=status_outputs, api_name="index_status")
    poll_timer.tick(do_status, inputs=job_id, outputs=status_outputs, api_name=False,
                    show_progress="hidden")
    cancel_btn.click(do_cancel, inputs=job_id, outputs=build_status, api_name="cancel_index")
    widths = lambda table: gr.update(column_widths=chunk_widths(table))  # noqa: E731
    restyle(retrieve_btn.click(do_retrieve, inputs=[question], inputs_kwargs=spec_kwargs,
                               outputs=chunks, api_name="retrieve"), chunks, widths)
    restyle(question.submit(do_retrieve, inputs=[question], inputs_kwargs=spec_kwargs,
                            outputs=chunks, api_name=False), chunks, widths)
    quality_btn.click(do_quality, inputs=[dataset], inputs_kwargs=spec_kwargs,
                      outputs=[quality, quality_plot], api_name="retrieval_quality", **STATS)
    load_btn.click(do_load, inputs=saved, outputs=[*spec_inputs, graph], api_name="load_pipeline")
    delete_btn.click(do_delete, inputs=saved, outputs=[saved, build_status],
                     api_name="delete_pipeline")

    def show(jid):
        return (follow_job(services.jobs, KIND, jid), gr.update(choices=services.datasets.ids()),
                gr.update(choices=services.indexes.names()))

    on_show(page, tab, show, inputs=[job_id], outputs=[job_id, dataset, saved])
