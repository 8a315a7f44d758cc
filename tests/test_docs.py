"""The docs site builds with `mkdocs build --strict`, its generated pages are complete, and what a
user reads stays short where it should and says nothing about the project's own history.

The pages' commands run in tests/test_readme.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from patchdiff_core.service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
USER_DOCS = [README] + sorted((REPO / "docs").rglob("*.md"))


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once; any warning (a broken link or anchor, a page not in the nav, a hook
    that cannot make its table) fails the strict build."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


def test_the_site_builds_strict_with_every_page(site):
    for page in (REPO / "docs").rglob("*.md"):
        rel = page.relative_to(REPO / "docs").with_suffix("")
        built = site / ("index.html" if rel.name == "index" and rel.parent == Path(".") else rel / "index.html")
        assert built.exists(), f"docs/{page.relative_to(REPO / 'docs')} was not built"
    assert not (site / "hooks").exists(), "the hooks are code, not pages"


def test_the_settings_page_lists_every_setting(site):
    html = (site / "guide" / "settings" / "index.html").read_text()
    assert "generated: settings" not in html
    for name, info in Settings.model_fields.items():
        assert f"PATCHDIFF_{name.upper()}" in html, name
        assert info.description, f"Settings.{name} needs Field(description=...): the settings page shows it"


def test_a_setting_added_later_appears_in_its_section():
    """The page is made from the class itself: a new field needs no edit of the docs."""

    class Later(Settings):
        # -- Experiments -----------------------------------------------------------------------
        shiny_knob_s: float = Field(default=86400.0, gt=0, description="a knob added after the page was written")

    text = _hook("settings_page").settings_markdown(Later)
    section = text.split("## Experiments", 1)[1]
    assert "| `PATCHDIFF_SHINY_KNOB_S` | `86400.0` (1 day) | number, > 0 | a knob added after the page was written |" in section
    for name in Settings.model_fields:
        assert f"`PATCHDIFF_{name.upper()}`" in text.split("## Experiments", 1)[0], name
    # The class's own sections, in its order.
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "Models" and sections[-1] == "Experiments" and "Other settings" not in sections


def test_the_errors_page_lists_every_4xx_of_the_schema(site):
    hook = _hook("api_errors_page")
    rows = hook.client_errors(hook.openapi_schema())
    assert {status for status, _, _ in rows} >= {401, 404, 422}
    html = (site / "guide" / "errors" / "index.html").read_text()
    assert "generated: api-errors" not in html
    for status, route, _ in rows:
        method, path = route.split(" ", 1)
        assert re.search(rf"<strong>{status}</strong></td>\s*<td>(?:(?!</td>).)*<code>{method} {re.escape(path)}</code>",
                         html, flags=re.S), (status, route)


def test_the_errors_table_fails_on_an_answer_without_a_fix_or_a_stale_fix():
    hook = _hook("api_errors_page")

    def schema(extra: dict[str, str] | None = None, drop: tuple[int, str] | None = None) -> dict:
        """Every route-specific fix's answer, plus `extra` ({status: "METHOD /path"}), less `drop`."""
        wanted = [key for key in hook.WHAT_TO_DO if isinstance(key, tuple) and key != drop]
        wanted += [(status, route) for status, route in (extra or {}).items()]
        paths: dict = {}
        for status, route in wanted:
            method, path = route.split(" ", 1)
            operation = paths.setdefault(path, {}).setdefault(method.lower(), {"responses": {}})
            operation["responses"][str(status)] = {"description": f"cause {status}"}
        return {"paths": paths}

    table = hook.errors_markdown(schema({404: "GET /things/{id}"}))
    assert "| **404** | `GET /things/{id}` | cause 404 | Check the job id" in table
    with pytest.raises(ValueError, match=r"lacks a fix for \[418\]"):  # a new 4xx without a fix written for it
        hook.errors_markdown(schema({418: "POST /generate"}))
    with pytest.raises(ValueError, match=r"no longer gives: \[\(409, 'POST /generate'\)\]"):  # a fix for an answer the API dropped
        hook.errors_markdown(schema(drop=(409, "POST /generate")))


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes; move detail into docs/"


def test_the_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (REPO / target).exists(), target


# Words about who did what when: meaningless to a user, and out of date the day after.
HISTORY = re.compile(r"\bissues? ?#?\d+|\bthe issue\b|\bsessions?\b|\blent\b|\blast (week|month)\b|\bthis week\b"
                     r"|\bmeasured (yesterday|today)\b|\bbefore this\b", re.I)


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_project_history_in_what_users_read(path):
    hits = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, f"{path.relative_to(REPO)}: words about the project's history: {hits}"
