"""Compare tab (first version): ask the default model a question and watch the answer stream."""
from __future__ import annotations

import gradio as gr

from core import config
from core.models import GenParams
from core.schema import validate_question
from jobs.services import Services
from ui.common import user_errors

BASE = "__base__"


def build(services: Services) -> None:
    gr.Markdown("Ask a question and watch the answer stream. The embedded model is "
                "SmolLM2-135M-Instruct: small and fast on a laptop CPU, not wise.")
    question = gr.Textbox(label="Question", lines=2, max_lines=8,
                          placeholder="e.g. When was the Eiffel Tower completed?")
    with gr.Row():
        model = gr.Dropdown([config.DEFAULT_CHAT_MODEL], value=config.DEFAULT_CHAT_MODEL,
                            allow_custom_value=True, label="Model (alias, folder or hub id)")
        adapter = gr.Dropdown([BASE], value=BASE, label="Adapter", allow_custom_value=False)
    with gr.Accordion("Decoding (shared by every system)", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(8, 512, value=96, step=8, label="Max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed")
    ask = gr.Button("Compare", variant="primary")
    answer = gr.Textbox(label="Answer", lines=6, interactive=False)
    stats = gr.Markdown()

    @user_errors
    def do_answer(q, model_ref, adapter_name, max_tokens, temp, top_p_value, seed_value):
        text = validate_question(q, config.MAX_QUESTION_CHARS)
        params = GenParams(max_new_tokens=int(max_tokens), temperature=float(temp),
                           top_p=float(top_p_value), seed=int(seed_value or 0))
        stream = services.hub.stream(model_ref, [text], [adapter_name or BASE], params)
        with stream:
            for rows in stream:
                yield rows[0], "generating…"
        g = stream.generations[0]
        yield g.text, (f"{g.seconds:.2f} s · first token {g.first_token_seconds:.2f} s · "
                       f"{g.new_tokens} tokens · {g.new_tokens / max(g.seconds, 1e-9):.1f} tokens/s")

    def adapters_for(model_ref):
        names = [BASE] + services.hub.list_adapters(model_ref) if model_ref else [BASE]
        return gr.update(choices=names, value=BASE)

    inputs = [question, model, adapter, max_new_tokens, temperature, top_p, seed]
    ask.click(do_answer, inputs=inputs, outputs=[answer, stats], api_name="compare")
    question.submit(do_answer, inputs=inputs, outputs=[answer, stats], api_name=False)
    model.change(adapters_for, inputs=model, outputs=adapter, api_name=False)
