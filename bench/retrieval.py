"""Retrieval speed of our Haystack pipelines: indexing throughput (passages/s) and query latency
(p50/p95 of retrieve(), query embedding included) for BM25, embedding and hybrid retrieval.

    .venv/bin/python -m bench.retrieval [--n-synthetic 100000] [--queries 50] [--skip-synthetic]
                                        [--threads N] [--embed-probe 500]

1. Shipped samples (NQ, BioASQ, Qasper corpora; every question of the three). Ratios are against
   BM25 measured in the same run.
2. A synthetic corpus of --n-synthetic passages (100 words each, drawn Zipf-like from the samples'
   vocabulary; seeded). BM25 is indexed in full. Embedding throughput is measured on --embed-probe
   passages; if embedding them all would take longer than --max-embed-minutes, the large store gets
   random unit vectors of the embedder's dimension instead (latency does not depend on the values)
   and the table says so. Embedding latency is compared with a stacked-numpy top-k on the same
   vectors: the floor an in-memory store could reach.

Every figure is given in wall time and in process CPU time. On a machine that other processes
keep busy, wall time is inflated; with --threads 1 the CPU time is close to what an idle core takes.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def latencies(spec: PipelineSpec, handle: DocumentStoreHandle, questions: list[str]) -> tuple[list, list]:
    """Wall and CPU seconds of retrieve() per question, after one warm-up query."""
    retrieve(spec, handle, questions[0])  # builds the pipeline, loads the embedder
    walls, cpus = [], []
    for question in questions:
        _, wall, cpu = timed(lambda: retrieve(spec, handle, question))
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus


def row(part: str, retriever: str, passages: int, rate: tuple[float, float], lat: tuple[list, list],
        note: str = "") -> dict[str, Any]:
    (p50, p95), (cpu50, _) = percentiles(lat[0]), percentiles(lat[1])
    return {"part": part, "retriever": retriever, "passages": passages, "passages_per_s": rate[0],
            "passages_per_cpu_s": rate[1], "p50_ms": p50, "p95_ms": p95, "p50_cpu_ms": cpu50,
            "queries": len(lat[0]), "note": note}


def warm_embedder() -> None:
    """Load the embedder once so no indexing figure includes model loading."""
    spec = PipelineSpec(name="warm", retriever="embedding")
    build_index(spec, [Passage("w", "warm up")], persist=False).release()


def bench_samples() -> list[dict]:
    datasets = [load_preset(name) for name in PRESETS]
    rows = []
    for retriever in RETRIEVERS:
        built, wall, cpu = [], 0.0, 0.0
        for ds in datasets:
            spec = PipelineSpec(name=f"bench-{ds.name}-{retriever}", retriever=retriever)
            handle, w, c = timed(lambda: build_index(spec, ds.corpus, persist=False))
            built.append((spec, handle, [ex.question for ex in ds.examples]))
            wall, cpu = wall + w, cpu + c
        passages = sum(handle.n_passages for _, handle, _ in built)
        walls, cpus = [], []
        for spec, handle, questions in built:
            w, c = latencies(spec, handle, questions)
            walls, cpus = walls + w, cpus + c
            handle.release()
        rows.append(row("samples", retriever, passages, (passages / wall, passages / cpu), (walls, cpus)))
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
    """Eight consecutive words of random passages: every query has a passage that matches it."""
    rng = random.Random(seed)
    out = []
    for passage in rng.sample(corpus, count):
        words = passage.text.split()
        start = rng.randrange(0, len(words) - 8)
        out.append(" ".join(words[start:start + 8]))
    return out


def bench_synthetic(n: int, queries: int, probe: int, max_minutes: float) -> list[dict]:
    corpus = synthetic_corpus(n)
    questions = synthetic_questions(corpus, queries)
    part = f"synthetic {n:,}"

    bm25 = PipelineSpec(name="bench-synthetic-bm25", retriever="bm25")
    handle, wall, cpu = timed(lambda: build_index(bm25, corpus, persist=False, batch_size=1000))
    rows = [row(part, "bm25", n, (n / wall, n / cpu), latencies(bm25, handle, questions))]
    handle.release()

    embedding = PipelineSpec(name="bench-synthetic-embedding", retriever="embedding")
    probe_handle, wall, cpu = timed(lambda: build_index(embedding, corpus[:probe], persist=False))
    rate = (probe / wall, probe / cpu)
    dim = len(probe_handle.document_store.filter_documents()[0].embedding)
    probe_handle.release()
    if n / rate[0] <= max_minutes * 60:
        handle = build_index(embedding, corpus, persist=False, batch_size=1000)
        note = f"all {n:,} embedded"
    else:
        handle = random_vector_handle(embedding, corpus, dim)
        note = (f"random unit vectors (embedding all: ~{n / rate[0] / 60:.0f} min wall, "
                f"~{n / rate[1] / 60:.0f} min CPU); rate from {probe:,} passages")
    rows.append(row(part, "embedding", n, rate, latencies(embedding, handle, questions), note))
    rows.append(row(part, "numpy top-k (floor)", n, (float("nan"),) * 2, numpy_floor(handle, queries, dim),
                    "same vectors, no store, no query embedding"))
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


def numpy_floor(handle: DocumentStoreHandle, queries: int, dim: int) -> tuple[list, list]:
    """Top-3 by one matrix product over pre-stacked float32 vectors."""
    matrix = np.array([d.embedding for d in handle.document_store.filter_documents()], dtype=np.float32)
    rng = np.random.default_rng(3)

    def top3(query: np.ndarray) -> np.ndarray:
        scores = matrix @ query
        top = np.argpartition(-scores, 3)[:3]
        return top[np.argsort(-scores[top])]

    walls, cpus = [], []
    for _ in range(queries):
        query = rng.standard_normal(dim).astype(np.float32)
        _, wall, cpu = timed(lambda: top3(query))
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus


def print_table(rows: list[dict]) -> None:
    header = (f"{'part':<18}{'retriever':<21}{'passages':>9}{'pass/s':>9}{'pass/cpu-s':>11}"
              f"{'p50 ms':>9}{'p95 ms':>9}{'p50 cpu ms':>11}{'p50 vs bm25':>12}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        base = next(b for b in rows if b["part"] == r["part"] and b["retriever"] == "bm25")
        print(f"{r['part']:<18}{r['retriever']:<21}{r['passages']:>9,}{r['passages_per_s']:>9.1f}"
              f"{r['passages_per_cpu_s']:>11.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p50_cpu_ms']:>11.1f}"
              f"{r['p50_ms'] / base['p50_ms']:>11.2f}x  {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-synthetic", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50, help="queries timed on the synthetic corpus")
    parser.add_argument("--embed-probe", type=int, default=500)
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
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
