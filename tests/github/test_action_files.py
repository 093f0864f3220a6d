"""action.yml, the workflows, the Dockerfile and docs/action.md: valid, secure, in agreement.

- action.yml and every workflow validate against SchemaStore's schemas;
- no `${{ }}` inside a `run:` script; every third-party action pinned by commit SHA;
- the inputs agree between action.yml, the container's environment (the certify step's
  `env:` and its `--env` list), the entrypoint's settings and docs/action.md;
- hadolint (Dockerfile) and zizmor (action.yml, workflows) report nothing;
- the image is built on a digest-pinned slim Debian with the torch version CI installs
  (PyPI's CUDA build), every dependency from one index by a hashed lock;
- one name for the action (`invarlock/certify-action@v1`) in the docs and examples, and the
  matrix example in docs/action.md is the workflow file that the checks above cover.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from invarlock.github.outcome import Outcome
from invarlock.github.settings import GITHUB_VARIABLES, INPUTS, input_variables
from tests.github.conftest import DATA, ROOT

SCHEMAS = DATA / "schemastore"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
PUBLISHED_OUTPUTS = {"check-run-url", "check-run-id", "comment-url"}  # written after publishing
COMPOSITE_OUTPUTS = {"report-dir", "artifact-name"}  # written by the certify step itself


class _ActionsLoader(yaml.SafeLoader):
    """YAML as GitHub reads it: `on:` is a key, not the boolean true (YAML 1.1)."""


_ActionsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ActionsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_ActionsLoader)


def schema(name: str) -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def action() -> dict[str, Any]:
    return load_yaml(ROOT / "action.yml")


def step(action: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in action["runs"]["steps"] if s.get("id") == step_id)


# ----------------------------------------------------------------------------- schemas


def test_schemastore_examples_behave_as_published():
    validator = schema("schemas__json__github-action.json")
    for good in ("test__github-action__docker.json",
                 "test__github-action__composite-run-steps.json"):
        assert not list(validator.iter_errors(json.loads((SCHEMAS / good).read_text())))
    bad = json.loads((SCHEMAS / "negative_test__github-action__missing_items_in_run.json")
                     .read_text())
    assert list(validator.iter_errors(bad))


def test_action_yml_matches_schemastore(action):
    errors = [e.message for e in schema("schemas__json__github-action.json").iter_errors(action)]
    assert errors == []
    assert action["runs"]["using"] == "composite"
    assert action["branding"]["icon"] and action["branding"]["color"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_schemastore(path):
    validator = schema("schemas__json__github-workflow.json")
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in validator.iter_errors(load_yaml(path))]
    assert errors == []


def test_the_expected_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "certify-example.yml", "certify-publish.yml", "certify-matrix.yml",
            "certify-fork.yml", "release-image.yml"} <= names
    example = load_yaml(ROOT / ".github/workflows/certify-example.yml")
    job = example["jobs"]["certify"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert job["permissions"] == {"contents": "read", "checks": "write",
                                  "pull-requests": "write"}
    assert "pull_request" in example["on"]
    publish = load_yaml(ROOT / ".github/workflows/certify-publish.yml")
    matrix = load_yaml(ROOT / ".github/workflows/certify-matrix.yml")
    assert publish["on"]["workflow_run"]["workflows"] == [example["name"], matrix["name"]]
    release = load_yaml(ROOT / ".github/workflows/release-image.yml")
    assert release["on"] == {"workflow_dispatch": release["on"]["workflow_dispatch"]}
    assert release["on"]["workflow_dispatch"]["inputs"]["version"]["required"] is True
    steps = release["jobs"]["release"]["steps"]
    pin = next(s for s in steps if "pin_image.py" in s.get("run", ""))
    assert "steps.build.outputs.digest" in pin["env"]["DIGEST"]
    assert "--force" not in pin["run"]  # the release tag is never overwritten
    assert set(matrix["jobs"]["certify"]["needs"]) == {"changes", "baseline"}
    assert set(matrix["jobs"]["comment"]["needs"]) == {"changes", "baseline", "certify"}
    aggregate = matrix["jobs"]["comment"]["steps"][-1]["with"]
    assert aggregate["mode"] == "aggregate"


# ----------------------------------------------------------------------------- required check

DOCUMENTED = [ROOT / ".github/workflows" / n for n in ("certify-example.yml",
                                                       "certify-matrix.yml")]


def _check_names(workflow: dict[str, Any]) -> set[str]:
    """The check names the action posts from a workflow's jobs (input name / check-name)."""
    names = set()
    for job in workflow["jobs"].values():
        for step_ in job.get("steps", []):
            if str(step_.get("uses", "")).startswith("./"):
                with_ = step_.get("with") or {}
                base = with_.get("check-name", "InvarLock")
                name = with_.get("name")
                names.add(f"{base} ({name})" if name else base)
    return names


