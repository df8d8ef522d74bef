"""Query side: retrieval (BM25 | embedding | hybrid with reciprocal rank fusion), an optional
cross-encoder ranker, the ChatPromptBuilder, and retrieval metrics.

The compare flow retrieves once (`retrieve`) and builds one prompt (`build_prompt`) that every
system then answers, so generation is not part of the query pipeline; `build_rag_pipeline` adds a
generator for callers who want a single Haystack pipeline.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from haystack import Document, Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.components.evaluators import DocumentMRREvaluator, DocumentRecallEvaluator
from haystack.components.joiners import DocumentJoiner
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever, InMemoryEmbeddingRetriever

from core import config
from core.schema import QAExample, validate_question
from pipelines.components import chat_dicts, embedder_path, make_generator, make_ranker, warm_up
from pipelines.indexing import DocumentStoreHandle
from pipelines.spec import PipelineSpec, SpecError

# With a ranker, the retrievers hand it a wider pool than top_k so reranking can change the set.
RANKER_POOL = 20
_CACHE_SIZE = 8


def check_compatible(spec: PipelineSpec, store: DocumentStoreHandle) -> None:
    """The query spec may change top_k, ranker and prompt, but vectors come from the index's embedder."""
    if spec.needs_embeddings and not store.has_embeddings:
        raise SpecError(f"The index '{store.name}' was built for BM25 only, without embeddings; "
                        f"rebuild it to use {spec.retriever} retrieval.")
    if spec.needs_embeddings and spec.embedder != store.spec.embedder:
        raise SpecError(f"The index '{store.name}' was embedded with '{store.spec.embedder}', not "
                        f"'{spec.embedder}'; rebuild it or keep its embedder.")


def build_query_pipeline(spec: PipelineSpec, store: DocumentStoreHandle) -> Pipeline:
    """Retriever(s) -> [joiner] -> [ranker] -> prompt_builder. Not warmed up (cheap to build)."""
    check_compatible(spec, store)
    pool = max(spec.top_k, RANKER_POOL) if spec.ranker else spec.top_k
    pipeline = Pipeline()
    sources = []
    if spec.retriever in ("bm25", "hybrid"):
        pipeline.add_component("bm25_retriever", InMemoryBM25Retriever(store.document_store, top_k=pool))
        sources.append("bm25_retriever")
    if spec.needs_embeddings:
        pipeline.add_component("text_embedder", text_embedder(spec))
        pipeline.add_component("embedding_retriever",
                               InMemoryEmbeddingRetriever(store.document_store, top_k=pool))
        pipeline.connect("text_embedder.embedding", "embedding_retriever.query_embedding")
        sources.append("embedding_retriever")
    last = sources[0]
    if len(sources) > 1:
        pipeline.add_component("joiner", DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=pool))
        for source in sources:
            pipeline.connect(f"{source}.documents", "joiner.documents")
        last = "joiner"
    if spec.ranker:
        pipeline.add_component("ranker", make_ranker(spec.ranker, spec.top_k))
        pipeline.connect(f"{last}.documents", "ranker.documents")
        last = "ranker"
    pipeline.add_component("prompt_builder", ChatPromptBuilder(template=spec.prompt_template,
                                                               required_variables=["question"]))
    pipeline.connect(f"{last}.documents", "prompt_builder.documents")
    return pipeline


def text_embedder(spec: PipelineSpec) -> Any:
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersTextEmbedder,
    )

    return SentenceTransformersTextEmbedder(model=embedder_path(spec.embedder), normalize_embeddings=True,
                                            progress_bar=False)


def query_inputs(spec: PipelineSpec, question: str) -> dict[str, dict[str, Any]]:
    """The run() data of a query pipeline for one question."""
    inputs: dict[str, dict[str, Any]] = {"prompt_builder": {"question": question}}
    if spec.retriever in ("bm25", "hybrid"):
        inputs["bm25_retriever"] = {"query": question}
    if spec.needs_embeddings:
        inputs["text_embedder"] = {"text": question}
    if spec.ranker:
        inputs["ranker"] = {"query": question}
    return inputs


def documents_output(spec: PipelineSpec) -> str:
    """The component whose `documents` output is the final retrieval result."""
    if spec.ranker:
        return "ranker"
    return {"bm25": "bm25_retriever", "embedding": "embedding_retriever", "hybrid": "joiner"}[spec.retriever]


