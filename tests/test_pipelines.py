"""pipelines/: specs, indexing, retrieval, prompts, YAML, retrieval metrics, the local generator.

BM25 tests need no model; tests that load the embedder or the chat model are marked integration.
"""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
from haystack import Pipeline

from core.datasets import QADataset, load_preset
from core.model_files import AdapterError
from core.schema import InputError, QAExample, split_of
from core.secrets import Secret
from core.store import Store
from core.systems import BASE
from pipelines.components import LOCAL_SERVER_KEY, LocalChatGenerator, make_generator
from pipelines.indexing import IndexCancelled, IndexNotFoundError, build_index, load_index
from pipelines.query import (build_prompt, build_query_pipeline, build_rag_pipeline, documents_output,
                             pipeline_yaml, query_inputs, retrieval_metrics, retrieve)
from pipelines.spec import (GeneratorSpec, PipelineSpec, SpecError, SplitterSpec, delete_spec, list_specs,
                            load_spec, save_spec)

PRESETS = ("nq", "bioasq", "qasper")
RETRIEVERS = ("bm25", "embedding", "hybrid")
MODEL_RETRIEVERS = {"embedding", "hybrid"}

# Recall@3 of the gold passages on each sample's eval split (split_of(id, 0, 0.3) == "eval", 19-22
# questions), default splitter (word, 150, overlap 30), measured on 2026-11-21:
#            bm25   embedding  hybrid
#   nq       1.00   1.00       1.00
#   bioasq   1.00   0.97       1.00
#   qasper   0.95   0.89       0.95
# The bound 0.8 sits below every measured value by at least two questions' worth, so a change of
# tokenizer or model version does not flip it, yet a broken retriever fails it by far: 3 chunks
# drawn at random from 52-162 have a recall near 0.05.
RECALL_AT_3_BOUND = 0.8


@lru_cache(maxsize=None)
def dataset(name: str) -> QADataset:
    return load_preset(name, source="sample")


def eval_examples(name: str) -> list[QAExample]:
    return [ex for ex in dataset(name).examples if split_of(ex.id, 0, 0.3) == "eval"]


def retriever_param(kind: str):
    marks = [pytest.mark.integration] if kind in MODEL_RETRIEVERS else []
    return pytest.param(kind, marks=marks, id=kind)


def ids(documents) -> list[tuple[str, str]]:
    return [(d.meta["passage_id"], d.id) for d in documents]


# ---------------------------------------------------------------- specs


def test_spec_round_trips_through_json():
    spec = PipelineSpec(name="round-trip", splitter=SplitterSpec(split_by="sentence", split_length=4,
                                                                 split_overlap=1), retriever="bm25",
                        top_k=5, generator=GeneratorSpec(kind="openai", model="gpt-x",
                                                         base_url="http://127.0.0.1:8000/v1"))
    again = PipelineSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize("change, message", [
    ({"retriever": "tf-idf"}, r"retriever: must be one of bm25, embedding, hybrid \(got 'tf-idf'\)"),
    ({"top_k": 0}, r"top_k: must be a whole number from 1 to 100 \(got 0\)"),
    ({"top_k": True}, r"top_k: must be a whole number from 1 to 100 \(got True\)"),
    ({"splitter": {"split_by": "word", "split_length": 50, "split_overlap": 50}}, "split overlap"),
    ({"splitter": {"split_by": "chapter"}}, r"splitter.split_by: must be one of word, sentence, passage"),
    ({"splitter": {"split_length": 50, "chunks": 2}}, r"Unknown field\(s\) in splitter: chunks\."),
    ({"name": "../escape"}, "Pipeline name '../escape' is not allowed"),
    ({"colour": "red"}, r"Unknown field\(s\) in the pipeline spec: colour\."),
    ({"prompt_template": '{% message role="user" %}Context only{% endmessage %}'}, "never uses"),
    ({"prompt_template": '{% message role="user" %}{{ question }{% endmessage %}'}, "does not render"),
    ({"prompt_template": "Plain text {{ question }}"}, "does not render"),
    ({"prompt_template": '{% message role="user" %}{{ question }} {{ lang }}{% endmessage %}'}, "uses lang"),
    ({"generator": {"kind": "cloud"}}, r"generator.kind: must be one of local, openai \(got 'cloud'\)"),
    ({"generator": {"temperature": 3}}, r"generator.temperature: must be a number from 0 to 2 \(got 3\)"),
    ({"generator": {"base_url": "ftp://x"}}, "must start with http:// or https://"),
])
def test_bad_spec_raises_a_clear_value_error(change, message):
    data = {**PipelineSpec(name="bad").to_dict(), **change}
    with pytest.raises(SpecError, match=message) as caught:
        PipelineSpec.from_dict(data)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, InputError)


