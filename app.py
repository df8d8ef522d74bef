"""Entry point (Hugging Face Spaces runs this file): build the tabs and launch."""
from __future__ import annotations

import logging
import os

import gradio as gr

from core import config, persistence, quant
from core.persistence import Persistence
from core.threads import configure_threads
from jobs.services import Services, build_services
from ui import (compare_tab, data_tab, evaluate_tab, finetune_tab, jobs_panel, rag_tab,
                study_tab)
from ui.keys import keyring

TITLE = "Fine-tune or RAG? A lab for 'Fine-Tuning or Fine-Failing?'"
INTRO = (
    "Does fine-tuning your model on a few hundred QA pairs help or hurt its retrieval-augmented "
    "answers? Barnett et al. (2024) found that LoRA fine-tuning on 200-1000 pairs of BioASQ, "
    "Natural Questions and Qasper usually made RAG answers *worse* (judged by G-Eval). "
    "Try it on your own model and data."
)


def build_app(services: Services, storage: Persistence | None = None) -> gr.Blocks:
    """`storage`: where results are kept beyond this process (core.persistence); its banner says
    where they are saved, or that they vanish with a Space's disk."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        banner = (storage or Persistence()).banner()
        if banner:
            gr.Markdown(banner)
        keys = keyring()  # the API keys this visitor typed, for this browser session only
        # Each tab re-reads the server's state when the page loads and when it is selected
        # (ui.common.on_show): lists of adapters, pipelines, runs and jobs, and its running job.
        with gr.Tab("Data"):
            data_tab.build(services)
        with gr.Tab("Fine-tune") as tab:
            finetune_tab.build(services, demo, tab)
        with gr.Tab("RAG") as tab:
            rag_tab.build(services, demo, tab)
        with gr.Tab("Compare") as tab:
            compare_tab.build(services, keys, demo, tab)
        with gr.Tab("Evaluate") as tab:
            evaluate_tab.build(services, keys, demo, tab)
        with gr.Tab("Study") as tab:
            study_tab.build(services, demo, tab)
        with gr.Tab("Jobs") as tab:
            jobs_panel.build(services, demo, tab)
    return demo


def configure_logging() -> None:
    """Server-side log on stderr at LOG_LEVEL (default INFO): refusals, jobs, tracebacks."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    configure_logging()
    try:
        quant.mode()  # checked before anything loads: a bad MODEL_QUANT is one line, not a traceback
    except ValueError as err:
        raise SystemExit(str(err)) from None
    logging.getLogger(__name__).info("starting (public mode: %s)", config.PUBLIC_MODE)
    # PERSIST_REPO: restore an empty data dir before the store opens it, then upload on schedule.
    storage = persistence.restore_at_start()
    services = build_services()
    storage.start(services.store, os.environ.get("HF_TOKEN") or None)
    configure_threads()  # probed at start-up, not on a visitor's first question
    # Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860).
    # Heavy events carry their own concurrency limits (ui.common); a full queue is refused with
    # Gradio's own message, and uploads above MAX_UPLOAD_MB never reach a handler.
    build_app(services, storage).queue(
        default_concurrency_limit=8, max_size=64 if config.PUBLIC_MODE else None,
    ).launch(max_file_size=config.MAX_UPLOAD_BYTES)
