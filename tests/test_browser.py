"""One real browser: Debian chromium driven by playwright, against the app on a free localhost port."""
import shutil
from pathlib import Path

import pytest

from appserver import ROOT, running_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


def pick(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it)")
def test_generate_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The default model (builtin:shapes) and its pre-filled prompt: what `make run` shows.
    with running_app("--outputs-dir", str(tmp_path)) as (url, _proc):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                prompt = page.get_by_label("Prompt", exact=True).first
                assert prompt.input_value() == "a red circle on a blue background"
                page.get_by_role("button", name="Generate").first.click()
                page.wait_for_selector("#readout table", timeout=120_000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#readout')].some(e => e.innerText.includes('Peak RAM'))",
                    timeout=120_000)
                text = page.locator("#readout").first.inner_text()
                assert " s" in text and "GiB" in text and "Total" in text
                assert page.locator("img").count() >= 1
                page.screenshot(path=str(ARTIFACTS / "browser-txt2img.png"), full_page=True)
                # The LoRA picker: choose the shipped LCM-LoRA, add it to the prompt, generate with it.
                page.get_by_label("LoRA", exact=True).first.click()
                page.get_by_role("option", name="lcm-shapes").first.click()
                page.get_by_role("button", name="Add to prompt").first.click()
                page.wait_for_function("() => document.querySelector('textarea').value.includes('<lora:lcm-shapes:1>')",
                                       timeout=30_000)
                page.get_by_role("button", name="Generate").first.click()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#readout')].some(e => e.innerText.includes('lcm-shapes x1'))",
                    timeout=120_000)
                page.screenshot(path=str(ARTIFACTS / "browser-lora.png"), full_page=True)
                page.get_by_role("tab", name="Optimizations").click()
                page.wait_for_selector("#opt-deepcache_interval", timeout=30_000)
                assert "Unavailable:" in page.inner_text("body")  # greyed boxes say why
                page.screenshot(path=str(ARTIFACTS / "browser-optimizations.png"), full_page=True)
                # Compare: the value fields follow the axis; four step counts make a four-column grid.
                page.get_by_role("tab", name="Compare").click()
                pick(page, "Compare by", "sampler")
                page.wait_for_function("() => document.querySelector('#compare-value-1 input').value === 'Euler'",
                                       timeout=30_000)
                pick(page, "Compare by", "steps")
                page.wait_for_function("() => document.querySelector('#compare-value-4 input').value === '30'",
                                       timeout=30_000)
                page.get_by_role("button", name="Compare", exact=True).click()
                page.wait_for_selector("#compare-table table", timeout=300_000)
                table = page.locator("#compare-table").inner_text()
                for label in ("steps: 5", "steps: 10", "steps: 20", "steps: 30", "reference", "dB", "GiB"):
                    assert label in table, label
                page.wait_for_function("() => document.querySelector('#compare-grid img')?.complete", timeout=30_000)
                page.screenshot(path=str(ARTIFACTS / "browser-compare.png"), full_page=True)
            finally:
                browser.close()
    assert (ARTIFACTS / "browser-txt2img.png").stat().st_size > 10_000
    assert list(tmp_path.rglob("*.png")), "the generated image was saved"
