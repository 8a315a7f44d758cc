"""Every `bash` and `python` block of README.md and of the docs pages (docs/**/*.md) runs as written.

Blocks run in order (the README first, then the pages by path), each in a fresh process, in one
scratch folder that links to this checkout's files (so what they write, grid.png, data/, ..., lands
there), with `.venv/bin` first on PATH (the README's "patchdiff on your PATH"). The marker on the
last non-blank line above a fence says how a block is run:

    <!-- test: skip (why) -->     not run (the reason is for the reader)
    <!-- test: server -->         started in the background; the test waits for GET /readyz on a
                                  free port (given to it as PATCHDIFF_API_PORT) and stops it after
                                  the blocks that need it. One such block in all the docs: the
                                  README's, and the pages' needs-server blocks use it too
    <!-- test: needs-server -->   run while the server is up, with `8000` replaced by its port

Blocks of other languages (```text, plain ```) are not run. A block fails the test when it exits
non-zero (bash runs with -e -o pipefail).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# The README, then every page of the docs site, in a fixed order.
DOCUMENTS = [README] + sorted((REPO / "docs").rglob("*.md"))
VENV_BIN = REPO / ".venv" / "bin"
MARKER = re.compile(r"^<!--\s*test:\s*(skip|server|needs-server)\b.*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
# What the scratch folder gets fresh instead of a link to the checkout (blocks write there), and the
# kinds of top-level file that blocks make (never linked, so a stray one in the checkout is not overwritten).
FRESH = {"data", "runs", "docs", "site", ".pytest_cache", "grid.png", "job.json"}
OUTPUT_SUFFIXES = {".png", ".npz", ".json", ".log"}


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    mode: str  # run | skip | server | needs-server
    heading: str
    doc: str = "README.md"  # the file, relative to the checkout

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.doc}:L{self.line}-{self.lang}-{slug}"


def doc_blocks(text: str, doc: str = "README.md") -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        m = FENCE.match(line)
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{doc}:{start + 1}: unclosed code fence")
        i += 1
        if lang not in ("bash", "sh", "shell", "python"):
            continue
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev.strip())
        mode = marker.group(1) if marker else "run"
        blocks.append(Block("python" if lang == "python" else "bash", "\n".join(body) + "\n", start + 1, mode, heading, doc))
    return blocks


BLOCKS = [b for path in DOCUMENTS for b in doc_blocks(path.read_text(), str(path.relative_to(REPO)))]


def test_the_extractor_finds_the_blocks():
    """The markers and fences parse the way the docstring says (a guard for README edits)."""
    sample = "# A\n\n<!-- test: skip (no) -->\n```bash\nfalse\n```\n\n```python\nprint(1)\n```\n```text\nx\n```\n"
    got = doc_blocks(sample, "docs/x.md")
    assert [(b.lang, b.mode, b.line, b.heading, b.doc) for b in got] == [
        ("bash", "skip", 4, "A", "docs/x.md"), ("python", "run", 8, "A", "docs/x.md")]
    assert len(DOCUMENTS) > 5 and all(path.exists() for path in DOCUMENTS)
    modes = [b.mode for b in BLOCKS]
    servers = [b for b in BLOCKS if b.mode == "server"]
    assert len(servers) <= 1 and all(b.doc == "README.md" for b in servers), "one server block at most: the README's"
    readme = [b for b in BLOCKS if b.doc == "README.md"]
    assert any(b.mode == "run" for b in readme) and any(b.lang == "python" and b.mode == "run" for b in readme)
    assert any(b.doc.startswith("docs/guide/") and b.mode in ("run", "needs-server") for b in BLOCKS)
    if "needs-server" in modes:
        assert "server" in modes and modes.index("server") < modes.index("needs-server")


def _free_port() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from service_harness import free_port

    return free_port()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        made_by_blocks = entry.is_file() and entry.suffix in OUTPUT_SUFFIXES
        if entry.name not in FRESH and entry.name != ".git" and not made_by_blocks:
            (root / entry.name).symlink_to(entry)
    (root / "docs").mkdir()
    return root


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core CI machine: no OpenMP spinning
    env.update(extra or {})
    return env


def _run(block: Block, cwd: Path, env: dict[str, str], code: str, timeout: float = 300) -> None:
    argv = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "bash" else [str(VENV_BIN / "python"), "-c", code]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{block.doc}:{block.line} ({block.heading}) exited {proc.returncode}\n--- block\n{code}"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


class Server:
    def __init__(self, block: Block, cwd: Path):
        self.port = _free_port()
        self.log = cwd / "server.log"
        self.proc = subprocess.Popen(
            ["bash", "-e", "-c", block.code], cwd=cwd, env=_env({"PATCHDIFF_API_PORT": str(self.port)}),
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{block.doc}:{block.line}: the server block exited {self.proc.returncode}:\n"
                                     + self.log.read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{block.doc}:{block.line}: no ready server on port {self.port}:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(scratch):
    block = next((b for b in BLOCKS if b.mode == "server"), None)
    if block is None:
        yield None
        return
    srv = Server(block, scratch)
    yield srv
    srv.stop()


needs_venv = pytest.mark.skipif(not (VENV_BIN / "patchdiff").exists(), reason="needs the project venv (make install)")


@needs_venv
@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode in ("run", "needs-server")], ids=lambda b: b.id)
def test_readme_block(block: Block, scratch: Path, request):
    if block.mode == "needs-server":
        srv = request.getfixturevalue("server")
        code = re.sub(r"(?<=[:/])8000\b", str(srv.port), block.code)
        _run(block, scratch, _env(), code)
    else:
        _run(block, scratch, _env(), block.code)
    # What the blocks say they make, made for real.
    for name in re.findall(r"""\.save\(["']([\w./-]+\.png)["']\)|--out\s+([\w./-]+\.png)""", block.code):
        path = scratch / (name[0] or name[1])
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            assert img.size[0] >= 32 and img.size[1] >= 32, (path, img.size)


def test_readme_library_example_makes_a_picture():
    """The library example saves a real image (the issue's NameError example is gone for good)."""
    lib = [b for b in BLOCKS if b.doc == "README.md" and b.lang == "python" and "load_model" in b.code]
    assert lib and all(b.mode == "run" for b in lib), "the library example must be a run block"
    assert any(".save(" in b.code for b in lib)
