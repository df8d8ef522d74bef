"""A person's flows in a real headless chromium (Debian's package, driven by playwright)."""
import json
import shutil

import pytest

from core.testhooks import GATE_ENV
from tests.app_server import running_app
from tests.gates import Gate
from tests.test_study import TINY

pytestmark = [pytest.mark.browser, pytest.mark.integration]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def page(tmp_path_factory, gates):
    from playwright.sync_api import sync_playwright
    with running_app(tmp_path_factory.mktemp("browser-data"), env={GATE_ENV: str(gates)}) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.goto(url)
            pg.get_by_role("tab", name="Compare").wait_for(timeout=60_000)
            yield pg
            browser.close()


def test_type_a_question_click_compare_and_see_both_columns_fill(page):
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Question", exact=True).fill(
        "Context: The Eiffel Tower was completed in 1889.\nQuestion: When was it completed?")
    page.get_by_label("System 2").click()
    page.get_by_role("option", name="base", exact=True).click()
    page.get_by_role("button", name="Compare", exact=True).click()
    first = page.get_by_label("1. smollm2-135m-instruct (base) · no RAG")
    second = page.get_by_label("2. smollm2-135m-instruct (base) · no RAG")
    for box in (first, second):
        page.wait_for_function("el => el.value && el.value.length > 0",
                               arg=box.element_handle(timeout=120_000), timeout=120_000)
    page.get_by_text("tokens/s").first.wait_for(timeout=120_000)
    assert "1889" in first.input_value()
    assert first.input_value() == second.input_value(), "same system, same greedy answer"
    assert page.get_by_role("button", name="tie").is_enabled()


def test_load_a_sample_and_see_the_preview(page):
    page.get_by_role("tab", name="Data").click()
    page.get_by_role("button", name="Load dataset").click()
    page.get_by_text("QA examples").wait_for(timeout=60_000)
    assert page.get_by_text("train").first.is_visible()


def test_build_an_index_retrieve_and_see_the_graph(page):
    page.get_by_role("tab", name="RAG").click()
    page.get_by_label("bm25").check()
    page.get_by_role("button", name="Build index").click()
    page.get_by_text("built:").wait_for(timeout=180_000)
    page.get_by_label("Try a query").fill("Which gene is mutated in cystic fibrosis?")
    page.get_by_role("button", name="Retrieve", exact=True).click()
    page.get_by_text("CFTR").first.wait_for(timeout=60_000)
    # The Mermaid graph is rendered in the page (an SVG), not left as text.
    graph = page.wait_for_selector("svg[id^='mermaid']", state="attached", timeout=30_000)
    assert "bm25_retriever" in graph.inner_html()


def test_plan_start_watch_and_cancel_a_study(page, gates):
    """The tiny spec typed into the spec box, planned, started and held (a test gate) before
    its first step: the grid shows its cells queued while the study runs, then cancelled."""
    page.get_by_role("tab", name="Study").click()
    editor = page.locator(".cm-content").filter(has_text='"name"').first
    editor.fill(json.dumps(TINY))
    page.get_by_role("button", name="Plan", exact=True).click()
    page.get_by_text("4 steps (0 already done)").wait_for(timeout=60_000)
    assert page.get_by_role("gridcell", name="to do").count() == 6  # 2 cells x 3 steps
    index = Gate(gates, "study-index").arm()
    page.get_by_role("button", name="Start study", exact=True).click()
    index.wait_reached(timeout=60)
    page.get_by_text("step 1/4: index sample:nq").wait_for(timeout=30_000)
    page.get_by_role("gridcell", name="queued").first.wait_for(timeout=30_000)
    assert page.get_by_role("gridcell", name="queued").count() == 6  # nothing has started yet
    assert page.locator(".vega-embed").count() >= 1  # the figure (empty until a run finishes)
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_text("Cancel requested").wait_for(timeout=30_000)
    index.release()
    page.get_by_text("cancelled").first.wait_for(timeout=60_000)
    page.get_by_role("gridcell", name="not run").first.wait_for(timeout=30_000)
