"""The Kubernetes manifests (deploy/kubernetes): the base and the example overlay render offline with
`kubectl kustomize`, every object is valid for its kind, and what they say about the service agrees
with the code.

- Kubernetes kinds: the `kubernetes` package's models (pydantic, unknown fields forbidden, strict
  types) validate each object, and it must come back unchanged from them (a snake_case key that
  the models accept but the API server does not, a value coerced, fail). The kind must exist in its
  API group and version (the package's API class for it has the operations).
- KEDA's ScaledObject (keda.sh/v1alpha1): no Python package carries its schema, so the part of
  KEDA's CRD (kedacore/keda, config/crd/bases/keda.sh_scaledobjects.yaml, and the fields
  apis/keda/v1alpha1/scaledobject_types.go adds) and of the metrics-api scaler's metadata
  (pkg/scalers/metrics_api_scaler.go) that a ScaledObject may use is written below as pydantic
  models, with the same required fields and types.
- Agreement with the code, one source for each: probe paths and the autoscaling route are routes of
  the API's OpenAPI schema; the container port is the API image's; the worker's liveness command is
  its image's HEALTHCHECK; env names are `Settings` fields (or AWS variables) and their values
  validate as `Settings`; the worker's grace period covers `STOP_TIMEOUT_S`; selectors, targets,
  Service ports and the KEDA URL point at objects of the same render.

kubectl is not a Python package: without it these tests skip on a developer's machine, and fail
under CI (CI=true).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import needs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

k8s = needs("kubernetes.client")

REPO = Path(__file__).resolve().parent.parent
KUSTOMIZE = REPO / "deploy" / "kubernetes"
RENDERS = ["base", "overlays/example"]
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"}
# The images' names (the overlay may put them in a registry and tag them).
API_IMAGE, WORKER_IMAGE = "patchdiff-api", "patchdiff-worker"
GRACE_MARGIN_S = 15  # beyond STOP_TIMEOUT_S: the step in flight, writing finished results


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("kubectl is not installed; CI needs it to render deploy/kubernetes")
    pytest.skip("kubectl is not installed; under CI this fails instead")


def render(folder: str) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(KUSTOMIZE / folder)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=RENDERS)
def rendered(request) -> list[dict]:
    return render(request.param)


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return render("overlays/example")


# -- what the code says --------------------------------------------------------------------------
@functools.cache
def openapi() -> dict:
    """The API's OpenAPI schema: its routes, which need a key, what they answer."""
    from api.main import create_app
    from patchdiff_core.service.settings import Settings

    return create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()  # builds without Redis


def route(operation_id: str) -> tuple[str, dict]:
    """(path, operation) of the GET route whose handler is `operation_id` (its function's name)."""
    for path, methods in openapi()["paths"].items():
        if methods.get("get", {}).get("operationId") == operation_id:
            return path, methods["get"]
    raise AssertionError(f"the API has no GET route {operation_id}")