class _PipelineCache:
    """Warm query pipelines by (retrieval settings, store): one is built per spec, not per question."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], tuple[Pipeline, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: PipelineSpec, store: DocumentStoreHandle) -> tuple[Pipeline, threading.Lock]:
        # The generator and splitter play no part in retrieval; changing them needs no new pipeline.
        settings = {k: v for k, v in spec.to_dict().items() if k not in ("generator", "splitter", "name")}
        key = (json.dumps(settings, sort_keys=True), store.document_store.index)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        pipeline = build_query_pipeline(spec, store)
        warm_up(pipeline)
        with self._lock:
            self._items[key] = (pipeline, threading.Lock())
            while len(self._items) > _CACHE_SIZE:
                self._items.popitem(last=False)
            return self._items[key]


_CACHE = _PipelineCache()


def retrieve(spec: PipelineSpec, store: DocumentStoreHandle, question: str) -> list[Document]:
    """The top_k chunks for `question`, best first (each has meta passage_id, maybe title)."""
    question = validate_question(question, config.MAX_QUESTION_CHARS)
    pipeline, lock = _CACHE.get(spec, store)
    last = documents_output(spec)
    with lock:  # components hold models; one question at a time per warm pipeline
        result = pipeline.run(query_inputs(spec, question), include_outputs_from={last})
    return result[last]["documents"][: spec.top_k]


def build_prompt(spec: PipelineSpec, question: str, documents: list[Document]) -> list[dict[str, str]]:
    """The chat messages (role/content dicts) that every compared system receives."""
    question = validate_question(question, config.MAX_QUESTION_CHARS)
    builder = ChatPromptBuilder(template=spec.prompt_template, required_variables=["question"])
    return chat_dicts(builder.run(question=question, documents=documents)["prompt"])


def build_rag_pipeline(spec: PipelineSpec, store: DocumentStoreHandle, generator: Any | None = None) -> Pipeline:
    """The query pipeline ending in a chat generator (default: the one spec.generator describes).

    Run it with `query_inputs(spec, question)`; with LocalChatGenerator, add {"llm": {"adapter": name}}.
    """
    pipeline = build_query_pipeline(spec, store)
    pipeline.add_component("llm", generator if generator is not None else make_generator(spec.generator))
    pipeline.connect("prompt_builder.prompt", "llm.messages")
    return pipeline


def pipeline_yaml(spec: PipelineSpec, store: DocumentStoreHandle) -> str:
    """Haystack YAML of the query pipeline (Pipeline.loads restores it, in this process with the
    same shared in-memory documents)."""
    return build_query_pipeline(spec, store).dumps()


# ---------------------------------------------------------------- retrieval metrics


def retrieval_metrics(spec: PipelineSpec, store: DocumentStoreHandle, examples: list[QAExample],
                      top_k: int | None = None,
                      progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Recall@k, hit rate@k and MRR@k of the gold passages.

    Matching rule: QAExample.contexts are gold passage texts. Each is mapped to the ids of the
    corpus passages with the same text (whitespace-normalised, exact otherwise); a retrieved chunk
    counts as gold when its meta passage_id is one of them, so any chunk of a gold passage is a hit.
    recall = share of an example's gold passages among the top k (Haystack multi_hit), hit_rate =
    share of examples with at least one (single_hit), mrr = mean 1/rank of the first gold chunk.
    Examples whose contexts match no corpus passage cannot be scored and are counted as `skipped`.
    """
    spec_k = spec.replace(top_k=top_k) if top_k is not None else spec
    truths: list[list[Document]] = []
    retrieved: list[list[Document]] = []
    skipped = 0
    for number, example in enumerate(examples, start=1):
        gold = store.gold_passage_ids(example.contexts)
        if not gold:
            skipped += 1
        else:
            truths.append([Document(content="", meta={"passage_id": pid}) for pid in sorted(gold)])
            retrieved.append(retrieve(spec_k, store, example.question))
        if progress is not None:
            progress(number / len(examples), f"Retrieved for {number}/{len(examples)} questions")
    if not truths:
        raise SpecError(f"None of the {len(examples)} examples has a gold passage in the corpus of "
                        f"index '{store.name}', so retrieval cannot be scored.")
    field = "meta.passage_id"
    recall = DocumentRecallEvaluator(mode="multi_hit", document_comparison_field=field)
    hits = DocumentRecallEvaluator(mode="single_hit", document_comparison_field=field)
    mrr = DocumentMRREvaluator(document_comparison_field=field)
    data = {"ground_truth_documents": truths, "retrieved_documents": retrieved}
    return {"k": spec_k.top_k, "n": len(truths), "skipped": skipped,
            "recall": recall.run(**data)["score"], "hit_rate": hits.run(**data)["score"],
            "mrr": mrr.run(**data)["score"]}
