"""Action settings: every input and GitHub variable, read once from the environment.

Inputs arrive as `INPUT_<NAME>` with the name upper-cased and hyphens turned into
underscores, which is how the composite action passes them to the container. Docker and
JavaScript actions receive the hyphenated form (`INPUT_GITHUB-TOKEN`); both are accepted.
Nothing else in the package reads the environment.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from invarlock.enums import StrEnum
from invarlock.errors import InputError
from invarlock.github.outcome import Conclusion

CERTIFY_COMMAND_VARIABLE = "INVARLOCK_CERTIFY_COMMAND"
# Set by action.yml: a file in the runner's temp folder where the entrypoint records the check
# run it opened, so that a later `if: always()` step can complete it if the container dies.
STATE_FILE_VARIABLE = "INVARLOCK_STATE_FILE"
DEFAULT_CERTIFY_COMMAND = ("invarlock", "certify")


@dataclass(frozen=True)
class InputSpec:
    """One input the entrypoint reads; `default` applies when the variable is unset or empty."""

    name: str
    default: str
    description: str


# The inputs the entrypoint reads. action.yml declares each of them (with the same default)
# and passes each to the container; tests/github/test_action_consistency.py checks that.
INPUTS: tuple[InputSpec, ...] = (
    InputSpec("mode", "certify",
              "`certify` runs the certifier; `publish` reports a downloaded result "
              "(fork pull requests, from a `workflow_run` workflow); `aggregate` writes one "
              "comment for the results of a matrix."),
    InputSpec("name", "", "Subject name in a matrix: suffixes the check name and the artifact "
                          "name, and names the subject's row in the aggregate comment."),
    InputSpec("baseline", "", "Baseline model, a directory in the workspace (empty for the "
                              "bundled demo model)."),
    InputSpec("subject", "", "Subject checkpoint to certify against the baseline."),
    InputSpec("edit-config", "", "YAML with `edit: {name: quant_rtn, plan: {...}}`: build the "
                                 "subject from the baseline instead of loading one."),
    InputSpec("dataset", "", "Evaluation data: a .txt file, a folder of .txt, a .jsonl file, "
                             "`demo`, `wikitext2` or `hf:NAME[:CONFIG[:SPLIT]]`."),
    InputSpec("profile", "ci", "Evidence size: `dev`, `ci` or `release`."),
    InputSpec("tier", "balanced", "Acceptance thresholds: `balanced`, `conservative` or "
                                  "`aggressive`."),
    InputSpec("preset", "", "Config files merged in order, one path per line."),
    InputSpec("device", "", "`cuda`, `cuda:N` or `cpu`; empty picks CUDA when a GPU is "
                            "visible."),
    InputSpec("dtype", "", "`float32`, `float16` or `bfloat16`; empty picks from the "
                           "checkpoint and device."),
    InputSpec("output-dir", "invarlock-report",
              "Folder for the certificate, relative to `working-directory`."),
    InputSpec("certificate", "", "Publish mode: the downloaded report folder (or certificate "
                                 "file) to publish; aggregate mode: the folder holding one "
                                 "downloaded report folder per subject."),
    InputSpec("github-token", "", "Token for the check run and the comment (default: the job "
                                  "token, or GITHUB_TOKEN outside the action)."),
    InputSpec("check-name", "InvarLock", "Name of the check run; also keys the sticky comment."),
    InputSpec("check-run", "true", "Create a check run on the commit."),
    InputSpec("comment", "true", "Create or update one sticky comment on the pull request."),
    InputSpec("comment-author", "", "Login the sticky comment is written as (empty: the "
                                    "token's own identity; the job token writes as "
                                    "`github-actions[bot]`). Only its comments are updated."),
    InputSpec("fail-conclusion", "failure",
              "Check-run conclusion for a FAIL: `failure`, or `neutral` to let branch "
              "protection pass it (errors always conclude `failure`)."),
    InputSpec("artifact-name", "invarlock-certificate",
              "Name of the certificate artifact (named in the report)."),
    # A trusted reference (invarlock.github.reference)
    InputSpec("reference-path", "", "A checkout of the pull request's base ref: the "
                                    "baseline, dataset and presets are read from it, and a "
                                    "pull request that changes them fails unless approved."),
    InputSpec("baseline-digest", "", "Pin the baseline's weights digest (`sha256:<hex>`): "
                                     "a different baseline stops the run (exit 2)."),
    InputSpec("policy-digest", "", "Pin the resolved policy's digest (`sha256:<hex>`): "
                                   "different thresholds stop the run (exit 2)."),
    InputSpec("dataset-digest", "", "Pin the evaluation data's digest (`sha256:<hex>`): "
                                    "other data stops the run (exit 2)."),
    InputSpec("allow-reference-change", "false",
              "Approve a pull request that changes the reference; set it only from a job in "
              "a protected environment (docs/action.md, \"A trusted reference\")."),
    InputSpec("comment-mode", "always",
              "When to write the sticky comment: `always`, `on-change` (only when the verdict "
              "line changes), `on-failure` (only when not PASS; an existing comment is always "
              "brought up to date) or `off`."),
    InputSpec("commit", "", "Commit to report on in place of the event's (for `workflow_run` "
                            "and other events that do not name the pull request's head)."),
    InputSpec("pr-number", "", "Pull request to comment on in place of the event's (with "
                               "`commit`; checked against the pull request's head)."),
    InputSpec("relevant", "true",
              "`false`: nothing this check certifies changed (the workflow decides, for "
              "example with `git diff`); the check run concludes `success` with \"no model "
              "change\" and nothing is certified."),
    InputSpec("subjects", "", "Aggregate mode: the subject names the matrix was expected to "
                              "certify, one per line (or comma-separated); a subject without "
                              "a report is a failing row."),
)
_SPECS = {spec.name: spec for spec in INPUTS}


class Mode(StrEnum):
    CERTIFY = "certify"
    PUBLISH = "publish"
    AGGREGATE = "aggregate"


class CommentMode(StrEnum):
    ALWAYS = "always"
    ON_CHANGE = "on-change"
    ON_FAILURE = "on-failure"
    OFF = "off"


# Results published from a downloaded report (mode `publish`: fork pull requests) carry this
# suffix, so that only a trusted run can satisfy a required check of the plain name.
FORK_SUFFIX = " (fork, unverified)"


@dataclass(frozen=True)
class CertifyInputs:
    """What goes to `invarlock certify`; empty strings mean "the certifier's default"."""

    baseline: str = ""
    subject: str = ""
    edit_config: str = ""
    dataset: str = ""
    profile: str = "ci"
    tier: str = "balanced"
    presets: tuple[str, ...] = ()
    device: str = ""
    dtype: str = ""


@dataclass(frozen=True)
class ReferenceInputs:
    """Where the reference comes from and what it is pinned to (invarlock.github.reference)."""

    path: str = ""  # reference-path: a checkout of the base ref
    baseline_digest: str = ""
    policy_digest: str = ""
    dataset_digest: str = ""
    allow_change: bool = False


# Set by action.yml: whether cache-dir names a folder that outlives the job, and the file the
# cache-secret input was written to (0600). A persistent cache without a secret is refused.
CACHE_PERSISTENT_VARIABLE = "INVARLOCK_CACHE_PERSISTENT"
CACHE_SECRET_FILE_VARIABLE = "INVARLOCK_CACHE_SECRET_FILE"


def _reference_inputs(environ: Mapping[str, str]) -> ReferenceInputs:
    """The reference inputs (certify mode), digests checked."""
    from invarlock.provenance import parse_digest

    def digest(name: str) -> str:
        value = read_input(environ, name)
        return parse_digest(value, f"input '{name}'") if value else ""

    _check_shared_cache(environ)
    return ReferenceInputs(
        path=read_input(environ, "reference-path"),
        baseline_digest=digest("baseline-digest"),
        policy_digest=digest("policy-digest"),
        dataset_digest=digest("dataset-digest"),
        allow_change=_boolean("allow-reference-change",
                              read_input(environ, "allow-reference-change")))


def _check_shared_cache(environ: Mapping[str, str]) -> None:
    """A cache that outlives the job is only used with a secret that signs its entries."""
    if (environ.get(CACHE_PERSISTENT_VARIABLE, "").strip().lower() in _TRUE
            and not environ.get(CACHE_SECRET_FILE_VARIABLE, "").strip()):
        raise InputError("input 'cache-dir' names a cache shared between jobs, which anyone "
                         "running on this runner could plant results in: set input "
                         "'cache-secret' (a secret forks cannot read), or leave 'cache-dir' "
                         "empty for a cache of this job only")


@dataclass(frozen=True)
class GitHubEnvironment:
    """The default variables of a workflow run (empty outside GitHub Actions)."""

    api_url: str = "https://api.github.com"
    server_url: str = "https://github.com"
    repository: str = ""  # owner/name
    sha: str = ""  # for pull_request events the merge commit, not the head
    event_name: str = ""
    event_path: Path | None = None
    run_id: str = ""
    run_attempt: str = "1"
    output_path: Path | None = None  # GITHUB_OUTPUT
    summary_path: Path | None = None  # GITHUB_STEP_SUMMARY
    in_actions: bool = False

    @property
    def run_url(self) -> str | None:
        if not (self.repository and self.run_id):
            return None
        return f"{self.server_url.rstrip('/')}/{self.repository}/actions/runs/{self.run_id}"

    @property
    def owner_and_name(self) -> tuple[str, str]:
        if not _REPOSITORY.fullmatch(self.repository):
            raise InputError(f"GITHUB_REPOSITORY must be owner/name, not {self.repository!r}")
        owner, name = self.repository.split("/")
        return owner, name


_REPOSITORY = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Settings:
    mode: Mode
    certify: CertifyInputs
    output_dir: Path
    certificate: Path | None
    check_name: str
    check_run: bool
    comment: bool
    artifact_name: str
    certify_command: tuple[str, ...]
    github: GitHubEnvironment
    token: str = field(default="", repr=False)  # never in a repr, a log line or an error
    name: str = ""  # the subject's name in a matrix
    comment_author: str = ""  # empty: the token's identity
    fail_conclusion: Conclusion = Conclusion.FAILURE
    state_file: Path | None = None  # where the open check run is recorded for the cleanup step
    repository_root: Path | None = None  # GITHUB_WORKSPACE: annotation paths start here
    reference: ReferenceInputs = field(default_factory=ReferenceInputs)
    comment_mode: CommentMode = CommentMode.ALWAYS
    commit: str = ""  # overrides the event's commit
    pr_number: int | None = None  # overrides the event's pull request
    subjects: tuple[str, ...] = ()  # aggregate mode: the names the matrix was expected to give
    cancel_file: Path | None = None  # exists once the job was cancelled (action.yml's trap)
    relevant: bool = True  # False: nothing to certify changed; the check passes as such

    @property
    def publishes(self) -> bool:
        """Whether anything is sent to the GitHub API."""
        return self.check_run or self.comment


def input_variables(name: str) -> tuple[str, str]:
    """The two spellings an input can arrive in: `INPUT_EDIT_CONFIG`, `INPUT_EDIT-CONFIG`."""
    upper = name.upper()
    return f"INPUT_{upper.replace('-', '_')}", f"INPUT_{upper}"


def read_input(environ: Mapping[str, str], name: str) -> str:
    """An input's value (whitespace stripped), or its default when unset or empty."""
    for variable in input_variables(name):
        value = environ.get(variable, "").strip()
        if value:
            return value
    return _SPECS[name].default