def _dockerfile_instructions(name: str) -> list[str]:
    text = (REPO / "docker" / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def api_image_port() -> int:
    """The port the API image serves: its EXPOSE, which must be its uvicorn's --port too."""
    lines = _dockerfile_instructions("api.Dockerfile")
    exposed = {int(line.split()[1]) for line in lines if line.startswith("EXPOSE ")}
    cmd = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    assert len(exposed) == 1 and int(cmd[cmd.index("--port") + 1]) in exposed, (exposed, cmd)
    return exposed.pop()


def worker_image_healthcheck() -> list[str]:
    line = next(line for line in _dockerfile_instructions("worker.Dockerfile") if line.startswith("HEALTHCHECK "))
    return json.loads(line.split(" CMD ", 1)[1])


def stop_timeout_s() -> float:
    from worker.control import STOP_TIMEOUT_S

    return STOP_TIMEOUT_S


def installed_models() -> set[str]:
    from patchdiff_core.generation.registry import load_manifest

    return {m.name for m in load_manifest(REPO / "weights")}


# -- KEDA's ScaledObject, written from its CRD ---------------------------------------------------
Int32 = Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScaleTarget(_Strict):
    name: str
    apiVersion: str | None = None
    kind: str | None = None
    envSourceContainerName: str | None = None


class AuthenticationRef(_Strict):
    name: str
    kind: str | None = None


class ScaleTrigger(_Strict):
    type: str
    metadata: dict[str, str]
    name: str | None = None
    metricType: Literal["AverageValue", "Value", "Utilization"] | None = None
    useCachedMetrics: bool | None = None
    authenticationRef: AuthenticationRef | None = None


class Fallback(_Strict):
    failureThreshold: Int32
    replicas: Int32


class ScalingModifiers(_Strict):
    formula: str | None = None
    target: str | None = None
    activationTarget: str | None = None
    metricType: str | None = None


class HorizontalPodAutoscalerConfig(_Strict):
    # The CRD embeds autoscaling/v2's HorizontalPodAutoscalerBehavior: the Kubernetes model checks it.
    behavior: dict | None = None
    name: str | None = None

    @field_validator("behavior")
    @classmethod
    def _behavior(cls, value):
        if value is not None:
            k8s.V2HorizontalPodAutoscalerBehavior.model_validate(value)
        return value


class AdvancedConfig(_Strict):
    horizontalPodAutoscalerConfig: HorizontalPodAutoscalerConfig | None = None
    restoreToOriginalReplicaCount: bool | None = None
    scalingModifiers: ScalingModifiers | None = None


class ScaledObjectSpec(_Strict):
    scaleTargetRef: ScaleTarget
    triggers: list[ScaleTrigger]
    pollingInterval: Int32 | None = None
    cooldownPeriod: Int32 | None = None
    initialCooldownPeriod: Int32 | None = None
    idleReplicaCount: Int32 | None = None
    minReplicaCount: Int32 | None = None
    maxReplicaCount: Int32 | None = None
    advanced: AdvancedConfig | None = None
    fallback: Fallback | None = None


class ScaledObject(_Strict):
    apiVersion: Literal["keda.sh/v1alpha1"]
    kind: Literal["ScaledObject"]
    metadata: dict
    spec: ScaledObjectSpec

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value):
        k8s.V1ObjectMeta.model_validate(value)
        return value


class MetricsApiMetadata(_Strict):
    """A `metrics-api` trigger's metadata: KEDA reads `targetValue` and `activationTargetValue` as
    numbers (in strings) and fails the trigger without `url`, `valueLocation` or `targetValue`."""

    url: str
    valueLocation: str
    targetValue: str
    activationTargetValue: str | None = None
    format: Literal["json", "xml", "yaml", "prometheus"] | None = None
    unsafeSsl: Literal["true", "false"] | None = None
    authMode: Literal["apiKey", "basic", "tls", "bearer"] | None = None
    method: Literal["header", "query"] | None = None
    keyParamName: str | None = None
    aggregateFromKubeServiceEndpoints: Literal["true", "false"] | None = None
    aggregationType: Literal["average", "sum", "max", "min"] | None = None

    @field_validator("targetValue", "activationTargetValue")
    @classmethod
    def _number(cls, value):
        if value is not None:
            float(value)  # a ValueError is a validation error
        return value


