"""The side-by-side comparison on the real 135M model, a real Haystack index, real adapters and a
real OpenAI-compatible server."""
from __future__ import annotations

import pytest

from core.datasets import load_preset
from core.generation import GenParams
from core.model_files import SMOLLM2
from core.models import get_hub
from core.schema import InputError
from core.systems import BASE, System
from pipelines.compare import closed_book_messages, compare
from pipelines.indexing import build_index
from pipelines.query import build_prompt
from pipelines.spec import PipelineSpec
from tests.app_server import free_port
from tests.servers import make_lora_adapters, served_model

pytestmark = pytest.mark.integration
PARAMS = GenParams(max_new_tokens=12)
QUESTION = "who wrote the novel frankenstein"


@pytest.fixture(scope="module")
def nq_index():
    spec = PipelineSpec(name="cmp-nq", retriever="bm25", top_k=2)
    return spec, build_index(spec, load_preset("nq").corpus, persist=False)


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    folders = make_lora_adapters(tmp_path_factory.mktemp("cmp-adapters"), ["cmp1", "cmp2"])
    return {name: str(path) for name, path in folders.items()}


def final(states):
    *_, last = states
    return last


def test_two_by_two_answers_each_system_with_its_own_adapter(nq_index, adapter_paths):
    spec, index = nq_index
    systems = [System(adapter=BASE), System(adapter=BASE, rag=True),
               System(adapter="cmp1"), System(adapter="cmp1", rag=True)]
    state = final(compare(QUESTION, systems, PARAMS, spec, index, adapter_paths=adapter_paths))
    assert all(c.error is None and c.done for c in state.columns), [c.error for c in state.columns]
    # Retrieval ran once; its chunks are in the RAG prompt every RAG system got.
    assert state.documents and "Frankenstein" in state.documents[0].content
    assert state.rag_messages == build_prompt(spec, QUESTION, state.documents)
    assert state.plain_messages == closed_book_messages(QUESTION)
    # Every column is its system's greedy answer alone; adapter columns differ from base ones.
    alone = [get_hub().generate(SMOLLM2, [state.rag_messages if s.rag else state.plain_messages],
                                [s.adapter], PARAMS)[0].text for s in systems]
    assert [c.text for c in state.columns] == alone
    base_plain, base_rag, ad_plain, ad_rag = alone
    assert ad_plain != base_plain and ad_rag != base_rag
    assert all(c.new_tokens and c.seconds > 0 and c.first_token_seconds <= c.seconds
               for c in state.columns)
    # The short closed-book prompts were prefilled first: their first tokens came before the
    # RAG prompts were read (the batch is prefilled group by group, shortest first).
    closed, rag = state.columns[0::2], state.columns[1::2]
    assert max(c.first_token_seconds for c in closed) < min(c.first_token_seconds for c in rag)


def test_streaming_yields_growing_text_before_the_end(adapter_paths):
    states = []
    for state in compare(QUESTION, [System(), System(adapter="cmp2")], GenParams(max_new_tokens=24),
                         adapter_paths=adapter_paths, poll_seconds=0.02):
        states.append([c.text for c in state.columns])
    assert len(states) > 3
    assert states[-1][0] and len({tuple(s) for s in states}) > 2


def test_bad_columns_fail_alone(adapter_paths):
    systems = [System(), System(adapter="nobody"),
               System("openai", "some-model", base_url=f"http://127.0.0.1:{free_port()}/v1")]
    state = final(compare(QUESTION, systems, PARAMS, adapter_paths=adapter_paths))
    ok, unknown, remote = state.columns
    assert ok.error is None and ok.text
    assert "Unknown adapter 'nobody'" in unknown.error
    assert "127.0.0.1" in remote.error


@pytest.mark.parametrize("systems, message", [
    ([], "at least one system"),
    ([System()] * 7, "At most 6"),
    ([System(rag=True)], "no pipeline"),
])
def test_bad_requests_are_refused_before_generating(systems, message):
    with pytest.raises(InputError, match=message):
        next(compare(QUESTION, systems, PARAMS))


def test_openai_compatible_column_answers_beside_local_ones():
    with served_model() as (url, name):
        systems = [System(), System("openai", name, base_url=url)]
        state = final(compare("Name a colour.", systems, PARAMS))
    local, remote = state.columns
    assert local.error is None and remote.error is None, (local.error, remote.error)
    assert local.text and remote.text