@pytest.mark.parametrize("path", [*DOCUMENTED, ROOT / ".github/workflows/certify-publish.yml"],
                         ids=lambda p: p.name)
def test_no_job_carries_a_check_name_the_action_posts(path):
    """A job's own check run has the job's name, and branch protection cannot tell it from
    the action's: a job named `InvarLock` would satisfy the required check by succeeding."""
    workflow = load_yaml(path)
    for job_id, job in workflow["jobs"].items():
        name = str(job.get("name", job_id))
        assert not name.startswith("InvarLock"), (path.name, name)
    if path.name != "certify-publish.yml":
        assert "InvarLock" in _check_names(workflow) or \
            any(n.startswith("InvarLock (") for n in _check_names(workflow))


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_documented_workflows_run_on_every_pull_request_and_in_the_merge_queue(path):
    """A `paths:` filter leaves a required check pending forever on other pull requests."""
    workflow = load_yaml(path)
    assert set(workflow["on"]) == {"pull_request", "merge_group"}
    assert not (workflow["on"]["pull_request"] or {}).get("paths")
    # ... and the job decides relevance itself: each certifying step on the GPU runner is
    # told whether anything it certifies changed
    steps = [s for job in workflow["jobs"].values() if "self-hosted" in job.get("runs-on", [])
             for s in job.get("steps", []) if str(s.get("uses", "")).startswith("./")]
    assert steps and all("relevant" in s["with"] for s in steps)


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_fork_pull_requests_never_reach_a_self_hosted_runner(path):
    workflow = load_yaml(path)
    jobs = workflow["jobs"]
    for job_id, job in jobs.items():
        if "self-hosted" not in job.get("runs-on", []):
            continue
        guards = [str(job.get("if", ""))] + [str(jobs[n].get("if", "")) for n in
                                              ([job["needs"]] if isinstance(job.get("needs"), str)
                                               else job.get("needs", []))]
        assert any("head.repo.full_name == github.repository" in g for g in guards), job_id


def test_jobs_after_a_matrix_are_not_always_and_aggregate_knows_its_subjects():
    matrix = load_yaml(ROOT / ".github/workflows/certify-matrix.yml")
    for job in matrix["jobs"].values():
        assert "always()" not in str(job.get("if", ""))
        for step_ in job.get("steps", []):
            assert "always()" not in str(step_.get("if", ""))
    subjects = set(matrix["jobs"]["certify"]["strategy"]["matrix"]["subject"])
    subjects.add(next(s for s in matrix["jobs"]["baseline"]["steps"]
                      if s.get("id") == "invarlock")["with"]["name"])
    aggregate = matrix["jobs"]["comment"]["steps"][-1]["with"]
    assert {n.strip() for n in aggregate["subjects"].split(",")} == subjects


def test_the_publish_step_runs_even_without_an_artifact():
    publish = load_yaml(ROOT / ".github/workflows/certify-publish.yml")
    steps = publish["jobs"]["publish"]["steps"]
    download = next(s for s in steps if "download-artifact" in str(s.get("uses")))
    assert download["continue-on-error"] is True
    assert download["with"]["pattern"] == "invarlock-certificate*"  # matrix artifacts too
    step_ = next(s for s in steps if s.get("uses") == "./")
    assert step_["if"] == "always()" and step_["with"]["mode"] == "publish"


# ----------------------------------------------------------------------------- security


def _runs(document: Any) -> list[str]:
    found = []
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "run" and isinstance(value, str):
                found.append(value)
            else:
                found += _runs(value)
    elif isinstance(document, list):
        for item in document:
            found += _runs(item)
    return found


