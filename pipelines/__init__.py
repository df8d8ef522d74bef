"""Haystack pipelines for the RAG side: specs, indexing, querying, our components."""
import os

# Haystack sends usage telemetry by default; this app runs offline on people's own data.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
