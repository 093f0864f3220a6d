# syntax=docker/dockerfile:1
# The InvarLock certifier for the GitHub Action (and for `docker run --gpus all` by hand).
#
# CUDA comes with pip's torch wheels (the nvidia-* packages); the slim CUDA base adds the
# NVIDIA container settings and the driver check (NVIDIA_REQUIRE_CUDA). Python is a standalone
# CPython build installed by uv, so the image needs no distribution packages.
# The package is installed with the same commands as the project's CI (Makefile `install`):
#   python -m pip install "torch==<version>"   then   python -m pip install ".[hf]"

ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.8.22 AS uv

FROM ${CUDA_BASE} AS build
ARG PYTHON_VERSION=3.12.11
ARG TORCH_VERSION=2.13.0
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && "$(uv python find "${PYTHON_VERSION}")" -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies ./policies
COPY invarlock ./invarlock
# DL3013 asks for pinned pip packages: ".[hf]" is this project (its ranges are in
# pyproject.toml, as in CI) and torch, the one large dependency, is pinned.
# hadolint ignore=DL3013
RUN python -m pip install "torch==${TORCH_VERSION}" \
    && python -m pip install ".[hf]" \
    && invarlock version

FROM ${CUDA_BASE}
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/home/invarlock
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY entrypoint /opt/invarlock/entrypoint
# The Action runs the container as the runner's user (`--user uid:gid`) so that files written
# into the workspace belong to it; HOME stays writable for any uid.
RUN useradd --uid 10001 --no-create-home --home-dir /home/invarlock invarlock \
    && mkdir -p /home/invarlock \
    && chmod 1777 /home/invarlock
USER 10001
WORKDIR /home/invarlock
ENTRYPOINT ["/opt/invarlock/entrypoint"]
