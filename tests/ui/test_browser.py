"""One real browser: Debian chromium driven by playwright, against the app on a free localhost port."""
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from appserver import ROOT, running_app
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


def wait_for_file(folder, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in folder.rglob("*.png"):
            try:  # a save in progress: its temp file may go between the listing and the open
                with Image.open(path) as im:
                    if text in (im.info.get("parameters") or ""):
                        return
            except FileNotFoundError:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no saved PNG mentions {text!r}")


def waiting_job(page, url: str, screenshot: Path) -> None:
    """An API job of many batches holds the device; the page's Generate waits, shows its place, then runs once
    the API job is interrupted."""
    body = json.dumps({"prompt": "a red circle", "steps": 150, "n_iter": 16, "width": 128, "height": 128}).encode()

    def post(path, data):
        request = urllib.request.Request(url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.read()

    long_job = threading.Thread(target=post, args=("sdapi/v1/txt2img", body))
    long_job.start()
    try:
        deadline = time.monotonic() + 60
        while json.loads(urllib.request.urlopen(url + "sdapi/v1/progress", timeout=10).read())["state"]["job"] == "":
            assert time.monotonic() < deadline, "the API job did not start"
            time.sleep(0.2)
        page.get_by_role("button", name="Generate").first.click()
        page.wait_for_function("() => [...document.querySelectorAll('#readout')].some("
                               "e => e.innerText.includes('Waiting for the device: 1st in line'))", timeout=60_000)
        text = page.locator("#readout").first.inner_text()
        assert "ahead: txt2img" in text and (" s before it starts" in text or "no estimate yet" in text)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        post("sdapi/v1/interrupt", b"{}")
        long_job.join(120)


def pick(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it)")
def test_generate_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The default model (builtin:shapes) and its pre-filled prompt: what `make run` shows.
    models = tmp_path / "models"  # what the Engine tab's pickers list (listed only: never loaded here)
    for name in ("sd15-finetune.safetensors", "vae/vae-ft-mse.safetensors"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).write_bytes(b"")
    with running_app("--outputs-dir", str(tmp_path / "out"), "--models-dir", str(models)) as (url, _proc):
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
                # Styles: pick one, generate; the saved PNG carries the expanded prompt and the style's name.
                page.get_by_label("Prompt", exact=True).first.fill("a red circle on a blue background")
                page.get_by_label("Styles", exact=True).first.click()
                page.get_by_role("option", name="Flat shapes").first.click()
                page.keyboard.press("Escape")
                page.get_by_role("button", name="Generate").first.click()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#readout')].some(e => e.innerText.includes('Peak RAM'))",
                    timeout=120_000)
                wait_for_file(tmp_path / "out", "Flat shapes")
                page.screenshot(path=str(ARTIFACTS / "browser-styles.png"), full_page=True)
                # A second job while another runs: it says where it stands and about how long.
                waiting_job(page, url, ARTIFACTS / "browser-waiting.png")
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#readout')].some(e => e.innerText.includes('Peak RAM'))",
                    timeout=120_000)
                # The Engine tab's pickers: the folder's models, VAEs and tiny autoencoders.
                page.get_by_role("tab", name="Engine").click()
                page.wait_for_selector("#model-picker", timeout=30_000)
                page.get_by_label("Model", exact=True).first.click()
                page.get_by_role("option", name="sd15-finetune.safetensors", exact=True).first.wait_for(timeout=30_000)
                page.screenshot(path=str(ARTIFACTS / "browser-pickers.png"), full_page=True)
                page.keyboard.press("Escape")
                page.get_by_role("tab", name="txt2img").click()
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
    assert list((tmp_path / "out").rglob("*.png")), "the generated image was saved"
