# heavyapp: Gunicorn + Flask for CPU-heavy work, one worker per usable CPU.
#
#   DOCKER_BUILDKIT=1 docker build -t heavyapp .
#   docker run --rm --cpus=2 -p 127.0.0.1:8000:8000 heavyapp
#
# Worker count: gunicorn_conf.py sizes the pool from the container's CPU quota
# (cgroup v1 cpu.cfs_quota_us/cpu.cfs_period_us or v2 cpu.max, rounded up), not
# from os.cpu_count(), so `--cpus=1` gives 1 worker even on a 64-core host.
# WEB_CONCURRENCY overrides it. numpy ships in the image (the app's /matmul and
# /predict); each worker's BLAS/OpenMP pool gets usable CPUs / workers threads,
# so `--cpus=2` gives 2 workers with 1 native thread each.
#
# Stopping: STOPSIGNAL is SIGTERM, Gunicorn's graceful stop: workers finish the
# request in hand, for at most GRACEFUL_TIMEOUT (30 s by default). `docker stop`
# only waits 10 s by default before SIGKILL, and the shorter of the two wins,
# so stop with `docker stop -t 35 ...` (Compose: stop_grace_period: 35s,
# Kubernetes: terminationGracePeriodSeconds: 35) -- anything >= GRACEFUL_TIMEOUT.
#
# The base image is a build argument so a registry mirror or a locally built
# stand-in can replace the official image; the tests build with
# --build-arg PYTHON_IMAGE=heavyapp-base:bookworm. A venv is used in both stages:
# it works on the official image and on Debian's python3 (PEP 668).
ARG PYTHON_IMAGE=python:3.12-slim

# ---------------------------------------------------------------- build: wheels
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/build-venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY heavyapp ./heavyapp
COPY workers ./workers
# The project and all its runtime dependencies as wheels; nothing else leaves this stage.
RUN /opt/build-venv/bin/pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000 \
    GRACEFUL_TIMEOUT=30 \
    HEAVYAPP_RUN_DIR=/tmp/heavyapp

# Install from the wheels only (no index, no compiler), then drop pip from the runtime venv.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels /wheels/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && useradd --uid 10001 --user-group --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin heavyapp

WORKDIR /app
COPY gunicorn_conf.py ./

# Numeric uid so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# No curl in slim images: the venv's Python asks /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4); sys.exit(r.status != 200)"]
CMD ["gunicorn", "-c", "gunicorn_conf.py", "heavyapp:app"]
