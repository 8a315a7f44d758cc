"""The page at `/` in a real browser: Debian's Chromium driven by Playwright, against real processes.

Chromium comes from `make browser-deps` (CI runs it). Without it this test is skipped on a
developer's machine but fails under CI (CI=true), so a missing browser never passes silently.
`playwright install` is never used: Playwright drives the system Chromium.
Set PATCHDIFF_UPDATE_SCREENSHOTS=1 to refresh docs/web_page.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

import httpx
import pytest
from service_harness import REPO, Processes, RedisServer, free_port, service_env, wait_until

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must run `make browser-deps` before the tests")
    pytest.skip("chromium is not installed (make browser-deps); under CI this fails instead")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The shipped demo model (real digits, so the screenshot shows sevens)."""
    tmp = tmp_path_factory.mktemp("web")
    redis_server = RedisServer(tmp / "redis").start()
    env = service_env(redis_server.url, REPO / "weights", tmp / "store", PATCHDIFF_DEFAULT_MODEL="digits",
                      PATCHDIFF_PROGRESS_EVENT_INTERVAL_S="0.05", PATCHDIFF_PREVIEW_EVERY_STEPS="10",
                      PATCHDIFF_PREVIEW_MIN_INTERVAL_S="0.1")
    procs = Processes(env, tmp / "logs")
    procs.worker()
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "a live worker")
    yield url, procs
    procs.stop_all()
    redis_server.stop()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(request, browser, service):
    """A page that may only talk to the service: any other request fails the test (offline check).

    Playwright's wait_for_function evaluates code, which the page's CSP forbids, so tests that
    need it bypass the CSP; tests marked `enforce_csp` keep it."""
    url, _ = service
    origin = urlsplit(url).netloc
    bypass = request.node.get_closest_marker("enforce_csp") is None
    context = browser.new_context(viewport={"width": 1100, "height": 900}, bypass_csp=bypass)
    page = context.new_page()
    elsewhere: list[str] = []

    def only_here(route):
        if urlsplit(route.request.url).netloc == origin or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not elsewhere, f"the page asked for something outside the service: {elsewhere}"
    assert not errors, f"JavaScript errors: {errors}"


def test_page_generates_watches_and_cancels(page, service, tmp_path):
    url, procs = service
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model option[value=digits]') !== null")
    # Every control has a label (screen readers, and clicking the label focuses the control).
    unlabeled = page.evaluate("[...document.querySelectorAll('input, select')].filter(e => !e.labels.length).map(e => e.id)")
    assert unlabeled == []
    # The model's own defaults fill the form, whatever form its steps take (the demo's: a searched 't:' list).
    defaults = next(m for m in httpx.get(f"{url}/models").json() if m["name"] == "digits")["defaults"]
    assert page.input_value("#steps") == defaults["timesteps"]
    assert page.input_value("#sampler") == defaults["sampler"]
    # Record every value the progress bar shows.
    page.evaluate("""() => {
        window.progressSeen = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
            .observe(bar, {attributes: true, attributeFilter: ['value', 'max']});
    }""")
    page.select_option("#class", "7")
    page.fill("#num-images", "4")
    page.fill("#steps", "200")
    page.fill("#seed", "11")
    page.click("#submit")

    page.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=60_000)
    page.wait_for_function("document.getElementById('status').textContent === 'finished'", timeout=120_000)
    job_id = page.text_content("#job-id")
    job = httpx.get(f"{url}/jobs/{job_id}").json()
    assert job["status"] == "finished" and job["request"]["class_labels"] == [7] * 4
    assert job["request"]["timesteps"] == "200" and job["request"]["seed"] == 11

    seen = page.evaluate("window.progressSeen")
    # Progress counts network evaluations image by image: 4 images x 200 steps.
    running = [value for value, maximum in seen if maximum == 800 and 0 < value < 800]
    assert len(running) >= 3 and running == sorted(running), seen  # it advanced, step by step
    page.wait_for_function("document.getElementById('grid').naturalWidth > 0", timeout=30_000)
    grid_bytes = page.evaluate("""async () => {
        const response = await fetch(document.getElementById('grid').src);
        return Array.from(new Uint8Array(await response.arrayBuffer()));
    }""")
    assert bytes(grid_bytes) == httpx.get(f"{url}/jobs/{job_id}/grid.png").content
    assert page.evaluate("document.getElementById('grid').naturalWidth") == 70  # 2x2 grid of 32-px images
    page.wait_for_function("document.querySelectorAll('#images img').length === 4")
    downloads = page.eval_on_selector_all("#images a[download]", "links => links.map(a => a.download)")
    assert downloads == [f"{job_id}-{i}.png" for i in range(4)]
    assert page.locator("#recent li").count() == 1

    page.screenshot(path=str(tmp_path / "web_page.png"), full_page=True)
    if os.environ.get("PATCHDIFF_UPDATE_SCREENSHOTS"):
        shutil.copy(tmp_path / "web_page.png", REPO / "docs" / "web_page.png")

    # A second job, submitted from the keyboard, cancelled from the page.
    page.fill("#steps", "1000")
    page.fill("#num-images", "8")
    page.focus("#seed")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('job-id').textContent !== '{job_id}'")
    second = page.text_content("#job-id")
    page.wait_for_function("['queued', 'running'].includes(document.getElementById('status').textContent)")
    # From the keyboard: a mouse click can land on whatever a just-arrived preview pushed under the
    # pointer (layout shift) on a busy machine; focus + Enter always reaches the button.
    page.focus("#cancel")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled')", timeout=30_000)
    assert httpx.get(f"{url}/jobs/{second}").json()["status"] == "cancelled"
    assert page.locator("#recent li").count() == 2
    assert "cancelled" in page.text_content("#recent")

    # Phone width: nothing sticks out sideways.
    page.set_viewport_size({"width": 375, "height": 800})
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    wide = page.evaluate("""[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 375)
                            .map(e => e.tagName + '#' + e.id + '.' + e.className)""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, wide


@pytest.mark.enforce_csp
def test_docs_and_redoc_work_offline(page, service):
    url, _ = service
    page.goto(url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "patchdiff" in page.text_content(".swagger-ui .info .title")
    page.get_by_text("/jobs/{job_id}/events").first.wait_for()
    page.goto(url + "/redoc")
    page.wait_for_selector("h1", timeout=30_000)
    assert "patchdiff" in page.text_content("h1")