def test_saved_specs_are_listed_loaded_and_deleted(tmp_path):
    store = Store(tmp_path / "specs.duckdb")
    try:
        spec = PipelineSpec(name="saved-one", retriever="bm25", top_k=4)
        save_spec(spec, haystack_yaml="components: {}\n", store=store)
        assert "saved-one" in list_specs()
        assert load_spec("saved-one") == spec
        row = store.query("SELECT spec, haystack_yaml FROM pipelines WHERE name = 'saved-one'")[0]
        assert json.loads(row["spec"])["top_k"] == 4 and row["haystack_yaml"] == "components: {}\n"
        save_spec(PipelineSpec(name="saved-one", retriever="bm25", top_k=6), store=store)  # overwrite
        assert load_spec("saved-one").top_k == 6
        assert json.loads(store.query("SELECT spec FROM pipelines")[0]["spec"])["top_k"] == 6
        delete_spec("saved-one", store=store)
        assert "saved-one" not in list_specs()
        assert store.query("SELECT * FROM pipelines WHERE name = 'saved-one'") == []
        with pytest.raises(SpecError, match="No saved pipeline named 'saved-one'"):
            load_spec("saved-one")
    finally:
        store.close()


# ---------------------------------------------------------------- indexing and retrieval


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("retriever", [retriever_param(r) for r in RETRIEVERS])
def test_sample_index_retrieves_gold_passages(preset, retriever):
    spec = PipelineSpec(name=f"{preset}-{retriever}", retriever=retriever, top_k=3)
    corpus = dataset(preset).corpus
    reports = []
    handle = build_index(spec, corpus, progress=lambda f, m: reports.append(f), persist=False)
    try:
        assert handle.n_passages == len(corpus) and handle.n_documents >= len(corpus)
        assert reports[-1] == 1.0 and reports == sorted(reports)
        metrics = retrieval_metrics(spec, handle, eval_examples(preset), top_k=3)
        assert metrics["skipped"] == 0 and metrics["n"] == len(eval_examples(preset))
        assert metrics["recall"] >= RECALL_AT_3_BOUND, metrics
        assert 0 < metrics["mrr"] <= metrics["hit_rate"] <= 1
    finally:
        handle.release()


@pytest.mark.parametrize("retriever", [retriever_param(r) for r in RETRIEVERS])
def test_saved_index_gives_identical_retrieval(retriever):
    spec = PipelineSpec(name=f"saved-{retriever}", retriever=retriever, top_k=4)
    built = build_index(spec, dataset("qasper").corpus)
    questions = [ex.question for ex in eval_examples("qasper")[:5]]
    before = [ids(retrieve(spec, built, q)) for q in questions]
    built.release()  # the reload below must come from disk, not from shared memory
    loaded = load_index(spec.name)
    assert loaded.spec == spec and loaded.n_documents > 0
    assert [ids(retrieve(loaded.spec, loaded, q)) for q in questions] == before
    assert all(len(found) == 4 for found in before)
    loaded.release()


@pytest.mark.parametrize("retriever", [retriever_param("bm25"), retriever_param("hybrid")])
def test_query_pipeline_yaml_round_trips(retriever):
    spec = PipelineSpec(name=f"yaml-{retriever}", retriever=retriever, top_k=3)
    handle = build_index(spec, dataset("nq").corpus, persist=False)
    question = eval_examples("nq")[0].question
    original = build_query_pipeline(spec, handle).to_dict()
    restored = Pipeline.loads(pipeline_yaml(spec, handle))
    assert restored.to_dict()["components"] == original["components"]
    assert sorted(map(str, restored.to_dict()["connections"])) == sorted(map(str, original["connections"]))
    last = documents_output(spec)
    result = restored.run(query_inputs(spec, question), include_outputs_from={last})
    assert ids(result[last]["documents"]) == ids(retrieve(spec, handle, question))
    assert question in result["prompt_builder"]["prompt"][-1].text
    handle.release()


def test_cancel_stops_indexing_between_batches():
    spec = PipelineSpec(name="cancelled", retriever="bm25")
    batches = []
    with pytest.raises(IndexCancelled):
        build_index(spec, dataset("bioasq").corpus, progress=lambda f, m: batches.append(f),
                    should_cancel=lambda: len(batches) >= 2, batch_size=10)
    assert len(batches) == 2 and batches[-1] < 1
    with pytest.raises(IndexNotFoundError, match="No index has been built for pipeline 'cancelled'"):
        load_index("cancelled")


def test_damaged_saved_index_gives_a_clear_error():
    spec = PipelineSpec(name="damaged", retriever="bm25")
    handle = build_index(spec, dataset("nq").corpus)
    handle.release()
    (handle.path / "store.json").write_text("{not json")
    with pytest.raises(SpecError, match="The saved index of 'damaged' is damaged"):
        load_index("damaged")


def test_empty_corpus_and_empty_question_are_refused():
    spec = PipelineSpec(name="empty", retriever="bm25")
    with pytest.raises(SpecError, match="no passages"):
        build_index(spec, [], persist=False)
    handle = build_index(spec, dataset("nq").corpus, persist=False)
    with pytest.raises(InputError, match="empty"):
        retrieve(spec, handle, "   ")
    handle.release()


