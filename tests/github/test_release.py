"""The release: tags are planned before anything is pushed, a release is never made twice,
`vX` moves only forward, and the action repository gets the pinned release tree.

`scripts/release_tags.py` is tested as functions; the release workflow's own step scripts
are run with bash against local bare repositories standing in for this repository and
`invarlock/certify-action` (git's `insteadOf` maps the GitHub URLs to them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.release_tags import main as release_tags_main
from scripts.release_tags import plan, released_versions
from tests.github.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "release-image.yml"
DIGEST = "sha256:" + "5e" * 32
IMAGE = "ghcr.io/invarlock/invarlock"


# ----------------------------------------------------------------------------- tag plan


def test_the_newest_patch_moves_the_major_tag_and_is_latest():
    tags = ["v1.2.0", "v1.3.0", "v0.9.9"]
    result = plan("1.3.1", "1.3.1", tags)
    assert (result.major, result.move_major, result.latest) == ("1", True, True)


def test_a_patch_to_an_older_minor_leaves_the_major_tag_where_it_is():
    result = plan("1.2.1", "1.2.1", ["v1.2.0", "v1.3.0"])
    assert (result.move_major, result.latest) == (False, False)
    # a newer major elsewhere: v1 still moves, but 1.4.0 is not the latest release
    result = plan("1.4.0", "1.4.0", ["v1.3.0", "v2.0.0"])
    assert (result.move_major, result.latest) == (True, False)
    # comparison is numeric, not by text: 1.10.0 is newer than 1.9.0
    assert plan("1.10.0", "1.10.0", ["v1.9.0"]).move_major
    assert not plan("1.9.1", "1.9.1", ["v1.10.0"]).move_major


def test_a_released_version_is_refused_wherever_its_tag_is():
    ls_remote = ["3f0c\trefs/tags/v1.2.3", "9a1b\trefs/tags/v1.2.3^{}", "77aa\trefs/tags/v1"]
    assert released_versions(ls_remote) == {(1, 2, 3)}
    with pytest.raises(ValueError, match=r"v1\.2\.3 is already released"):
        plan("1.2.3", "1.2.3", ls_remote)


@pytest.mark.parametrize("version", ["1.2", "v1.2.3", "01.2.3", "1.2.3-rc1", "1.2.3\n::x::",
                                     ""])
def test_a_malformed_version_is_refused(version):
    with pytest.raises(ValueError, match=r"version must be X\.Y\.Z"):
        plan(version, version, [])


def test_the_version_must_be_the_package_version():
    with pytest.raises(ValueError, match=r"not the package version 0\.1\.0"):
        plan("0.2.0", "0.1.0", [])


def test_the_command_prints_outputs_or_one_line_and_exit_2(tmp_path, capsys):
    tags = tmp_path / "tags.txt"
    tags.write_text("aa\trefs/tags/v0.1.0\n")
    assert release_tags_main(["0.1.1", "--package-version", "0.1.1", "--tags", str(tags)]) == 0
    assert capsys.readouterr().out == "major=0\nmove-major=true\nlatest=true\n"
    assert release_tags_main(["0.1.0", "--package-version", "0.1.0", "--tags", str(tags)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("release_tags: v0.1.0 is already released")


# ----------------------------------------------------------------------------- the workflow


def _step(fragment: str) -> dict:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]["steps"]
    return next(s for s in steps if fragment in s.get("name", ""))


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


class Sandbox:
    """This repository (a clone of a local bare `origin`) and the action repository."""

    def __init__(self, root: Path, version: str):
        self.root = root
        remotes = root / "remotes" / "invarlock"
        remotes.mkdir(parents=True)
        self.origin = remotes / "invarlock.git"
        self.action = remotes / "certify-action.git"
        for bare in (self.origin, self.action):
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        gitconfig = root / "gitconfig"
        gitconfig.write_text(f'[url "file://{root / "remotes"}/"]\n'
                             "\tinsteadOf = https://github.com/\n"
                             "[user]\n\tname = t\n\temail = t@example.invalid\n"
                             "[init]\n\tdefaultBranch = main\n")
        self.env = {"PATH": os.environ["PATH"], "HOME": str(root),
                    "GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1",
                    "RUNNER_TEMP": str(root / "temp"), "GITHUB_OUTPUT": str(root / "output"),
                    "GITHUB_STEP_SUMMARY": str(root / "summary"), "IMAGE": IMAGE,
                    "ACTION_REPOSITORY": "invarlock/certify-action", "VERSION": version,
                    "GITHUB_SERVER_URL": "https://github.com",
                    "GITHUB_REPOSITORY": "invarlock/invarlock",
                    "GH_TOKEN": "job-token", "ACTION_TOKEN": "action-token",
                    "REF": "refs/heads/main", "DIGEST": DIGEST}
        (root / "temp").mkdir()
        source = root / "source"
        for path in ("action.yml", "scripts/pin_image.py", "scripts/release_tags.py",
                     ".github/workflows/release-image.yml", "README.md"):
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / path, source / path)
        pyproject = (ROOT / "pyproject.toml").read_text()
        (source / "pyproject.toml").write_text(
            re.sub(r'^version = ".*"$', f'version = "{version}"', pyproject, flags=re.M))
        self.git(source, "init", "-q")
        self.git(source, "add", ".")
        self.git(source, "commit", "-q", "-m", "main")
        self.git(source, "push", "-q", str(self.origin), "HEAD:refs/heads/main")
        self.checkout = root / "checkout"
        self.git(root, "clone", "-q", str(self.origin), str(self.checkout))

    def git(self, cwd: Path, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, env=self.env, check=True,
                              capture_output=True, text=True).stdout.strip()

    def seed_action_release(self, *tags: str) -> str:
        """An earlier release in the action repository: one commit on main, `tags` on it."""
        work = self.root / f"seed-{'-'.join(tags)}"
        self.git(self.root, "clone", "-q", str(self.action), str(work))
        (work / "action.yml").write_text(f"# released as {tags}\n")
        self.git(work, "add", ".")
        self.git(work, "commit", "-q", "-m", "earlier release")
        self.git(work, "push", "-q", "origin", "HEAD:refs/heads/main",
                 *[f"HEAD:refs/tags/{t}" for t in tags])
        return self.git(work, "rev-parse", "HEAD")

    def run(self, fragment: str, **env: str) -> subprocess.CompletedProcess:
        script = _step(fragment)["run"]
        return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", script],
                              cwd=self.checkout, env={**self.env, **env},
                              capture_output=True, text=True)

    def outputs(self) -> dict[str, str]:
        path = Path(self.env["GITHUB_OUTPUT"])
        lines = path.read_text().splitlines() if path.exists() else []
        return dict(line.split("=", 1) for line in lines)

    def ref(self, bare: Path, ref: str) -> str | None:
        done = subprocess.run(["git", "rev-parse", "--verify", "-q", ref], cwd=bare,
                              capture_output=True, text=True)
        return done.stdout.strip() or None


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    if not shutil.which("git"):
        pytest.skip("needs git")
    return Sandbox(tmp_path, "1.2.1")


def test_the_plan_step_refuses_any_branch_but_main(sandbox):
    done = sandbox.run("plan the tags", REF="refs/heads/feature")
    assert done.returncode == 1
    assert "::error::releases are made from main only, not refs/heads/feature" in done.stdout
    assert sandbox.outputs() == {}


def test_the_plan_step_refuses_a_version_tagged_in_the_action_repository(sandbox):
    sandbox.seed_action_release("v1.2.1")
    done = sandbox.run("plan the tags")
    assert done.returncode != 0
    assert "release_tags: v1.2.1 is already released" in done.stderr
    assert sandbox.outputs() == {}


def test_an_older_patch_is_released_without_moving_v1_or_the_action_main(sandbox):
    newer = sandbox.seed_action_release("v1.3.0", "v1")
    planned = sandbox.run("plan the tags")
    assert planned.returncode == 0, planned.stderr
    assert sandbox.outputs() == {"major": "1", "move-major": "false", "latest": "false"}

    pinned = sandbox.run("Pin action.yml")
    assert pinned.returncode == 0, pinned.stderr
    released = sandbox.ref(sandbox.origin, "refs/tags/v1.2.1^{commit}")
    assert released and released == sandbox.git(sandbox.checkout, "rev-parse", "HEAD")

    published = sandbox.run("Publish the release tree", MAJOR="1", MOVE_MAJOR="false",
                            LATEST="false")
    assert published.returncode == 0, published.stderr
    assert "::notice::v1 stays where it is" in published.stdout
    assert sandbox.ref(sandbox.action, "refs/tags/v1") == newer
    assert sandbox.ref(sandbox.action, "refs/heads/main") == newer
    tagged = sandbox.ref(sandbox.action, "refs/tags/v1.2.1")
    assert tagged and tagged != newer


def test_the_newest_release_pins_the_digest_moves_v1_and_ships_no_workflows(sandbox):
    sandbox.seed_action_release("v1.2.0", "v1")
    assert sandbox.run("plan the tags").returncode == 0
    assert sandbox.outputs() == {"major": "1", "move-major": "true", "latest": "true"}
    assert sandbox.run("Pin action.yml").returncode == 0
    published = sandbox.run("Publish the release tree", MAJOR="1", MOVE_MAJOR="true",
                            LATEST="true")
    assert published.returncode == 0, published.stderr

    release = sandbox.ref(sandbox.action, "refs/tags/v1.2.1")
    assert sandbox.ref(sandbox.action, "refs/tags/v1") == release
    assert sandbox.ref(sandbox.action, "refs/heads/main") == release
    files = _git(sandbox.action, "ls-tree", "-r", "--name-only", release).split()
    assert "action.yml" in files and "scripts/pin_image.py" in files
    assert not [f for f in files if f.startswith(".github/workflows/")]
    action = yaml.safe_load(_git(sandbox.action, "show", f"{release}:action.yml"))
    assert action["inputs"]["image"]["default"] == f"{IMAGE}@{DIGEST}"
    # the action repository's history goes on from the earlier release
    assert _git(sandbox.action, "rev-list", "--count", release) == "2"


def test_a_release_tag_that_appears_meanwhile_is_not_overwritten(sandbox):
    assert sandbox.run("plan the tags").returncode == 0
    # another run tags v1.2.1 after this run's plan
    rival = sandbox.root / "rival"
    sandbox.git(sandbox.root, "clone", "-q", str(sandbox.origin), str(rival))
    sandbox.git(rival, "commit", "-q", "--allow-empty", "-m", "rival")
    sandbox.git(rival, "tag", "v1.2.1")
    sandbox.git(rival, "push", "-q", "origin", "refs/tags/v1.2.1")
    theirs = sandbox.ref(sandbox.origin, "refs/tags/v1.2.1")

    pinned = sandbox.run("Pin action.yml")
    assert pinned.returncode != 0
    assert "already exists" in pinned.stderr or "rejected" in pinned.stderr
    assert sandbox.ref(sandbox.origin, "refs/tags/v1.2.1") == theirs


def test_the_image_is_pushed_by_digest_and_tagged_only_after_the_release_tag():
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]["steps"]
    names = [s.get("name", s.get("uses", "")) for s in steps]

    def index(fragment: str) -> int:
        return next(i for i, name in enumerate(names) if fragment in name)

    build = steps[index("Build and push by digest")]["with"]
    assert "tags" not in build and "push-by-digest=true" in build["outputs"]
    assert build["file"] == "Dockerfile" and build["platforms"] == "linux/amd64"
    order = [index(f) for f in ("plan the tags", "docker/login-action",
                                "image tag must not exist", "Build and push by digest",
                                "must be public", "Pin action.yml", "Tag the image",
                                "Publish the release tree", "GitHub Releases")]
    assert order == sorted(order)
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]
    assert job["environment"] == "release"
    assert set(job["permissions"]) == {"contents", "packages"}
