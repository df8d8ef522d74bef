"""A person's flows in a real headless chromium (Debian's package, driven by playwright).

One app and one page serve the whole module; the tests run in file order and build on each other
(the RAG test's index is the Evaluate and 2x2 tests' pipeline), and the last ones photograph every
tab. Screenshots go to SCREENSHOT_DIR (default: the module's tmp dir); `make screenshots` writes
them to docs/ for the README, with docs/compare-2x2.gif (the 2x2 compare streaming), whose frames
are captured only when SCREENSHOT_DIR is set."""
import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from core.testhooks import GATE_ENV
from scripts import gif
from tests.app_server import REPO, running_app
from tests.gates import Gate
from tests.test_study import TINY

pytestmark = [pytest.mark.browser, pytest.mark.integration]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1280, 800
TABS = ["Data", "Fine-tune", "RAG", "Compare", "Evaluate", "Study", "Jobs"]
BASE = "smollm2-135m-instruct (base)"
GIF = "compare-2x2.gif"
FRAME_MS = 300  # between frames of the streaming answers (pacing only: nothing is asserted on it)
MAX_CAPTURES = 400  # scripts.gif keeps at most gif.MAX_FRAMES of them, evenly spaced
# The page's own copy of every server message (Gradio streams them over fetch): a test reads the
# Vega-Lite spec a gr.Plot received from here, not from pixels.
RECORD_MESSAGES = """
window.__messages = [];
const plainFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await plainFetch(...args);
  const url = String(args[0] && args[0].url ? args[0].url : args[0]);
  if (url.includes("queue/data") && response.body) {
    const reader = response.clone().body.getReader();
    const decoder = new TextDecoder();
    (async () => {
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        window.__messages.push(decoder.decode(value, {stream: true}));
      }
    })();
  }
  return response;
};
"""


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory, gates):
    from playwright.sync_api import sync_playwright
    with running_app(tmp_path_factory.mktemp("browser-data"), env={GATE_ENV: str(gates)}) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            pg.add_init_script(RECORD_MESSAGES)
            pg.goto(url)
            pg.get_by_role("tab", name="Compare").wait_for(timeout=60_000)
            yield pg
            browser.close()


def plots(page) -> list[dict]:
    """Every Altair plot the page received so far, oldest first, as Vega-Lite specs."""
    text = "".join(page.evaluate("window.__messages"))
    found = []
    for line in text.splitlines():
        if line.startswith("data:") and '"altair"' in line:
            found += list(altair_specs(json.loads(line[5:])))
    return found


def altair_specs(node):
    if isinstance(node, dict):
        if node.get("type") == "altair" and isinstance(node.get("plot"), str):
            yield json.loads(node["plot"])
        for value in node.values():
            yield from altair_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from altair_specs(value)


# The grid also keeps hidden copies of its cells for measuring: only a shown one counts.
SHOWN_RECTS = """(root, text) => [...root.querySelectorAll('th, [role=columnheader]')]
  .filter(el => el.innerText.trim() === text)
  .map(el => el.getBoundingClientRect())
  .filter(r => r.width > 0 && r.height > 0)
  .map(r => ({x: r.x, right: r.right}))"""


def shown_within_width(table, header: str) -> bool:
    """Whether `table` shows the column `header` wholly inside the 1280 px viewport."""
    rects = table.evaluate(SHOWN_RECTS, header)
    return bool(rects) and all(0 <= r["x"] and r["right"] <= WIDTH for r in rects)


