# syntax=docker/dockerfile:1.7
# POD images, one multi-stage file (docker-compose.yml builds each target):
#   serve     slim CPU server: ONNX Runtime + FastAPI, no torch             docker build --target serve -t pod-rec/serve .
#   serve-gpu CUDA server: onnxruntime-gpu (CUDA provider) and torch        docker build --target serve-gpu -t pod-rec/serve-gpu .
#   train     data + training + export (torch CPU wheel)                    docker build --target train -t pod-rec/train .
#   loadtest  Locust and the scenario in loadtests/                         docker build --target loadtest -t pod-rec/loadtest .
# Every pip install is pinned by deploy/constraints.txt (the versions the tests pass with) plus the torch and
# onnxruntime-gpu pins below. No model weights are downloaded at build time: the train image trains from
# scratch on the embedded synthetic shop (or on data you mount), and servers read a bundle from a volume.
# Bases: PYTHON_IMAGE is the official slim image (Python in /usr/local/bin); a plain Debian bookworm image works
# too (`--build-arg PYTHON_IMAGE=localhost/pod-base:bookworm`, as deploy/images/build.sh makes one with
# debootstrap): the base stage then installs Debian's python3 and python3-venv (/usr/bin/python3).
# Package index settings never enter an image: two optional build secrets reach pip only while it runs,
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt   a CA bundle (a TLS-intercepting proxy)
#   --secret id=pip_conf,src=pip.conf                           a pip config (index-url with a token, proxy)
# (BuildKit: `docker build --secret ...`; podman/buildah: `podman build --secret ...`; compose: `secrets:`).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---------------------------------------------------------------- shared: user, pip settings, the source
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Official python images have python3; a plain Debian base gets Debian's (the same 3.11 as bookworm's slim image).
# DL3008 (pin apt versions) ignored: the pinned base release decides them, and Debian drops superseded versions.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi \
    && groupadd --system --gid 10001 pod \
    && useradd --system --uid 10001 --gid pod --home-dir /app --shell /usr/sbin/nologin pod \
    && mkdir -p /app /models \
    && chown pod:pod /app /models
WORKDIR /app

FROM base AS source
COPY pyproject.toml README.md /src/
COPY deploy/constraints.txt /src/deploy/constraints.txt
COPY pod /src/pod
COPY cli /src/cli
COPY service /src/service
COPY training /src/training
COPY export /src/export
COPY loadtests /src/loadtests

# ---------------------------------------------------------------- serve (CPU): `.[serve]` only, no torch
FROM source AS serve-build
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-compile -c /src/deploy/constraints.txt "/src[serve]" \
    && ! pip show torch >/dev/null 2>&1

FROM base AS serve
COPY --from=serve-build /opt/venv /opt/venv
ENV POD_HOST=0.0.0.0 \
    POD_PORT=8000 \
    POD_BUNDLE=/models/bundle
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POD_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["pod"]
CMD ["serve"]

# ---------------------------------------------------------------- train: torch CPU wheel, `.[export]` (train + ONNX)
FROM source AS train-build
ARG TORCH_VERSION
# the CPU wheel (no CUDA libraries); where that index is unreachable, a pip_conf secret with `find-links` to a
# directory holding the +cpu wheel and TORCH_INDEX_URL=https://pypi.org/simple (for its dependencies) does it
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-compile --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.version.cuda is None, 'not the CPU wheel: ' + torch.__version__" \
    && pip install --no-compile -c /src/deploy/constraints.txt "/src[export]"

FROM base AS train
COPY --from=train-build /opt/venv /opt/venv
COPY --chown=pod:pod deploy/train-and-export.sh /app/deploy/train-and-export.sh
ENV POD_BUNDLE=/models/bundle \
    POD_WORK=/models/work
USER 10001:10001
ENTRYPOINT ["pod"]
CMD ["--help"]

# ---------------------------------------------------------------- loadtest: Locust + the scenario
FROM source AS loadtest-build
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-compile -c /src/deploy/constraints.txt "/src[loadtest]"

FROM base AS loadtest
COPY --from=loadtest-build /opt/venv /opt/venv
COPY --chown=pod:pod loadtests /app/loadtests
USER 10001:10001
EXPOSE 8089 5557
ENTRYPOINT ["pod", "loadtest"]
CMD ["--help"]

# ---------------------------------------------------------------- serve-gpu: CUDA runtime, onnxruntime-gpu and torch
FROM ${CUDA_IMAGE} AS serve-gpu
ARG TORCH_VERSION
ARG ONNXRUNTIME_GPU_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt versions) ignored: python3/python3-venv follow the pinned CUDA image's Ubuntu release, and
# Ubuntu drops superseded point versions from its archive, so exact pins would break the build on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 pod \
    && useradd --system --uid 10001 --gid pod --home-dir /app --shell /usr/sbin/nologin pod \
    && mkdir -p /app /models \
    && chown pod:pod /app /models
WORKDIR /app
COPY --from=source /src /src
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-compile --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-compile -c /src/deploy/constraints.txt "/src[serve,train]" \
    && pip uninstall -y onnxruntime \
    && pip install --no-compile "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && rm -rf /src
ENV POD_HOST=0.0.0.0 \
    POD_PORT=8000 \
    POD_BUNDLE=/models/bundle \
    POD_PROVIDER=cuda
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POD_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["pod"]
CMD ["serve"]