def read_settings(environ: Mapping[str, str]) -> Settings:
    """Read and check every input once; bad values raise InputError naming the input."""
    def get(name: str) -> str:
        return read_input(environ, name)

    early = environ.get(INPUT_ERROR_VARIABLE, "").strip()
    if early:
        raise InputError(early)
    mode = _choice("mode", get("mode"), Mode)
    certificate = Path(get("certificate")) if get("certificate") else None
    if mode is not Mode.CERTIFY and certificate is None:
        raise InputError(f"input 'certificate' is required in {mode} mode: the downloaded "
                         "report folder" + (" or certificate file" if mode is Mode.PUBLISH
                                            else "s' parent folder"))
    name = get("name")
    if not _NAME.fullmatch(name):
        raise InputError(f"input 'name' must be letters, digits, '.', '_' or '-' (at most 64), "
                         f"not {name!r}")
    check_name = check_name_for(get("check-name"), name, mode)
    comment_mode = _comment_mode(get("comment-mode"), _boolean("comment", get("comment")))
    if len(check_name) > 100:
        raise InputError("input 'check-name' is longer than 100 characters")
    fail_conclusion = get("fail-conclusion").lower()
    if fail_conclusion not in (Conclusion.FAILURE, Conclusion.NEUTRAL):
        raise InputError(f"input 'fail-conclusion' must be failure or neutral, not "
                         f"{fail_conclusion!r}")
    return Settings(
        mode=mode,
        certify=CertifyInputs(
            baseline=get("baseline"), subject=get("subject"), edit_config=get("edit-config"),
            dataset=get("dataset"), profile=get("profile"), tier=get("tier"),
            presets=tuple(line.strip() for line in get("preset").splitlines() if line.strip()),
            device=get("device"), dtype=get("dtype")),
        output_dir=Path(get("output-dir")),
        certificate=certificate,
        check_name=check_name,
        check_run=_boolean("check-run", get("check-run")),
        comment=comment_mode is not CommentMode.OFF,
        artifact_name=f"{get('artifact-name')}-{name}" if name else get("artifact-name"),
        certify_command=_command(environ.get(CERTIFY_COMMAND_VARIABLE, "")),
        github=_github_environment(environ),
        token=read_token(environ),
        name=name,
        comment_author=get("comment-author"),
        fail_conclusion=Conclusion(fail_conclusion),
        state_file=_optional_path(environ.get(STATE_FILE_VARIABLE, "")),
        repository_root=_optional_path(environ.get("GITHUB_WORKSPACE", "")),
        reference=_reference_inputs(environ) if mode is Mode.CERTIFY else ReferenceInputs(),
        comment_mode=comment_mode,
        commit=_commit(get("commit")),
        pr_number=_pr_number(get("pr-number")),
        subjects=_subjects(get("subjects")),
        relevant=_boolean("relevant", get("relevant")),
        cancel_file=_optional_path(environ.get(CANCEL_FILE_VARIABLE, "")),
    )