def inside_viewport(locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH


def test_a_reload_during_a_finetune_shows_its_progress_and_loss_chart(page, gates):
    """The run stands at a gate after its first step, so it is still running after the reload.
    First in the module: a reload clears what the other tests leave on the page for the
    screenshots (a loaded dataset, retrieved chunks, answers)."""
    after_step_1 = Gate(gates, "finetune-step-1").arm()
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Dataset (preset or file path)").click()
    page.get_by_role("option", name="nq", exact=True).click()  # the shortest prompts
    page.get_by_role("button", name="CPU preset").click()  # 32 pairs, one epoch
    page.wait_for_function("el => el.value === '32'", timeout=60_000,
                           arg=page.get_by_label("Training pairs (n_train)").element_handle())
    page.get_by_label("Adapter name (empty: derived from the spec)").fill("browser-tiny")
    page.get_by_role("button", name="Start fine-tuning").click()
    job_box = page.get_by_label("Job", exact=True)
    page.wait_for_function("el => el.value.length > 0", arg=job_box.element_handle(),
                           timeout=60_000)
    job_id = job_box.input_value()
    after_step_1.wait_reached(timeout=900)
    try:
        page.reload()
        page.get_by_role("tab", name="Fine-tune").click()
        page.wait_for_function("([el, id]) => el.value === id",
                               arg=[page.get_by_label("Job", exact=True).element_handle(), job_id],
                               timeout=60_000)
        page.get_by_text(re.compile(r"^running · \d+% · step 1/")).wait_for(timeout=60_000)
        page.wait_for_function(
            "() => window.__messages.join('').includes('loss on answer tokens')", timeout=60_000)
        loss = [p for p in plots(page) if p.get("encoding", {}).get("y", {}).get("title")
                == "loss on answer tokens"][-1]
        points = [row for rows in loss["datasets"].values() for row in rows]
        assert any(p["step"] == 1 and p["curve"] == "train" for p in points), points
    finally:
        page.get_by_role("button", name="Cancel", exact=True).filter(visible=True).click()
        after_step_1.release()
    page.get_by_text("cancelled").filter(visible=True).first.wait_for(timeout=60_000)


def test_type_a_question_click_compare_and_see_both_columns_fill(page):
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Question", exact=True).fill(
        "Context: The Eiffel Tower was completed in 1889.\nQuestion: When was it completed?")
    page.get_by_label("System 2").click()
    page.get_by_role("option", name="base", exact=True).click()
    page.get_by_role("button", name="Compare", exact=True).click()
    first = page.get_by_label(f"1. {BASE} · no RAG")
    second = page.get_by_label(f"2. {BASE} · no RAG")
    for box in (first, second):
        page.wait_for_function("el => el.value && el.value.length > 0",
                               arg=box.element_handle(timeout=120_000), timeout=600_000)
    page.get_by_text("tokens/s").first.wait_for(timeout=600_000)  # 2 shared cores: slow
    assert "1889" in first.input_value()
    assert first.input_value() == second.input_value(), "same system, same greedy answer"
    assert page.get_by_role("button", name="tie").is_enabled()
    # The vote buttons name the systems they vote for, not "1" and "2".
    assert page.get_by_role("button", name="A: base is better").is_enabled()
    assert page.get_by_role("button", name="B: base is better").is_visible()


def test_load_a_sample_and_see_the_preview(page):
    page.get_by_role("tab", name="Data").click()
    assert not page.get_by_label("Hub dataset id").is_visible()  # only for "Any Hub dataset"
    page.get_by_role("button", name="Load dataset").click()
    page.get_by_text("QA examples").wait_for(timeout=60_000)
    for header in ("split", "question", "answer"):
        cell = page.get_by_role("columnheader", name=header, exact=True).filter(visible=True)
        assert inside_viewport(cell), header
    assert page.get_by_text("train").first.is_visible()
    page.get_by_label("Any Hub dataset").check()
    page.get_by_label("Hub dataset id").wait_for()
    page.get_by_label("Shipped sample").check()
    page.get_by_label("Hub dataset id").wait_for(state="hidden")


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
    # The server's answer to the click, as the page received it: the tab's 3 s poll may redraw
    # the status line over the message before a locator sees it, the recorded stream keeps it.
    page.wait_for_function("() => window.__messages.join('').includes('Cancel requested')",
                           timeout=30_000)
    index.release()
    page.get_by_text("cancelled").filter(visible=True).first.wait_for(timeout=60_000)
    page.get_by_role("gridcell", name="not run").first.wait_for(timeout=30_000)



