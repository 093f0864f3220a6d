"""Tests for invarlock.provenance: pins on the reference are checked before anything is
evaluated, and the certificate says where each reference item came from."""

from __future__ import annotations

import pytest

from invarlock.certificate import document
from invarlock.errors import InputError
from invarlock.provenance import Origin, Reference, parse_digest, record
from tests.faults.conftest import FAST, certify, error_lines, invoke

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def fast_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "fast.yaml"
    path.write_text(FAST)
    return path


def test_digest_forms():
    assert parse_digest("AB" * 32, "--policy-digest") == DIGEST
    assert parse_digest(f" {DIGEST} ", "--policy-digest") == DIGEST
    with pytest.raises(InputError, match="--baseline-digest must be sha256:"):
        parse_digest("sha256:1234", "--baseline-digest")


def test_record_marks_matching_pins_and_hashes_presets(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("auto: {tier: balanced}\n")
    ref = Reference(Origin.BASE_CHECKOUT, baseline_digest=DIGEST, policy_digest="sha256:" +
                    "0" * 64, presets=(preset,))
    section = record(ref, baseline_digest=DIGEST, dataset_digest="sha256:" + "1" * 64,
                     policy_digest="sha256:" + "2" * 64)
    assert section["baseline"] == {"origin": "pinned-digest", "digest": DIGEST}
    assert section["dataset"]["origin"] == "base-checkout"
    assert section["policy"]["origin"] == "base-checkout"  # a pin that did not match
    assert section["presets"][0]["digest"].startswith("sha256:")
    assert record(None, baseline_digest=DIGEST, dataset_digest=DIGEST,
                  policy_digest=DIGEST)["origin"] == "local"


@pytest.mark.parametrize("flag", ["--baseline-digest", "--policy-digest", "--dataset-digest"])
def test_pin_mismatch_exits_2_before_anything_is_evaluated(
        flag, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path, monkeypatch):
    from invarlock import certify as pipeline
    from invarlock.stages import plan as plan_stage

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluation started despite a pin mismatch")

    monkeypatch.setattr(plan_stage, "plan_windows", evaluated)  # the dataset pin: after reading
    monkeypatch.setattr(pipeline, "evaluate_baseline", evaluated)
    code, summary, stderr = certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "out",
                                    sonnets_path, fast_preset, flag, DIGEST, "--no-cache")
    assert code == 2, summary
    (line,) = error_lines(stderr)
    assert "does not match the pinned" in line and DIGEST in line
    assert not (tmp_path / "out").exists()


def test_matching_pins_are_recorded_and_the_certificate_verifies(
        tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    code, summary, _ = certify(tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "first", sonnets_path,
                               fast_preset, "--no-cache")
    first = document.load_certificate(summary["certificate"])
    assert first["reference"]["origin"] == "local"
    code, summary, _ = certify(
        tiny_gpt2_dir, tiny_gpt2_dir, tmp_path / "pinned", sonnets_path, fast_preset,
        "--no-cache", "--reference-origin", "base-checkout", "--reference-changed", "none",
        "--baseline-digest", first["baseline"]["weights_digest"],
        "--policy-digest", first["policy"]["digest"],
        "--dataset-digest", first["dataset"]["digest"])
    assert code == 0, summary
    ref = document.load_certificate(summary["certificate"])["reference"]
    assert ref["origin"] == "base-checkout"
    assert ref["baseline"] == {"origin": "pinned-digest",
                               "digest": first["baseline"]["weights_digest"], "changed": False}
    assert ref["policy"]["origin"] == "pinned-digest"
    assert ref["dataset"] == {"origin": "pinned-digest", "digest": first["dataset"]["digest"],
                              "changed": False}
    assert [p["path"] for p in ref["presets"]] == [str(fast_preset)]
    assert invoke("verify", summary["certificate"], "--json")[0] == 0


def test_record_says_what_the_pull_request_changed(tmp_path):
    """Compared with the base checkout, each item says whether the pull request changed it;
    the policy changed when a preset did. Not compared: no `changed` at all."""
    preset = tmp_path / "p.yaml"
    preset.write_text("auto: {tier: aggressive}\n")
    digests = {"baseline_digest": DIGEST, "dataset_digest": DIGEST, "policy_digest": DIGEST}
    section = record(Reference(Origin.PULL_REQUEST, presets=(preset,),
                               changed=(f"preset:{preset}",)), **digests)
    assert [section[k]["changed"] for k in ("baseline", "dataset", "policy")] == [
        False, False, True]
    assert section["presets"][0]["changed"] is True
    section = record(Reference(Origin.BASE_CHECKOUT, presets=(preset,), changed=()), **digests)
    assert not any(section[k]["changed"] for k in ("baseline", "dataset", "policy"))
    section = record(Reference(Origin.PULL_REQUEST, presets=(preset,)), **digests)
    assert "changed" not in section["baseline"] and "changed" not in section["presets"][0]


def test_an_unknown_changed_item_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="--reference-changed must be baseline, dataset, none "
                                         "or preset:<one of the --preset files>, not 'models'"):
        Reference(Origin.PULL_REQUEST, changed=("models",))
    with pytest.raises(InputError, match=r"not 'preset:other\.yaml'"):
        Reference(Origin.PULL_REQUEST, presets=(tmp_path / "p.yaml",),
                  changed=("preset:other.yaml",))
