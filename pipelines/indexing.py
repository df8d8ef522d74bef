"""Indexing: passages -> Haystack pipeline (split, embed when the retriever needs it, write) ->
an InMemoryDocumentStore, built in batches so progress shows and a cancel takes effect, then saved.

On disk, config.subdir("indexes")/<name>/ holds store.json (InMemoryDocumentStore.save_to_disk)
and manifest.json (the spec it was built with, and the corpus digests used for retrieval metrics).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from haystack import Document, Pipeline
from haystack.components.preprocessors import DocumentSplitter
from haystack.components.writers import DocumentWriter
from haystack.document_stores.errors import DocumentStoreError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy

from core.schema import Passage
from pipelines.components import embedder_path, warm_up
from pipelines.spec import PipelineSpec, SpecError, index_dir

Progress = Callable[[float, str], None]
DEFAULT_BATCH = 64
# Haystack's "sentence" needs NLTK data that cannot be fetched offline; "period" splits after ".".
_HAYSTACK_SPLIT = {"word": "word", "sentence": "period", "passage": "passage"}


class IndexCancelled(Exception):
    """should_cancel() returned True between two batches; nothing was saved."""


class IndexNotFoundError(SpecError):
    """No saved index under that name."""


@dataclass
class DocumentStoreHandle:
    """A built index: its document store, the spec it was built with, and the corpus digests.

    The store is shared (Haystack's process-global storage keyed by `document_store.index`), so a
    pipeline re-created from YAML in this process sees the same documents; `release()` frees it.
    """

    name: str
    spec: PipelineSpec
    document_store: InMemoryDocumentStore
    passage_digests: dict[str, list[str]] = field(default_factory=dict)  # text digest -> passage ids
    n_passages: int = 0
    seconds: float = 0.0
    path: Path | None = None

    @property
    def n_documents(self) -> int:
        return self.document_store.count_documents()

    @property
    def has_embeddings(self) -> bool:
        return self.spec.needs_embeddings

    def gold_passage_ids(self, contexts: Iterable[str]) -> set[str]:
        """Ids of the corpus passages whose text equals a context (whitespace-normalised)."""
        return {pid for text in contexts for pid in self.passage_digests.get(text_digest(text), [])}

    def release(self) -> None:
        """Free the documents held in process memory (the saved copy on disk stays)."""
        self.document_store.delete_all_documents()


def text_digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:24]


def build_index(spec: PipelineSpec, passages: list[Passage], progress: Progress | None = None,
                should_cancel: Callable[[], bool] | None = None, batch_size: int = DEFAULT_BATCH,
                persist: bool = True) -> DocumentStoreHandle:
    """Split, embed (for embedding/hybrid retrieval) and store `passages`; save unless persist=False."""
    documents = passage_documents(passages)
    if not documents:
        raise SpecError("There are no passages with text to index; load a dataset with a corpus first.")
    if batch_size < 1:
        raise SpecError(f"The indexing batch size must be at least 1, not {batch_size}.")
    store = InMemoryDocumentStore(index=f"{spec.name}:{uuid.uuid4().hex[:12]}",
                                  embedding_similarity_function="dot_product")
    pipeline = indexing_pipeline(spec, store)
    started = time.perf_counter()
    try:
        warm_up(pipeline)
        for start in range(0, len(documents), batch_size):
            if should_cancel is not None and should_cancel():
                raise IndexCancelled(f"Indexing '{spec.name}' was cancelled after {start} passages.")
            pipeline.run({"splitter": {"documents": documents[start:start + batch_size]}})
            done = min(start + batch_size, len(documents))
            if progress is not None:
                progress(done / len(documents), f"Indexed {done}/{len(documents)} passages")
    except BaseException:
        store.delete_all_documents()  # a partial index must not linger in shared memory
        raise
    handle = DocumentStoreHandle(spec.name, spec, store, corpus_digests(passages), len(documents),
                                 time.perf_counter() - started)
    if persist:
        save_index(handle)
    return handle


def passage_documents(passages: list[Passage]) -> list[Document]:
    """One Document per passage; meta keeps the passage's own meta plus passage_id and title."""
    documents = []
    for passage in passages:
        if not passage.text or not passage.text.strip():
            continue
        meta = {**passage.meta, "passage_id": passage.id}
        if passage.title:  # absent rather than "": the embedder would embed an empty title line
            meta["title"] = passage.title
        documents.append(Document(content=passage.text, meta=meta))
    return documents


def corpus_digests(passages: list[Passage]) -> dict[str, list[str]]:
    digests: dict[str, list[str]] = {}
    for passage in passages:
        ids = digests.setdefault(text_digest(passage.text), [])
        if passage.id not in ids:
            ids.append(passage.id)
    return digests


def indexing_pipeline(spec: PipelineSpec, store: InMemoryDocumentStore) -> Pipeline:
    """DocumentSplitter -> [SentenceTransformersDocumentEmbedder] -> DocumentWriter."""
    splitter = spec.splitter
    pipeline = Pipeline()
    pipeline.add_component("splitter", DocumentSplitter(
        split_by=_HAYSTACK_SPLIT[splitter.split_by], split_length=splitter.split_length,
        split_overlap=splitter.split_overlap))
    # SKIP: two corpus entries with the same text and meta are one document, not an error.
    pipeline.add_component("writer", DocumentWriter(store, policy=DuplicatePolicy.SKIP))
    if spec.needs_embeddings:
        pipeline.add_component("embedder", document_embedder(spec))
        pipeline.connect("splitter.documents", "embedder.documents")
        pipeline.connect("embedder.documents", "writer.documents")
    else:
        pipeline.connect("splitter.documents", "writer.documents")
    return pipeline


def document_embedder(spec: PipelineSpec) -> object:
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
    )

    # Normalised vectors make the store's dot product a cosine similarity for any embedder.
    return SentenceTransformersDocumentEmbedder(
        model=embedder_path(spec.embedder), normalize_embeddings=True, progress_bar=False,
        meta_fields_to_embed=["title"])


# ---------------------------------------------------------------- on disk


def save_index(handle: DocumentStoreHandle) -> Path:
    """Write the index folder; the new folder replaces the old one only once it is complete."""
    target = index_dir(handle.name)
    tmp = target.with_name(f".{handle.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        handle.document_store.save_to_disk(str(tmp / "store.json"))
        manifest = {"spec": handle.spec.to_dict(), "passage_digests": handle.passage_digests,
                    "n_passages": handle.n_passages, "seconds": handle.seconds}
        (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    handle.path = target
    return target


def load_index(name: str) -> DocumentStoreHandle:
    folder = index_dir(name)
    if not (folder / "manifest.json").is_file() or not (folder / "store.json").is_file():
        raise IndexNotFoundError(f"No index has been built for pipeline '{name}'; build it first.")
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        store = InMemoryDocumentStore.load_from_disk(str(folder / "store.json"))
        spec = PipelineSpec.from_dict(manifest["spec"])
        return DocumentStoreHandle(name, spec, store, manifest["passage_digests"], manifest["n_passages"],
                                   manifest["seconds"], folder)
    except SpecError:
        raise
    except (OSError, ValueError, KeyError, DocumentStoreError) as exc:
        raise SpecError(f"The saved index of '{name}' is damaged ({exc!r}); build it again.") from exc