def test_a_study_runs_to_the_end_and_its_cells_figure_and_verdicts_fill(page):
    """One size, one eval item, one metric: the smallest whole study. Started from the tab, it
    runs to the end while the page watches: every cell done, the figure's bars for the four
    setups of its one cell, a verdict row per fine-tuned setup."""
    spec = {**TINY, "name": "tiny-browser", "sizes": [4],
            "evaluation": {**TINY["evaluation"], "n_items": 1, "metrics": ["accuracy"]}}
    page.get_by_role("tab", name="Study").click()
    page.locator(".cm-content").filter(has_text='"name"').first.fill(json.dumps(spec))
    page.get_by_role("button", name="Start study", exact=True).click()
    page.get_by_text("Started study job").wait_for(timeout=60_000)
    page.get_by_text(re.compile(r"^done · 100%")).wait_for(timeout=1_200_000)
    page.get_by_role("gridcell", name="done").first.wait_for(timeout=60_000)
    assert page.get_by_role("gridcell", name="queued").count() == 0
    page.wait_for_function(
        "() => window.__messages.join('').includes('fine-tuned + RAG')", timeout=60_000)
    figure = [p for p in plots(page) if "facet" in p][-1]
    data = [row for rows in figure["datasets"].values() for row in rows]
    assert {row["setup"] for row in data} == {"base", "base + RAG", "fine-tuned",
                                              "fine-tuned + RAG"}
    assert {row["metric"] for row in data} == {"accuracy"}
    assert all(1 <= row["mean"] <= 5 for row in data)
    verdicts = page.get_by_role("gridcell", name=re.compile(r"^fine-tuning on 4 pairs"))
    verdicts.first.wait_for(timeout=60_000)
    texts = [verdicts.nth(i).inner_text() for i in range(verdicts.count())]
    # One verdict per fine-tuned setup (with and without RAG), whatever its direction.
    assert sorted(" with RAG" in t for t in texts) == [False, True], texts
    assert all("accuracy with" in t or "accuracy without" in t for t in texts), texts

def test_evaluate_summary_shows_diff_at_1280_px_and_the_chart_groups_bars(page):
    page.get_by_role("tab", name="Evaluate").click()
    page.get_by_label("Items (empty = all eval items)").fill("2")
    page.get_by_label("Repeats").fill("1")
    page.get_by_label("Max new tokens (answers)").fill("16")
    page.get_by_label("completeness").uncheck()  # one metric keeps the run short
    page.get_by_label("RAG pipeline (for RAG systems)").click()
    page.get_by_role("option", name="bioasq-hybrid", exact=True).click()
    systems = page.get_by_label("Systems (base model or adapter, with or without RAG)")
    for choice in (f"{BASE} · no RAG", f"{BASE} · RAG"):
        systems.click()
        page.get_by_role("option", name=choice, exact=True).click()
    labels = (f"{BASE} · no RAG", f"{BASE} · RAG bioasq-hybrid")  # a run names its pipeline
    assert not page.get_by_label("Samples (sampling)").is_visible()  # logprobs: no samples
    page.get_by_role("button", name="Start evaluation").click()
    page.get_by_text("Started run").wait_for(timeout=60_000)
    # The Study tab (hidden now) shows its own finished job's line.
    page.get_by_text(re.compile(r"^done · 100%")).filter(visible=True).wait_for(timeout=1_200_000)
    summary = page.locator("#eval-summary")
    page.wait_for_function("el => el.innerText.includes('RAG bioasq-hybrid')",
                           arg=summary.element_handle(), timeout=60_000)
    for header in ("diff", "diff 95% CI", "mean", "95% CI"):
        assert shown_within_width(summary, header), header
    # Both systems side by side on the metric's fixed 1-5 axis: never stacked.
    page.wait_for_function("() => window.__messages.join('').includes('hconcat')",
                           timeout=60_000)
    chart = [p for p in plots(page) if "hconcat" in p][-1]
    assert [panel["title"] for panel in chart["hconcat"]] == ["accuracy (1-5)"]
    for panel in chart["hconcat"]:
        bars = next(layer for layer in panel["layer"] if layer["mark"]["type"] == "bar")
        assert bars["encoding"]["x"]["field"] == "system"  # one bar per system, side by side
        assert bars["encoding"]["y"]["stack"] is None
        assert bars["encoding"]["y"]["scale"]["domain"] == [1, 5]
    data = [row for rows in chart["datasets"].values() for row in rows]
    assert {row["system"] for row in data} == set(labels)


