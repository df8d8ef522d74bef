"""The README's gradio_client examples, one per tab, run exactly as written (only the URL is the
test app's) against one real app, in README order and in one namespace, as a reader would run
them: load a sample, train a tiny adapter, build an index, compare, evaluate, list the jobs."""
import contextlib
import io
import re

import pytest

from tests.app_server import REPO, running_app

pytestmark = pytest.mark.integration
README_URL = 'Client("http://127.0.0.1:7860/")'
TABS = ["setup", "data", "finetune", "rag", "compare", "evaluate", "jobs"]


def readme_examples() -> dict[str, str]:
    """The code block after each `<!-- api-example: NAME -->` marker of README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- api-example: (\w+) -->\n```python\n(.*?)\n```", text, re.S))


def test_every_tab_has_an_example_in_order():
    assert list(readme_examples()) == TABS


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    """The namespace the examples share, after the setup block ran against a fresh app."""
    with running_app(tmp_path_factory.mktemp("examples-data")) as url:
        setup = readme_examples()["setup"]
        assert README_URL in setup
        namespace: dict = {}
        exec(setup.replace(README_URL, f'Client("{url}", verbose=False)'), namespace)
        yield namespace


def run(ns: dict, name: str) -> str:
    """Run one README block in the shared namespace; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_examples()[name], f"README.md:{name}", "exec"), ns)
    return printed.getvalue()


def test_data_example_loads_the_sample(ns):
    run(ns, "data")
    assert "QA examples" in ns["summary"] and len(ns["preview"]["data"]) == 20


def test_finetune_example_trains_the_adapter(ns):
    run(ns, "finetune")
    assert ns["status"].startswith("**done**"), ns["status"]
    assert ns["details"]["metrics"]["steps"] == 2


def test_rag_example_builds_and_retrieves(ns):
    run(ns, "rag")
    assert "**nq-bm25** built" in ns["build_status"], ns["build_status"]
    chunks = ns["chunks"]  # NQ passages have no title: that column is dropped
    assert "Frankenstein" in chunks["data"][0][chunks["headers"].index("text")]


def test_compare_example_answers_four_systems_and_votes(ns):
    printed = run(ns, "compare")
    labels = [c["label"] for c in ns["columns"][:4]]
    assert labels == ["1. smollm2-135m-instruct (base) · no RAG",
                      "2. smollm2-135m-instruct (base) · RAG nq-bm25", "3. nq-tiny · no RAG",
                      "4. nq-tiny · RAG nq-bm25"], labels
    assert all(c["value"].strip() for c in ns["columns"][:4])
    assert not ns["columns"][4]["visible"]
    assert "Vote recorded (A better: A = 2. base + RAG, B = 4. nq-tiny + RAG)" in printed


def test_evaluate_example_judges_both_systems(ns):
    run(ns, "evaluate")
    assert ns["run_status"].startswith("**done**"), ns["run_status"]
    systems = {dict(zip(ns["summary"]["headers"], r))["system"] for r in ns["summary"]["data"]}
    assert systems == {"smollm2-135m-instruct (base) · no RAG", "nq-tiny · no RAG"}
    assert len(ns["table"]["data"]) == 2


def test_jobs_example_lists_every_kind_of_job(ns):
    printed = run(ns, "jobs")
    assert {"finetune", "index", "evaluate"} <= {r["kind"] for r in ns["rows"]}
    assert ns["rows"][0]["kind"] == "evaluate"  # newest first
    assert "step 2/2 · loss" in printed  # the fine-tune's log
