"""Fine-tune tab: the study's knobs, a live loss chart, and the adapters list."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import gradio as gr
import pandas as pd

from core import charts
from core import config
from core.secrets import Secret
from jobs.adapters import KIND
from jobs.finetune_data import FinetuneSpec
from jobs.services import Services
from ui.common import (START_JOB, empty_note, fmt_seconds, follow_job, job_status, on_show,
                       restyle, user_errors, visitor)

logger = logging.getLogger(__name__)
FORM = ["base_model", "dataset", "source", "n_train", "context", "pipeline", "lora_r",
        "lora_alpha", "lora_dropout", "target_modules", "qlora", "epochs", "lr", "lr_schedule",
        "warmup_ratio", "micro_batch_size", "grad_accum", "max_length", "seed", "val_size",
        "val_every", "checkpoint_every", "name"]
NUMBERS = ["n_train", "lora_r", "lora_alpha", "lora_dropout", "epochs", "lr", "warmup_ratio",
           "micro_batch_size", "grad_accum", "max_length", "seed", "val_size", "val_every",
           "checkpoint_every"]
ADAPTER_COLUMNS = ["name", "base_model", "n_train", "context", "final_train_loss",
                   "final_val_loss", "steps", "tokens/s", "wall", "created"]


def form_values(spec: FinetuneSpec) -> list:
    d = spec.to_dict()
    d["target_modules"] = ",".join(d["target_modules"])
    return [d[k] for k in FORM]


def spec_from_form(form: dict) -> FinetuneSpec:
    """The spec of the form's values, keyed by FORM (the names /start_finetune's API shows)."""
    d = dict(form)
    for key in NUMBERS:
        d[key] = d[key] or 0  # an emptied number box reads as 0; the spec says what it must be
    return FinetuneSpec.from_dict(d).check_runnable()


def adapters_table(services: Services) -> pd.DataFrame:
    rows = []
    for a in services.adapters.rows():
        m, s = a.metrics or {}, a.spec or {}
        rows.append({"name": a.name, "base_model": a.base_model, "n_train": m.get("n_train"),
                     "context": s.get("context", ""),
                     "final_train_loss": _loss(m.get("final_train_loss")),
                     "final_val_loss": _loss(m.get("final_val_loss")), "steps": m.get("steps"),
                     "tokens/s": round(m["train_tokens_per_s"]) if m.get("train_tokens_per_s")
                     else None, "wall": fmt_seconds(m.get("wall_seconds")),
                     "created": f"{a.created_at:%Y-%m-%d %H:%M}"})
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def _loss(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def adapter_markdown(name: str, spec: dict, metrics: dict, folder: str) -> str:
    """An adapter's spec and results as a few readable lines (the JSON stays one click away)."""
    s, m = spec or {}, metrics or {}
    modules = ", ".join(s.get("target_modules") or [])
    pairs = m.get("n_train", s.get("n_train", "?"))
    lines = [f"#### {name}",
             f"Base model `{s.get('base_model', '?')}` · dataset `{s.get('dataset', '?')}` "
             f"({s.get('source', '?')}) · {pairs} training pairs · context "
             f"{s.get('context', '?')}",
             f"LoRA r {s.get('lora_r', '?')}, alpha {s.get('lora_alpha', '?')}, dropout "
             f"{s.get('lora_dropout', '?')} on {modules or '?'} · {s.get('epochs', '?')} "
             f"epochs · lr {s.get('lr', '?')} ({s.get('lr_schedule', '?')}) · batch "
             f"{s.get('micro_batch_size', '?')} × {s.get('grad_accum', '?')} · max length "
             f"{s.get('max_length', '?')} · seed {s.get('seed', '?')}"]
    if m:
        val = f", validation {_loss(m['final_val_loss'])}" if m.get("final_val_loss") else ""
        speed = (f" · {m['train_tokens_per_s']:.0f} tokens/s" if m.get("train_tokens_per_s")
                 else "")
        lines.append(f"{m.get('steps', '?')} steps · final loss: train "
                     f"{_loss(m.get('final_train_loss'))}{val}{speed} · wall "
                     f"{fmt_seconds(m.get('wall_seconds')) or '?'}")
    lines.append(f"Folder: `{folder}`")
    return "\n\n".join(lines)