def test_bm25_index_refuses_embedding_queries():
    spec = PipelineSpec(name="bm25-only", retriever="bm25")
    handle = build_index(spec, dataset("nq").corpus, persist=False)
    with pytest.raises(SpecError, match="built for BM25 only"):
        retrieve(PipelineSpec(name="bm25-only", retriever="hybrid"), handle, "who wrote frankenstein")
    handle.release()


def test_retrieval_metrics_skip_examples_without_gold_in_corpus():
    spec = PipelineSpec(name="metrics", retriever="bm25", top_k=2)
    handle = build_index(spec, dataset("nq").corpus, persist=False)
    stray = QAExample("x1", "who painted the mona lisa", "Leonardo", ["A passage not in the corpus."])
    metrics = retrieval_metrics(spec, handle, [*eval_examples("nq")[:4], stray])
    assert metrics["n"] == 4 and metrics["skipped"] == 1 and metrics["k"] == 2
    with pytest.raises(SpecError, match="None of the 1 examples"):
        retrieval_metrics(spec, handle, [stray])
    handle.release()


def test_ranker_that_is_not_a_cross_encoder_or_unreachable_is_refused():
    handle = build_index(PipelineSpec(name="ranked", retriever="bm25"), dataset("nq").corpus, persist=False)
    bi_encoder = PipelineSpec(name="ranked", retriever="bm25", ranker="all-minilm-l6-v2")
    with pytest.raises(SpecError, match="not a cross-encoder"):
        build_query_pipeline(bi_encoder, handle)
    # The hub is unreachable here (HF_HUB_OFFLINE), as on a laptop without network.
    missing = PipelineSpec(name="ranked", retriever="bm25", ranker="nobody/no-such-cross-encoder")
    with pytest.raises(SpecError, match="ranker model 'nobody/no-such-cross-encoder' could not be loaded"):
        retrieve(missing, handle, "who wrote frankenstein")
    handle.release()


def test_prompt_carries_question_and_passages_in_order():
    spec = PipelineSpec(name="prompt", retriever="bm25", top_k=2)
    handle = build_index(spec, dataset("qasper").corpus, persist=False)
    question = eval_examples("qasper")[0].question
    documents = retrieve(spec, handle, question)
    messages = build_prompt(spec, question, documents)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert question in user
    first, second = (user.index(d.content.strip()[:80]) for d in documents)
    assert first < second
    assert documents[0].meta["title"] in user  # Qasper passages carry "paper / section" titles
    handle.release()


def test_openai_generator_needs_a_key_or_a_local_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SpecError, match="set the OPENAI_API_KEY"):
        make_generator(GeneratorSpec(kind="openai", model="gpt-4o-mini"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-stored")
    local = make_generator(GeneratorSpec(kind="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    assert local.api_base_url == "http://127.0.0.1:9/v1"
    assert local.api_key.resolve_value() == LOCAL_SERVER_KEY  # the env key is not for this URL
    hosted = make_generator(GeneratorSpec(kind="openai", model="gpt-4o-mini"))
    assert hosted.api_key.resolve_value() == "sk-test-not-stored"
    assert "sk-test-not-stored" not in json.dumps(hosted.to_dict())  # secrets never serialised
    typed = make_generator(GeneratorSpec(kind="openai", model="m", base_url="http://127.0.0.1:9/v1"),
                           Secret("sk-typed"))
    assert typed.api_key.resolve_value() == "sk-typed"
    with pytest.raises(ValueError, match="Cannot serialize token-based secret"):
        typed.to_dict()


# ---------------------------------------------------------------- the local generator


def test_local_generator_refuses_unknown_settings():
    with pytest.raises(SpecError, match="Unknown generation setting"):
        LocalChatGenerator(generation_kwargs={"max_tokens": 5})


@pytest.mark.integration
def test_rag_pipeline_with_local_generator_answers_and_serialises():
    # top_k=1: with a second, unrelated passage the 135M model sometimes copies the wrong one.
    spec = PipelineSpec(name="rag-local", retriever="bm25", top_k=1,
                        generator=GeneratorSpec(max_new_tokens=24))
    handle = build_index(spec, dataset("nq").corpus, persist=False)
    pipeline = build_rag_pipeline(spec, handle)
    question = "who wrote the novel frankenstein"
    result = pipeline.run({**query_inputs(spec, question), "llm": {"adapter": BASE}},
                          include_outputs_from={"prompt_builder"})
    reply = result["llm"]["replies"][0]
    assert "shelley" in reply.text.lower(), reply.text
    assert reply.meta["adapter"] == BASE and 0 < reply.meta["new_tokens"] <= 24
    restored = Pipeline.loads(pipeline.dumps())
    generator = restored.get_component("llm")
    assert isinstance(generator, LocalChatGenerator)
    assert generator.generation_kwargs == {"max_new_tokens": 24, "temperature": 0.0}
    messages = result["prompt_builder"]["prompt"]
    with pytest.raises(AdapterError, match="no-such-adapter not attached"):
        generator.run(messages, adapter="no-such-adapter")
    handle.release()
