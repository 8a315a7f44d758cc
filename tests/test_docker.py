"""Static checks of the container setup: docker/*.Dockerfile, docker-compose.yml and its CPU override,
.env.example, .dockerignore, the dependency locks and docker/s3_init.py, against the code they run.

No Docker engine is needed (`make compose-test` builds and runs the stack for real). When a Compose v2
CLI is installed (`docker compose`, or a standalone v2 `docker-compose`), `config -q` validates the
files as Compose itself reads them; without one that check is skipped, except under CI (CI=true),
where .ci/run installs Compose first and a missing one fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import needs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
STANDINS = REPO / "tests" / "compose" / "standins.yml"
LOCKS = REPO / "docker" / "requirements"
S3_INIT = REPO / "docker" / "s3_init.py"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
DOCKERFILES = [API_DOCKERFILE, WORKER_DOCKERFILE]
PATCHDIFF_VAR = re.compile(r"\bPATCHDIFF_[A-Z0-9_]*[A-Z0-9]")


# -- reading the files ---------------------------------------------------------------------------

class _Reset:
    """Compose's `!reset` tag: drop what the files before defined for this key."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class _Override:
    """Compose's `!override` tag: replace instead of merging."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: _Override(_construct_any(loader, node)))


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge(base, override):
    """Compose's merge of a later file into an earlier one, for the keys these files use: mappings
    merge key by key, sequences are appended to (so an empty list does not remove anything),
    `!reset` removes and `!override` replaces."""
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = value.value if isinstance(value, _Override) else value
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, _Override):
        yield from _strings(value.value)
    elif isinstance(value, str):
        yield value


def interpolated_vars(data) -> dict[str, list[str | None]]:
    """{VAR: the operator of each use (':-', '-', ':?', ... or None)} for each ${VAR...} / $VAR that
    compose interpolates in the parsed file (values, not comments; `$$` is an escaped `$`, left to
    the container's shell)."""
    found: dict[str, list[str | None]] = {}
    for text in _strings(data):
        for m in _INTERPOLATION.finditer(text):
            if not m.group("escaped"):
                found.setdefault(m.group("braced") or m.group("named"), []).append(m.group("op"))
    return found


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of a (string) value; `$$` becomes `$`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg")
        present = name in env
        nonempty = bool(env.get(name))
        if op == ":-":
            return env[name] if nonempty else arg
        if op == "-":
            return env[name] if present else arg
        if op in (":?", "?"):
            if not (nonempty if op == ":?" else present):
                raise KeyError(f"{name} is required: {arg}")
            return env[name]
        if op == ":+":
            return arg if nonempty else ""
        if op == "+":
            return arg if present else ""
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value)


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


class Dockerfile:
    """The instructions of a Dockerfile: comments dropped, continuation lines joined."""

    def __init__(self, path: Path):
        self.path = path
        self.instructions: list[tuple[str, str]] = []
        pending = ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if stripped.startswith("#"):
                continue  # comments (and parser directives), also inside continued instructions
            if not stripped and not pending:
                continue
            pending += " " + stripped if pending else stripped
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            if pending:
                keyword, _, rest = pending.partition(" ")
                self.instructions.append((keyword.upper(), rest.strip()))
            pending = ""
        assert not pending, f"{path.name}: ends inside a continued instruction"

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{self.path.name}: expected one {keyword}, found {len(found)}"
        return found[0]

    @staticmethod
    def exec_form(rest: str) -> list[str]:
        assert rest.startswith("["), f"not the exec (JSON) form: {rest!r}"
        return json.loads(rest)

    def copies(self) -> list[tuple[list[str], str]]:
        """[(sources, destination)] of COPY/ADD instructions that copy from the build context."""
        out = []
        for rest in self.all("COPY") + self.all("ADD"):
            args = self.exec_form(rest) if rest.startswith("[") else shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            out.append((args[:-1], args[-1]))
        return out

    def arg_defaults(self) -> dict[str, str]:
        out = {}
        for rest in self.all("ARG"):
            name, sep, default = rest.partition("=")
            if sep:
                out[name.strip()] = default.strip().strip('"')
        return out

    def healthcheck_command(self) -> list[str]:
        rest = self.one("HEALTHCHECK")
        cmd = rest[rest.index("CMD ") + 4:].strip()
        return self.exec_form(cmd)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return load_compose(COMPOSE_CPU)


@pytest.fixture(scope="module")
def merged(compose, compose_cpu) -> dict:
    return merge(compose, compose_cpu)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def settings_fields() -> set[str]:
    from patchdiff_core.service.settings import Settings

    return {"PATCHDIFF_" + name.upper() for name in Settings.model_fields}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _resolved_service_envs(compose: dict, env: dict[str, str]) -> dict[str, dict[str, str]]:
    return {name: interpolate(service_env(svc), env) for name, svc in compose["services"].items()}


