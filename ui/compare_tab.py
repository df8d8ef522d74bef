"""Compare tab: one question, up to six systems side by side, with and without RAG, then a vote."""
from __future__ import annotations

import gradio as gr

from core import config
from core.generation import GenParams
from core.systems import BASE
from jobs.services import Services
from core.systems import System
from pipelines.compare import MAX_SYSTEMS, Comparison, compare
from ui.common import GENERATE, empty_note, on_show, user_errors
from ui.keys import KeyRing, remember
from ui.served import listing
from ui.tables import chunks_table

NONE, OPENAI = "(off)", "OpenAI-compatible"
SERVED = "served: "  # + a model name listed by the endpoint: that model on the endpoint
CHOICES = ["A better", "B better", "tie", "all bad"]


def short_name(system: System) -> str:
    """A system as a vote button names it: base, the adapter or the remote model, + RAG."""
    who = system.model if system.kind == "openai" else (
        "base" if system.is_base else system.adapter)
    return who + (" + RAG" if system.rag else "")


def vote_labels(columns: list, a: int, b: int) -> list[str]:
    """The vote buttons' texts for columns `a` and `b` (1-based), e.g. "A: base + RAG is
    better"; the plain choices while there is nothing to vote on."""
    if not columns:
        return list(CHOICES)
    return [f"A: {short_name(columns[a - 1].system)} is better",
            f"B: {short_name(columns[b - 1].system)} is better", *CHOICES[2:]]


def system_choices(services: Services, model_ref: str, served: list[str] | None = None) -> list[str]:
    return [NONE, "base", *services.adapters.names(model_ref), OPENAI,
            *(SERVED + name for name in served or [])]


