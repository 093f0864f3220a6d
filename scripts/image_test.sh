#!/usr/bin/env bash
# Build the Action's image from the repository's Dockerfile, exactly as the release does
# (same file, same lock, torch's CUDA build from PyPI), with buildah on a Debian base of the
# same release made by debootstrap; then run the demo certification and the Action's
# entrypoint inside it on CPU, and with CUDA too where this machine has an NVIDIA GPU.
# Needs root, buildah and debootstrap (installed with apt-get when missing), Debian's mirror
# and the Python package index; no registry image is pulled.
#
#   scripts/image_test.sh            (or `make image-test`)
#
# Settings (environment): IMAGE_TEST_DIR (work folder, default /var/tmp/invarlock-image),
# DEBIAN_MIRROR, PYPI_INDEX_URL (a mirror of PyPI; the lock's hashes still apply),
# STORAGE_DRIVER (vfs). Prints the figures (build time, image size, run times) at the end
# and writes them to $IMAGE_TEST_DIR/figures.txt.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="${IMAGE_TEST_DIR:-/var/tmp/invarlock-image}"
# The release's base is debian:bookworm-slim (Dockerfile); the lock is for its Python 3.11.
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
index="${PYPI_INDEX_URL:-https://pypi.org/simple}"
driver="${STORAGE_DRIVER:-vfs}"
base="localhost/invarlock-debian:${suite}"
image="localhost/invarlock:image-test"
bah=(buildah --storage-driver "$driver")

fail() { echo "image-test: $*" >&2; exit "${2:-1}"; }

[ "$(id -u)" = 0 ] || fail "needs root (buildah and debootstrap)" 2
missing=()
for tool in buildah debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || fail "${missing[*]} not installed and no apt-get" 2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
mkdir -p "$work"

# 1. The base: a minimal Debian made from Debian's packages, imported as an image. It
#    carries ca-certificates already, so the build's read-only mount of this machine's
#    /etc/ssl/certs (below) never meets the package's install script.
if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  if [ ! -x "$work/rootfs/usr/bin/apt-get" ] || [ ! -d "$work/rootfs/usr/share/ca-certificates" ]; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$work/rootfs" "$mirror"
  fi
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
  ctr="$("${bah[@]}" from scratch)"
  "${bah[@]}" add "$ctr" "$work/rootfs.tar" /
  "${bah[@]}" config --cmd /bin/bash "$ctr"
  "${bah[@]}" commit --rm "$ctr" "$base"
  rm -f "$work/rootfs.tar"
fi

# 2. The image: the release's Dockerfile with only the base replaced. This machine's CA
#    store is mounted read-only (it may hold a proxy's CA) and named to pip.
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "PYPI_INDEX_URL=$index"
            --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
mounts=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mounts+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
  build_args+=(--build-arg "PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
fi
start=$(date +%s)
"${bah[@]}" bud --isolation chroot "${mounts[@]}" "${build_args[@]}" \
  -f "$root/Dockerfile" -t "$image" "$root"
build_s=$(( $(date +%s) - start ))
size="$("${bah[@]}" images --noheading --format '{{.Size}}' "$image")"
printf 'build_seconds: %s\nimage_size: %s\n' "$build_s" "$size" > "$work/figures.txt"

ctr="$("${bah[@]}" from "$image")"
trap '"${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run=("${bah[@]}" run --isolation chroot --user 10001)

# With an NVIDIA GPU here: its device nodes and the driver's libraries (what the NVIDIA
# Container Toolkit would mount) go into the container, and everything runs on CUDA as well.
gpu=()
devices=("cpu")
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  for node in /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia-uvm-tools /dev/nvidia[0-9]*; do
    [ -e "$node" ] && gpu+=(--device "$node")
  done
  while read -r soname path; do
    gpu+=(-v "$(readlink -f "$path"):/usr/local/nvidia/lib64/$soname:ro")
  done < <(ldconfig -p | awk '$1 ~ /^lib(cuda|nvidia-ml|nvidia-ptxjitcompiler|nvidia-nvvm)\.so\.[0-9]+$/ && /x86-64/ {print $1, $NF}')
  gpu+=(--env LD_LIBRARY_PATH=/usr/local/nvidia/lib64)
  devices+=("cuda")
fi

figures=("image: $image (Dockerfile on base $base)" "build_seconds: $build_s"
         "image_size: $size")
failures=()
for device in "${devices[@]}"; do
  extra=()
  [ "$device" = cuda ] && extra=("${gpu[@]}")
  # 3. The demo certification inside the image, as the image's user.
  start=$(date +%s)
  "${run[@]}" "${extra[@]}" "$ctr" -- invarlock certify --device "$device" \
    --out "/home/invarlock/demo-$device" --json | tee "$work/demo-$device.json"
  demo_s=$(( $(date +%s) - start ))
  verdict="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["verdict"])' \
    "$work/demo-$device.json")"
  # 4. The Action's entrypoint, as action.yml runs it but without publishing: it certifies
  #    the demo (dev profile) and writes the step outputs and the report folder.
  start=$(date +%s)
  "${run[@]}" "${extra[@]}" --env "INPUT_DEVICE=$device" --env INPUT_PROFILE=dev \
    --env INPUT_CHECK_RUN=false --env INPUT_COMMENT=false \
    --env "INPUT_OUTPUT_DIR=/home/invarlock/action-$device" \
    --env "GITHUB_OUTPUT=/home/invarlock/outputs-$device" "$ctr" -- /opt/invarlock/entrypoint
  entry_s=$(( $(date +%s) - start ))
  "${run[@]}" "$ctr" -- sh -c "test -s /home/invarlock/action-$device/evaluation.cert.html \
    && grep -A1 '^verdict<<' /home/invarlock/outputs-$device" | tee "$work/entrypoint-$device.txt"
  entry_verdict="$(sed -n 2p "$work/entrypoint-$device.txt")"
  figures+=("demo_${device}_seconds: $demo_s" "demo_${device}_verdict: $verdict"
            "entrypoint_${device}_seconds: $entry_s" "entrypoint_${device}_verdict: $entry_verdict")
  [ "$verdict" = PASS ] || failures+=("the demo did not PASS inside the image on $device")
  [ "$entry_verdict" = PASS ] || failures+=("the entrypoint did not report PASS on $device")
done
printf '%s\n' "${figures[@]}" | tee "$work/figures.txt"
[ "${#failures[@]}" = 0 ] || fail "$(IFS=';'; echo "${failures[*]}")"