# -- files, builds and COPY sources ---------------------------------------------------------------

def test_compose_files_parse_and_name_the_services(compose, compose_cpu):
    assert {"redis", "s3", "s3-init", "proxy", "api", "worker"} <= set(compose["services"])
    assert not [n for n in compose["services"] if "minio" in n], "MinIO's images are gone from Docker Hub"
    assert set(compose_cpu["services"]) <= set(compose["services"]), "the override adds no service"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU])
def test_every_build_dockerfile_exists(path, compose):
    data = load_compose(path)
    for name, svc in data["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        base = compose["services"][name].get("build") or {}
        build = merge(base, build) if isinstance(build, dict) else {"context": build}
        context = (REPO / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_api_and_worker_build_the_two_dockerfiles(compose):
    for name, dockerfile in (("api", API_DOCKERFILE), ("worker", WORKER_DOCKERFILE)):
        build = compose["services"][name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == dockerfile


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(path):
    copies = Dockerfile(path).copies()
    assert copies, f"{path.name} copies nothing"
    for sources, _ in copies:
        for src in sources:
            assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such file or directory in the repository"


def test_dockerignore_keeps_copied_paths_and_drops_local_state():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for must in (".venv", ".git", "runs", "data", "tests", ".env", "**/__pycache__"):
        assert must in patterns, f".dockerignore does not exclude {must}"
    # The offline wheelhouse is bind-mounted from the build context.
    assert not {"docker", "docker/wheels", "docker/wheels/"} & patterns
    copied = {src.rstrip("/").split("/")[0] for path in DOCKERFILES for sources, _ in Dockerfile(path).copies()
              for src in sources}
    for top in copied:
        assert top not in patterns, f".dockerignore excludes {top}, which a Dockerfile copies"


def test_api_image_gets_the_manifest_but_no_weights():
    for sources, _ in Dockerfile(API_DOCKERFILE).copies():
        for src in sources:
            assert not src.endswith(".safetensors"), f"the API image copies weights: {src}"
            assert src.rstrip("/") != "weights", "the API image copies the whole weights/ directory"
    assert any("weights/manifest.json" in sources for sources, _ in Dockerfile(API_DOCKERFILE).copies())


def test_images_copy_the_packages_that_setuptools_finds(pyproject):
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    api_copied = {s.rstrip("/") for sources, _ in Dockerfile(API_DOCKERFILE).copies() for s in sources}
    worker_copied = {s.rstrip("/") for sources, _ in Dockerfile(WORKER_DOCKERFILE).copies() for s in sources}
    assert {"pyproject.toml", "patchdiff_core", "api"} <= api_copied
    assert {"pyproject.toml", "patchdiff_core", "worker", "weights"} <= worker_copied
    assert (api_copied | worker_copied) & {"patchdiff_core", "api", "worker"} <= packages
    if (REPO / "README.md").exists():  # pyproject's `readme`: only a warning when missing
        assert "README.md" in api_copied and "README.md" in worker_copied


# -- environment variables ------------------------------------------------------------------------

def test_every_patchdiff_variable_is_a_settings_field(settings_fields):
    for path in [COMPOSE, COMPOSE_CPU, ENV_EXAMPLE, *DOCKERFILES]:
        unknown = set(PATCHDIFF_VAR.findall(path.read_text())) - settings_fields
        assert not unknown, f"{path.name} names PATCHDIFF_ variables that Settings does not read: {sorted(unknown)}"


def test_every_interpolated_variable_is_in_env_example_and_has_a_default(env_example):
    for path in [COMPOSE, COMPOSE_CPU]:
        for name, ops in interpolated_vars(load_compose(path)).items():
            assert name in env_example, f"{path.name} interpolates ${{{name}}}, which .env.example lacks"
            assert all(op in (":-", "-") for op in ops), \
                f"{path.name}: a ${{{name}}} has no default, so compose fails without a .env"


def test_env_example_has_only_variables_that_compose_uses(env_example):
    used = set(interpolated_vars(load_compose(COMPOSE))) | set(interpolated_vars(load_compose(COMPOSE_CPU)))
    assert set(env_example) <= used, f".env.example sets unused variables: {sorted(set(env_example) - used)}"


def test_api_keys_are_off_in_compose_but_on_in_env_example(compose, env_example):
    assert _resolved_service_envs(compose, {})["api"]["PATCHDIFF_API_KEYS"] == ""
    assert env_example["PATCHDIFF_API_KEYS"].strip(), ".env.example must turn API keys on"
    with_keys = _resolved_service_envs(compose, env_example)["api"]["PATCHDIFF_API_KEYS"]
    assert with_keys == env_example["PATCHDIFF_API_KEYS"]


@pytest.mark.parametrize("source", ["defaults", "env_example"])
@pytest.mark.parametrize("service", ["api", "worker"])
def test_service_environment_makes_valid_settings(compose, merged, env_example, service, source, monkeypatch):
    """What Settings() reads in the container: the image's ENV, then compose's environment."""
    from patchdiff_core.service.settings import Settings

    env = env_example if source == "env_example" else {}
    dockerfile = Dockerfile(API_DOCKERFILE if service == "api" else WORKER_DOCKERFILE)
    for data in (compose, merged):
        build_args = {**dockerfile.arg_defaults(), **(data["services"][service]["build"].get("args") or {})}
        image_env = {}
        for rest in dockerfile.all("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                if key.startswith("PATCHDIFF_"):
                    image_env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m, a=build_args: a[m.group(1)], value)
        for key in list(os.environ):
            if key.startswith("PATCHDIFF_"):
                monkeypatch.delenv(key)
        for key, value in {**image_env, **_resolved_service_envs(data, env)[service]}.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.store_s3_bucket and settings.store_s3_endpoint_url == "http://s3:8333"
        assert str(settings.weights_dir) == "/app/weights"
        if service == "api":
            assert bool(settings.api_keys) == bool(env.get("PATCHDIFF_API_KEYS"))
        else:
            assert settings.device == ("cuda" if data is compose else "cpu")
            assert settings.served_models


def test_api_and_worker_share_redis_and_store_settings(compose, env_example):
    for env in ({}, env_example):
        envs = _resolved_service_envs(compose, env)
        for key in ("PATCHDIFF_REDIS_URL", "PATCHDIFF_STORE_S3_BUCKET", "PATCHDIFF_STORE_S3_PREFIX",
                    "PATCHDIFF_STORE_S3_ENDPOINT_URL", "PATCHDIFF_DEFAULT_MODEL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            assert envs["api"][key] == envs["worker"][key], key
        assert envs["api"]["PATCHDIFF_REDIS_URL"] == "redis://redis:6379/0"
        assert envs["api"]["PATCHDIFF_STORE_S3_ENDPOINT_URL"] == "http://s3:8333"
        assert envs["s3-init"]["PATCHDIFF_STORE_S3_ENDPOINT_URL"] == "http://s3:8333"
        # The app's S3 credentials are the key pair SeaweedFS is configured with.
        identities = json.loads(interpolate(compose["configs"]["s3-config"]["content"], env))["identities"]
        creds = [c for i in identities for c in i["credentials"]]
        assert {"accessKey": envs["api"]["AWS_ACCESS_KEY_ID"], "secretKey": envs["api"]["AWS_SECRET_ACCESS_KEY"]} in creds
        assert all(envs["s3-init"][k] == envs["api"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


# -- the API image --------------------------------------------------------------------------------

def _pip_installs(dockerfile: Dockerfile) -> list[list[str]]:
    installs = []
    for rest in dockerfile.all("RUN"):
        commands: list[list[str]] = [[]]
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        for word in lexer:
            if word in ("&&", "||", ";", ";;", "|", "{", "}"):
                commands.append([])
            else:
                commands[-1].append(word)
        for words in commands:
            if "pip" in words and "install" in words:
                args = words[words.index("install") + 1:]
                installs.append([a for a in args if not a.startswith("-") and a != "$@"])
    return installs


def _lock(name: str) -> dict[str, str]:
    """{normalised name: version} of docker/requirements/NAME.txt (exact pins only)."""
    pins = {}
    for line in (LOCKS / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([\w.]+)", line)
            assert m, f"{name}.txt: not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _requirement_names(reqs: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in reqs}


def test_api_image_installs_the_locked_api_dependencies_only(pyproject):
    installs = _pip_installs(Dockerfile(API_DOCKERFILE))
    assert installs == [["/tmp/requirements/api.txt"], ["."]], f"the API image must install its lock, then ., got {installs}"
    assert "--no-deps" in " ".join(Dockerfile(API_DOCKERFILE).all("RUN")), "the project itself without dependencies"
    extras = pyproject["project"]["optional-dependencies"]
    lock = _lock("api")
    assert not [n for n in lock if n.startswith(("torch", "nvidia"))], "the API lock pulls torch"
    missing = (_requirement_names(extras["api"]) | _requirement_names(pyproject["project"]["dependencies"])) - set(lock)
    assert not missing, f"docker/requirements/api.txt lacks {sorted(missing)} (make lock)"


def test_worker_locks_cover_the_worker_dependencies(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    torch_lock, worker_lock = _lock("torch"), _lock("worker")
    assert not set(torch_lock) & set(worker_lock), "a package pinned in both worker locks"
    wanted = _requirement_names(extras["core"] + extras["worker"] + pyproject["project"]["dependencies"])
    missing = wanted - set(torch_lock) - set(worker_lock)
    assert not missing, f"the worker locks lack {sorted(missing)} (make lock)"
    assert "torch" in torch_lock and "torch" not in worker_lock
    installs = _pip_installs(Dockerfile(WORKER_DOCKERFILE))
    assert installs == [["/tmp/requirements/torch.txt"], ["/tmp/requirements/torch.txt", "/tmp/requirements/worker.txt"],
                        ["."]], installs
    # Debian bookworm's python3 is 3.11.2: redis needs async-timeout below 3.11.3.
    assert "async-timeout" in _lock("api") and "async-timeout" in worker_lock


def test_locks_and_images_carry_nothing_of_a_build_machine():
    """No local index, find-links directory or CA bundle of the machine that made them."""
    paths = [*LOCKS.glob("*.txt"), *DOCKERFILES, COMPOSE, COMPOSE_CPU, ENV_EXAMPLE, S3_INIT, STANDINS,
             *(REPO / "tests" / "compose").glob("*")]
    for path in paths:
        if path.is_file():
            text = path.read_text()
            for bad in ("file://", "/opt/wheels", "/opt/pypi", "ca-certificates.crt", "PIP_CERT", "--cert", "/work/"):
                assert bad not in text, f"{path.relative_to(REPO)} names {bad!r}"


def test_dependencies_are_installed_before_the_source_is_copied():
    """A code change must not reinstall the dependencies: in the final stage the venv (built from the
    locks in an earlier stage) comes before the first COPY of source."""
    for path in DOCKERFILES:
        text = Dockerfile(path)
        order = [(kw, rest) for kw, rest in text.instructions if kw in ("FROM", "COPY", "RUN")]
        final = max(i for i, (kw, _) in enumerate(order) if kw == "FROM")
        deps = [i for i, (kw, rest) in enumerate(order) if kw == "COPY" and "--from=deps" in rest]
        source = [i for i, (kw, rest) in enumerate(order) if kw == "COPY" and "patchdiff_core" in rest]
        assert deps and source and final < deps[0] < source[0], f"{path.name}: {order}"
        first_stage = order[:final]
        assert any("requirements" in rest for kw, rest in first_stage if kw == "COPY")
        assert not any("patchdiff_core" in rest or "pyproject" in rest for kw, rest in first_stage if kw == "COPY"), \
            f"{path.name}: the dependency stage copies source"


def test_base_and_third_party_images_are_variables(compose):
    for path in DOCKERFILES:
        dockerfile = Dockerfile(path)
        assert dockerfile.arg_defaults()["PYTHON_IMAGE"].startswith("python:3.11")
        assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in dockerfile.all("FROM")), f"{path.name}: FROM {dockerfile.all('FROM')}"
    services = compose["services"]
    for name, var in (("redis", "REDIS_IMAGE"), ("s3", "S3_IMAGE"), ("proxy", "PROXY_IMAGE")):
        image = services[name]["image"]
        assert image.startswith("${" + var + ":-"), f"{name}: image {image} is not overridable with {var}"
        default = interpolate(image, {})
        assert ":" in default and not default.endswith(":latest"), f"{name}: pin a tag, not {default}"
    for name in ("api", "worker", "s3-init"):
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11.13-slim-bookworm}"


def test_ports_are_published_on_localhost_only(compose, merged):
    for data in (compose, merged):
        for name, svc in data["services"].items():
            for port in svc.get("ports") or []:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_api_cmd_is_uvicorn_factory_on_the_exposed_port(compose):
    dockerfile = Dockerfile(API_DOCKERFILE)
    cmd = dockerfile.exec_form(dockerfile.one("CMD"))
    assert cmd[0] == "uvicorn" and "--factory" in cmd
    assert "api.main:create_app" in cmd
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert dockerfile.one("EXPOSE").split() == [port]
    assert [str(p) for p in compose["services"]["api"]["expose"]] == [port]


# -- compose: the proxy in front of the API replicas ----------------------------------------------

def _haproxy_config(compose: dict) -> dict[str, dict[str, list[list[str]]]]:
    """{section: {name: [keyword line, split]}} of the proxy's HAProxy configuration (`configs:`)."""
    sections: dict[str, dict[str, list[list[str]]]] = {}
    current: list[list[str]] | None = None
    for line in compose["configs"]["proxy-config"]["content"].splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = sections.setdefault(words[0], {}).setdefault(" ".join(words[1:]), [])
        else:
            assert current is not None, f"a keyword outside any section: {line!r}"
            current.append(words)
    return sections


def _keyword(lines: list[list[str]], *keyword: str) -> list[list[str]]:
    """The arguments of each line of `lines` that starts with `keyword`."""
    return [words[len(keyword):] for words in lines if tuple(words[:len(keyword)]) == keyword]


def test_only_the_proxy_publishes_a_port_so_the_api_scales(compose, merged):
    """`--scale api=N` needs the API replicas to publish no host port; the proxy publishes API_PORT."""
    for data in (compose, merged):
        published = {name: svc["ports"] for name, svc in data["services"].items() if svc.get("ports")}
        assert published == {"proxy": ["127.0.0.1:${API_PORT:-8000}:8000"]}, published
    assert interpolate(compose["services"]["proxy"]["ports"][0], {}) == "127.0.0.1:8000:8000"
    assert compose["services"]["proxy"]["depends_on"] == {"api": {"condition": "service_started"}}
    assert "container_name" not in compose["services"]["api"], "a fixed container name cannot scale"


def test_proxy_config_balances_over_the_api_replicas(compose, tmp_path):
    """The HAProxy configuration against the compose file and the API: the port it binds is the one
    published, its servers are the `api` service's replicas on uvicorn's port found through Docker's
    DNS, health-checked on the liveness route, with timeouts that an event stream's keep-alives fit."""
    from patchdiff_core.service.settings import Settings

    proxy = compose["services"]["proxy"]
    command = proxy["command"]
    config_path = command[command.index("-f") + 1]
    assert [c["target"] for c in proxy["configs"] if c["source"] == "proxy-config"] == [config_path]
    config = _haproxy_config(compose)
    frontend = next(iter(config["frontend"].values()))
    published_target = proxy["ports"][0].rsplit(":", 1)[1]
    assert _keyword(frontend, "bind") == [[f":{published_target}"]]
    backends = config["backend"]
    assert _keyword(frontend, "default_backend") == [[name] for name in backends]
    backend = next(iter(backends.values()))

    api_port = Dockerfile(API_DOCKERFILE).one("EXPOSE").split()[0]
    [(_name, count, address)] = [tuple(args) for args in _keyword(backend, "server-template")]
    assert address == f"api:{api_port}", f"the proxy's servers are {address}, the API replicas api:{api_port}"
    assert int(count) >= 2, "room for several replicas"
    default_server = _keyword(backend, "default-server")[0]
    assert "check" in default_server and default_server[default_server.index("resolvers") + 1] in config["resolvers"]
    assert default_server[default_server.index("init-addr") + 1] == "none", "HAProxy must start before any replica"
    resolvers = next(iter(config["resolvers"].values()))
    assert _keyword(resolvers, "nameserver")[0][1] == "127.0.0.11:53", "Docker's embedded DNS"
    assert _keyword(backend, "option", "httpchk") == [[]]
    [check] = _keyword(backend, "http-check", "send")
    assert check[check.index("meth") + 1] == "GET"
    assert check[check.index("uri") + 1] == "/healthz", f"the proxy checks {check}: the API's liveness is /healthz"
    assert "/healthz" in _app_paths(tmp_path)

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
        return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[unit]

    timeouts = {args[0]: seconds(args[1]) for args in _keyword(next(iter(config["defaults"].values())), "timeout")}
    keepalive = Settings.model_fields["sse_keepalive_s"].default
    assert min(timeouts["client"], timeouts["server"]) >= 3 * keepalive, \
        f"an idle event stream sends a keep-alive every {keepalive} s: the proxy's timeouts {timeouts} cut it"


def test_api_module_imports_without_torch():
    code = ("import importlib, sys; import api.main as m; assert callable(m.create_app); "
            "assert 'torch' not in sys.modules, 'api.main imports torch'")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def _app_paths(store_dir: Path) -> set[str]:
    from api.main import create_app
    from patchdiff_core.service.settings import Settings

    # Nothing connects at creation: the Redis client is lazy.
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", store_dir=store_dir))
    return {getattr(route, "path", None) for route in app.routes}


def test_api_healthchecks_use_existing_endpoints_on_the_right_port(compose, tmp_path):
    paths = _app_paths(tmp_path)
    assert {"/healthz", "/readyz"} <= paths
    dockerfile = Dockerfile(API_DOCKERFILE)
    port = dockerfile.one("EXPOSE").split()[0]
    commands = [" ".join(dockerfile.healthcheck_command()), " ".join(compose["services"]["api"]["healthcheck"]["test"])]
    for command in commands:
        urls = re.findall(r"https?://[^'\" ]+", command)
        assert urls, f"no URL in healthcheck {command!r}"
        for url in urls:
            m = re.match(r"https?://(127\.0\.0\.1|localhost):(\d+)(/[^?'\" ]*)", url)
            assert m, f"healthcheck URL {url} is not local"
            routes = sorted(p for p in paths if p)
            assert m.group(2) == port and m.group(3) in paths, f"{url}: port {port}, routes {routes}"
            assert m.group(3) == "/healthz", "the container healthcheck is liveness (/healthz), not readiness"
        assert "curl" not in command and "wget" not in command, "no curl or wget in python:slim"


# -- the worker image -----------------------------------------------------------------------------

def test_worker_cmd_module_is_importable():
    dockerfile = Dockerfile(WORKER_DOCKERFILE)
    assert dockerfile.exec_form(dockerfile.one("CMD")) == ["python", "-m", "worker"]
    code = ("import importlib.util, sys; import worker.main as m; assert callable(m.run_worker); "
            "assert importlib.util.find_spec('worker.__main__') is not None")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_worker_torch_pin_matches_pyproject_lock_and_compose(pyproject, compose):
    from packaging.requirements import Requirement

    dockerfile = Dockerfile(WORKER_DOCKERFILE)
    args = dockerfile.arg_defaults()
    version = args["TORCH_VERSION"]
    assert version == "2.13.0", "the torch everything else is tested with"
    torch_req = next(Requirement(r) for r in pyproject["project"]["optional-dependencies"]["core"]
                     if Requirement(r).name == "torch")
    assert torch_req.specifier.contains(version), f"TORCH_VERSION {version} outside pyproject's {torch_req}"
    assert _lock("torch")["torch"] == version
    assert str(compose["services"]["worker"]["build"]["args"]["TORCH_VERSION"]) == version
    # The GPU image: the default index (PyPI), whose Linux wheel is the CUDA build.
    assert args["TORCH_INDEX_URL"] == "" == compose["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"]
    assert args["DEVICE"] == "cuda"
    assert "PATCHDIFF_DEVICE=${DEVICE}" in " ".join(dockerfile.all("ENV"))
    assert "NVIDIA_VISIBLE_DEVICES=all" in " ".join(dockerfile.all("ENV"))


def test_worker_cpu_build_uses_the_cpu_index(compose_cpu, merged):
    args = compose_cpu["services"]["worker"]["build"]["args"]
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu")
    assert args["DEVICE"] == "cpu" == service_env(compose_cpu["services"]["worker"])["PATCHDIFF_DEVICE"]
    assert set(merged["services"]["worker"]["build"]["args"]) <= set(Dockerfile(WORKER_DOCKERFILE).arg_defaults()), \
        "build args the Dockerfile does not declare"
    assert merged["services"]["worker"]["image"] != load_compose(COMPOSE)["services"]["worker"]["image"], \
        "the CPU and CUDA worker images need different tags"


def test_worker_healthcheck_follows_the_control_loop(tmp_path):
    """The HEALTHCHECK command exits 0 only while the worker's control loop touches its liveness file."""
    command = Dockerfile(WORKER_DOCKERFILE).healthcheck_command()
    assert command[0] == "python"
    alive = tmp_path / "alive"
    env = {**os.environ, "PATCHDIFF_WORKER_LIVENESS_FILE": str(alive)}

    def healthy() -> bool:
        return subprocess.run([sys.executable, *command[1:]], check=False, cwd=REPO, env=env, capture_output=True,
                              timeout=60).returncode == 0

    assert not healthy(), "healthy with no worker"
    alive.write_text("now")
    assert healthy()
    old = time.time() - 120
    os.utime(alive, (old, old))  # the control loop stopped going round two minutes ago
    assert not healthy()


def test_the_worker_touches_its_liveness_file(tmp_path, monkeypatch):
    from worker.main import Liveness

    class Control:
        finished = __import__("threading").Event()
        counters = type("C", (), {"loops": 1})()

    path = tmp_path / "alive"
    thread = Liveness(Control(), str(path))
    thread.start()
    try:
        wait_until_exists = time.monotonic() + 10
        while not path.exists() and time.monotonic() < wait_until_exists:
            time.sleep(0.05)
        assert path.exists()
    finally:
        Control.finished.set()
        thread.join(10)


def test_images_run_as_non_root_with_a_healthcheck():
    for path in DOCKERFILES:
        dockerfile = Dockerfile(path)
        users = dockerfile.all("USER")
        assert users, f"{path.name} runs as root"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name} runs as root"
        assert dockerfile.healthcheck_command()


# -- compose: GPU, volumes, dependencies, redis, S3 --------------------------------------------

def _devices(service: dict) -> list:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_worker_sees_every_gpu_in_the_base_file_and_none_with_the_cpu_override(compose, merged):
    devices = _devices(compose["services"]["worker"])
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert not any(_devices(svc) for name, svc in compose["services"].items() if name != "worker")
    assert _devices(merged["services"]["worker"]) == []
    assert service_env(merged["services"]["worker"])["PATCHDIFF_DEVICE"] == "cpu"
    assert service_env(compose["services"]["worker"])["PATCHDIFF_DEVICE"] == "cuda"


def _volume_mounts(service: dict) -> list[tuple[str, str]]:
    """[(source, target)] of a service's volumes (short or long syntax)."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"]))
        else:
            source, _, rest = str(volume).partition(":")
            mounts.append((source, rest.split(":")[0]))
    return mounts


def test_worker_replicas_claim_one_gpu_each_through_a_shared_lock_folder(compose, merged, monkeypatch, tmp_path):
    """`--scale worker=N` on a machine with N GPUs: each replica sees every GPU and claims the first
    free one by a lock in PATCHDIFF_GPU_LOCK_DIR, which must be a named volume that the worker
    replicas share (a folder of each container's own would let every replica claim GPU 0), owned by
    the worker image's user."""
    from patchdiff_core.service.settings import Settings
    from worker.gpus import choose_device

    worker = compose["services"]["worker"]
    lock_dir = service_env(worker)["PATCHDIFF_GPU_LOCK_DIR"]
    sources = [src for src, target in _volume_mounts(worker) if target == lock_dir]
    assert len(sources) == 1, f"no volume is mounted on PATCHDIFF_GPU_LOCK_DIR {lock_dir}: {worker.get('volumes')}"
    source = sources[0]
    assert source in compose["volumes"], f"{lock_dir} is not on a named volume (each replica would have its own)"
    others = [name for name, svc in compose["services"].items()
              if name != "worker" and source in [src for src, _ in _volume_mounts(svc)]]
    assert not others, f"only the workers share the GPU locks; {others} mount {source} too"
    monkeypatch.setenv("PATCHDIFF_GPU_LOCK_DIR", lock_dir)
    assert str(Settings().gpu_lock_dir) == lock_dir

    # The image makes the folder, owned by the user the worker runs as (a new named volume takes the
    # ownership of the folder it is mounted on).
    dockerfile = Dockerfile(WORKER_DOCKERFILE)
    user = dockerfile.all("USER")[-1].split(":")[0]
    runs = " ".join(dockerfile.all("RUN"))
    assert re.search(r"mkdir -p [^&;]*" + re.escape(lock_dir) + r"(\s|$)", runs), f"the image does not make {lock_dir}"
    parent = lock_dir.rsplit("/", 1)[0]
    assert re.search(rf"chown -R (\S+:\S+) {re.escape(parent)}(\s|$)", runs), f"{parent} is not given to the worker's user"
    assert re.search(rf"useradd --uid {user}\b", runs), f"USER {user} is not the user the image creates"

    # The CPU override keeps the setting; a CPU worker claims nothing.
    assert service_env(merged["services"]["worker"])["PATCHDIFF_GPU_LOCK_DIR"] == lock_dir
    assert choose_device("cpu", tmp_path, 4) == ("cpu", None) and not list(tmp_path.iterdir())


def test_cpu_override_keeps_the_rest_of_the_worker(compose, merged):
    base, over = compose["services"]["worker"], merged["services"]["worker"]
    assert over["build"]["dockerfile"] == base["build"]["dockerfile"]
    assert over["depends_on"] == base["depends_on"]
    env_base, env_over = service_env(base), service_env(over)
    assert {k: v for k, v in env_over.items() if k != "PATCHDIFF_DEVICE"} == \
           {k: v for k, v in env_base.items() if k != "PATCHDIFF_DEVICE"}


@pytest.mark.parametrize("which", ["base", "merged"])
def test_named_volumes_are_declared(compose, merged, which):
    data = compose if which == "base" else merged
    declared = set(data.get("volumes") or {})
    for name, svc in data["services"].items():
        for volume in svc.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type", "volume") != "volume" or not volume.get("source"):
                    continue
                source = volume["source"]
            else:
                if ":" not in volume:
                    continue  # an anonymous volume
                source = volume.split(":")[0]
            if source.startswith((".", "/", "~", "$")):
                continue  # a bind mount
            assert source in declared, f"{name}: volume {source!r} is not declared at the top level"


def test_dependencies_wait_for_health_and_bucket(compose):
    services = compose["services"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["s3-init"]["condition"] == "service_completed_successfully"
    # s3_init.py waits for the S3 server itself (S3_INIT_TIMEOUT_S); SeaweedFS's image has no health check.
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_started"
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"


def test_redis_is_persistent_and_checked(compose):
    redis_svc = compose["services"]["redis"]
    assert interpolate(redis_svc["image"], {}).startswith("redis:7")
    command = redis_svc["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[1] == "/data" for v in redis_svc["volumes"])
    assert redis_svc["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_seaweedfs_serves_s3_with_the_configured_keys_on_its_volume(compose):
    s3 = compose["services"]["s3"]
    assert interpolate(s3["image"], {}).startswith("chrislusf/seaweedfs:")
    command = s3["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[0] == "server" and "-s3" in command and "-dir=/data" in command and "-s3.port=8333" in command
    config_path = next(a.split("=", 1)[1] for a in command if a.startswith("-s3.config="))
    assert {"source": "s3-config", "target": config_path} in s3["configs"]
    assert any(str(v).split(":")[1] == "/data" for v in s3["volumes"])
    assert "ports" not in s3, "the S3 port stays inside the compose network"


@pytest.mark.parametrize("source", ["defaults", "env_example"])
def test_s3_init_creates_the_configured_bucket_and_retention(compose, env_example, source):
    env = env_example if source == "env_example" else {}
    envs = _resolved_service_envs(compose, env)
    bucket = envs["api"]["PATCHDIFF_STORE_S3_BUCKET"]
    assert bucket == envs["worker"]["PATCHDIFF_STORE_S3_BUCKET"] == envs["s3-init"]["PATCHDIFF_STORE_S3_BUCKET"]
    assert envs["s3-init"]["PATCHDIFF_STORE_S3_PREFIX"] == envs["api"]["PATCHDIFF_STORE_S3_PREFIX"]
    assert "RESULTS_RETENTION_DAYS" not in envs["s3-init"]  # derived from PATCHDIFF_JOB_TTL_S (one setting)
    init = compose["services"]["s3-init"]
    assert init["command"] == ["python", "/app/s3_init.py"]
    assert (["docker/s3_init.py"], "./s3_init.py") in Dockerfile(API_DOCKERFILE).copies()
    assert Dockerfile(API_DOCKERFILE).one("WORKDIR") == "/app"
    assert init["build"] == compose["services"]["api"]["build"] and init["image"] == compose["services"]["api"]["image"]
    assert init.get("restart") in ("no", None)


def test_s3_init_script_sets_bucket_and_lifecycle_idempotently(monkeypatch, capsys):
    """docker/s3_init.py against moto's in-process S3: bucket, rule, and again (every `up` runs it)."""
    import importlib.util

    moto = needs("moto")
    spec = importlib.util.spec_from_file_location("s3_init", S3_INIT)
    s3_init = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s3_init)
    for key, value in {"PATCHDIFF_STORE_S3_BUCKET": "results", "PATCHDIFF_STORE_S3_PREFIX": "jobs",
                       "PATCHDIFF_JOB_TTL_S": str(2 * 86400), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PATCHDIFF_STORE_S3_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        import boto3

        assert s3_init.main() == 0
        assert s3_init.main() == 0
        s3 = boto3.client("s3")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["results"]
        rules = s3.get_bucket_lifecycle_configuration(Bucket="results")["Rules"]
        assert [(r["Filter"]["Prefix"], r["Expiration"]["Days"], r["Status"]) for r in rules] == [("jobs/", 3, "Enabled")]
    out = capsys.readouterr().out
    assert "created bucket results" in out and "bucket results exists" in out


# -- Compose itself -------------------------------------------------------------------------------

def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], check=False,
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        out = subprocess.run([standalone, "version"], check=False, capture_output=True, text=True)
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return [standalone]
    return None


@pytest.mark.parametrize("env_file", [None, ".env.example"])
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"],
                                   ["docker-compose.yml", "docker-compose.cpu.yml", "tests/compose/standins.yml"]],
                         ids=["base", "cpu", "compose-test"])
def test_compose_config_validates(files, env_file):
    cli = _compose_cli()
    if cli is None:
        if os.environ.get("CI"):
            pytest.fail("CI: .ci/run installs Docker Compose v2 first, and `docker compose version` fails")
        pytest.skip("the Docker Compose v2 CLI is missing here (`docker compose version` fails: no compose "
                    "plugin, and no standalone docker-compose v2); the other tests parse the files themselves")
    args = [*cli, "--project-directory", str(REPO)]
    for f in files:
        args += ["-f", str(REPO / f)]
    if env_file:
        args += ["--env-file", str(REPO / env_file)]
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("PATCHDIFF_", "AWS_", "S3_")) or k in read_env_file(ENV_EXAMPLE) or k == "COMPOSE_FILE")}
    result = subprocess.run([*args, "config", "-q"], check=False, cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
