# syntax=docker/dockerfile:1
# The InvarLock certifier for the GitHub Action (and for `docker run --gpus all` by hand).
# The release workflow builds this file as it stands; `make image-test` builds the same file
# on a local Debian base of the same release (scripts/image_test.sh).
#
# - Base: Debian 12 (bookworm) slim, pinned by digest; its Python 3.11 is the one the lock
#   was resolved for. A local base is given with --build-arg BASE_IMAGE=...
# - torch is PyPI's Linux wheel, the CUDA 13.0 build: the CUDA runtime libraries come as its
#   `nvidia-*` wheels, so the host's NVIDIA driver (580 or newer, mounted by the NVIDIA
#   Container Toolkit) is all a GPU container needs from outside.
# - Every dependency comes from one index, pinned and hashed in docker/requirements.lock
#   (`--require-hashes`, wheels only), installed before the source is copied: a source change
#   rebuilds only the last layers, never torch.
# - llama.cpp (the `llamacpp` extra, `--runtime llama.cpp`): llama-cpp-python is on PyPI as
#   source only, so it is built here from its hashed sdist (docker/llamacpp.lock) with a
#   hashed build backend (docker/llamacpp-build.lock) and Debian's cmake and g++, which are
#   removed in the same layer. Built for the CPU, x86-64 with AVX2/FMA/F16C (any CPU of the
#   last decade; not tuned to the build machine); no GPU backend: the image has no CUDA
#   compiler, so on a GPU the default runtime for GGUF is transformers' (docs/action.md).

ARG BASE_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

FROM ${BASE_IMAGE}

# Where the locked wheels come from (a mirror of PyPI may be given; the hashes still apply).
ARG PYPI_INDEX_URL=https://pypi.org/simple
# Optional CA bundle for pip (a TLS-intercepting proxy's), e.g. a file mounted into the build.
ARG PIP_CERT
# CMake options of the image's llama.cpp build (see the header).
ARG LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
# OCI labels: the release passes the version and the commit it was built from.
ARG VERSION=unreleased
ARG REVISION=unknown

LABEL org.opencontainers.image.title="InvarLock certifier" \
      org.opencontainers.image.description="Certifies an edited model checkpoint against its baseline; the image of the InvarLock GitHub Action." \
      org.opencontainers.image.source="https://github.com/invarlock/invarlock" \
      org.opencontainers.image.url="https://github.com/invarlock/certify-action" \
      org.opencontainers.image.documentation="https://github.com/invarlock/invarlock/blob/main/docs/action.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="InvarLock" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="debian:bookworm-slim"

# NVIDIA_* tell the NVIDIA Container Toolkit to mount the driver's compute and nvidia-smi
# libraries and to refuse a driver older than CUDA 13.0 (exit 125 before the certifier starts).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/home/invarlock

# The base's own Python, whatever its patch version (DL3008 asks to pin apt packages).
# The Action runs the container as the runner's user (`--user uid:gid`) so that files written
# into the workspace belong to it; HOME stays writable for any uid.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --no-create-home --home-dir /home/invarlock invarlock \
    && mkdir -p /home/invarlock \
    && chmod 1777 /home/invarlock

# Dependencies: exactly the locked files, from one index, no resolution, no builds.
COPY docker/requirements.lock /opt/invarlock/requirements.lock
RUN python -m pip install --index-url "${PYPI_INDEX_URL}" --require-hashes --no-deps \
        --only-binary=:all: -r /opt/invarlock/requirements.lock

# llama.cpp, built from its hashed source; the compilers leave with this layer (libgomp,
# llama.cpp's OpenMP runtime, stays).
COPY docker/llamacpp-build.lock docker/llamacpp.lock /opt/invarlock/
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cmake g++ make libgomp1 \
    && python -m pip install --index-url "${PYPI_INDEX_URL}" --require-hashes --no-deps \
        --only-binary=:all: -r /opt/invarlock/llamacpp-build.lock \
    && CMAKE_ARGS="${LLAMACPP_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python -m pip install --index-url "${PYPI_INDEX_URL}" --require-hashes --no-deps \
        --no-build-isolation -r /opt/invarlock/llamacpp.lock \
    && python -m pip uninstall -y scikit-build-core pathspec \
    && DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove cmake g++ make \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"

# The certifier from this source, with the locked build backend and no index at all.
COPY pyproject.toml README.md /opt/invarlock/src/
COPY policies /opt/invarlock/src/policies
COPY invarlock /opt/invarlock/src/invarlock
RUN python -m pip install --no-index --no-deps --no-build-isolation /opt/invarlock/src \
    && rm -rf /opt/invarlock/src \
    && python -m pip check \
    && invarlock version
COPY entrypoint /opt/invarlock/entrypoint

USER 10001
WORKDIR /home/invarlock
ENTRYPOINT ["/opt/invarlock/entrypoint"]