# -- schema checks -------------------------------------------------------------------------------
def _snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def schema_problems(obj: dict) -> list[str]:
    """What is wrong with `obj` for its apiVersion and kind ([] if nothing)."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if api_version == "keda.sh/v1alpha1" and kind == "ScaledObject":
        try:
            so = ScaledObject.model_validate(obj)
        except ValidationError as exc:
            return [f"{where}: {exc}"]
        problems = []
        for trigger in so.spec.triggers:
            if trigger.type == "metrics-api":
                try:
                    MetricsApiMetadata.model_validate(trigger.metadata)
                except ValidationError as exc:
                    problems.append(f"{where}: metrics-api metadata: {exc}")
        return problems
    group, _, version = api_version.rpartition("/")
    api_class = "".join(p.capitalize() for p in group.removesuffix(".k8s.io").split(".")) if group else "Core"
    api = getattr(k8s, f"{api_class}{version.capitalize()}Api", None)
    snake = _snake(kind)
    if api is None or not (hasattr(api, f"create_namespaced_{snake}") or hasattr(api, f"create_{snake}")):
        return [f"{where}: no kind {kind} in {api_version}"]
    model = getattr(k8s, f"{version.capitalize()}{kind}", None)
    if model is None:
        return [f"{where}: the kubernetes package has no model {version.capitalize()}{kind}"]
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        return [f"{where}: {exc}"]
    back = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    if back != obj:
        return [f"{where}: changed by the {model.__name__} model (a name or value Kubernetes would not take): {back}"]
    return []


# -- agreement with the code ---------------------------------------------------------------------
def _of(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in _of(objects, kind) if o["metadata"]["name"] == name), None)


def _containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _image_name(container: dict) -> str:
    return container["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]


def _deployments_of(objects: list[dict], image: str) -> list[dict]:
    return [d for d in _of(objects, "Deployment") if any(_image_name(c) == image for c in _containers(d))]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pods_selected(objects: list[dict], selector: dict) -> list[dict]:
    return [d for d in _of(objects, "Deployment") if _selects(selector, _pod_labels(d))]


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def _literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def check_selectors(objects: list[dict]) -> list[str]:
    problems = []
    for d in _of(objects, "Deployment"):
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if not _selects(d["spec"]["selector"].get("matchLabels", {}), labels):
            problems.append(f"Deployment/{d['metadata']['name']}: its selector does not match its pod labels")
    for s in _of(objects, "Service"):
        if s["spec"].get("type") == "ExternalName":
            continue
        pods = _pods_selected(objects, s["spec"].get("selector", {}))
        if [_image_name(c) for d in pods for c in _containers(d)] != [API_IMAGE]:
            names = [d["metadata"]["name"] for d in pods]
            problems.append(f"Service/{s['metadata']['name']}: selects {names}, not the API only")
        problems += [f"Service/{s['metadata']['name']}: port {p['port']} reaches no container port of its pods"
                     for p in s["spec"].get("ports", []) if not _service_port_reaches_api(objects, s, p["port"])]
    for pdb in _of(objects, "PodDisruptionBudget"):
        if not _pods_selected(objects, pdb["spec"]["selector"].get("matchLabels", {})):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pods")
    return problems


def check_targets(objects: list[dict]) -> list[str]:
    """HPAs and ScaledObjects scale Deployments of this render; each Deployment has one autoscaler
    at most; every worker Deployment has a ScaledObject, the API an HPA on CPU."""
    problems, scaled = [], {}
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for scaler in _of(objects, kind):
            ref = scaler["spec"]["scaleTargetRef"]
            target = _named(objects, ref.get("kind", "Deployment"), ref["name"])
            if target is None or ref.get("apiVersion", "apps/v1") != target["apiVersion"]:
                problems.append(f"{kind}/{scaler['metadata']['name']}: scales {ref}, which this render lacks")
                continue
            if ref["name"] in scaled:
                problems.append(f"Deployment/{ref['name']}: scaled by both {scaled[ref['name']]} and {kind}")
            scaled[ref["name"]] = kind
    for d in _deployments_of(objects, WORKER_IMAGE):
        if scaled.get(d["metadata"]["name"]) != "ScaledObject":
            problems.append(f"Deployment/{d['metadata']['name']}: a worker Deployment without a ScaledObject")
    for d in _deployments_of(objects, API_IMAGE):
        hpa = next((h for h in _of(objects, "HorizontalPodAutoscaler")
                    if h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]), None)
        if hpa is None or {m.get("resource", {}).get("name") for m in hpa["spec"]["metrics"]} != {"cpu"}:
            problems.append(f"Deployment/{d['metadata']['name']}: the API needs an HPA on CPU")
        elif not all(c.get("resources", {}).get("requests", {}).get("cpu") for c in _containers(d)):
            problems.append(f"Deployment/{d['metadata']['name']}: CPU utilisation needs a CPU request")
    return problems


def check_api(objects: list[dict]) -> list[str]:
    """The API container listens on the image's port; its probes are the health routes."""
    problems, port = [], api_image_port()
    # Readiness without a live worker: an API pod serves status and results without one.
    live_path, readiness_path = route("healthz")[0], route("readyz")[0] + "?require_worker=false"
    for d in _deployments_of(objects, API_IMAGE):
        for c in _containers(d):
            where = f"Deployment/{d['metadata']['name']}/{c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if list(ports.values()) != [port]:
                problems.append(f"{where}: container ports {ports}, the image serves {port}")
            for probe, path in (("livenessProbe", live_path), ("readinessProbe", readiness_path)):
                get = c.get(probe, {}).get("httpGet", {})
                if get.get("path") != path or ports.get(get.get("port"), get.get("port")) != port:
                    problems.append(f"{where}: {probe} {get}, expected GET {path} on port {port}")
    return problems


