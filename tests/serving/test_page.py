"""The upload page in a real headless Chromium: upload a CT, see the nodule table.

Needs Debian's ``chromium`` at /usr/bin/chromium and the ``playwright`` package (its own
browser download is not used); skips saying which is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk

from tests.serving.conftest import analysis_models, synthetic_ct_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.mark.slow
def test_uploading_an_mhd_raw_pair_shows_the_nodule_table_with_pictures(
    browser_page: Any, tmp_path: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(analysis_models(tmp_path / "models")))
    header = tmp_path / "phantom.mhd"
    sitk.WriteImage(synthetic_ct_image(), str(header))
    page = browser_page
    page.goto(base)
    page.wait_for_selector("#service:has-text('Server ready')", timeout=10_000)
    assert page.title() == "lungcad: nodules in a chest CT"

    page.set_input_files("#ct", [str(header), str(tmp_path / "phantom.raw")])
    page.click("#analyze")
    page.wait_for_selector("#nodules tbody tr", timeout=30_000)

    rows = page.locator("#nodules tbody tr")
    assert rows.count() == 2
    assert page.inner_text("#status") == "Done: 2 nodule(s)."
    first = rows.nth(0).locator("td")
    assert float(first.nth(2).inner_text()) > 0.99  # p(nodule) of the confident classifier
    assert first.nth(3).inner_text() == "–"  # no malignancy model
    widths = page.eval_on_selector_all("#nodules img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [64, 64]
    assert "phantom" in page.inner_text("#summary")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


@pytest.mark.slow
def test_a_refused_upload_shows_the_servers_reason(
    browser_page: Any, tmp_path: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    base = serve(make_app(analysis_models(tmp_path / "models")))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a CT")
    page = browser_page
    page.goto(base)
    page.set_input_files("#ct", str(notes))
    page.click("#analyze")
    page.wait_for_selector("#status.error", timeout=10_000)
    assert "400: notes.txt: unrecognised CT format" in page.inner_text("#status")
    assert page.is_hidden("#result")