def loss_frame(points: list[dict]) -> pd.DataFrame:
    rows = [{"step": p["step"], "loss": p[key], "curve": label}
            for p in points for key, label in (("train_loss", "train"), ("val_loss", "validation"))
            if p.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"])


def can_sign_in() -> bool:
    """On a Space with Gradio's OAuth extras (gradio[oauth]); without them the sign-in button
    would stop the app from starting, so the token box stays instead."""
    if not config.ON_SPACE:
        return False
    missing = [m for m in ("itsdangerous", "authlib") if importlib.util.find_spec(m) is None]
    if missing:
        logger.warning("No 'Sign in with Hugging Face' button: install gradio[oauth] (missing %s).",
                       ", ".join(missing))
    return not missing


def build(services: Services, page: gr.Blocks, tab: gr.Tab) -> None:
    gr.Markdown("Train a LoRA adapter on QA pairs (loss on the answer tokens only), the way the "
                "study did: 200, 500 or 1000 pairs, r 16, alpha 32, 3 epochs, lr 2e-4, batch 16. "
                "On a laptop CPU start from the **CPU preset** (the embedded 135M model, 32 pairs, "
                "a few minutes). A run keeps going when you close the browser.")
    defaults = FinetuneSpec()
    with gr.Row():
        cpu = gr.Button("CPU preset")
        study = gr.Button("Study defaults")
    with gr.Row():
        base_model = gr.Textbox(defaults.base_model, label="Base model (alias, folder, hub id)")
        dataset = gr.Dropdown(["bioasq", "qasper", "nq"], value=defaults.dataset,
                              allow_custom_value=True, label="Dataset (preset or file path)")
        source = gr.Radio(["sample", "hub"], value=defaults.source, label="Preset source")
        n_train = gr.Dropdown([32, 200, 500, 1000], value=defaults.n_train,
                              allow_custom_value=True, label="Training pairs (n_train)")
    with gr.Row():
        context = gr.Radio(["none", "gold", "retrieved"], value=defaults.context,
                           label="Context in training prompts")
        pipeline = gr.Dropdown(services.indexes.names(), value=None, allow_custom_value=True,
                               label="Pipeline (template; retriever for 'retrieved')")
        name = gr.Textbox("", label="Adapter name (empty: derived from the spec)")
    with gr.Accordion("LoRA and optimisation", open=False):
        with gr.Row():
            lora_r = gr.Number(defaults.lora_r, precision=0, label="LoRA r")
            lora_alpha = gr.Number(defaults.lora_alpha, label="alpha")
            lora_dropout = gr.Number(defaults.lora_dropout, label="dropout")
            target_modules = gr.Textbox(",".join(defaults.target_modules), label="Target modules")
            qlora = gr.Checkbox(defaults.qlora, label="QLoRA 4-bit (CUDA only)")
        with gr.Row():
            epochs = gr.Number(defaults.epochs, precision=0, label="Epochs")
            lr = gr.Number(defaults.lr, label="Learning rate")
            lr_schedule = gr.Radio(["cosine", "linear", "constant"], value=defaults.lr_schedule,
                                   label="Schedule")
            warmup_ratio = gr.Number(defaults.warmup_ratio, label="Warm-up ratio")
        with gr.Row():
            micro_batch_size = gr.Number(defaults.micro_batch_size, precision=0, label="Micro batch")
            grad_accum = gr.Number(defaults.grad_accum, precision=0, label="Grad accumulation")
            max_length = gr.Number(defaults.max_length, precision=0, label="Max length (tokens)")
            seed = gr.Number(defaults.seed, precision=0, label="Seed")
        with gr.Row():
            val_size = gr.Number(defaults.val_size, precision=0, label="Validation examples")
            val_every = gr.Number(defaults.val_every, precision=0, label="Validate every (steps)")
            checkpoint_every = gr.Number(defaults.checkpoint_every, precision=0,
                                         label="Checkpoint every (steps)")
    form = [base_model, dataset, source, n_train, context, pipeline, lora_r, lora_alpha,
            lora_dropout, target_modules, qlora, epochs, lr, lr_schedule, warmup_ratio,
            micro_batch_size, grad_accum, max_length, seed, val_size, val_every, checkpoint_every,
            name]
    with gr.Row():
        start = gr.Button("Start fine-tuning", variant="primary")
        cancel = gr.Button("Cancel", variant="stop")
        resume = gr.Button("Resume")
    job_id = gr.Textbox(label="Job", interactive=True)
    status = gr.Markdown()
    chart = gr.Plot(charts.loss(loss_frame([])), label="Loss (answer tokens)")

    gr.Markdown("### Adapters")
    adapters = gr.Dataframe(value=adapters_table(services), interactive=False, wrap=True)
    empty_note(adapters, "No adapters yet: start fine-tuning above (the CPU preset takes a few "
               "minutes) or load one from a folder or the Hub below.")
    with gr.Row():
        adapter = gr.Dropdown([], label="Adapter", allow_custom_value=True)
        new_name = gr.Textbox(label="New name")
        rename = gr.Button("Rename")
        delete = gr.Button("Delete", variant="stop")
        download = gr.Button("Download zip")
    zip_file = gr.File(label="Zip", interactive=False, visible=False)  # after Download zip
    with gr.Row():
        import_source = gr.Textbox(label="Load an adapter: folder or Hub id")
        import_btn = gr.Button("Load adapter")
        repo_id = gr.Textbox(label="Push to Hub repo (owner/name)")
        # On a Space visitors sign in and push with their own account; elsewhere HF_TOKEN or a
        # token typed for this request.
        sign_in = can_sign_in()
        if sign_in:
            gr.LoginButton("Sign in with Hugging Face")
        hf_token = gr.Textbox(label="HF token (this request only)", type="password",
                              visible=not sign_in)
        push = gr.Button("Push to Hub")
    adapter_status = gr.Markdown()
    about = gr.Markdown("_Choose an adapter (click a row above) to see its spec and results._")
    with gr.Accordion("Spec and metrics as JSON", open=False):
        details = gr.JSON(label="Spec and metrics")

    @user_errors
    def do_start(request: gr.Request, *, pipeline=None, **fields):
        """Start a fine-tune job; the fields are FinetuneSpec's (jobs.finetune --help)."""
        spec = spec_from_form({**fields, "pipeline": pipeline})  # None: optional in the API
        jid = services.adapters.train(spec, visitor(request))
        return jid, f"Started `{jid}` → adapter **{spec.output_name}**."

    def poll(job_id):
        jid = (job_id or "").strip()
        if not jid:
            return gr.update(), gr.update()
        job, text = job_status(services.jobs, jid)
        return text, charts.loss(loss_frame(services.jobs.metrics(jid))) if job else gr.update()

    @user_errors
    def do_cancel(job_id, request: gr.Request):
        services.jobs.cancel(job_id or "", visitor(request))
        return "Cancel requested; the last checkpoint is kept for a resume."

    @user_errors
    def do_resume(job_id, request: gr.Request):
        services.jobs.resume(job_id or "", visitor(request))
        return "Resuming from the last checkpoint."

    def adapter_choices():
        return gr.update(choices=[a.name for a in services.adapters.rows()])

    @user_errors
    def show_adapter(adapter):
        if not adapter:
            return None
        row = services.adapters.get(adapter)
        return {"spec": row.spec, "metrics": row.metrics, "folder": row.path}

    def describe(shown):
        if not shown:
            return "_Choose an adapter (click a row above) to see its spec and results._"
        name_value = Path(shown.get("folder") or "").name or "Adapter"
        return adapter_markdown(name_value, shown.get("spec"), shown.get("metrics"),
                                shown.get("folder", ""))

    @user_errors
    def do_rename(adapter, new_name):
        services.adapters.rename(adapter, new_name)
        return adapters_table(services), f"Renamed `{adapter}` to `{new_name}`."

    @user_errors
    def do_delete(adapter):
        services.adapters.delete(adapter)
        return adapters_table(services), f"Deleted `{adapter}`."

    @user_errors
    def do_zip(adapter):
        return str(services.adapters.zip(adapter))

    @user_errors
    def do_import(source, base_model):
        loaded = services.adapters.import_(source, base_model or config.DEFAULT_CHAT_MODEL)
        return adapters_table(services), f"Loaded adapter `{loaded}`."

    @user_errors
    def do_push(adapter, repo_id, hf_token=None, oauth_token: gr.OAuthToken | None = None):
        # Gradio fills oauth_token from the visitor's sign-in (None when not signed in).
        token = Secret(oauth_token.token) if oauth_token else Secret.typed(hf_token)
        return f"Pushed: {services.adapters.push(adapter, repo_id, token)}"

    @user_errors
    def cpu_preset(ds, src):
        """The CPU preset on the chosen dataset, with a max length that fits its prompts."""
        spec = FinetuneSpec.cpu_preset().replace(dataset=(ds or "nq").strip(), source=src)
        return form_values(spec.replace(max_length=services.adapters.fitted_max_length(spec)))

    cpu.click(cpu_preset, inputs=[dataset, source], outputs=form, api_name=False)
    study.click(lambda: form_values(FinetuneSpec()), outputs=form, api_name=False)
    start.click(do_start, inputs_kwargs=dict(zip(FORM, form)), outputs=[job_id, status],
                api_name="start_finetune", **START_JOB)
    cancel.click(do_cancel, inputs=job_id, outputs=status, api_name="cancel_finetune")
    resume.click(do_resume, inputs=job_id, outputs=status, api_name="resume_finetune")
    job_id.change(poll, inputs=job_id, outputs=[status, chart], api_name="finetune_status")
    gr.Timer(2.0).tick(poll, inputs=job_id, outputs=[status, chart], api_name=False,
                       show_progress="hidden")
    gr.Timer(5.0).tick(lambda: adapters_table(services), outputs=adapters, api_name=False,
                       show_progress="hidden")
    def pick(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    adapters.select(pick, outputs=adapter, api_name=False)
    adapter.focus(adapter_choices, outputs=adapter, api_name=False)
    adapter.change(show_adapter, inputs=adapter, outputs=details, api_name="adapter_details")
    details.change(describe, inputs=details, outputs=about, api_name=False, queue=False)
    # The adapter list follows every change made here (its endpoints' outputs stay as they are).
    rename.click(do_rename, inputs=[adapter, new_name], outputs=[adapters, adapter_status],
                 api_name="rename_adapter").success(adapter_choices, outputs=adapter,
                                                    api_name=False)
    delete.click(do_delete, inputs=adapter, outputs=[adapters, adapter_status],
                 api_name="delete_adapter").success(adapter_choices, outputs=adapter,
                                                    api_name=False)
    restyle(download.click(do_zip, inputs=adapter, outputs=zip_file, api_name="download_adapter"),
            zip_file)
    import_btn.click(do_import, inputs=[import_source, base_model],
                     outputs=[adapters, adapter_status], api_name="load_adapter").success(
                         adapter_choices, outputs=adapter, api_name=False)
    push.click(do_push, inputs=[adapter, repo_id, hf_token], outputs=adapter_status,
               api_name="push_adapter")
    pipeline.focus(lambda: gr.update(choices=services.indexes.names()), outputs=pipeline,
                   api_name=False)

    def show(jid):
        return (follow_job(services.jobs, KIND, jid), gr.update(choices=services.indexes.names()),
                adapter_choices(), adapters_table(services))

    on_show(page, tab, show, inputs=[job_id], outputs=[job_id, pipeline, adapter, adapters])
