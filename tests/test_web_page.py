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
MAX_IMAGES, MAX_JOB_COST = 48, 20_000


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
    # Limits other than the defaults, so that the page shows it reads them from the server.
    env = service_env(redis_server.url, REPO / "weights", tmp / "store", PATCHDIFF_DEFAULT_MODEL="digits",
                      PATCHDIFF_PROGRESS_EVENT_INTERVAL_S="0.05", PATCHDIFF_PREVIEW_EVERY_STEPS="10",
                      PATCHDIFF_PREVIEW_MIN_INTERVAL_S="0.1", PATCHDIFF_MAX_IMAGES_PER_JOB=str(MAX_IMAGES),
                      PATCHDIFF_MAX_JOB_COST=str(MAX_JOB_COST))
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


def _record(page, name: str, expression: str, *targets: str) -> None:
    """Keep every value of `expression` that the page shows while `targets` change (window[name])."""
    page.evaluate("""([name, expression, targets]) => {
        window[name] = [];
        const look = () => window[name].push(eval(expression));
        const observer = new MutationObserver(look);
        for (const id of targets) {
            observer.observe(document.getElementById(id), {attributes: true, childList: true, subtree: true, characterData: true});
        }
        look();
    }""", [name, expression, list(targets)])


def test_page_generates_watches_and_cancels(page, service, tmp_path):
    url, _ = service
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model option[value=digits]') !== null")
    # Every control has a label (screen readers, and clicking the label focuses the control).
    unlabeled = page.evaluate("[...document.querySelectorAll('input, select')].filter(e => !e.labels.length).map(e => e.id)")
    assert unlabeled == []
    # The limits come from the server (GET /limits), not from the page.
    assert page.get_attribute("#num-images", "max") == str(MAX_IMAGES)
    assert f"1 to {MAX_IMAGES}" in page.text_content("#num-images-hint")
    # The model's own defaults fill the form; its searched 't:' schedule reads as a count, the
    # exact steps one click away.
    defaults = next(m for m in httpx.get(f"{url}/models").json() if m["name"] == "digits")["defaults"]
    count = len(defaults["timesteps"].split(","))
    assert defaults["timesteps"].startswith("t:") and page.input_value("#steps") == f"{count} (tuned)"
    assert page.input_value("#sampler") == defaults["sampler"]
    page.click("#steps-raw")
    assert page.input_value("#steps") == defaults["timesteps"] and page.is_hidden("#steps-raw")

    # A limit only the server checks (the job's cost), refused next to its field, submitted with Enter.
    page.fill("#num-images", "40")
    page.fill("#steps", "1000")
    page.focus("#steps")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('num-images-error').textContent !== ''")
    assert f"over the limit of {MAX_JOB_COST}" in page.text_content("#num-images-error")
    assert page.get_attribute("#num-images", "aria-invalid") == "true" and page.text_content("#form-error") == ""
    assert page.is_hidden("#job")  # nothing was queued
    # A limit the page knows is refused before anything is sent.
    page.fill("#num-images", str(MAX_IMAGES + 1))
    page.click("#submit")
    assert f"at most {MAX_IMAGES} images" in page.text_content("#num-images-error")

    page.select_option("#class", "7")
    page.fill("#num-images", "4")
    page.fill("#steps", "200")
    page.fill("#seed", "11")
    _record(page, "progressSeen", "document.getElementById('progress-text').textContent", "progress-text")
    _record(page, "picturesSeen", "[document.getElementById('preview-figure').hidden, document.getElementById('grid-figure').hidden]",
            "preview-figure", "grid-figure")
    _record(page, "recentSeen", "document.getElementById('recent').textContent", "recent")
    page.click("#submit")
    assert page.text_content("#num-images-error") == "" and page.get_attribute("#num-images", "aria-invalid") is None

    page.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=60_000)
    page.wait_for_function("document.getElementById('status').textContent === 'finished'", timeout=120_000)
    job_id = page.text_content("#job-id")
    job = httpx.get(f"{url}/jobs/{job_id}").json()
    assert job["status"] == "finished" and job["request"]["class_labels"] == [7] * 4
    assert job["request"]["timesteps"] == "200" and job["request"]["seed"] == 11

    # Progress in the job's units: steps of 200 (never the 800 network evaluations of 4 images).
    seen = page.evaluate("window.progressSeen")
    running = [text for text in seen if " of 200" in text]
    assert len(running) >= 3, seen
    assert not any("800" in text for text in seen), seen
    steps = [int(text.split("step ")[1].split(" ")[0]) for text in running]
    assert steps == sorted(steps) and steps[-1] > steps[0], seen  # it advanced, step by step
    assert any(" left" in text for text in seen), seen  # a time estimate once it had a rate
    # The live preview, then the result in its place: never both at once, nor neither after the preview.
    pictures = page.evaluate("window.picturesSeen")
    assert [False, True] in pictures and [False, False] not in pictures, pictures
    assert [True, True] not in pictures[pictures.index([False, True]):], pictures
    page.wait_for_function("document.getElementById('grid').naturalWidth > 0", timeout=30_000)
    assert page.is_hidden("#preview-figure") and page.is_visible("#grid-figure")
    # The recent list followed the job as it ran.
    recent = page.evaluate("window.recentSeen")
    assert any("running" in text for text in recent) and "finished" in page.text_content("#recent"), recent

    grid_bytes = page.evaluate("""async () => {
        const response = await fetch(document.getElementById('grid').src);
        return Array.from(new Uint8Array(await response.arrayBuffer()));
    }""")
    assert bytes(grid_bytes) == httpx.get(f"{url}/jobs/{job_id}/grid.png").content
    assert page.evaluate("document.getElementById('grid').naturalWidth") == 70  # 2x2 grid of 32-px images
    # Pixel-exact: a whole-number upscale, drawn with square pixels.
    shown = page.evaluate("document.getElementById('grid').clientWidth")  # inside its border
    assert shown >= 140 and shown % 70 == 0, shown
    assert page.evaluate("getComputedStyle(document.getElementById('grid')).imageRendering") == "pixelated"
    page.wait_for_function("document.querySelectorAll('#images img').length === 4")
    downloads = page.eval_on_selector_all("#images a[download]", "links => links.map(a => a.download)")
    assert downloads == [f"{job_id}-{i}.png" for i in range(4)]
    assert page.locator("#recent li").count() == 1

    # The finished job's settings and seed.
    page.wait_for_function("document.getElementById('settings').textContent.includes('Took')")
    settings = page.text_content("#settings")
    assert "Seed11" in settings and "Steps200" in settings and "7 for every image" in settings, settings
    page.screenshot(path=str(tmp_path / "web_page.png"), full_page=True)
    if os.environ.get("PATCHDIFF_UPDATE_SCREENSHOTS"):
        shutil.copy(tmp_path / "web_page.png", REPO / "docs" / "web_page.png")
    # Click to enlarge; Escape closes.
    page.click("#grid-figure button.enlarge")
    page.wait_for_function("document.getElementById('viewer').open")
    page.wait_for_function("document.getElementById('viewer-image').clientWidth > 140")
    assert page.evaluate("document.getElementById('viewer-image').clientWidth") % 70 == 0
    page.keyboard.press("Escape")
    page.wait_for_function("!document.getElementById('viewer').open")

    # "Reuse" fills the form with the job's settings; "new seed" with them and another seed.
    page.select_option("#class", value="")
    page.fill("#num-images", "1")
    page.fill("#steps", "50")
    page.fill("#seed", "")
    page.click("#reuse")
    assert [page.input_value(f"#{f}") for f in ("class", "num-images", "steps", "seed", "sampler")] == \
        ["7", "4", "200", "11", job["request"]["sampler"]]
    page.click("#new-seed")
    assert page.input_value("#seed") not in ("", "11") and page.input_value("#steps") == "200"

    # A second job, with a new seed, submitted from the keyboard, cancelled from the page.
    page.fill("#steps", "1000")
    page.fill("#num-images", "8")
    page.focus("#seed")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('job-id').textContent !== '{job_id}'")
    second = page.text_content("#job-id")
    page.wait_for_function("['queued', 'running'].includes(document.getElementById('status').textContent)")
    assert httpx.get(f"{url}/jobs/{second}").json()["request"]["seed"] not in (11, None)
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
