# The S3 stand-in of `make compose-test` (tests only; see s3_standin.py and README "Docker").
# Built offline like the project's images: PYTHON_IMAGE + the wheels in docker/wheels/.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}
COPY tests/compose/s3-standin.txt /tmp/requirements.txt
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/wheels; else set --; fi; \
    python3 -m venv /opt/venv && /opt/venv/bin/python -m pip install "$@" --require-virtualenv -r /tmp/requirements.txt
RUN groupadd --gid 10002 s3 && useradd --uid 10002 --gid 10002 --no-create-home --shell /usr/sbin/nologin s3 \
    && mkdir -p /data && chown s3:s3 /data
COPY tests/compose/s3_standin.py /opt/s3_standin.py
USER 10002:10002
EXPOSE 8333
ENTRYPOINT ["/opt/venv/bin/python", "/opt/s3_standin.py"]
