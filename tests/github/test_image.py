"""The shipped image: one Dockerfile, dependencies from a hashed lock before the source, and
`make image-test` building exactly that file and running the demo and the entrypoint in it.

The fast tests read the Dockerfile, the lock and .dockerignore, and drive
scripts/image_test.sh with stand-ins for buildah and nvidia-smi to check what it builds and
runs. The slow test builds the image for real (root, buildah, debootstrap, Debian's mirror
and PyPI; tens of minutes with the vfs storage driver).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import tomllib

from tests.github.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
LOCK = (ROOT / "docker" / "requirements.lock").read_text(encoding="utf-8")


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(?:\s*#.*\n)*\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", dockerfile))
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in text.splitlines()
            if line.strip()]


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every requirement in the lock."""
    found = {}
    for block in re.split(r"\n(?=[a-z0-9])", LOCK):
        head = re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+) \\", block)
        if head:
            found[head.group(1)] = (head.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})",
                                                              block))
    return found


# ----------------------------------------------------------------------------- the Dockerfile


def test_dependencies_are_installed_from_the_lock_before_the_source_is_copied():
    steps = _instructions(DOCKERFILE)
    copies = [(i, args) for i, (op, args) in enumerate(steps) if op == "COPY"]
    lock_copy = next(i for i, args in copies if "docker/requirements.lock" in args)
    install = next(i for i, (op, args) in enumerate(steps)
                   if op == "RUN" and "-r /opt/invarlock/requirements.lock" in args)
    source = [i for i, args in copies if re.search(r"\b(invarlock|pyproject\.toml|policies)\b",
                                                   args.split()[0])]
    assert lock_copy < install < min(source)
    # the torch layer depends on the lock alone: nothing else is copied before it
    assert [i for i, _ in copies if i < install] == [lock_copy]
    args = steps[install][1]
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:",
                 '--index-url "${PYPI_INDEX_URL}"'):
        assert flag in args, flag
    # the certifier itself: no index at all, so nothing can be resolved from anywhere
    own = next(a for op, a in steps if op == "RUN" and "/opt/invarlock/src" in a)
    assert "--no-index" in own and "--no-deps" in own and "pip check" in own


def test_the_image_is_one_stage_non_root_with_labels_and_the_toolkit_settings():
    steps = _instructions(DOCKERFILE)
    assert [args for op, args in steps if op == "FROM"] == ["${BASE_IMAGE}"]
    assert steps[-2:] == [("WORKDIR", "/home/invarlock"),
                          ("ENTRYPOINT", '["/opt/invarlock/entrypoint"]')]
    assert [args for op, args in steps if op == "USER"] == ["10001"]
    labels = " ".join(args for op, args in steps if op == "LABEL")
    for key in ("title", "description", "source", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in env


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    admitted = {line[1:].rstrip("/") for line in
                (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = set()
    for op, args in _instructions(DOCKERFILE):
        if op == "COPY" and not args.startswith("--from"):
            sources |= set(args.split()[:-1])
    assert sources == admitted
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()


# ----------------------------------------------------------------------------- the lock


def test_every_locked_requirement_is_pinned_and_hashed_and_from_one_index():
    locked = _locked()
    assert len(locked) > 50
    for name, (version, hashes) in locked.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), (name, version)  # no +cpu/+cu
        assert hashes, name
    for option in ("--index-url", "--extra-index-url", "--find-links", "--trusted-host",
                   "-e ", "git+", "file:"):
        assert not re.search(rf"^{re.escape(option)}", LOCK, flags=re.M), option


def test_the_lock_holds_cuda_torch_at_the_ci_version_and_every_declared_dependency():
    locked = _locked()
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(),
                      flags=re.M).group(1)
    assert locked["torch"][0] == torch
    # PyPI's Linux torch is the CUDA build: its runtime comes as nvidia-* wheels
    assert {"nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-nccl-cu13",
            "triton"} <= set(locked)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = [*project["project"]["dependencies"],
                *project["project"]["optional-dependencies"]["hf"],
                *project["build-system"]["requires"]]
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        assert name in locked, requirement


# ----------------------------------------------------------------------------- make image-test


FAKE_BUILDAH = r"""#!/usr/bin/env bash
# Records each call; answers as buildah would for an image whose demo says $VERDICT.
printf '%s\n' "$*" >> "$LOG"
args=" $* "
case "$args" in
  *" inspect "*) exit 0 ;;
  *" bud "*) exit 0 ;;
  *" images "*) echo "6.62 GB" ;;
  *" from "*) echo working-container ;;
  *" rm "*) exit 0 ;;
  *" invarlock certify "*) printf '{"verdict": "%s"}\n' "$VERDICT" ;;
  *"grep -A1"*) printf 'verdict<<EOF\n%s\n' "$VERDICT" ;;
  *" run "*) exit 0 ;;
  *) echo "unexpected: $*" >&2; exit 9 ;;
esac
"""


def _image_test(tmp_path: Path, verdict: str, gpu: bool) -> tuple[subprocess.CompletedProcess,
                                                                    list[str]]:
    if os.geteuid() != 0:
        pytest.skip("scripts/image_test.sh needs root")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"buildah": FAKE_BUILDAH, "debootstrap": "#!/bin/sh\nexit 9\n"}
    if gpu:
        tools["nvidia-smi"] = "#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n"
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "LOG": str(log),
           "VERDICT": verdict, "IMAGE_TEST_DIR": str(tmp_path / "work"), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "image_test.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, log.read_text().splitlines()