# The box (left, top, right, bottom) around the grid's columns that show an answer.
SHOWN_COLUMNS = """el => {
  const rects = [...el.querySelectorAll('.column')]
    .filter(c => [...c.querySelectorAll('textarea')].some(t => t.offsetParent !== null))
    .map(c => c.getBoundingClientRect());
  return [Math.min(...rects.map(r => r.left)), Math.min(...rects.map(r => r.top)),
          Math.max(...rects.map(r => r.right)), Math.max(...rects.map(r => r.bottom))];
}"""


# While the grid is filmed: animations stop, so a frame means a change of content, and what
# follows the grid is not painted, as the grid grows over it when the answers get longer.
FILMING = ("*, *::before, *::after {animation: none !important; transition: none !important} "
           "#compare-answers ~ * {opacity: 0}")  # not hidden: the test still finds the votes


def painted_frames(page, until) -> list[bytes]:
    """The viewport (PNG) as Chromium paints it (its screencast), until `until()` holds: at most
    one frame per FRAME_MS, the newest kept. Screenshots would ask the renderer, starved while
    the model streams on shared cores, for frames of its own (each took 1-17 s at load 6); the
    screencast only passes on what it paints anyway. FILMING applies meanwhile."""
    still = page.add_style_tag(content=FILMING)
    cdp = page.context.new_cdp_session(page)
    frames, kept_at = [], [float("-inf")]

    def keep(event):
        now = time.monotonic()
        if now - kept_at[0] < FRAME_MS / 1000 or len(frames) >= MAX_CAPTURES:
            frames.pop()
        else:
            kept_at[0] = now
        frames.append(base64.b64decode(event["data"]))
        cdp.send("Page.screencastFrameAck", {"sessionId": event["sessionId"]})

    cdp.on("Page.screencastFrame", keep)
    cdp.send("Page.startScreencast", {"format": "png"})
    try:
        while not until():
            page.wait_for_timeout(FRAME_MS)
    finally:
        cdp.send("Page.stopScreencast")
        cdp.detach()
        still.evaluate("el => el.remove()")
    return frames


