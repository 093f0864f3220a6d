"""Reference mode: the baseline, dataset and presets come from a checkout of the base ref, a
pull request that changes any of them fails the check unless approved, and trust decides the
cache namespace. The entrypoint runs as the container runs it, against the API stand-in."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from invarlock.github.reference import Item, compare, tree_digest
from tests.github.conftest import TOKEN, payload, step_environment
from tests.github.test_entrypoint import run_entrypoint

REFERENCE = {"baseline": "models/base", "dataset": "data/eval.txt", "preset": "presets/ci.yaml"}


def _as_text(markdown: str) -> str:
    """Escaped Markdown read back as its characters (backslash escapes and zero-width
    spaces removed), as a reader sees it."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u200b", "")


def _repository(root: Path) -> None:
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "models" / "base" / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "models" / "int8").mkdir(parents=True)
    (root / "models" / "int8" / "model.safetensors").write_bytes(b"\x01" * 64)
    (root / "data").mkdir()
    (root / "data" / "eval.txt").write_text("Shall I compare thee to a summer's day?\n")
    (root / "presets").mkdir()
    (root / "presets" / "ci.yaml").write_text("auto: {tier: balanced}\n")


@pytest.fixture
def workspace(tmp_path):
    """A pull request's checkout, with the base ref checked out beside it under `base/`."""
    _repository(tmp_path)
    (tmp_path / "base").mkdir()
    _repository(tmp_path / "base")
    return tmp_path


def _step(root: Path, standin, *, fork: bool = False, **inputs: str):
    event = payload("pull_request__synchronize.payload.json")
    if fork:
        event["pull_request"]["head"]["repo"]["full_name"] = "contributor/Hello-World"
    inputs = {"baseline": "models/base", "subject": "models/int8",
              "dataset": "data/eval.txt", "preset": "presets/ci.yaml", **inputs}
    step = step_environment(root, standin.url, "pull_request", event, github_token=TOKEN,
                            **inputs)
    step.env["GITHUB_WORKSPACE"] = str(root)
    step.certify_with("pass")
    return step


def _flags(step) -> dict[str, list[str]]:
    (call,) = step.certifier_calls()
    flags: dict[str, list[str]] = {}
    for arg in call["argv"]:
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            flags.setdefault(name, []).append(value)
    return flags


def _swap(root: Path, what: str) -> None:
    """What a pull request would do to move the bar along with the subject."""
    if what == "baseline":  # the baseline replaced by the edited weights
        shutil.copy(root / "models/int8/model.safetensors", root / "models/base")
    elif what == "dataset":
        (root / "data/eval.txt").write_text("an easier text\n")
    else:  # a preset that loosens the limit
        (root / "presets/ci.yaml").write_text("auto: {tier: aggressive}\n")


@pytest.mark.parametrize("what", ["baseline", "dataset", "preset"])
def test_a_pull_request_that_swaps_the_reference_fails_the_check(what, workspace, standin):
    _swap(workspace, what)
    step = _step(workspace, standin, **{"reference_path": "base"})
    done = run_entrypoint(step)
    assert done.returncode == 2, done.stdout + done.stderr
    assert not (workspace / "certifier-calls.jsonl").exists()  # nothing was evaluated
    run = standin.check_runs[min(standin.check_runs)]
    assert run["conclusion"] == "failure"
    text = run["output"]["title"] + run["output"]["summary"]
    assert "the pull request changes the reference" in text
    assert f"{what} `{REFERENCE[what]}` (changed)" in _as_text(run["output"]["summary"])
    assert "changes the reference" in standin.comments[2][0]["body"]


def test_without_reference_mode_the_swap_goes_unnoticed(workspace, standin):
    """What happens today: the pull request's own baseline is the bar."""
    _swap(workspace, "baseline")
    step = _step(workspace, standin)
    assert run_entrypoint(step).returncode == 0
    flags = _flags(step)
    assert flags["--baseline"] == ["models/base"] and flags["--reference-origin"] == [
        "pull-request"]


def test_an_unchanged_reference_is_read_from_the_base_checkout(workspace, standin):
    step = _step(workspace, standin, reference_path="base")
    done = run_entrypoint(step)
    assert done.returncode == 0, done.stdout + done.stderr
    flags = _flags(step)
    base = workspace / "base"
    assert flags["--baseline"] == [str(base / "models/base")]
    assert flags["--dataset"] == [str(base / "data/eval.txt")]
    assert flags["--preset"] == [str(base / "presets/ci.yaml")]
    assert flags["--subject"] == ["models/int8"]  # the subject is the pull request's
    assert flags["--reference-origin"] == ["base-checkout"]
    assert flags["--reference-changed"] == ["none"]  # compared: nothing changed
    assert flags["--cache-namespace"] == ["trusted"]


def test_an_approved_change_uses_the_pull_requests_files(workspace, standin):
    _swap(workspace, "preset")
    step = _step(workspace, standin, reference_path="base", allow_reference_change="true")
    assert run_entrypoint(step).returncode == 0
    flags = _flags(step)
    assert flags["--preset"] == ["presets/ci.yaml"]
    assert flags["--reference-origin"] == ["pull-request"]
    assert flags["--reference-changed"] == ["preset:presets/ci.yaml"]  # recorded per item


def test_a_reference_removed_or_added_is_a_change(workspace, standin):
    (workspace / "presets/ci.yaml").unlink()
    (workspace / "presets/ci.yaml").symlink_to(workspace / "base/presets/ci.yaml")
    step = _step(workspace, standin, reference_path="base")
    assert run_entrypoint(step).returncode == 2
    summary = standin.check_runs[min(standin.check_runs)]["output"]["summary"]
    assert "preset `presets/ci.yaml` (changed)" in _as_text(summary)  # a link is compared as a link


