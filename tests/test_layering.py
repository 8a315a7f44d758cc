"""The layering of the code, read from its imports by import-linter (contracts in pyproject.toml):
the API never imports torch, the service contract is torch-free, each library layer imports only
the layers below it, and the library never imports the API or the worker."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout, result.stdout[-2000:]
