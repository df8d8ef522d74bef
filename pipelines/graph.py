"""A Haystack pipeline as Mermaid text, rendered in the page (no online renderer)."""
from __future__ import annotations

from haystack import Pipeline


def pipeline_mermaid(pipeline: Pipeline) -> str:
    lines = ["flowchart LR"]
    for name, instance in pipeline.walk():
        lines.append(f'    {_node(name)}["{name}<br/><small>{type(instance).__name__}</small>"]')
    for sender, receiver, data in pipeline.graph.edges(data=True):
        label = f"{data['from_socket'].name} → {data['to_socket'].name}"
        lines.append(f'    {_node(sender)} -->|"{label}"| {_node(receiver)}')
    return "\n".join(lines)


def _node(name: str) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in name)
