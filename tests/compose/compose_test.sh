#!/usr/bin/env bash
# `make compose-test`: build the images and run the compose stack for real on this machine, with the
# CPU override, scaled out (2 API replicas behind the `proxy` service, 3 workers), then check it from
# the host (check.py): jobs through the proxy's port and through each API replica (grid PNGs from
# the S3 store through any of them), the job metrics of the replicas summing to the jobs submitted,
# one worker restarted mid-job, GPU claims across the worker containers' shared lock folder,
# `down` + `up` keeping the finished jobs' results on the same port.
#
# Needs a Docker engine and Compose v2 (`docker compose`), debootstrap (to make the base images
# when no registry can be reached) and the project's venv (PYTHON). .ci/run installs all of them.
#
# Settings (environment):
#   PATCHDIFF_COMPOSE_CACHE   where the Debian root filesystems are cached (/var/cache/patchdiff-compose-test)
#   PATCHDIFF_COMPOSE_PORT    host port of the API (the proxy), on 127.0.0.1 (18000)
#   PYTHON_IMAGE, REDIS_IMAGE, PROXY_IMAGE
#                             use these images instead of making stand-ins with debootstrap (e.g.
#                             python:3.11.13-slim-bookworm, redis:7.4.6-alpine, haproxy:3.2-alpine
#                             where a registry works)
#   DEBIAN_MIRROR             for debootstrap (http://deb.debian.org/debian)
#   KEEP_STACK=1              leave the stack running at the end (default: down -v)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
CACHE=${PATCHDIFF_COMPOSE_CACHE:-/var/cache/patchdiff-compose-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export API_PORT=${PATCHDIFF_COMPOSE_PORT:-18000}
export COMPOSE_PROJECT_NAME=patchdiff-compose-test
export IMAGE_TAG=compose-test
export PATCHDIFF_API_KEYS=   # auth off for the test (the default of docker-compose.yml)
STANDIN_PY=patchdiff-standin/python:3.11-bookworm
STANDIN_REDIS=patchdiff-standin/redis:7.0-bookworm
STANDIN_PROXY=patchdiff-standin/haproxy:2.6-bookworm
# The scaled stack: what `up` starts (and check.py starts again after `down`).
export API_REPLICAS=2 WORKER_REPLICAS=3
t0=$SECONDS
step() { printf '\n== [%4ss] %s\n' "$((SECONDS - t0))" "$*"; }

docker info >/dev/null 2>&1 || { echo "compose-test: no Docker engine (docker info failed)"; exit 1; }
docker compose version >/dev/null 2>&1 || { echo "compose-test: no Compose v2 (docker compose version failed)"; exit 1; }

# -- base images: Debian bookworm root filesystems made by debootstrap, imported --------------------
make_rootfs() {  # make_rootfs NAME "PACKAGES" [FROM] -> $CACHE/NAME.tar (cached)
  # debootstrap a minimal bookworm with PACKAGES, or add them with apt to the cached rootfs FROM.
  local name=$1 packages=$2 from=${3:-} dir
  [ -s "$CACHE/$name.tar" ] && return 0
  mkdir -p "$CACHE"; dir=$(mktemp -d "$CACHE/$name.XXXX")
  if [ -z "$from" ]; then
    command -v debootstrap >/dev/null || { echo "compose-test: needs debootstrap (apt-get install debootstrap)"; exit 1; }
    debootstrap --variant=minbase --include="${packages// /,}" bookworm "$dir" "$MIRROR" > "$CACHE/$name.log" 2>&1 \
      || { tail -20 "$CACHE/$name.log"; exit 1; }
  else
    tar -C "$dir" -xf "$CACHE/$from.tar"
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' > "$dir/usr/sbin/policy-rc.d"; chmod +x "$dir/usr/sbin/policy-rc.d"
    { chroot "$dir" apt-get update -q && DEBIAN_FRONTEND=noninteractive chroot "$dir" apt-get install -y -q --no-install-recommends $packages; } \
      > "$CACHE/$name.log" 2>&1 || { tail -20 "$CACHE/$name.log"; exit 1; }
    rm -f "$dir/usr/sbin/policy-rc.d"
  fi
  chroot "$dir" apt-get clean
  # Nothing of this machine in the image: its resolver and name (docker sets its own at run time).
  : > "$dir/etc/resolv.conf"; : > "$dir/etc/hostname"
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/tmp/* "$dir"/var/log/*.log "$dir"/var/cache/apt/*.bin
  if [ -x "$dir/usr/bin/redis-server" ]; then mkdir -p "$dir/data"; chroot "$dir" chown redis:redis /data; fi
  tar -C "$dir" -cf "$CACHE/$name.tar.tmp" . && mv "$CACHE/$name.tar.tmp" "$CACHE/$name.tar"
  rm -rf "$dir"
}
if [ -z "${PYTHON_IMAGE:-}" ]; then
  export PYTHON_IMAGE=$STANDIN_PY
  if ! docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
    step "base image $PYTHON_IMAGE (debootstrap: python3, python3-venv)"
    make_rootfs python "python3 python3-venv"
    docker import --change 'CMD ["python3"]' "$CACHE/python.tar" "$PYTHON_IMAGE"
  fi
fi
if [ -z "${REDIS_IMAGE:-}" ]; then
  export REDIS_IMAGE=$STANDIN_REDIS
  if ! docker image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
    step "base image $REDIS_IMAGE (Debian's redis-server on the bookworm rootfs)"
    make_rootfs python "python3 python3-venv"
    make_rootfs redis redis-server python
    docker import --change 'WORKDIR /data' --change 'USER redis' --change 'CMD ["redis-server"]' \
      "$CACHE/redis.tar" "$REDIS_IMAGE"
  fi
fi
if [ -z "${PROXY_IMAGE:-}" ]; then
  export PROXY_IMAGE=$STANDIN_PROXY
  if ! docker image inspect "$PROXY_IMAGE" >/dev/null 2>&1; then
    step "base image $PROXY_IMAGE (Debian's haproxy on the bookworm rootfs)"
    make_rootfs python "python3 python3-venv"
    make_rootfs haproxy haproxy python
    # The official image's entrypoint runs `haproxy -W -db` plus the command's arguments; so does this one.
    docker import --change 'USER haproxy' --change 'ENTRYPOINT ["/usr/sbin/haproxy", "-W", "-db"]' \
      "$CACHE/haproxy.tar" "$PROXY_IMAGE"
  fi
fi

# -- wheelhouse: every line of the locks, as wheels, for the offline builds --------------------------
LOCKS="docker/requirements/torch.txt docker/requirements/worker.txt docker/requirements/api.txt tests/compose/s3-standin.txt"
stamp=$(cat $LOCKS | sha256sum | cut -c1-16)
# The stamp lives outside docker/wheels/, and wheels that did not change are left as they are:
# the folder is bind-mounted into the builds, so any change there rebuilds their layers (torch!).
# The stamp is per machine, the folder per checkout: a fresh checkout (an empty folder) fills it too.
if [ "$(cat "$CACHE/wheels.stamp" 2>/dev/null)" != "$stamp" ] || ! ls docker/wheels/*.whl >/dev/null 2>&1; then
  step "wheelhouse docker/wheels/ from the locks"
  mkdir -p "$CACHE"; fresh=$(mktemp -d "$CACHE/wheels.XXXX")
  # shellcheck disable=SC2046
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$fresh" $(printf -- '-r %s ' $LOCKS)
  for f in docker/wheels/*.whl; do
    if [ -e "$f" ] && [ ! -e "$fresh/${f##*/}" ]; then rm -f "$f"; fi
  done
  for f in "$fresh"/*.whl; do
    if ! cmp -s "$f" "docker/wheels/${f##*/}"; then cp -p "$f" docker/wheels/; fi
  done
  rm -rf "$fresh" docker/wheels/.stamp
  echo "$stamp" > "$CACHE/wheels.stamp"
