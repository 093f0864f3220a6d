"""Settings: inputs in both spellings, defaults, validation messages, the token kept hidden."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from invarlock.errors import InputError
from invarlock.github.settings import (
    DEFAULT_CERTIFY_COMMAND,
    INPUTS,
    CommentMode,
    Mode,
    fallback_settings,
    input_variables,
    read_input,
    read_settings,
)


def test_defaults_when_nothing_is_set():
    s = read_settings({})
    assert s.mode is Mode.CERTIFY
    assert s.certify.profile == "ci" and s.certify.tier == "balanced"
    assert s.certify.baseline == "" and s.certify.presets == ()
    assert s.check_run and s.comment and s.check_name == "InvarLock"
    assert s.output_dir == Path("invarlock-report")
    assert s.certify_command == DEFAULT_CERTIFY_COMMAND
    assert s.token == ""
    assert s.github.api_url == "https://api.github.com"
    assert not s.github.in_actions


def test_both_spellings_are_read():
    assert input_variables("github-token") == ("INPUT_GITHUB_TOKEN", "INPUT_GITHUB-TOKEN")
    assert read_settings({"INPUT_GITHUB-TOKEN": "t1"}).token == "t1"
    assert read_settings({"INPUT_GITHUB_TOKEN": "t2"}).token == "t2"
    assert read_settings({"INPUT_EDIT-CONFIG": "e.yaml"}).certify.edit_config == "e.yaml"
    # the composite action's underscore form wins when both are set
    assert read_settings({"INPUT_CHECK_NAME": "a", "INPUT_CHECK-NAME": "b"}).check_name == "a"


def test_empty_or_blank_inputs_fall_back_to_the_default():
    assert read_input({"INPUT_PROFILE": "  "}, "profile") == "ci"
    assert read_input({"INPUT_TIER": " conservative\n"}, "tier") == "conservative"


def test_every_input_has_a_description_and_a_string_default():
    for spec in INPUTS:
        assert spec.description and isinstance(spec.default, str)
    assert len({spec.name for spec in INPUTS}) == len(INPUTS)


def test_presets_one_per_line_and_the_certify_inputs():
    s = read_settings({"INPUT_PRESET": "a.yaml\n\n  b dir/c.yaml \n", "INPUT_BASELINE": "m/base",
                       "INPUT_SUBJECT": "m/int8", "INPUT_DATASET": "d.txt",
                       "INPUT_PROFILE": "dev", "INPUT_DEVICE": "cuda:1", "INPUT_DTYPE": "bfloat16"})
    assert s.certify.presets == ("a.yaml", "b dir/c.yaml")
    assert (s.certify.baseline, s.certify.subject, s.certify.dataset) == ("m/base", "m/int8",
                                                                         "d.txt")
    assert (s.certify.device, s.certify.dtype, s.certify.profile) == ("cuda:1", "bfloat16", "dev")


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("False", False), ("1", True),
                                                 ("no", False), ("ON", True)])
def test_booleans(value, expected):
    assert read_settings({"INPUT_COMMENT": value}).comment is expected


def test_bad_values_name_the_input():
    with pytest.raises(InputError, match="input 'check-run' must be true or false, not 'maybe'"):
        read_settings({"INPUT_CHECK_RUN": "maybe"})
    with pytest.raises(InputError,
                       match="input 'mode' must be certify or publish or aggregate, not 'push'"):
        read_settings({"INPUT_MODE": "push"})
    with pytest.raises(InputError, match="input 'certificate' is required in publish mode"):
        read_settings({"INPUT_MODE": "publish"})
    with pytest.raises(InputError, match="check-name"):
        read_settings({"INPUT_CHECK_NAME": "x" * 101})
    with pytest.raises(InputError, match="INVARLOCK_CERTIFY_COMMAND is not a valid command"):
        read_settings({"INVARLOCK_CERTIFY_COMMAND": "python 'unclosed"})


def test_publish_mode_and_the_certify_command():
    s = read_settings({"INPUT_MODE": "Publish", "INPUT_CERTIFICATE": "dl/report",
                       "INVARLOCK_CERTIFY_COMMAND": "python3 -m invarlock certify"})
    assert s.mode is Mode.PUBLISH and s.certificate == Path("dl/report")
    assert s.certify_command == ("python3", "-m", "invarlock", "certify")


def test_github_variables_and_token_fallback():
    s = read_settings({"GITHUB_API_URL": "https://ghe.example.com/api/v3",
                       "GITHUB_SERVER_URL": "https://ghe.example.com",
                       "GITHUB_REPOSITORY": "org/repo", "GITHUB_RUN_ID": "9",
                       "GITHUB_ACTIONS": "true", "GITHUB_TOKEN": "from-env",
                       "GITHUB_OUTPUT": "/tmp/out"})
    assert s.github.api_url == "https://ghe.example.com/api/v3"
    assert s.github.run_url == "https://ghe.example.com/org/repo/actions/runs/9"
    assert s.github.owner_and_name == ("org", "repo")
    assert s.github.output_path == Path("/tmp/out") and s.github.in_actions
    assert s.token == "from-env"


def test_bad_repository_is_an_input_error():
    with pytest.raises(InputError, match="GITHUB_REPOSITORY must be owner/name"):
        _ = read_settings({"GITHUB_REPOSITORY": "no-slash"}).github.owner_and_name


def test_the_token_is_not_in_the_repr():
    s = read_settings({"INPUT_GITHUB_TOKEN": "ghs_secret_value"})
    assert "ghs_secret_value" not in repr(s)


def test_a_subject_name_suffixes_check_and_artifact_and_a_softer_fail_is_explicit():
    settings = read_settings({"INPUT_NAME": "int4", "INPUT_FAIL_CONCLUSION": "Neutral"})
    assert settings.check_name == "InvarLock (int4)"
    assert settings.artifact_name == "invarlock-certificate-int4"
    assert str(settings.fail_conclusion) == "neutral"
    assert str(read_settings({}).fail_conclusion) == "failure"
    with pytest.raises(InputError, match="input 'fail-conclusion' must be failure or neutral"):
        read_settings({"INPUT_FAIL_CONCLUSION": "success"})
    with pytest.raises(InputError, match="input 'name' must be letters"):
        read_settings({"INPUT_NAME": "../int4"})
    with pytest.raises(InputError, match="input 'certificate' is required in aggregate mode"):
        read_settings({"INPUT_MODE": "aggregate"})


@pytest.mark.parametrize(("inputs", "message"), [
    ({"INPUT_COMMENT_MODE": "sometimes"}, "input 'comment-mode' must be one of always"),
    ({"INPUT_COMMIT": "main"}, "input 'commit' must be a full commit SHA"),
    ({"INPUT_PR_NUMBER": "2; rm"}, "input 'pr-number' must be a pull request number"),
    ({"INPUT_SUBJECTS": "int8, in t4"}, "input 'subjects': 'in t4' is not a subject name"),
    ({"INPUT_SUBJECTS": "int8, int8"}, "input 'subjects' names a subject twice"),
    ({"INPUT_RELEVANT": "maybe"}, "input 'relevant' must be true or false"),
    ({"INVARLOCK_INPUT_ERROR": "gpus must be all, a count"}, "gpus must be all, a count"),
])
def test_the_publishing_inputs_are_checked(inputs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        read_settings(inputs)


def test_publishing_inputs_and_the_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("ghs_FromTheFile\n")
    s = read_settings({"INPUT_COMMENT_MODE": "On-Failure", "INPUT_PR_NUMBER": "12",
                       "INPUT_COMMIT": "a" * 40, "INPUT_SUBJECTS": "int8\nint4, awq",
                       "INVARLOCK_TOKEN_FILE": str(token)})
    assert s.comment_mode is CommentMode.ON_FAILURE and s.comment
    assert (s.pr_number, s.commit, s.subjects) == (12, "a" * 40, ("int8", "int4", "awq"))
    assert s.token == "ghs_FromTheFile"
    assert read_settings({"INPUT_COMMENT": "false"}).comment_mode is CommentMode.OFF
    assert not read_settings({"INPUT_COMMENT_MODE": "off"}).comment


def test_publish_mode_never_posts_under_the_required_name():
    s = read_settings({"INPUT_MODE": "publish", "INPUT_CERTIFICATE": "r", "INPUT_NAME": "int4"})
    assert s.check_name == "InvarLock (int4) (fork, unverified)"
    fallback = fallback_settings({"INPUT_MODE": "publish", "INPUT_COMMENT": "sometimes"})
    assert fallback.check_name == "InvarLock (fork, unverified)" and not fallback.comment