def _optional_path(value: str) -> Path | None:
    return Path(value) if value.strip() else None


NAME_PATTERN = _NAME = re.compile(r"[A-Za-z0-9._-]{0,64}")


# The workflow variables the entrypoint reads (action.yml forwards each into the container).
GITHUB_VARIABLES = ("GITHUB_ACTIONS", "GITHUB_API_URL", "GITHUB_SERVER_URL", "GITHUB_REPOSITORY",
                    "GITHUB_SHA", "GITHUB_EVENT_NAME", "GITHUB_EVENT_PATH", "GITHUB_RUN_ID",
                    "GITHUB_RUN_ATTEMPT", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY",
                    "GITHUB_WORKSPACE")


def _github_environment(environ: Mapping[str, str]) -> GitHubEnvironment:
    environ = {k: v for k, v in environ.items() if k in GITHUB_VARIABLES}

    def path(name: str) -> Path | None:
        value = environ.get(name, "")
        return Path(value) if value else None

    defaults = GitHubEnvironment()
    return GitHubEnvironment(
        api_url=environ.get("GITHUB_API_URL") or defaults.api_url,
        server_url=environ.get("GITHUB_SERVER_URL") or defaults.server_url,
        repository=environ.get("GITHUB_REPOSITORY", ""),
        sha=environ.get("GITHUB_SHA", ""),
        event_name=environ.get("GITHUB_EVENT_NAME", ""),
        event_path=path("GITHUB_EVENT_PATH"),
        run_id=environ.get("GITHUB_RUN_ID", ""),
        run_attempt=environ.get("GITHUB_RUN_ATTEMPT") or defaults.run_attempt,
        output_path=path("GITHUB_OUTPUT"),
        summary_path=path("GITHUB_STEP_SUMMARY"),
        in_actions=environ.get("GITHUB_ACTIONS") == "true",
    )


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InputError(f"input '{name}' must be true or false, not {value!r}")


