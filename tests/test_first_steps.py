"""The newcomer's settings: `make serve PORT=`, `make test BASE_PORT=` (the harness's free_port) and
`make install`'s choice of torch build, checked with `make -n` (prints the commands, runs nothing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import service_harness

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def make_n(*args: str, env: dict[str, str] | None = None) -> str:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    full.update(env or {})
    # A stamp newer than pyproject.toml is not needed: -n prints the install recipe too.
    out = subprocess.run(["make", "-n", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_serve_takes_a_port():
    assert "patchdiff serve --port 8123" in make_n("serve", "PORT=8123")
    assert "patchdiff serve --port 8124" in make_n("serve", env={"PATCHDIFF_API_PORT": "8124"})
    lines = [line for line in make_n("serve").splitlines() if "patchdiff serve" in line]
    assert lines and all("--port" not in line for line in lines), "no port given: the settings' default (8000)"


def test_make_test_takes_a_base_port():
    assert "PATCHDIFF_TEST_BASE_PORT=20000 " in make_n("test", "BASE_PORT=20000")


def test_make_install_picks_the_cpu_build_without_a_gpu():
    cpu = make_n("install", "TORCH_VARIANT=cpu", "--always-make")
    # The wheel on disk first (no index, no download), else PyTorch's CPU index; never the default
    # index's CUDA build before torch is in place.
    assert '--no-deps --no-index "torch==2.13.0+cpu"' in cpu
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in cpu
    assert cpu.index("--no-index") < cpu.index('install --quiet "torch==2.13.0"') < cpu.index("-e '.[all]'")
    cuda = make_n("install", "TORCH_VARIANT=cuda", "--always-make")
    assert '[ "cuda" = cpu ]' in cuda, "TORCH_VARIANT=cuda skips the CPU step: torch from the default index"
    if shutil.which("nvidia-smi") is None:
        assert '[ "cpu" = cpu ]' in make_n("install", "--always-make"), "no GPU here: the CPU build"


def test_free_port_counts_up_from_the_base_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        # `base` is taken while this socket is open: the next free one comes.
        monkeypatch.setenv("PATCHDIFF_TEST_BASE_PORT", str(base))
        monkeypatch.setattr(service_harness, "_next_port", None)
        first = service_harness.free_port()
        second = service_harness.free_port()
    assert base < first < second
    monkeypatch.delenv("PATCHDIFF_TEST_BASE_PORT")
    assert service_harness.free_port() > 0  # any port again


def test_free_port_rejects_a_bad_base(monkeypatch):
    monkeypatch.setenv("PATCHDIFF_TEST_BASE_PORT", "80")
    monkeypatch.setattr(service_harness, "_next_port", None)
    with pytest.raises(ValueError):
        service_harness.free_port()
    monkeypatch.setattr(service_harness, "_next_port", None)