def test_the_2x2_preset_answers_four_systems_in_one_go(page, shots, tmp_path):
    """Base and a LoRA adapter (random weights, so it answers differently), each without and with
    the RAG test's index, answer one question. With SCREENSHOT_DIR set, the answer grid is
    photographed while it streams: the README's docs/compare-2x2.gif."""
    from tests.servers import make_lora_adapters
    folder = make_lora_adapters(tmp_path, ["browser-lora"])["browser-lora"]
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Load an adapter: folder or Hub id").fill(str(folder))
    page.get_by_role("button", name="Load adapter", exact=True).click()
    page.get_by_text("Loaded adapter browser-lora").wait_for(timeout=120_000)

    page.get_by_role("tab", name="Compare").click()
    tie = page.get_by_role("button", name="tie", exact=True)
    page.get_by_role("button", name="Clear", exact=True).click()  # the last test's answers
    page.wait_for_function("el => el.disabled", arg=tie.element_handle(), timeout=60_000)
    page.get_by_label("Question", exact=True).fill("Which gene is mutated in cystic fibrosis?")
    page.get_by_label("RAG pipeline (built index)").click()
    page.get_by_role("option", name="bioasq-hybrid", exact=True).click()
    page.get_by_role("button", name=re.compile(r"^2×2 preset")).click()
    page.wait_for_function("el => el.value === 'browser-lora'", timeout=60_000,
                           arg=page.get_by_label("System 3", exact=True).filter(visible=True)
                           .element_handle())
    page.get_by_text("Decoding (shared by every system)").click()
    page.get_by_label("number input for Max new tokens").fill("48")  # short: 2 shared cores
    page.get_by_role("button", name="Compare", exact=True).click()
    labels = [f"1. {BASE} · no RAG", f"2. {BASE} · RAG bioasq-hybrid",
              "3. browser-lora · no RAG", "4. browser-lora · RAG bioasq-hybrid"]
    page.get_by_label(labels[3], exact=True).wait_for(timeout=120_000)  # retrieved: all shown
    grid = page.locator("#compare-answers")
    photograph = bool(os.environ.get("SCREENSHOT_DIR"))  # off in CI: no frames, no cost
    frames = []
    if photograph:
        grid.evaluate("el => el.scrollIntoView({block: 'start'})")
        frames = painted_frames(page, until=tie.is_enabled)
    page.wait_for_function("el => !el.disabled", arg=tie.element_handle(), timeout=900_000)
    if photograph:  # the last frame once the event ended (its outputs' orange borders gone)
        page.wait_for_function("el => !el.querySelector('.generating')",
                               arg=grid.element_handle(), timeout=60_000)
        box = grid.evaluate(SHOWN_COLUMNS)
        frames.append(page.screenshot())
        question = page.locator("#compare-question")
        question.evaluate("el => el.scrollIntoView({block: 'start'})")
        gif.assemble(frames, shots / GIF, header=page.screenshot(clip=question.bounding_box()),
                     box=box)

    answers = [page.get_by_label(label, exact=True).input_value() for label in labels]
    assert all(answer.strip() for answer in answers), answers
    assert answers[2] != answers[0] and answers[3] != answers[1], answers  # the adapter counts
    # One statistics line per system, each within the 48 new tokens asked for.
    tokens = [int(n) for n in re.findall(r"(\d+) tokens · [\d.]+ tokens/s", grid.inner_text())]
    assert len(tokens) == 4 and all(0 < n <= 48 for n in tokens), grid.inner_text()
    page.get_by_text("CFTR").filter(visible=True).first.wait_for()  # the chunks, retrieved once
    assert page.get_by_role("button", name="A: base is better").is_enabled()
    assert page.get_by_role("button", name="B: base + RAG is better").is_enabled()


def shot_name(tab: str) -> str:
    return f"tab-{tab.lower()}.png"


def test_the_gallery_is_every_tab_the_app_has_and_the_readme_shows_it(page):
    """The screenshots below cover exactly the app's tabs, and the README shows each of them
    (and the 2x2 GIF), so a tab added or renamed cannot leave the pictures stale."""
    shown = page.get_by_role("tab").filter(visible=True).all_inner_texts()
    assert [name.strip() for name in shown] == TABS
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    expected = {shot_name(tab) for tab in TABS}
    assert set(re.findall(r"\(docs/(tab-[\w-]+\.png)\)", readme)) == expected
    assert {p.name for p in (REPO / "docs").glob("tab-*.png")} == expected
    assert f"(docs/{GIF})" in readme and (REPO / "docs" / GIF).is_file()


@pytest.mark.parametrize("tab", TABS)
def test_screenshot_of_every_tab(page, shots, tab):
    """Each tab at 1280x800, scrolled to what it is about, as a PNG a reviewer can open."""
    page.get_by_role("tab", name=tab).click()
    page.wait_for_timeout(500)  # let the tab's on-show refresh paint (no assertion rests on it)
    focus = {"Fine-tune": page.get_by_label("Job", exact=True),
             "RAG": page.get_by_label("Try a query"),
             "Evaluate": page.get_by_label("Run", exact=True)}.get(tab)
    if focus is not None:
        focus.evaluate("el => el.scrollIntoView({block: 'start'})")
    path = shots / shot_name(tab)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