def _choice(name: str, value: str, enum: type[Mode]) -> Mode:
    try:
        return enum(value.lower())
    except ValueError:
        allowed = " or ".join(m.value for m in enum)
        raise InputError(f"input '{name}' must be {allowed}, not {value!r}") from None


def _command(value: str) -> tuple[str, ...]:
    """`INVARLOCK_CERTIFY_COMMAND`: the command run in place of `invarlock certify`."""
    if not value.strip():
        return DEFAULT_CERTIFY_COMMAND
    try:
        parts = tuple(shlex.split(value))
    except ValueError as exc:
        raise InputError(f"{CERTIFY_COMMAND_VARIABLE} is not a valid command line: {exc}") \
            from None
    return parts


# ----------------------------------------------------------------------------- trust, failures
# What the runner side of action.yml hands the entrypoint besides the inputs.

# A 0600 file in the (mounted) state folder holding the token: the container gets the token
# there, never in its environment (`docker inspect`) or on the command line.
TOKEN_FILE_VARIABLE = "INVARLOCK_TOKEN_FILE"
# Set by action.yml's cancel trap before `docker stop`: a container that docker had not yet
# created when the job was cancelled finds it when it starts, and stops before certifying.
CANCEL_FILE_VARIABLE = "INVARLOCK_CANCEL_FILE"
# An input the composite's own steps refused (gpus, shm-size, working-directory, ...): the
# entrypoint reports it as a failed check instead of certifying.
INPUT_ERROR_VARIABLE = "INVARLOCK_INPUT_ERROR"
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def read_token(environ: Mapping[str, str]) -> str:
    """The token: the input, else the token file action.yml mounts, else GITHUB_TOKEN."""
    token = read_input(environ, "github-token")
    if token:
        return token
    path = environ.get(TOKEN_FILE_VARIABLE, "").strip()
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            token = ""
        if token:
            return token
    return environ.get("GITHUB_TOKEN", "").strip()


