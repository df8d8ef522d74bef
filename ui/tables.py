"""Tables more than one tab shows."""
from __future__ import annotations

import pandas as pd

CHUNK_COLUMNS = ["rank", "score", "passage_id", "title", "text"]


def chunks_table(documents) -> pd.DataFrame:
    """Retrieved chunks, best first (the RAG tab's query box and Compare's shared context)."""
    rows = [{"rank": i, "score": round(d.score, 4) if d.score is not None else None,
             "passage_id": d.meta.get("passage_id", ""), "title": d.meta.get("title", ""),
             "text": d.content} for i, d in enumerate(documents, start=1)]
    return pd.DataFrame(rows, columns=CHUNK_COLUMNS)
