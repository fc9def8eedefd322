"""The Imagen pages in headless Chromium, on the real stack, after a real batch run against the emulator.

Chromium is Debian's package (``make test`` installs it; Playwright only drives it, no browser is
downloaded). The stack's simple auth manager runs in all-admins mode, so the browser is an
authenticated admin; who may read what is tested on the API (``tests/ui/test_api.py``).
Screenshots go to ``.artifacts/ui/`` (``IMAGEN_UI_ARTIFACTS`` moves them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pandas as pd
import pytest

from tests.system.stack import REPO, Stack

pytestmark = [pytest.mark.system, pytest.mark.ui]

DAG_ID = "imagen_sys_ui"
ROWS = [
    {"prompt_id": "tea-1", "prompt": "A ceramic teapot, morning light", "size": "1:1"},
    {"prompt_id": "tea-2", "prompt": "一只陶瓷茶壶，柔和的晨光，产品摄影", "size": "16:9"},
    {"prompt_id": "pan-1", "prompt": "A copper saucepan on marble", "size": "1:1"},
    {"prompt_id": "bag-1", "prompt": "A designer handbag [[moderate]]", "size": "1:1"},
    {"prompt_id": "bad-1", "prompt": "", "size": "1:1"},
]
EXPECTED = {"completed": 3, "moderated": 1, "invalid": 1}
ARTIFACTS = Path(os.environ.get("IMAGEN_UI_ARTIFACTS", REPO / ".artifacts" / "ui"))


def chromium() -> str:
    """Return Debian's chromium, installing it when missing and allowed; fail loudly otherwise."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail(
            "Debian's chromium is needed for the browser tests: apt-get install chromium (make test does)"
        )
    return found


@pytest.fixture(scope="module")
def ui_run(system_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    stack = system_stack
    stack.emulator.reset()
    folder = tmp_path_factory.mktemp("ui-run")
    prompts = folder / "prompts.parquet"
    pd.DataFrame(ROWS).to_parquet(prompts)
    run_id = stack.trigger(
        DAG_ID, prompts=str(prompts), output_path=str(folder / "out"), journal_path=str(folder / "journal")
    )
    assert stack.wait_run(DAG_ID, run_id, timeout=120) == "success"
    assert stack.xcom_return(DAG_ID, run_id), "the batch task returned nothing"
    quoted = quote(run_id, safe="")
    return {
        "run_id": run_id,
        "gallery": f"{stack.api_url}/dags/{DAG_ID}/runs/{quoted}/plugin/imagen-gallery",
        "task": f"{stack.api_url}/dags/{DAG_ID}/runs/{quoted}/tasks/generate",
        "spend": f"{stack.api_url}/plugin/imagen-spend",
        "spend_data": f"{stack.api_url}/imagen/api/spend?days=30",
        "links": f"{stack.api_url}/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/generate/links",
    }


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    errors: list[str] = []
    tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    failed = request.session.testsfailed
    try:
        yield tab
    finally:
        if request.session.testsfailed > failed or errors:
            # What the browser saw, for the report: the page, and the console's errors.
            tab.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name[:60]}.png"))
            print("browser console errors:", errors)
        context.close()


def plugin_frame(page: Any, name: str) -> Any:
    """Return the iframe Airflow's UI shows the plugin's page in, found afresh at every use (the UI may
    mount it again while it settles, which would strand a frame object held from before)."""
    return page.frame_locator(f"iframe[title='{name}']")


def gallery_frame(page: Any, url: str) -> Any:
    page.goto(url)
    frame = plugin_frame(page, "Imagen gallery")
    frame.locator(".tile").first.wait_for()
    return frame


def test_the_gallery_shows_every_row_with_its_status_and_filters_narrow_it(page: Any, ui_run: dict) -> None:
    frame = gallery_frame(page, ui_run["gallery"])
    assert frame.locator(".tile").count() == len(ROWS)
    chips = Counter(frame.locator(".tile [data-testid=status]").all_inner_texts())
    assert chips == Counter(EXPECTED)
    header = frame.locator("#stats").inner_text()
    assert "138" in header and "$0.138" in header  # 3 completed × 46 credits
    # A thumbnail (not the full PNG) is loaded and decoded.
    image = frame.locator(".tile img").first
    image.scroll_into_view_if_needed()
    # Polled from here: the page's CSP (rightly) refuses the string evaluation wait_for_function uses.
    deadline = time.monotonic() + 20
    while image.evaluate("i => i.complete && i.naturalWidth") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert image.evaluate("i => i.naturalWidth") > 0
    assert "/thumbs/" in image.get_attribute("src")
    # Chinese prompts read as text, not boxes: the page's bundled CJK font loads (this machine has none).
    faces = frame.locator("body").evaluate(
        "b => document.fonts.load('14px \"Imagen CJK\"', '茶').then(found => found.length)"
    )
    assert faces >= 1
    page.screenshot(path=str(ARTIFACTS / "gallery.png"))

    frame.locator("#status-filter").select_option("moderated")
    assert frame.locator(".tile").count() == 1
    assert frame.locator(".tile [data-testid=status]").inner_text() == "moderated"
    frame.locator("#status-filter").select_option("")
    frame.locator("#size-filter").select_option("16:9")
    assert frame.locator(".tile").count() == 1
    assert frame.locator(".tile .prompt").inner_text() == ROWS[1]["prompt"]
    page.screenshot(path=str(ARTIFACTS / "gallery-filtered.png"))


def test_the_batch_tasks_extra_link_leads_to_the_runs_gallery(page: Any, ui_run: dict) -> None:
    links = httpx.get(ui_run["links"], timeout=30).json()  # what the UI's button is drawn from
    assert links["extra_links"] == {"Imagen gallery": ui_run["gallery"]}, links
    page.goto(ui_run["task"] + "/details")
    link = page.get_by_role("link", name="Imagen gallery")
    link.wait_for()
    page.screenshot(path=str(ARTIFACTS / "extra-link.png"))
    assert link.get_attribute("href") == ui_run["gallery"]
    page.goto(link.get_attribute("href"))
    frame = gallery_frame(page, ui_run["gallery"])
    assert frame.locator(".tile").count() == len(ROWS)


def test_the_spend_page_shows_the_runs_credits(page: Any, ui_run: dict) -> None:
    data = httpx.get(ui_run["spend_data"], timeout=60).json()
    assert [d for d in data["dags"] if d["dag_id"] == DAG_ID], data
    page.goto(ui_run["spend"])
    frame = plugin_frame(page, "Imagen spend")
    row = frame.locator(f"#dags-table tr[data-dag={DAG_ID}]")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells == [DAG_ID, "1", "5", "3", "138", "$0.138"]
    assert frame.locator("#chart svg rect.bar").count() >= 1
    assert frame.locator("#days-table tbody tr").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "spend.png"))