def test_image_test_builds_the_release_dockerfile_and_runs_demo_and_entrypoint(tmp_path):
    done, calls = _image_test(tmp_path, "PASS", gpu=False)
    assert done.returncode == 0, done.stderr
    bud = next(c for c in calls if " bud " in f" {c} ")
    assert f"-f {ROOT}/Dockerfile" in bud and bud.endswith(str(ROOT))
    assert "--storage-driver vfs" in bud and "--isolation chroot" in bud
    assert "-v /etc/ssl/certs:/etc/ssl/certs:ro" in bud
    # only the base and the release's own build arguments differ: the same image otherwise
    assert set(re.findall(r"--build-arg (\w+)=", bud)) <= {
        "BASE_IMAGE", "PYPI_INDEX_URL", "VERSION", "REVISION", "PIP_CERT"}
    assert "BASE_IMAGE=localhost/invarlock-debian:bookworm" in bud
    runs = [c for c in calls if " run " in f" {c} "]
    assert any("invarlock certify --device cpu" in c and "--user 10001" in c for c in runs)
    assert any(c.endswith("/opt/invarlock/entrypoint") and "INPUT_DEVICE=cpu" in c
               for c in runs)
    assert not any("cuda" in c for c in runs)
    figures = (tmp_path / "work" / "figures.txt").read_text()
    assert "demo_cpu_verdict: PASS" in figures and "entrypoint_cpu_verdict: PASS" in figures
    assert "image_size: 6.62 GB" in figures


def test_image_test_runs_on_cuda_too_where_a_gpu_is_found(tmp_path):
    done, calls = _image_test(tmp_path, "PASS", gpu=True)
    assert done.returncode == 0, done.stderr
    runs = [c for c in calls if " run " in f" {c} "]
    cuda = [c for c in runs if "invarlock certify --device cuda" in c]
    assert cuda and "LD_LIBRARY_PATH=/usr/local/nvidia/lib64" in cuda[0]
    assert any(c.endswith("/opt/invarlock/entrypoint") and "INPUT_DEVICE=cuda" in c
               for c in runs)
    assert "demo_cuda_verdict: PASS" in (tmp_path / "work" / "figures.txt").read_text()


def test_image_test_fails_when_the_demo_does_not_pass_inside(tmp_path):
    done, _ = _image_test(tmp_path, "FAIL", gpu=False)
    assert done.returncode == 1
    assert "image-test: the demo did not PASS inside the image on cpu" in done.stderr
    assert "demo_cpu_verdict: FAIL" in (tmp_path / "work" / "figures.txt").read_text()


def test_make_image_test_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image-test:\n\tscripts/image_test\.sh$", makefile, flags=re.M)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (buildah and debootstrap)")
def test_the_image_builds_and_certifies_the_demo_inside(tmp_path):
    env = dict(os.environ)
    work = Path(env.setdefault("IMAGE_TEST_DIR", "/var/tmp/invarlock-image"))
    done = subprocess.run(["make", "image-test"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=7200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = (work / "figures.txt").read_text()
    assert "demo_cpu_verdict: PASS" in figures and "entrypoint_cpu_verdict: PASS" in figures
    if shutil.which("nvidia-smi"):
        assert "demo_cuda_verdict: PASS" in figures
    assert int(re.search(r"build_seconds: (\d+)", figures).group(1)) > 0
