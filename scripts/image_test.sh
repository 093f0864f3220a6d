#!/usr/bin/env bash
# Build the Action's image with buildah on a Debian base made by debootstrap, then run the
# demo certification inside it on CPU, and the Action's entrypoint (no publishing). Needs root, buildah and debootstrap (Debian packages)
# and access to Debian's mirror and the Python package index; no registry images are pulled.
#
#   scripts/image_test.sh            (or `make image-test`)
#
# Settings (environment): IMAGE_TEST_DIR (work folder, default /var/tmp/invarlock-image),
# DEBIAN_SUITE (bookworm), DEBIAN_MIRROR, TORCH_REQUIREMENT (torch==2.13.0+cpu),
# TORCH_INDEX_URL, PIP_FIND_LINKS (a folder of wheels to search too, mounted into the build),
# STORAGE_DRIVER (vfs). Prints the figures (build time, image size, demo time) at the end and
# writes them to $IMAGE_TEST_DIR/figures.txt.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="${IMAGE_TEST_DIR:-/var/tmp/invarlock-image}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
torch_requirement="${TORCH_REQUIREMENT:-torch==2.13.0+cpu}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
find_links="${PIP_FIND_LINKS:-}"
driver="${STORAGE_DRIVER:-vfs}"
base="localhost/invarlock-debian:${suite}"
image="localhost/invarlock:image-test"
bah=(buildah --storage-driver "$driver")

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "image-test: $tool is not installed (apt-get install $tool)" >&2; exit 2; }
done
mkdir -p "$work"

# 1. The base: a minimal Debian made from Debian's packages, imported as an image.
if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  if [ ! -x "$work/rootfs/usr/bin/apt-get" ]; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror"
  fi
  tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
  ctr="$("${bah[@]}" from scratch)"
  "${bah[@]}" add "$ctr" "$work/rootfs.tar" /
  "${bah[@]}" config --cmd /bin/bash "$ctr"
  "${bah[@]}" commit --rm "$ctr" "$base"
  rm -f "$work/rootfs.tar"
fi

# 2. The image, from the repository's Dockerfile with the CPU variant of torch.
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_REQUIREMENT=$torch_requirement"
            --build-arg "TORCH_INDEX_URL=$torch_index")
# This machine's CA bundle (it may hold a proxy's CA) for pip, beside the base's own store.
mounts=(-v /etc/ssl/certs:/run/host-certs:ro)
build_args+=(--build-arg "PIP_CERT=/run/host-certs/ca-certificates.crt")
if [ -n "$find_links" ]; then
  build_args+=(--build-arg "PIP_FIND_LINKS=$find_links")
  mounts+=(-v "$find_links:$find_links:ro")
fi
start=$(date +%s)
"${bah[@]}" bud --isolation chroot --layers=false "${mounts[@]}" "${build_args[@]}" \
  -f "$root/Dockerfile" -t "$image" "$root"
build_s=$(( $(date +%s) - start ))
size="$("${bah[@]}" inspect --type image --format '{{.Size}}' "$image" 2>/dev/null || echo 0)"
if [ "$size" = 0 ] || [ -z "$size" ]; then
  size="$("${bah[@]}" images --json "$image" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["size"])')"
fi

# 3. The demo certification inside the image, on CPU, as the image's user.
ctr="$("${bah[@]}" from "$image")"
trap '"${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
start=$(date +%s)
"${bah[@]}" run --isolation chroot --user 10001 "$ctr" -- \
  sh -c 'cd /home/invarlock && invarlock certify --device cpu --out /home/invarlock/demo --json' \
  | tee "$work/demo.json"
demo_s=$(( $(date +%s) - start ))
verdict="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["verdict"])' "$work/demo.json")"

# 4. The Action's entrypoint inside the image, as action.yml runs it (without publishing):
#    it certifies (the demo, dev profile, on CPU) and writes the outputs and the report folder.
start=$(date +%s)
"${bah[@]}" run --isolation chroot --user 10001 \
  --env INPUT_DEVICE=cpu --env INPUT_PROFILE=dev --env INPUT_CHECK_RUN=false \
  --env INPUT_COMMENT=false --env INPUT_OUTPUT_DIR=/home/invarlock/action-report \
  --env GITHUB_OUTPUT=/home/invarlock/outputs "$ctr" -- /opt/invarlock/entrypoint
entry_s=$(( $(date +%s) - start ))
"${bah[@]}" run --isolation chroot --user 10001 "$ctr" -- \
  sh -c 'test -s /home/invarlock/action-report/evaluation.cert.html && grep -A1 "^verdict<<" /home/invarlock/outputs' \
  | tee "$work/entrypoint-outputs.txt"

{
  echo "image: $image (base $base, $torch_requirement)"
  echo "build_seconds: $build_s"
  echo "image_size: $size"
  echo "demo_seconds: $demo_s"
  echo "demo_verdict: $verdict"
  echo "entrypoint_seconds: $entry_s"
  echo "entrypoint_verdict: $(sed -n 2p "$work/entrypoint-outputs.txt")"
} | tee "$work/figures.txt"
[ "$verdict" = PASS ] || { echo "image-test: the demo did not PASS inside the image" >&2; exit 1; }
[ "$(sed -n 2p "$work/entrypoint-outputs.txt")" = PASS ] || { echo "image-test: the entrypoint did not report PASS inside the image" >&2; exit 1; }