def _service_port_reaches_api(objects: list[dict], service: dict, port: int) -> bool:
    entry = next((p for p in service["spec"].get("ports", []) if p["port"] == port), None)
    if entry is None:
        return False
    target = entry.get("targetPort", port)
    return any(target in (p.get("name"), p["containerPort"])
               for d in _pods_selected(objects, service["spec"].get("selector", {}))
               for c in _containers(d) for p in c.get("ports", []))


def _schema_at(schema: dict, location: str) -> dict | None:
    """The JSON schema of the field that a GJSON path of plain keys names (dict keys: any name)."""
    for key in location.split("."):
        while "$ref" in schema:
            schema = openapi()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        if key in schema.get("properties", {}):
            schema = schema["properties"][key]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            return None
    return schema


def check_workers(objects: list[dict]) -> list[str]:
    """One GPU per pod, the image's health check as the liveness probe, time to hand back, models that
    the image has, a compile cache on a volume, and a KEDA trigger per model on GET /autoscale."""
    problems = []
    healthcheck, grace = worker_image_healthcheck(), stop_timeout_s() + GRACE_MARGIN_S
    autoscale_path, autoscale_op = route("autoscale")
    if autoscale_op.get("security"):
        problems.append("GET /autoscale needs an API key: KEDA's trigger sends none")
    response = autoscale_op["responses"]["200"]["content"]["application/json"]["schema"]
    for d in _deployments_of(objects, WORKER_IMAGE):
        name, pod = d["metadata"]["name"], d["spec"]["template"]["spec"]
        if pod.get("terminationGracePeriodSeconds", 30) < grace:
            problems.append(f"Deployment/{name}: terminationGracePeriodSeconds under {grace} s "
                            "(STOP_TIMEOUT_S + margin)")
        if any(_selects(s["spec"].get("selector", {}), _pod_labels(d)) for s in _of(objects, "Service")):
            problems.append(f"Deployment/{name}: a Service selects workers (they take jobs from Redis)")
        (c,) = _containers(d)
        env = _literal_env(c)
        if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") != "1":
            problems.append(f"Deployment/{name}: one GPU per pod (limits nvidia.com/gpu: \"1\")")
        if env.get("PATCHDIFF_DEVICE") != "cuda":
            problems.append(f"Deployment/{name}: PATCHDIFF_DEVICE must be cuda (the pod's one GPU)")
        for probe in ("livenessProbe", "startupProbe"):
            if c.get(probe, {}).get("exec", {}).get("command") != healthcheck:
                problems.append(f"Deployment/{name}: {probe} must run {healthcheck} (the image's health check)")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if env.get("PATCHDIFF_COMPILE_CACHE_DIR") not in mounts:
            problems.append(f"Deployment/{name}: PATCHDIFF_COMPILE_CACHE_DIR is not a volume mount ({mounts})")
        models = [m.strip() for m in env.get("PATCHDIFF_WORKER_MODELS", "").split(",") if m.strip()]
        if not models or not set(models) <= installed_models():
            problems.append(f"Deployment/{name}: PATCHDIFF_WORKER_MODELS {models} not among the image's models "
                            f"{installed_models()}")
        scalers = [s for s in _of(objects, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
        for so in scalers:
            where = f"ScaledObject/{so['metadata']['name']}"
            if so["spec"].get("minReplicaCount", 0) < 1:
                problems.append(f"{where}: minReplicaCount under 1: the API refuses jobs for a model no worker serves, "
                                "so a group at 0 would never scale up")
            triggers = so["spec"]["triggers"]
            located = {t["metadata"].get("valueLocation") for t in triggers}
            wanted = {f"models.{m}.outstanding_cost" for m in models}
            if located != wanted:
                problems.append(f"{where}: triggers read {located}, the group serves {wanted}")
            for t in triggers:
                problems += _check_trigger(objects, where, t, autoscale_path, response)
    return problems


def _check_trigger(objects: list[dict], where: str, trigger: dict, path: str, response: dict) -> list[str]:
    problems, meta = [], trigger["metadata"]
    if trigger["type"] != "metrics-api":
        return [f"{where}: trigger type {trigger['type']}, expected metrics-api"]
    if trigger.get("metricType", "AverageValue") != "AverageValue":
        problems.append(f"{where}: metricType must be AverageValue (replicas = outstanding cost / targetValue)")
    location = _schema_at(response, meta.get("valueLocation", ""))
    if location is None or location.get("type") != "integer":
        problems.append(f"{where}: valueLocation {meta.get('valueLocation')} is no number of GET {path}'s answer")
    url = urlsplit(meta.get("url", ""))
    host, _, namespace_svc = (url.hostname or "").partition(".")
    service = _named(objects, "Service", host)
    if service is None:
        problems.append(f"{where}: url {meta.get('url')} names no Service of this render")
    else:
        if namespace_svc != f"{service['metadata'].get('namespace')}.svc":
            problems.append(f"{where}: url {meta.get('url')}: KEDA calls from its own namespace; "
                            f"expected {host}.{service['metadata'].get('namespace')}.svc")
        if url.port is None or not _service_port_reaches_api(objects, service, url.port):
            problems.append(f"{where}: url port {url.port} is no port of Service/{host} that reaches the API container")
    if url.scheme != "http" or url.path != path:
        problems.append(f"{where}: url {meta.get('url')}, expected http://...{path}")
    return problems


def _env_names(objects: list[dict]) -> list[tuple[str, str]]:
    """(where, name) of every environment variable the render sets."""
    found = []
    for cm in _of(objects, "ConfigMap"):
        found += [(f"ConfigMap/{cm['metadata']['name']}", k) for k in cm.get("data", {})]
    for secret in _of(objects, "Secret"):
        found += [(f"Secret/{secret['metadata']['name']}", k) for k in secret.get("data", {})]
    for d in _of(objects, "Deployment"):
        for c in _containers(d):
            found += [(f"Deployment/{d['metadata']['name']}/{c['name']}", e["name"]) for e in c.get("env", [])]
    return found


def check_settings(objects: list[dict]) -> list[str]:
    """Every variable is a setting (or an AWS one), and what each container gets validates as Settings."""
    from patchdiff_core.service.settings import Settings

    fields = {f"PATCHDIFF_{name.upper()}" for name in Settings.model_fields}
    problems = [f"{where}: {name} is neither a setting nor an AWS variable"
                for where, name in _env_names(objects) if name not in fields | AWS_VARIABLES]
    configs = {cm["metadata"]["name"]: cm.get("data", {}) for cm in _of(objects, "ConfigMap")}
    secrets = {s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
               for s in _of(objects, "Secret")}
    for d in _of(objects, "Deployment"):
        for c in _containers(d):
            where, env = f"Deployment/{d['metadata']['name']}/{c['name']}", {}
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    ref = source["configMapRef"]["name"]
                    if ref not in configs:
                        problems.append(f"{where}: ConfigMap {ref} is not in this render")
                    env.update(configs.get(ref, {}))
            env.update(_literal_env(c))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if secrets and ref["key"] not in secrets.get(ref["name"], {}) and not ref.get("optional"):
                    problems.append(f"{where}: {e['name']} from Secret {ref['name']} key {ref['key']}, "
                                    "which this render lacks")
                env[e["name"]] = secrets.get(ref["name"], {}).get(ref["key"], "")
            named = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
            if not secrets and len(named) > 1:
                problems.append(f"{where}: refers to several Secrets")
            with mock.patch.dict(os.environ, {k: v for k, v in env.items() if v}, clear=True):
                try:
                    Settings()
                except ValidationError as exc:
                    problems.append(f"{where}: its settings do not validate: {exc}")
    return problems


def check_external_services(objects: list[dict]) -> list[str]:
    """A plain name (no dots) in an address setting is a Service of this render (an ExternalName)."""
    problems = []
    for cm in _of(objects, "ConfigMap"):
        data = cm.get("data", {})
        hosts = [a.rsplit(":", 1)[0] for a in data.get("PATCHDIFF_REDIS_SENTINELS", "").split(",") if a.strip()]
        if data.get("PATCHDIFF_STORE_S3_ENDPOINT_URL"):
            hosts.append(urlsplit(data["PATCHDIFF_STORE_S3_ENDPOINT_URL"]).hostname)
        problems += [f"ConfigMap/{cm['metadata']['name']}: {host} is no Service of this render"
                     for host in hosts if "." not in host and _named(objects, "Service", host) is None]
    return problems


CHECKS: list[Callable[[list[dict]], list[str]]] = [
    check_selectors, check_targets, check_api, check_workers, check_settings, check_external_services]


def problems(objects: list[dict]) -> list[str]:
    """Schema problems, else (the checks read valid objects only) disagreements with the code."""
    found = [p for obj in objects for p in schema_problems(obj)]
    if not found:
        for check in CHECKS:
            found += check(objects)
    return found


# -- the tests -----------------------------------------------------------------------------------
def _kind_and_name(obj: dict) -> str:
    name = obj["metadata"]["name"]
    if obj["kind"] in ("ConfigMap", "Secret"):  # generated: name-<hash of the content>
        name = name.rsplit("-", 1)[0]
    return f"{obj['kind']}/{name}"


def test_renders_the_objects_of_the_service(rendered):
    made = {_kind_and_name(o) for o in rendered}
    assert made >= {"Deployment/patchdiff-api", "Service/patchdiff-api", "HorizontalPodAutoscaler/patchdiff-api",
                    "PodDisruptionBudget/patchdiff-api", "ConfigMap/patchdiff-config",
                    "Deployment/patchdiff-worker-digits", "ScaledObject/patchdiff-worker-digits"}, made
    assert len({o["metadata"].get("namespace") for o in rendered}) == 1, "one namespace for everything"


def test_every_object_is_valid_and_agrees_with_the_code(rendered):
    assert problems(rendered) == []


def test_the_overlay_makes_the_secret_the_base_refers_to(overlay):
    (secret,) = _of(overlay, "Secret")
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert {"PATCHDIFF_API_KEYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(values)
    assert all(v.startswith("PLACEHOLDER") for v in values.values()), "the example's keys say they are placeholders"
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in _of(overlay, "Deployment") for c in _containers(d)
            for e in c.get("env", []) if "valueFrom" in e}
    assert refs == {secret["metadata"]["name"]}


# -- the checks fail on broken manifests ---------------------------------------------------------
def _api(objects: list[dict]) -> dict:
    return _containers(_deployments_of(objects, API_IMAGE)[0])[0]


def _worker(objects: list[dict]) -> dict:
    return _deployments_of(objects, WORKER_IMAGE)[0]


def _first(objects: list[dict], kind: str) -> dict:
    return _of(objects, kind)[0]


def _trigger(objects: list[dict]) -> dict:
    return _first(objects, "ScaledObject")["spec"]["triggers"][0]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _worker_env(objects: list[dict], name: str, value: str) -> None:
    next(e for e in _containers(_worker(objects))[0]["env"] if e["name"] == name)["value"] = value


def _url(objects: list[dict], change: Callable[[str], str]) -> None:
    _trigger(objects)["metadata"]["url"] = change(_trigger(objects)["metadata"]["url"])


# (what breaks, how: a change of the rendered overlay, what a problem must say)
BREAKAGES: list[tuple[str, Callable[[list[dict]], None], str]] = [
    ("misspelled field", lambda o: _rename(_api(o), "livenessProbe", "livenesProbe"),
     "containers.0.livenesProbe\n  Extra inputs are not permitted"),
    ("snake_case field", lambda o: _rename(_api(o), "imagePullPolicy", "image_pull_policy"),
     "changed by the V1Deployment model"),
    ("string for a number", lambda o: _api(o)["ports"][0].update(containerPort="8000"),
     "ports.0.containerPort\n  Input should be a valid integer"),
    ("missing required field", lambda o: _api(o).pop("name"), "containers.0.name\n  Field required"),
    ("kind not in its group", lambda o: _first(o, "PodDisruptionBudget").update(apiVersion="apps/v1"),
     "no kind PodDisruptionBudget in apps/v1"),
    ("probe off the routes", lambda o: _api(o)["readinessProbe"]["httpGet"].update(path="/ready"),
     "expected GET /readyz?require_worker=false"),
    ("container port not the image's", lambda o: _api(o)["ports"][0].update(containerPort=8080),
     "the image serves 8000"),
    ("unknown setting", lambda o: _first(o, "ConfigMap")["data"].update(PATCHDIFF_REDIS_SENTINAL_MASTER="x"),
     "PATCHDIFF_REDIS_SENTINAL_MASTER is neither a setting"),
    ("setting that does not validate", lambda o: _first(o, "ConfigMap")["data"].update(PATCHDIFF_JOB_TTL_S="a week"),
     "its settings do not validate"),
    ("Secret without a key the pods read", lambda o: _first(o, "Secret")["data"].pop("AWS_ACCESS_KEY_ID"),
     "key AWS_ACCESS_KEY_ID, which this render lacks"),
    ("selector off the pods",
     lambda o: _first(o, "Service")["spec"]["selector"].update({"app.kubernetes.io/component": "apis"}),
     "not the API only"),
    ("Service port off the container's", lambda o: _first(o, "Service")["spec"]["ports"][0].update(targetPort="web"),
     "port 8000 reaches no container port"),
    ("HPA on a missing Deployment",
     lambda o: _first(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="patchdiff-apis"),
     "which this render lacks"),
    ("worker not on its GPU", lambda o: _worker_env(o, "PATCHDIFF_DEVICE", "cpu"), "PATCHDIFF_DEVICE must be cuda"),
    ("short grace period", lambda o: _worker(o)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds"),
    ("liveness not the image's check",
     lambda o: _containers(_worker(o))[0]["livenessProbe"]["exec"].update(command=["python", "-m", "worker"]),
     "livenessProbe must run"),
    ("two GPUs per pod", lambda o: _containers(_worker(o))[0]["resources"]["limits"].update({"nvidia.com/gpu": "2"}),
     "one GPU per pod"),
    ("KEDA: misspelled field", lambda o: _rename(_first(o, "ScaledObject")["spec"], "scaleTargetRef", "scaleTargetref"),
     "spec.scaleTargetref\n  Extra inputs are not permitted"),
    ("KEDA: string for an int32", lambda o: _first(o, "ScaledObject")["spec"].update(maxReplicaCount="8"),
     "spec.maxReplicaCount\n  Input should be a valid integer"),
    ("KEDA: trigger without metadata", lambda o: _trigger(o).pop("metadata"),
     "spec.triggers.0.metadata\n  Field required"),
    ("KEDA: HPA behavior field misspelled",
     lambda o: _rename(_first(o, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
                       "scaleDown", "scaleDwn"),
     "behavior.scaleDwn\n  Extra inputs are not permitted"),
    ("KEDA: metrics-api without valueLocation", lambda o: _trigger(o)["metadata"].pop("valueLocation"),
     "MetricsApiMetadata\nvalueLocation\n  Field required"),
    ("KEDA: targetValue not a number", lambda o: _trigger(o)["metadata"].update(targetValue="lots"),
     "could not convert string to float: 'lots'"),
    ("KEDA: url on another route", lambda o: _url(o, lambda u: u.replace("/autoscale", "/metrics")),
     "expected http://.../autoscale"),
    ("KEDA: url on another port", lambda o: _url(o, lambda u: u.replace(":8000", ":80")), "url port 80"),
    ("KEDA: url without the namespace", lambda o: _url(o, lambda u: re.sub(r"\.[a-z-]+\.svc", "", u)),
     "KEDA calls from its own namespace"),
    ("KEDA: valueLocation off the answer",
     lambda o: _trigger(o)["metadata"].update(valueLocation="models.digits.cost"),
     "valueLocation models.digits.cost is no number"),
    ("KEDA: scale to zero", lambda o: _first(o, "ScaledObject")["spec"].update(minReplicaCount=0),
     "minReplicaCount under 1"),
    ("KEDA: target missing",
     lambda o: _first(o, "ScaledObject")["spec"]["scaleTargetRef"].update(name="patchdiff-worker"),
     "which this render lacks"),
]


@pytest.mark.parametrize(("change", "expected"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES])
def test_a_broken_manifest_fails(overlay, change, expected):
    objects = copy.deepcopy(overlay)
    change(objects)
    found = problems(objects)
    assert any(expected in p for p in found), f"no problem mentions {expected!r}: {found}"
