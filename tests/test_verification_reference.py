"""Tests for invarlock.verification.reference: `verify` rejects a certificate whose
reference section names other digests or origins than the evidence it accompanies, even when
resealed (the content digest is a checksum anyone can recompute, not a signature)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock.certificate import document
from invarlock.cli import main
from invarlock.verification.reference import reference_differences
from invarlock.verify import verify_certificate
from tests.certs import synthetic_certificate, with_reference

OTHER = "sha256:" + "ef" * 32


@pytest.fixture(scope="module")
def plain():
    return synthetic_certificate(shift=0.0, seed=11)


def _resealed(cert: dict, change) -> dict:
    """A forger's edit: change the content, then recompute the content digest."""
    out = copy.deepcopy(cert)
    change(out)
    out.pop("digest", None)
    return document.seal(out)


def test_an_honest_reference_section_verifies(plain):
    for cert in (with_reference(plain), with_reference(plain, "pull-request", changed=None),
                 with_reference(plain, "pull-request", changed=("preset:presets/ci.yaml",)),
                 with_reference(plain, "local", changed=None, pinned=("baseline", "policy"))):
        assert reference_differences(cert) == []
        report = verify_certificate(cert)
        assert report.verified, report.differences
        assert "reference digests" in report.checked


def test_a_certificate_without_a_reference_section_is_not_affected(plain):
    report = verify_certificate(plain)
    assert report.verified and "reference digests" not in report.checked


@pytest.mark.parametrize("item,evidence", [("baseline", "baseline.weights_digest"),
                                           ("dataset", "dataset.digest"),
                                           ("policy", "policy.digest")])
def test_a_resealed_reference_digest_that_is_not_the_evidences_is_rejected(plain, item,
                                                                          evidence):
    """A certificate measured against one baseline cannot claim the base branch's other one."""
    cert = _resealed(with_reference(plain),
                     lambda c: c["reference"][item].__setitem__("digest", OTHER))
    report = verify_certificate(cert)
    assert not report.verified and report.exit_code == 2
    (line,) = report.differences
    assert line.startswith(f"reference.{item}.digest: names {OTHER}") and evidence in line


def test_a_resealed_origin_is_rejected(plain):
    """An item said to come from the base branch while the run read the pull request."""
    cert = _resealed(with_reference(plain, "pull-request"),
                     lambda c: c["reference"]["baseline"].__setitem__("origin",
                                                                      "base-checkout"))
    (line,) = verify_certificate(cert).differences
    assert line.startswith("reference.baseline.origin: base-checkout differs from the run's "
                           "origin pull-request")
    cert = _resealed(with_reference(plain),
                     lambda c: c["reference"].__setitem__("origin", "pinned-digest"))
    assert any(d.startswith("reference.origin:") for d in verify_certificate(cert).differences)


def test_a_hidden_change_is_rejected(plain):
    """A changed preset cannot be shown as unchanged while the policy it set says changed,
    nor can a change be claimed for files read from the base branch."""
    approved = with_reference(plain, "pull-request", changed=("preset:presets/ci.yaml",))
    hidden = _resealed(approved, lambda c: c["reference"]["presets"][0].__setitem__(
        "changed", False))
    (line,) = verify_certificate(hidden).differences
    assert line.startswith("reference.policy.changed: is true, but a preset was not changed")
    from_base = _resealed(with_reference(plain), lambda c: c["reference"]["dataset"]
                          .__setitem__("changed", True))
    assert any(d.startswith("reference.dataset.changed: a changed item is read from the pull "
                            "request") for d in verify_certificate(from_base).differences)
    partial = _resealed(with_reference(plain), lambda c: c["reference"]["baseline"]
                        .pop("changed"))
    assert "reference: `changed` is recorded for some items only" in \
        verify_certificate(partial).differences


def test_the_verify_command_exits_2_on_a_tampered_reference(plain, tmp_path: Path):
    cert = _resealed(with_reference(plain),
                     lambda c: c["reference"]["baseline"].__setitem__("digest", OTHER))
    path = tmp_path / "evaluation.cert.json"
    path.write_text(json.dumps(cert), encoding="utf-8")
    result = CliRunner().invoke(main, ["verify", str(path), "--json"])
    assert result.exit_code == 2, result.output
    assert "reference.baseline.digest" in result.output
