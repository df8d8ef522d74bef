"""Retrieval speed of our Haystack pipelines: indexing throughput (passages/s) and query latency
(p50/p95 of retrieve(), query embedding included) for BM25, embedding and hybrid retrieval.

    .venv/bin/python -m bench.retrieval [--n-synthetic 100000] [--queries 50] [--skip-synthetic]
                                        [--threads N]

1. Shipped samples (NQ, BioASQ, Qasper corpora; every question of the three). Ratios are against
   BM25 measured in the same run.
2. A synthetic corpus of --n-synthetic passages (100 words each, drawn Zipf-like from the samples'
   vocabulary; seeded). BM25 is indexed in full. Embedding throughput is measured on --embed-probe
   passages; if embedding them all would take longer than --max-embed-minutes, the large store gets
   random unit vectors of the embedder's dimension instead (latency does not depend on the values)
   and the table says so. Embedding latency is compared with a stacked-numpy top-k on the same
   vectors: the floor an in-memory store could reach.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from haystack import Document
from haystack.document_stores.in_memory import InMemoryDocumentStore

from core.datasets import load_preset
from core.schema import Passage
from pipelines.indexing import DocumentStoreHandle, build_index, corpus_digests
from pipelines.query import retrieve
from pipelines.spec import PipelineSpec

PRESETS = ("nq", "bioasq", "qasper")
RETRIEVERS = ("bm25", "embedding", "hybrid")
WORDS_PER_PASSAGE = 100


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def latencies(spec: PipelineSpec, handle: DocumentStoreHandle, questions: list[str]) -> list[float]:
    retrieve(spec, handle, questions[0])  # warm: builds the pipeline, loads the embedder
    out = []
    for question in questions:
        start = time.perf_counter()
        retrieve(spec, handle, question)
        out.append(time.perf_counter() - start)
    return out


def warm_embedder() -> None:
    """Load the embedder once so no indexing figure includes model loading."""
    spec = PipelineSpec(name="warm", retriever="embedding")
    build_index(spec, [Passage("w", "warm up")], persist=False).release()


def bench_samples() -> list[dict]:
    datasets = [load_preset(name) for name in PRESETS]
    rows = []
    for retriever in RETRIEVERS:
        handles, seconds = [], 0.0
        for ds in datasets:
            spec = PipelineSpec(name=f"bench-{ds.name}-{retriever}", retriever=retriever)
            start = time.perf_counter()
            handles.append((spec, build_index(spec, ds.corpus, persist=False)))
            seconds += time.perf_counter() - start
        passages = sum(h.n_passages for _, h in handles)
        lat = [t for (spec, h), ds in zip(handles, datasets)
               for t in latencies(spec, h, [ex.question for ex in ds.examples])]
        p50, p95 = percentiles(lat)
        rows.append({"part": "samples", "retriever": retriever, "passages": passages,
                     "passages_per_s": passages / seconds, "p50_ms": p50, "p95_ms": p95,
                     "queries": len(lat), "note": ""})
        for _, h in handles:
            h.release()
    return rows


def synthetic_corpus(n: int, seed: int = 0) -> list[Passage]:
    vocabulary = sorted({w.lower().strip(".,;:()\"'") for ds in (load_preset(p) for p in PRESETS)
                         for passage in ds.corpus for w in passage.text.split()} - {""})
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)  # Zipf-like, like real text
    weights /= weights.sum()
    words = np.array(vocabulary)[rng.choice(len(vocabulary), size=(n, WORDS_PER_PASSAGE), p=weights)]
    return [Passage(f"s{i}", " ".join(row)) for i, row in enumerate(words)]


def synthetic_questions(corpus: list[Passage], count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for passage in rng.sample(corpus, count):
        words = passage.text.split()
        start = rng.randrange(0, len(words) - 8)
        out.append(" ".join(words[start:start + 8]))
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_synthetic(n: int, queries: int, probe: int, max_minutes: float) -> list[dict]:
    corpus = synthetic_corpus(n)
    questions = synthetic_questions(corpus, queries)
    rows = []

    bm25 = PipelineSpec(name="bench-synthetic-bm25", retriever="bm25")
    handle, seconds = timed(lambda: build_index(bm25, corpus, persist=False, batch_size=1000))
    p50, p95 = percentiles(latencies(bm25, handle, questions))
    rows.append({"part": f"synthetic {n:,}", "retriever": "bm25", "passages": n, "passages_per_s": n / seconds,
                 "p50_ms": p50, "p95_ms": p95, "queries": queries, "note": ""})
    handle.release()

    embedding = PipelineSpec(name="bench-synthetic-embedding", retriever="embedding")
    probe_handle, probe_s = timed(lambda: build_index(embedding, corpus[:probe], persist=False))
    rate = probe / probe_s
    dim = len(probe_handle.document_store.filter_documents()[0].embedding)
    probe_handle.release()
    if n / rate <= max_minutes * 60:
        handle, seconds = timed(lambda: build_index(embedding, corpus, persist=False, batch_size=1000))
        note = f"all {n:,} embedded"
    else:
        handle = random_vector_handle(embedding, corpus, dim)
        note = (f"random unit vectors: embedding all would take ~{n / rate / 60:.0f} min; "
                f"rate from {probe:,} passages")
    p50, p95 = percentiles(latencies(embedding, handle, questions))
    rows.append({"part": f"synthetic {n:,}", "retriever": "embedding", "passages": n, "passages_per_s": rate,
                 "p50_ms": p50, "p95_ms": p95, "queries": queries, "note": note})
    rows.append(numpy_floor(handle, queries, n, dim))
    handle.release()
    return rows


def random_vector_handle(spec: PipelineSpec, corpus: list[Passage], dim: int) -> DocumentStoreHandle:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((len(corpus), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = InMemoryDocumentStore(index="bench-synthetic-random", embedding_similarity_function="dot_product")
    store.write_documents([Document(content=p.text, meta={"passage_id": p.id}, embedding=v.tolist())
                           for p, v in zip(corpus, vectors)])
    return DocumentStoreHandle(spec.name, spec, store, corpus_digests(corpus), len(corpus))


def numpy_floor(handle: DocumentStoreHandle, queries: int, n: int, dim: int) -> dict:
    """Top-k by one matrix product over pre-stacked float32 vectors (no store, no query embedding)."""
    matrix = np.array([d.embedding for d in handle.document_store.filter_documents()], dtype=np.float32)
    rng = np.random.default_rng(3)
    out = []
    for _ in range(queries):
        query = rng.standard_normal(dim).astype(np.float32)
        start = time.perf_counter()
        scores = matrix @ query
        top = np.argpartition(-scores, 3)[:3]
        top = top[np.argsort(-scores[top])]
        out.append(time.perf_counter() - start)
    p50, p95 = percentiles(out)
    return {"part": f"synthetic {n:,}", "retriever": "numpy top-k (floor)", "passages": n,
            "passages_per_s": float("nan"), "p50_ms": p50, "p95_ms": p95, "queries": queries,
            "note": "same vectors, no store overhead"}


def print_table(rows: list[dict]) -> None:
    header = f"{'part':<18}{'retriever':<22}{'passages':>9}{'pass/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'vs bm25 p50':>13}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r["part"] == row["part"] and r["retriever"] == "bm25")
        ratio = row["p50_ms"] / base["p50_ms"]
        print(f"{row['part']:<18}{row['retriever']:<22}{row['passages']:>9,}{row['passages_per_s']:>10.1f}"
              f"{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}{ratio:>12.2f}x  {row['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-synthetic", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50, help="queries timed on the synthetic corpus")
    parser.add_argument("--embed-probe", type=int, default=2_000)
    parser.add_argument("--max-embed-minutes", type=float, default=10.0)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 avoids oversubscription when other processes share the CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warm_embedder()
    rows = bench_samples()
    if not args.skip_synthetic:
        rows += bench_synthetic(args.n_synthetic, args.queries, args.embed_probe, args.max_embed_minutes)
    print_table(rows)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:,.0f} MiB; torch threads {torch.get_num_threads()}")
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_mib}, default=float))


if __name__ == "__main__":
    main()