def _uses(path: Path) -> list[str]:
    return re.findall(r"^\s*(?:-\s*)?uses:\s*(\S+.*)$", path.read_text(), flags=re.M)


@pytest.mark.parametrize("path", [ROOT / "action.yml", *WORKFLOWS], ids=lambda p: p.name)
def test_no_expressions_inside_scripts(path):
    for script in _runs(load_yaml(path)):
        assert "${{" not in script, script


@pytest.mark.parametrize("path", [ROOT / "action.yml", *WORKFLOWS], ids=lambda p: p.name)
def test_actions_are_pinned_by_commit(path):
    for use in _uses(path):
        if use.startswith("./"):
            continue
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*", use), use


def test_zizmor_finds_nothing():
    zizmor = shutil.which("zizmor") or str(Path(sys.executable).with_name("zizmor"))
    result = subprocess.run(
        [zizmor, "--offline", "--no-progress", "--config", ".github/zizmor.yml", "action.yml",
         ".github/workflows"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- agreement


def test_inputs_agree_between_action_container_settings_and_docs(action):
    action_inputs = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}
    settings_inputs = {spec.name: spec.default for spec in INPUTS}

    # every input the entrypoint reads is declared, with the same default
    for name, default in settings_inputs.items():
        assert name in action_inputs, name
        if not action_inputs[name].startswith("${{"):
            assert action_inputs[name] == default, name

    # ... and reaches the container: set in the certify step's env, forwarded by name
    certify = step(action, "certify")
    env = certify["env"]
    container_inputs = {k: v for k, v in env.items() if k.startswith("INPUT_")}
    assert container_inputs == {input_variables(name)[0]: f"${{{{ inputs.{name} }}}}"
                                for name in settings_inputs}
    forwarded = set(re.findall(r"^\s+((?:INPUT|GITHUB)_[A-Z_]+)\s*$", certify["run"],
                               flags=re.M))
    # ... all but the token, which reaches the container in a 0600 file (INVARLOCK_TOKEN_FILE)
    assert {k for k in forwarded if k.startswith("INPUT_")} == \
        set(container_inputs) - {"INPUT_GITHUB_TOKEN"}
    assert set(GITHUB_VARIABLES) <= forwarded

    # the inputs only the composite steps use are used there
    text = (ROOT / "action.yml").read_text()
    for name in set(action_inputs) - set(settings_inputs):
        assert re.search(rf"\binputs\.{re.escape(name)}\b", text), name

    # docs/action.md lists every input with the same default
    docs = _table(ROOT / "docs" / "action.md", "Input")
    assert set(docs) == set(action_inputs)
    for name, cells in docs.items():
        assert cells[0].strip("`") == action_inputs[name], name


def test_outputs_agree_between_action_entrypoint_and_docs(action):
    written = set(Outcome.failed(2, "x").outputs()) | PUBLISHED_OUTPUTS | COMPOSITE_OUTPUTS
    for name, spec in action["outputs"].items():
        match = re.fullmatch(r"\$\{\{ steps\.certify\.outputs\.([\w-]+) \}\}", spec["value"])
        assert match and match.group(1) == name, name
        assert name in written, name
    assert set(_table(ROOT / "docs" / "action.md", "Output")) == set(action["outputs"])


def test_image_is_pinned_and_built_from_the_locked_cuda_torch_ci_tests(action):
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(),
                        flags=re.M).group(1)
    default = action["inputs"]["image"]["default"]
    # a release commit pins the digest; between releases, main names the version's tag
    assert default == f"ghcr.io/invarlock/invarlock:{version}" or re.fullmatch(
        r"ghcr\.io/invarlock/invarlock@sha256:[0-9a-f]{64}", default)
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, flags=re.M).group(1)
    # one stage, on a slim Debian pinned by digest (the lock is for its Python 3.11)
    assert re.fullmatch(r"debian:bookworm-slim@sha256:[0-9a-f]{64}", base)
    assert re.findall(r"^FROM (\S+)", dockerfile, flags=re.M) == ["${BASE_IMAGE}"]
    # torch at the version CI tests, from PyPI (its CUDA build), in the hashed lock
    lock = (ROOT / "docker" / "requirements.lock").read_text()
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(),
                      flags=re.M).group(1)
    assert re.search(rf"^torch=={re.escape(torch)} \\$", lock, flags=re.M)
    assert re.search(r"^nvidia-cublas==\S+ \\$", lock, flags=re.M)
    docs = (ROOT / "docs" / "action.md").read_text()
    assert "580 branch or newer" in docs and f"torch=={torch}" in docs
    # installs use apt and pip only, from one index, hashes required
    instructions = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", dockerfile))
    installs = "\n".join(line for line in instructions.splitlines()
                         if line.startswith(("RUN ", "ADD ", "COPY ")))
    assert "pip install" in installs and "apt-get install" in installs
    for command in ("curl", "wget", "uv ", "ADD ", "github.com/", "--extra-index-url",
                    "--find-links", "--trusted-host"):
        assert command not in installs, command
    assert '--index-url "${PYPI_INDEX_URL}" --require-hashes --no-deps' in dockerfile
    assert "ARG PYPI_INDEX_URL=https://pypi.org/simple" in dockerfile
    assert re.search(r"^ENTRYPOINT \[\"/opt/invarlock/entrypoint\"\]$", dockerfile, flags=re.M)
    assert "NVIDIA_VISIBLE_DEVICES=all" in dockerfile
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, flags=re.M)
    assert "org.opencontainers.image.source=" in dockerfile


