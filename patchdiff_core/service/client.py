"""A small HTTP client for the patchdiff service (httpx). Torch-free.

    client = PatchdiffClient("http://127.0.0.1:8000")
    job = client.submit(model="digits", num_images=16, class_label=3, seed=42)
    job = client.wait(job["id"], on_progress=print)
    png = client.grid(job["id"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from patchdiff_core.service.records import TERMINAL  # the statuses a job ends in


class ServiceError(Exception):
    def __init__(self, status_code: int, detail: Any):
        super().__init__(f"HTTP {status_code}: {_detail_text(detail)}")
        self.status_code, self.detail = status_code, detail


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI validation errors: name the fields
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)


class PatchdiffClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> "PatchdiffClient":
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        return response

    def submit(self, **request: Any) -> dict:
        """POST /generate; fields as in the API (model, num_images, class_label, seed, ...)."""
        body = {k: v for k, v in request.items() if v is not None}
        return self._check(self.http.post("/generate", json=body)).json()

    def status(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/jobs/{job_id}")).json()

    def models(self) -> list[dict]:
        return self._check(self.http.get("/models")).json()

    def wait(
        self, job_id: str, on_progress: Callable[[dict], None] | None = None, poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict:
        """Poll until the job ends; returns its final status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.status(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def grid(self, job_id: str) -> bytes:
        return self._check(self.http.get(f"/jobs/{job_id}/grid.png")).content

    def image(self, job_id: str, index: int) -> bytes:
        return self._check(self.http.get(f"/jobs/{job_id}/images/{index}.png")).content
