"""Data tab: pick a preset sample, a hub dataset or an upload; see its size, split and a preview."""
from __future__ import annotations

import gradio as gr

from core import datasets
from core.schema import SplitSetting
from jobs.services import Services
from ui.common import empty_note, user_errors
from ui.tables import preview_table

SOURCES = ["Shipped sample", "Preset from the Hub", "Any Hub dataset", "Upload a file"]


def summary_markdown(ds: datasets.QADataset, dataset_id: str, split: SplitSetting) -> str:
    counts = ds.split_counts(split.seed, split.eval_fraction)
    skipped = getattr(ds, "skipped", 0)
    lines = [
        f"### {ds.name}",
        f"`{dataset_id}` · **{len(ds.examples)}** QA examples · **{len(ds.corpus)}** passages",
        f"Split (seeded hash of each id, seed {split.seed}, {split.eval_fraction:.0%} eval): "
        f"**{counts['train']}** train · **{counts['eval']}** eval. "
        "Eval examples never enter a training set.",
    ]
    if skipped:
        lines.append(f"{skipped} rows were skipped (empty question or answer).")
    return "\n\n".join(lines)


def build(services: Services) -> None:
    gr.Markdown("Load the QA pairs and passages that fine-tuning, RAG and evaluation will use. "
                "The shipped samples work offline; the presets load the study's datasets from "
                "the Hugging Face Hub.")
    with gr.Row():
        source = gr.Radio(SOURCES, value=SOURCES[0], label="Source", scale=2)
        preset = gr.Dropdown(
            [(p.label, name) for name, p in datasets.PRESETS.items()], value="bioasq",
            label="Preset", scale=1,
        )
    with gr.Row(visible=False) as hub_row:  # each source shows only the fields it uses
        hub_id = gr.Textbox(label="Hub dataset id", placeholder="owner/name", scale=2)
        hub_config = gr.Textbox(label="Config (optional)", scale=1)
        hub_split = gr.Textbox(label="Split", value="train", scale=1)
    upload = gr.File(label="Upload JSONL / CSV / Parquet",
                     file_types=[".jsonl", ".json", ".csv", ".parquet"], visible=False)
    with gr.Accordion("Column mapping (hub datasets and uploads)", open=False,
                      visible=False) as mapping:
        with gr.Row():
            col_q = gr.Textbox(value="question", label="Question column")
            col_a = gr.Textbox(value="answer", label="Answer column")
            col_c = gr.Textbox(value="", label="Contexts column (optional)")
            col_id = gr.Textbox(value="", label="Id column (optional)")
    load = gr.Button("Load dataset", variant="primary")
    summary = gr.Markdown()
    preview = gr.Dataframe(label="Preview (first 20 examples)", interactive=False, wrap=True,
                           column_widths=["70px", "40%", "30%", "100px", "15%"])
    empty_note(preview, "Pick a source and click Load dataset to see its size, split and first "
               "examples.")

    @user_errors
    def do_load(*, source, preset, hub_id=None, hub_config=None, hub_split, upload=None,
                question_column, answer_column, contexts_column, id_column,
                progress=gr.Progress()):
        # Keyword-only: these names are the API's; a default of None makes a parameter optional.
        mapping = datasets.ColumnMapping(question=(question_column or "").strip() or "question",
                                         answer=(answer_column or "").strip() or "answer",
                                         contexts=(contexts_column or "").strip() or None,
                                         id=(id_column or "").strip() or None)
        progress(0.1, desc="loading")
        if source == SOURCES[0]:
            ds = datasets.load_preset(preset, source="sample")
        elif source == SOURCES[1]:
            ds = datasets.load_preset(preset, source="hub")
        elif source == SOURCES[2]:
            if not (hub_id or "").strip():
                raise ValueError("Type a Hub dataset id (owner/name) first.")
            ds = datasets.load_hub(hub_id.strip(), mapping,
                                   config=(hub_config or "").strip() or None,
                                   split=(hub_split or "").strip() or "train")
        else:
            if upload is None:
                raise ValueError("Choose a file to upload first.")
            ds = datasets.load_upload(upload if isinstance(upload, str) else upload.name,
                                      mapping)
        progress(0.8, desc="saving to DuckDB")
        dataset_id = services.datasets.add(ds)
        split = services.datasets.split(dataset_id)
        return (summary_markdown(ds, dataset_id, split),
                preview_table(ds.preview(20, split.seed, split.eval_fraction)))

    def show_fields(src):
        return (gr.update(visible=src in SOURCES[:2]), gr.update(visible=src == SOURCES[2]),
                gr.update(visible=src == SOURCES[3]), gr.update(visible=src in SOURCES[2:]))

    source.change(show_fields, inputs=source, outputs=[preset, hub_row, upload, mapping],
                  api_name=False, queue=False)
    load.click(
        do_load,
        inputs_kwargs=dict(source=source, preset=preset, hub_id=hub_id, hub_config=hub_config,
                           hub_split=hub_split, upload=upload, question_column=col_q,
                           answer_column=col_a, contexts_column=col_c, id_column=col_id),
        outputs=[summary, preview], api_name="load_dataset",
    )
