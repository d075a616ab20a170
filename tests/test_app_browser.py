"""The Gradio demo in a real browser: Playwright drives Debian's Chromium against app.py on 127.0.0.1.

Needs ``pip install playwright`` (the ``test`` extras) and ``/usr/bin/chromium`` (``apt-get install
chromium``); never ``playwright install``. Without them the test skips, except under ``CI=true``,
where it fails. It saves the page after a successful generation to ``docs/demo.png``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path

import pytest
from test_app import load_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "demo.png"
VIEWPORT = {"width": 1280, "height": 900}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000


def _missing(reason: str) -> None:
    """Skip, or fail under CI (which installs the browser and Playwright)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}; .ci/run installs it.")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright; do not run `playwright install`)")
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    return sync_playwright


def _is_local(host: object) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def outside_calls():
    """Record (and refuse) every connection or name lookup this process tries beyond the loopback."""
    attempts: list[str] = []
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
            attempts.append(f"connect {address}")
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    def guarded_lookup(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if not _is_local(name):
            attempts.append(f"lookup {name}")
            raise socket.gaierror(socket.EAI_NONAME, f"test: no network ({name})")
        return lookup(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_lookup
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.getaddrinfo = connect, lookup




def _demo_model(app, tmp_path_factory) -> tuple[str, object]:
    """The bundled ``digits-sd`` with the app's own settings when its weights are installed (a real digit
    for the screenshot), else a tiny random pipeline saved to a folder, calibrated briefly."""
    from diffq.pipelines import reference

    if getattr(reference, "bundled_path", lambda _name: None)("digits-sd") is not None:
        return "digits-sd", app.DemoModels(progress_bars=False)
    from diffq.pipelines.testing import TINY_CALL_KWARGS, tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("demo") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    call = TINY_CALL_KWARGS["StableDiffusionPipeline"]
    models = app.DemoModels(
        call_kwargs={"height": call["height"], "width": call["width"]},
        calibration_prompts=["a red cat", "a handwritten digit 7"],
        calibration_steps=2,
        progress_bars=False,
    )
    return str(folder), models


@pytest.fixture(scope="module")
def demo_url(sync_playwright, outside_calls, tmp_path_factory):
    """The demo on a free 127.0.0.1 port, served from a background thread."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = load_app()
    model, models = _demo_model(app, tmp_path_factory)
    demo = app.build_app(model=model, models=models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _text(page, selector: str) -> str:
    """The text a Markdown/Code component shows (without its progress timer)."""
    return page.locator(f"{selector} [data-testid='markdown'], {selector} .cm-content").first.inner_text()


WAIT_FOR_TEXT = """([sel, needles, previous]) => {
    const el = document.querySelector(sel);
    const text = el && el.querySelector("[data-testid='markdown']");
    const tracker = el && el.querySelector("[data-testid='status-tracker']");
    return !!text && (!tracker || tracker.classList.contains("hide")) && text.innerText !== previous
        && needles.some(n => text.innerText.includes(n));
}"""


def _wait_for_text(page, selector: str, *needles: str, previous: str | None = None) -> str:
    """Wait until the component is idle and its text differs from ``previous`` and has one of ``needles``."""
    page.wait_for_function(WAIT_FOR_TEXT, arg=[selector, list(needles), previous], timeout=TIMEOUT_MS)
    return _text(page, selector)


def _image_shown(page, selector: str, timeout_ms: int = 10_000) -> bool:
    """Whether the image component shows a decoded image (waiting a little for it to arrive)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "sel => { const img = document.querySelector(sel + ' img');"
            " return !!img && img.complete && img.naturalWidth > 0; }",
            arg=selector,
            timeout=timeout_ms,
        )
    except PlaywrightTimeout:
        return False
    return True


def _click_generate(page) -> str:
    previous = _text(page, "#status")
    page.locator("#generate").click()
    return _wait_for_text(page, "#status", "Done", "Error", previous=previous)


def _set_model(page, model: str) -> None:
    box = page.locator("#model input")
    box.fill(model)
    box.press("Enter")
    box.blur()


def _screenshot(page) -> None:
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    partial = SCREENSHOT.with_name(f".{SCREENSHOT.stem}.{os.getpid()}.png")
    try:
        page.screenshot(path=str(partial))
        os.replace(partial, SCREENSHOT)
    finally:
        partial.unlink(missing_ok=True)


def test_demo_in_chromium(sync_playwright, demo_url, outside_calls):
    started = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            browser_outside: list[str] = []

            def only_local(route):
                url = route.request.url
                if url.startswith(demo_url) or url.startswith(("data:", "blob:")):
                    route.continue_()
                else:
                    browser_outside.append(url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(demo_url)
            page.locator("#generate").wait_for(timeout=TIMEOUT_MS)
            model = page.locator("#model input").input_value()

            # Errors show a message in the page, and the app keeps serving.
            _set_model(page, "/nonexistent/diffq-demo-model")
            status = _click_generate(page)
            assert "Error" in status and "/nonexistent/diffq-demo-model" in status, status
            assert "Traceback" not in status
            _set_model(page, model)
            page.locator("#prompt textarea").fill("   ")
            status = _click_generate(page)
            assert "Error" in status and "prompt is empty" in status, status

            # One click: both images from the same seed, and the metrics.
            page.locator("#prompt textarea").fill("a handwritten digit 7")
            status = _click_generate(page)
            assert "Done" in status, status
            assert _image_shown(page, "#full-image") and _image_shown(page, "#quantized-image")
            metrics = _text(page, "#metrics")
            for needle in ("denoiser weights", "MiB", "smaller", "seconds per image", "dB", "quantized (w4a8)"):
                assert needle in metrics, metrics
            assert "—\t—" not in metrics and "nan" not in metrics.lower(), metrics

            # The plan tab: bits per layer, calibration ranges and the table.
            page.get_by_role("tab", name="Plan & calibration").click()
            page.locator("#show-plan").click()
            plan_status = _wait_for_text(page, "#plan-status", "layers quantized", "Error")
            assert "layers quantized" in plan_status, plan_status
            assert _image_shown(page, "#bits-chart") and _image_shown(page, "#ranges-chart")
            assert "int4" in _text(page, "#plan-table")

            # Back to the comparison for the README's screenshot.
            page.get_by_role("tab", name="Compare").click()
            page.locator("#full-image img").wait_for(state="visible")
            _screenshot(page)
        finally:
            browser.close()
    assert browser_outside == [], f"the page tried to reach the internet: {browser_outside}"
    assert outside_calls == [], f"the server tried to reach the internet: {outside_calls}"
    assert SCREENSHOT.stat().st_size > 10_000
    print(f"browser flow took {time.perf_counter() - started:.1f} s")