def build(services: Services, keys: gr.State, page: gr.Blocks, tab: gr.Tab) -> None:
    """`keys`: the visitor's session keyring (ui.keys), shared with the Evaluate tab."""
    gr.Markdown("Ask one question of several systems at once: the base model and fine-tuned "
                "adapters, each with or without RAG. Retrieval runs once, every system gets the "
                "same prompt template and decoding, and all local systems answer in one batch.")
    with gr.Row():
        question = gr.Textbox(label="Question", lines=2, max_lines=8, scale=3,
                              placeholder="e.g. Which gene is mutated in cystic fibrosis?",
                              elem_id="compare-question")
        with gr.Column(scale=2):
            dataset = gr.Dropdown(services.datasets.ids(), value=None, label="…or pick from a "
                                  "dataset's eval split", allow_custom_value=True)
            picked = gr.Dropdown([], label="Eval question", value=None)
    reference = gr.Markdown()
    with gr.Row():
        model = gr.Dropdown([config.DEFAULT_CHAT_MODEL], value=config.DEFAULT_CHAT_MODEL,
                            allow_custom_value=True, label="Base model (alias, folder or hub id)")
        pipeline = gr.Dropdown(services.indexes.names(), value=None, label="RAG pipeline (built index)",
                               allow_custom_value=True)
        preset = gr.Button("2×2 preset: {base, adapter} × {no RAG, RAG}")
    rows = []
    with gr.Row():
        for i in range(MAX_SYSTEMS):
            with gr.Column(min_width=140):
                choice = gr.Dropdown(system_choices(services, config.DEFAULT_CHAT_MODEL),
                                     value="base" if i == 0 else NONE, label=f"System {i + 1}",
                                     allow_custom_value=True)  # adapters trained later
                rag = gr.Checkbox(value=False, label="RAG")
                rows.append((choice, rag))
    with gr.Accordion("OpenAI-compatible endpoint", open=False):
        with gr.Row():
            base_url = gr.Textbox(label="Base URL (empty = the app's endpoint)",
                                  placeholder="http://127.0.0.1:8000/v1")
            remote_model = gr.Textbox(label="Served model name")
            api_key = gr.Textbox(label="API key (kept for this browser session only, never "
                                 "stored)", type="password")
        list_models = gr.Button("List server models (each becomes a 'served:' system)")
        served_table = gr.Dataframe(label="Served models (vLLM lists each LoRA adapter with its "
                                    "base model as parent)", interactive=False)
        empty_note(served_table, "Give the server's base URL above and click the button to "
                   "list its models.")
        served = gr.State([])
    with gr.Accordion("Decoding (shared by every system)", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(8, 512, value=96, step=8, label="Max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05,
                                    label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        ask = gr.Button("Compare", variant="primary")
        regenerate = gr.Button("Regenerate")
        clear = gr.Button("Clear")
    chunks = gr.Dataframe(label="Retrieved chunks (shared by every RAG system)", wrap=True,
                          interactive=False, visible=False)
    answers, stats = [], []
    with gr.Row(elem_id="compare-answers"):
        for i in range(MAX_SYSTEMS):
            with gr.Column(min_width=160):
                answers.append(gr.Textbox(label=f"System {i + 1}", lines=8, interactive=False,
                                          visible=i == 0))
                stats.append(gr.Markdown())
    last = gr.State(None)
    with gr.Row():
        vote_a = gr.Dropdown([1, 2], value=1, label="A = system", interactive=False)
        vote_b = gr.Dropdown([1, 2], value=2, label="B = system", interactive=False)
        vote_buttons = [gr.Button(c, interactive=False) for c in CHOICES]
    vote_status = gr.Markdown()

    row_inputs = [w for pair in rows for w in pair]
    # The handlers' keyword arguments, named as the API shows them; the six slots are
    # system_1, rag_1, ..., system_6, rag_6.
    fields = dict(question=question, base_model=model, pipeline=pipeline, base_url=base_url,
                  remote_model=remote_model, api_key=api_key, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed)
    fields |= {f"{kind}_{i + 1}": widget for i, pair in enumerate(rows)
               for kind, widget in zip(("system", "rag"), pair)}
    outputs = [chunks, *answers, *stats, last, vote_a, vote_b, *vote_buttons]
    outputs_and_keys = [*outputs, keys]

    def systems_from(model_ref, pipe, url, remote, slots: dict) -> list[System]:
        systems = []
        for i in range(1, MAX_SYSTEMS + 1):
            choice, use_rag = slots.get(f"system_{i}"), slots.get(f"rag_{i}")
            if choice in (None, NONE):
                continue
            if choice == OPENAI or choice.startswith(SERVED):
                name = choice[len(SERVED):] if choice.startswith(SERVED) else remote
                systems.append(System("openai", (name or "").strip(), rag=bool(use_rag),
                                      base_url=(url or "").strip() or None, pipeline=pipe))
            else:
                adapter = BASE if choice == "base" else choice
                systems.append(System("local", model_ref, adapter, bool(use_rag), pipeline=pipe))
        return systems

    def render(state: Comparison, final: bool) -> list:
        n = len(state.columns)
        out = [gr.update(value=chunks_table(state.documents), visible=bool(state.documents))]
        out += [gr.update(value=c.text, label=f"{i + 1}. {c.system.label}", visible=True)
                for i, c in enumerate(state.columns)]
        out += [gr.update(value="", visible=False)] * (MAX_SYSTEMS - n)
        out += [c.stats for c in state.columns] + [""] * (MAX_SYSTEMS - n)
        record = state if final else None
        numbers = [(f"{i}. {short_name(c.system)}", i) for i, c in enumerate(state.columns, 1)]
        # No columns (cleared): no choices and no value, which the vote pickers' change accepts.
        out += [record,
                gr.update(choices=numbers, value=1 if n else None, interactive=final and n > 1),
                gr.update(choices=numbers, value=min(2, n) or None, interactive=final and n > 1)]
        out += [gr.update(value=label, interactive=final)
                for label in vote_labels(state.columns, 1, min(2, n))]
        return out

    def run(ring: KeyRing, q, model_ref, pipe, url, remote, key, max_tokens, temp, top,
            seed_value, slots, documents=None):
        ring, secret = remember(ring, url, key)
        params = GenParams(max_new_tokens=int(max_tokens), temperature=float(temp),
                           top_p=float(top), seed=int(seed_value or 0))
        systems = systems_from(model_ref, pipe, url, remote, slots)
        spec = index = None
        if pipe and any(s.rag for s in systems):
            index = services.indexes.get(pipe)
            spec = index.spec
        state = None
        for state in compare(q, systems, params, spec, index, api_key=secret,
                             documents=documents, adapter_paths=services.adapters.paths()):
            yield [*render(state, final=False), ring]
        yield [*render(state, final=True), ring]

    @user_errors
    def do_compare(ring, *, question, base_model, pipeline=None, base_url=None,
                   remote_model=None, api_key=None, max_new_tokens, temperature, top_p, seed,
                   **slots):
        yield from run(ring, question, base_model, pipeline, base_url, remote_model, api_key,
                       max_new_tokens, temperature, top_p, seed, slots)

    @user_errors
    def do_regenerate(previous, ring, *, question, base_model, pipeline=None, base_url=None,
                      remote_model=None, api_key=None, max_new_tokens, temperature, top_p, seed,
                      **slots):
        # Same question and chunks: only the answers are drawn again (a new seed when sampling).
        same = previous and previous.question == question.strip()
        documents = previous.documents if same else None
        new_seed = int(seed or 0) + (1 if float(temperature) > 0 else 0)
        yield from run(ring, question, base_model, pipeline, base_url, remote_model, api_key,
                       max_new_tokens, temperature, top_p, new_seed, slots, documents)

    def do_clear():
        empty = Comparison("", columns=[])
        return render(empty, final=False)

    @user_errors
    def do_vote(record: Comparison | None, system_a, system_b, choice):
        if record is None:
            raise gr.Error("Generate answers first, then vote.")
        a, b = int(system_a), int(system_b)
        if a == b and choice in ("A better", "B better"):
            raise gr.Error("A and B are the same system; pick two different ones.")
        cols = [record.columns[a - 1], record.columns[b - 1]]
        vote_id = services.evaluations.record_vote(
            record.question, [c.system for c in cols], [c.text for c in cols],
            choice.replace(" ", "_"), decoding=vars(record.params),
            retrieved=[{"passage_id": d.meta.get("passage_id"), "score": d.score}
                       for d in record.documents])
        return (f"Vote recorded ({choice}: A = {a}. {short_name(cols[0].system)}, B = {b}. "
                f"{short_name(cols[1].system)}), id `{vote_id}`.")

    def pick_question(ds_id):
        if not ds_id:
            return gr.update(choices=[], value=None)
        examples = services.datasets.eval_examples(ds_id)
        return gr.update(choices=[(e.question, e.id) for e in examples], value=None)

    def use_question(ds_id, example_id):
        if not (ds_id and example_id):
            return gr.update(), ""
        example = next(e for e in services.datasets.eval_examples(ds_id) if e.id == example_id)
        return example.question, f"**Reference answer:** {example.answer}"

    @user_errors
    def two_by_two(base_model, pipeline):
        adapters = services.adapters.names(base_model)
        if not adapters:
            raise gr.Error("No adapter yet: fine-tune one (Fine-tune tab) or load one first.")
        if not pipeline:
            raise gr.Error("Choose a RAG pipeline with a built index first (RAG tab).")
        plan = [("base", False), ("base", True), (adapters[0], False), (adapters[0], True)]
        plan += [(NONE, False)] * (MAX_SYSTEMS - len(plan))
        return [v for choice, use_rag in plan for v in (choice, use_rag)]


    ask.click(do_compare, inputs=[keys], inputs_kwargs=fields, outputs=outputs_and_keys,
              api_name="compare", **GENERATE)
    question.submit(do_compare, inputs=[keys], inputs_kwargs=fields, outputs=outputs_and_keys,
                    api_name=False, **GENERATE)
    regenerate.click(do_regenerate, inputs=[last, keys], inputs_kwargs=fields,
                     outputs=outputs_and_keys, api_name="regenerate", **GENERATE)
    clear.click(do_clear, outputs=outputs, api_name="clear")
    for button, choice in zip(vote_buttons, CHOICES):
        button.click(do_vote, inputs=[last, vote_a, vote_b, gr.State(choice)],
                     outputs=vote_status, api_name=f"vote_{choice.replace(' ', '_')}")
    def name_votes(record: Comparison | None, a, b):
        if record is None or not record.columns or not (a and b):
            return [gr.update()] * len(CHOICES)
        return vote_labels(record.columns, int(a), int(b))

    for side in (vote_a, vote_b):
        side.change(name_votes, inputs=[last, vote_a, vote_b], outputs=vote_buttons,
                    api_name=False, queue=False)
    dataset.change(pick_question, inputs=dataset, outputs=picked, api_name=False)
    picked.change(use_question, inputs=[dataset, picked], outputs=[question, reference],
                  api_name=False)
    preset.click(two_by_two, inputs=[model, pipeline], outputs=row_inputs, api_name="preset_2x2")
    choices = [choice for choice, _ in rows]
    list_models.click(user_errors(listing), inputs=[keys, base_url, api_key],
                      outputs=[served_table, served, keys], api_name="list_server_models").then(
        lambda m, names: [gr.update(choices=system_choices(services, m, names))] * MAX_SYSTEMS,
        inputs=[model, served], outputs=choices, api_name=False)
    for choice in choices:  # adapters trained since the page loaded appear on the next click
        choice.focus(lambda m, names: gr.update(choices=system_choices(services, m, names)),
                     inputs=[model, served], outputs=choice, api_name=False)
    pipeline.focus(lambda: gr.update(choices=services.indexes.names()), outputs=pipeline,
                   api_name=False)
    dataset.focus(lambda: gr.update(choices=services.datasets.ids()), outputs=dataset,
                  api_name=False)

    def show(model_ref, names):
        systems = gr.update(choices=system_choices(services, model_ref, names))
        return ([systems] * MAX_SYSTEMS + [gr.update(choices=services.indexes.names()),
                                           gr.update(choices=services.datasets.ids())])

    on_show(page, tab, show, inputs=[model, served], outputs=choices + [pipeline, dataset])