def test_pinning_the_image_changes_only_the_default(tmp_path):
    from scripts.pin_image import pin

    text = (ROOT / "action.yml").read_text()
    digest = "sha256:" + "0123456789abcdef" * 4
    pinned = pin(text, "ghcr.io/invarlock/invarlock", digest)
    before, after = load_yaml(ROOT / "action.yml"), yaml.load(pinned, Loader=_ActionsLoader)
    assert after["inputs"]["image"]["default"] == f"ghcr.io/invarlock/invarlock@{digest}"
    after["inputs"]["image"]["default"] = before["inputs"]["image"]["default"]
    assert after == before
    assert not list(schema("schemas__json__github-action.json").iter_errors(
        yaml.load(pinned, Loader=_ActionsLoader)))
    with pytest.raises(ValueError, match="not an image digest"):
        pin(text, "ghcr.io/invarlock/invarlock", "sha256:abc")


def test_docs_and_examples_use_one_name_for_the_action():
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob(
        "*.md")), *WORKFLOWS]}
    for name, text in texts.items():
        for use in re.findall(r"uses: (invarlock/[\w.@/$-]+)", text):
            # the release workflow names the major tag it moves
            assert use in ("invarlock/certify-action@v1", "invarlock/certify-action@v$MAJOR"), \
                (name, use)
        assert not re.search(r"(?<!ghcr\.io/)invarlock/invarlock@", text), name
    docs = texts["action.md"]
    assert docs.count("uses: invarlock/certify-action@v1") >= 4


def test_the_matrix_example_in_the_docs_is_the_checked_workflow():
    docs = (ROOT / "docs" / "action.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", docs, flags=re.S)
    example = next(b for b in blocks if b.startswith("name: Certify model variants"))
    workflow = (ROOT / ".github/workflows/certify-matrix.yml").read_text()
    workflow = workflow[workflow.index("name: Certify model variants"):]
    assert example == workflow.replace("uses: ./", "uses: invarlock/certify-action@v1")
    validator = schema("schemas__json__github-workflow.json")
    assert not list(validator.iter_errors(yaml.load(example, Loader=_ActionsLoader)))


def test_entrypoint_is_an_executable_python_script():
    path = ROOT / "entrypoint"
    assert path.stat().st_mode & 0o111
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert "invarlock.github" in text


def _table(path: Path, first_header: str) -> dict[str, list[str]]:
    """Rows of the Markdown table whose first header cell is `first_header`: name -> cells."""
    rows: dict[str, list[str]] = {}
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith(f"| {first_header} |"):
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            rows[cells[0].strip("`")] = [c.strip() for c in line.split("|")[2:-1]]
        elif inside:
            break
    return rows
