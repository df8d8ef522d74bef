"""A person's flows in a real headless chromium (Debian's package, driven by playwright)."""
import shutil

import pytest

from tests.app_server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.integration]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with running_app(tmp_path_factory.mktemp("browser-data")) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.goto(url)
            pg.get_by_role("tab", name="Compare").wait_for(timeout=60_000)
            yield pg
            browser.close()


def test_type_a_question_click_compare_and_see_the_answer(page):
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Question").fill(
        "Context: The Eiffel Tower was completed in 1889.\nQuestion: When was it completed?")
    page.get_by_role("button", name="Compare").click()
    answer = page.get_by_label("Answer")
    page.wait_for_function(
        "el => el.value && el.value.length > 0", arg=answer.element_handle(), timeout=120_000)
    page.get_by_text("tokens/s").wait_for(timeout=120_000)
    assert "1889" in answer.input_value()


def test_load_a_sample_and_see_the_preview(page):
    page.get_by_role("tab", name="Data").click()
    page.get_by_role("button", name="Load dataset").click()
    page.get_by_text("QA examples").wait_for(timeout=60_000)
    assert page.get_by_text("train").first.is_visible()