def test_pins_reach_the_certifier_and_bad_pins_are_input_errors(workspace, standin):
    digest = "sha256:" + "ab" * 32
    step = _step(workspace, standin, baseline_digest=digest, policy_digest="AB" * 32,
                 dataset_digest=digest)
    assert run_entrypoint(step).returncode == 0
    flags = _flags(step)
    assert flags["--baseline-digest"] == [digest] == flags["--policy-digest"]
    assert flags["--dataset-digest"] == [digest]
    bad = _step(workspace, standin, policy_digest="sha256:123")
    done = run_entrypoint(bad)
    assert done.returncode == 2
    assert "input 'policy-digest' must be sha256:" in done.stdout


def test_a_fork_reads_and_writes_the_untrusted_cache_namespace(workspace, standin):
    step = _step(workspace, standin, fork=True)
    assert run_entrypoint(step).returncode == 0
    assert _flags(step)["--cache-namespace"] == ["untrusted"]


def test_a_persistent_cache_without_a_secret_is_refused(workspace, standin):
    step = _step(workspace, standin)
    step.env["INVARLOCK_CACHE_PERSISTENT"] = "true"
    done = run_entrypoint(step)
    assert done.returncode == 2
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("::error")]
    assert "set input 'cache-secret'" in line
    assert not (workspace / "certifier-calls.jsonl").exists()
    step.env["INVARLOCK_CACHE_SECRET_FILE"] = str(workspace / "secret")
    assert run_entrypoint(step).returncode == 0


def test_reference_path_must_be_a_folder_and_paths_stay_in_the_workspace(workspace, standin):
    step = _step(workspace, standin, reference_path="nowhere")
    assert run_entrypoint(step).returncode == 2
    outside = _step(workspace, standin, reference_path="base", baseline="../elsewhere")
    assert run_entrypoint(outside).returncode == 2
    summary = standin.check_runs[max(standin.check_runs)]["output"]["summary"]
    assert "outside the workspace" in summary


def test_tree_digest_sees_content_names_and_links(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _repository(a)
    _repository(b)
    assert tree_digest(a) == tree_digest(b)
    (b / "data" / "extra.txt").write_text("")
    assert tree_digest(a) != tree_digest(b)
    item = Item("dataset", "data/eval.txt", a / "data/eval.txt", b / "data/eval.txt")
    assert compare([item]) == []
    (a / "data/eval.txt").write_text("other")
    assert [c.how for c in compare([item])] == ["changed"]


def test_reference_settings_are_read_once_and_checked():
    from invarlock.errors import InputError
    from invarlock.github.settings import read_settings

    settings = read_settings({"INPUT_REFERENCE_PATH": "base", "INPUT_ALLOW-REFERENCE-CHANGE":
                              "TRUE", "INPUT_BASELINE_DIGEST": "ab" * 32})
    ref = settings.reference
    assert (ref.path, ref.allow_change, ref.baseline_digest, ref.policy_digest) == (
        "base", True, "sha256:" + "ab" * 32, "")
    with pytest.raises(InputError, match="input 'allow-reference-change' must be true or false"):
        read_settings({"INPUT_ALLOW_REFERENCE_CHANGE": "approved"})


def test_paths_follow_the_working_directory_and_reference_path_the_workspace(tmp_path,
                                                                            standin):
    """working-directory: sub, reference-path: base (as actions/checkout's `path`)."""
    _repository(tmp_path / "sub")
    _repository(tmp_path / "base" / "sub")
    step = _step(tmp_path / "sub", standin, reference_path="base")
    step.env["GITHUB_WORKSPACE"] = str(tmp_path)
    assert run_entrypoint(step).returncode == 0
    flags = _flags(step)
    assert flags["--baseline"] == [str(tmp_path / "base/sub/models/base")]
    assert flags["--preset"] == [str(tmp_path / "base/sub/presets/ci.yaml")]


def test_an_unreadable_reference_file_is_a_refusal_not_a_crash(workspace, monkeypatch):
    from invarlock.github import reference
    from invarlock.github.event import Target
    from invarlock.github.settings import read_settings

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reference, "tree_digest", unreadable)
    settings = read_settings({"INPUT_BASELINE": "models/base", "INPUT_REFERENCE_PATH": "base",
                              "GITHUB_WORKSPACE": str(workspace)})
    prepared = reference.prepare(settings, Target("a" * 40, 2, None), cwd=workspace)
    assert prepared.refusal is not None and prepared.refusal.exit_code == 2
    assert prepared.refusal.error.startswith("cannot compare the reference with the base "
                                             "checkout: Permission denied")


def test_the_composite_action_refuses_a_swapped_preset_in_reference_mode(tmp_path, standin):
    """The same through action.yml's steps and the container's environment (fake docker)."""
    from tests.github.test_action_composite import Runner

    runner = Runner(tmp_path, standin.url, "pass", baseline="models/base",
                    subject="models/int8", dataset="data/eval.txt",
                    preset="presets/ci.yaml", **{"reference-path": "base"})
    _repository(runner.workspace)
    _repository(runner.workspace / "base")
    _swap(runner.workspace, "preset")
    results = runner.run_job()
    assert results["certify"].outputs["exit-code"] == "2", results["certify"].stdout
    assert not (tmp_path / "certifier-calls.jsonl").exists()
    assert results["Gate"].returncode == 1
    run = standin.check_runs[min(standin.check_runs)]
    assert run["conclusion"] == "failure"
    assert "preset `presets/ci.yaml` (changed)" in _as_text(run["output"]["summary"])
