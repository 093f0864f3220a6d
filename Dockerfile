# syntax=docker/dockerfile:1
# The InvarLock certifier for the GitHub Action (and for `docker run --gpus all` by hand).
#
# Every install step uses the base's distribution packages (Python from apt) and a package
# index (pip): nothing is downloaded from release pages, so any Debian or Ubuntu base builds.
#
# The released image: the NVIDIA CUDA 13.0 *base* image (runtime settings and the driver check
# NVIDIA_REQUIRE_CUDA, no toolkit) with torch's CUDA 13.0 build from PyTorch's cu130 index,
# pinned by its local version (+cu130): the CUDA libraries come with torch's wheels and need an
# NVIDIA driver 580 or newer (docs/action.md, "Self-hosted GPU runner").
#
# A CPU build for testing (`make image-test`, scripts/image_test.sh) passes another base and
# torch variant, e.g. a Debian base made with debootstrap and `torch==2.13.0+cpu`:
#   --build-arg BASE_IMAGE=localhost/invarlock-debian:bookworm
#   --build-arg TORCH_REQUIREMENT=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL=...

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_REQUIREMENT=torch==2.13.0+cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# Where the certifier's other dependencies come from (PyPI unless a mirror is given).
ARG PYPI_INDEX_URL=https://pypi.org/simple
# Optional: a folder of wheels mounted into the build (`buildah bud -v`), searched as well,
# and a CA bundle for pip (a proxy's).
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# DL3008 asks for pinned apt packages: the base's own Python is wanted, whatever its version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies ./policies
COPY invarlock ./invarlock
# The same two steps as the project's CI (Makefile `install`): torch, then ".[hf]" (this
# project; its ranges are in pyproject.toml). torch is pinned with its variant.
# hadolint ignore=DL3013
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PYPI_INDEX_URL}" \
        "${TORCH_REQUIREMENT}" \
    && python -m pip install --index-url "${PYPI_INDEX_URL}" ".[hf]" \
    && invarlock version

FROM ${BASE_IMAGE}
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/home/invarlock
# The runtime needs the same Python the build stage's venv points at.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --home-dir /home/invarlock invarlock \
    && mkdir -p /home/invarlock \
    && chmod 1777 /home/invarlock
COPY --from=build /opt/venv /opt/venv
COPY entrypoint /opt/invarlock/entrypoint
# The Action runs the container as the runner's user (`--user uid:gid`) so that files written
# into the workspace belong to it; HOME stays writable for any uid.
USER 10001
WORKDIR /home/invarlock
ENTRYPOINT ["/opt/invarlock/entrypoint"]
