import functools
import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = ["uncond_p2", "classcond_se_p4", "classcond_thresh_p2"]
# The fixtures' README: a faithful port is at ~1e-6 forward and ~1e-5 over a trajectory.
FORWARD_TOL, TRAJECTORY_TOL = 1e-5, 1e-4


def needs(module: str):
    """Import a test dependency (the `test` extra installs it): skip when it is missing on a
    developer's machine, but fail under CI (CI=true), so that a check never goes missing silently."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; `make test` installs the test extra, CI must have it")
        return pytest.importorskip(module)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nhwc_to_nchw(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def nchw_to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).cpu().numpy()


class Golden:
    def __init__(self, name: str):
        self.name = name
        self.dir = FIXTURES / name
        self.h5 = self.dir / "ema_weights.h5"
        self.config = json.loads((self.dir / "config.json").read_text())

    @functools.cached_property
    def ref(self) -> dict[str, np.ndarray]:
        return dict(np.load(self.dir / "reference.npz"))


@pytest.fixture(params=GOLDEN_CASES)
def golden(request) -> Golden:
    return Golden(request.param)


TINY_CONFIG = dict(res=16, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], num_classes=10, patch_size=2, se=False)


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A small random class-conditional model file (with metadata as `patchdiff train` writes it)."""
    import torch

    from patchdiff_core.model.checkpoint import save_model
    from patchdiff_core.model.config import ModelConfig
    from patchdiff_core.model.unet import PatchedUNet

    torch.manual_seed(0)
    model = PatchedUNet(ModelConfig(**TINY_CONFIG))
    with torch.no_grad():  # the zero-initialised layers of a fresh model would make outputs trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(model, path, {"model": "tiny", "classes": json.dumps([f"c{i}" for i in range(10)])})
    return path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private real redis-server for the session (the machine's own Redis is not assumed)."""
    from service_harness import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()
