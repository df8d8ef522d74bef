"""Next-token scoring: how likely the model is to start each candidate (a G-Eval score digit) at
the end of a prompt, read from one forward pass instead of sampled.

Some tokenizers (SmolLM2's) write " 3" as a bare space token then "3". For them a space token is
appended to the input, and the forward pass reads both slots:
P(c) = P("3" or " 3" now) + P(" " now) * P("3" after the space).
ModelHub.score_tokens runs the forward pass; this module builds its input and reads its logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenScores:
    """Next-token probability of each candidate (its first token, with/without a leading space)."""

    probs: dict[str, float]
    mass: float  # total probability the candidates got; low means the model wanted another token

    def normalized(self) -> dict[str, float]:
        if self.mass <= 0:
            raise ValueError("None of the allowed tokens got any probability; cannot normalize.")
        return {c: p / self.mass for c, p in self.probs.items()}


@dataclass
class _CandidatePaths:
    direct: list[int]  # next token ids that start the candidate ("3", or " 3" as one token)
    space_id: int | None = None  # a bare space token that can come first
    after_space: list[int] = field(default_factory=list)  # ids starting the candidate after it


def _candidate_paths(tokenizer: Any, candidate: str) -> _CandidatePaths:
    def starts(token_id: int) -> bool:
        piece = tokenizer.decode([token_id]).strip()
        return bool(piece) and candidate.strip().startswith(piece)

    bare = tokenizer.encode(candidate, add_special_tokens=False)
    spaced = tokenizer.encode(" " + candidate, add_special_tokens=False)
    paths = _CandidatePaths(sorted({t[0] for t in (bare, spaced) if t and starts(t[0])}))
    if len(spaced) > 1 and not tokenizer.decode(spaced[:1]).strip() and starts(spaced[1]):
        paths.space_id, paths.after_space = spaced[0], [spaced[1]]
    if not paths.direct and paths.space_id is None:
        raise ValueError(f"Candidate '{candidate}' has no token of its own in this tokenizer.")
    return paths


class NextTokenQuery:
    """The input ids for one forward pass over `text`, and how to read each candidate's
    probability from the logits of its last two positions."""

    def __init__(self, tokenizer: Any, text: str, candidates: list[str]) -> None:
        self._paths = {c: _candidate_paths(tokenizer, c) for c in candidates}
        self._space = next((p.space_id for p in self._paths.values() if p.space_id is not None), None)
        self.input_ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"] + (
            [self._space] if self._space is not None else [])

    def scores(self, last_logits: torch.Tensor) -> TokenScores:
        """`last_logits`: (2, vocab), the logits of the last two input positions."""
        now = torch.softmax(last_logits[-2 if self._space is not None else -1].double(), dim=-1)
        after_space = torch.softmax(last_logits[-1].double(), dim=-1)
        probs = {}
        for candidate, path in self._paths.items():
            p = now[path.direct].sum()
            if path.space_id is not None and path.space_id == self._space:
                p = p + now[path.space_id] * after_space[path.after_space].sum()
            probs[candidate] = float(p)
        return TokenScores(probs, sum(probs.values()))