def check_name_for(base: str, name: str, mode: Mode) -> str:
    """The check run's name: the subject's name in brackets, the fork suffix in publish mode."""
    check_name = f"{base} ({name})" if name else base
    return check_name + FORK_SUFFIX if mode is Mode.PUBLISH else check_name


def _comment_mode(value: str, comment: bool) -> CommentMode:
    try:
        mode = CommentMode(value.lower())
    except ValueError:
        allowed = ", ".join(m.value for m in CommentMode)
        raise InputError(f"input 'comment-mode' must be one of {allowed}, not {value!r}") \
            from None
    return mode if comment else CommentMode.OFF


def _commit(value: str) -> str:
    if value and not _SHA.fullmatch(value):
        raise InputError(f"input 'commit' must be a full commit SHA (40 hex digits), not "
                         f"{value!r}")
    return value


def _pr_number(value: str) -> int | None:
    if not value:
        return None
    if not re.fullmatch(r"[1-9][0-9]{0,9}", value):
        raise InputError(f"input 'pr-number' must be a pull request number, not {value!r}")
    return int(value)


def _subjects(value: str) -> tuple[str, ...]:
    names = [n.strip() for n in re.split(r"[\n,]", value) if n.strip()]
    for n in names:
        if not _NAME.fullmatch(n) or not n:
            raise InputError(f"input 'subjects': {n!r} is not a subject name (letters, digits, "
                             "'.', '_' or '-')")
    if len(set(names)) != len(names):
        raise InputError("input 'subjects' names a subject twice")
    return tuple(names)


def fallback_settings(environ: Mapping[str, str]) -> Settings:
    """Settings good enough to publish a failure when the inputs themselves are bad.

    Every input that does not parse takes its default; publishing a check run stays off only
    when `check-run` says so plainly. The comment is left out: the check carries the reason.
    """
    def get(name: str) -> str:
        return read_input(environ, name)

    try:
        mode = Mode(get("mode").lower())
    except ValueError:
        mode = Mode.CERTIFY
    name = get("name") if _NAME.fullmatch(get("name")) else ""
    check_name = check_name_for(get("check-name"), name, mode)
    if len(check_name) > 100:
        check_name = check_name_for(_SPECS["check-name"].default, name, mode)
    commit = get("commit") if _SHA.fullmatch(get("commit")) else ""
    return Settings(
        mode=mode, certify=CertifyInputs(), output_dir=Path(get("output-dir")),
        certificate=None, check_name=check_name,
        check_run=get("check-run").lower() not in _FALSE, comment=False,
        artifact_name="", certify_command=DEFAULT_CERTIFY_COMMAND,
        github=_github_environment(environ), token=read_token(environ), name=name,
        state_file=_optional_path(environ.get(STATE_FILE_VARIABLE, "")),
        comment_mode=CommentMode.OFF, commit=commit)