fi
du -sh docker/wheels

COMPOSE=(docker compose -f docker-compose.yml -f docker-compose.cpu.yml -f tests/compose/standins.yml)
dump_logs() {
  echo "== compose-test failed; the stack's state and logs:"
  "${COMPOSE[@]}" ps -a || true
  "${COMPOSE[@]}" logs --no-color --tail 80 || true
}
cleanup() {
  rc=$?
  [ "$rc" = 0 ] || dump_logs
  if [ "${KEEP_STACK:-0}" != 1 ]; then "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; fi
  exit "$rc"
}
trap cleanup EXIT

step "clean slate: down -v"
"${COMPOSE[@]}" down -v --remove-orphans

step "build (offline, --network none; PYTHON_IMAGE=$PYTHON_IMAGE)"
# `docker compose build` can exit 0 although a build failed (Compose 2.40 falling back to the classic
# builder when buildx is missing), and the stack would then run the previous images: read its output.
build_log=$(mktemp)
"${COMPOSE[@]}" build 2>&1 | tee "$build_log"
if grep -qE "^(failed to solve|ERROR)|^#[0-9]+ ERROR" "$build_log"; then
  echo "compose-test: an image build failed (see above)"; exit 1
fi
rm -f "$build_log"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^patchdiff-(api|worker):$IMAGE_TAG" || true
for img in "patchdiff-api:$IMAGE_TAG" "patchdiff-worker:$IMAGE_TAG-cpu"; do
  user=$(docker image inspect --format '{{.Config.User}}' "$img")
  [ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] || { echo "$img runs as root"; exit 1; }
  echo "$img: user $user, healthcheck $(docker image inspect --format '{{json .Config.Healthcheck.Test}}' "$img" | cut -c1-60)..."
done
docker run --rm --network none --entrypoint python "patchdiff-worker:$IMAGE_TAG-cpu" -c \
  "import torch; print('worker image: torch', torch.__version__, 'cuda', torch.version.cuda); assert torch.__version__.startswith('2.13.0')"

step "up: $API_REPLICAS API replicas behind the proxy, $WORKER_REPLICAS workers"
"${COMPOSE[@]}" up -d --scale api="$API_REPLICAS" --scale worker="$WORKER_REPLICAS"
"${COMPOSE[@]}" logs --no-color s3-init

step "checks through http://127.0.0.1:$API_PORT and each API replica"
"$PYTHON" tests/compose/check.py --port "$API_PORT" --api-replicas "$API_REPLICAS" \
  --worker-replicas "$WORKER_REPLICAS" -- "${COMPOSE[@]}"


