"""`invarlock verify`: authentic certificates verify; every kind of tampering is caught, also
when the attacker re-seals the content digest afterwards."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock import gate
from invarlock.certificate import document
from invarlock.cli import main
from invarlock.enums import MetricKind
from invarlock.policy import policy_digest
from invarlock.verify import baseline_evidence_differences, verify_certificate
from tests.certs import synthetic_certificate
from tests.guard_sections import spectral_section, with_guard_sections


@pytest.fixture(scope="module")
def passing() -> dict:
    return synthetic_certificate(shift=0.0, seed=1)


@pytest.fixture(scope="module")
def failing() -> dict:
    return synthetic_certificate(shift=0.2, seed=2)


def reseal(cert: dict) -> dict:
    """What an attacker does after editing: recompute the content digest."""
    body = {k: v for k, v in cert.items() if k != "digest"}
    return {**body, "digest": document.content_digest(body)}


def edited(cert: dict, change) -> dict:
    out = copy.deepcopy(cert)
    change(out)
    return out


def mentions(report, *words: str) -> bool:
    return any(all(w in d for w in words) for d in report.differences)


@pytest.mark.parametrize(("shift", "kind", "verdict", "code"), [
    (0.0, MetricKind.PPL_CAUSAL, "PASS", 0),
    (0.2, MetricKind.PPL_CAUSAL, "FAIL", 1),
    (1.5, MetricKind.PPL_CAUSAL, "FAIL", 1),  # catastrophic: final set not evaluated
    (0.0, MetricKind.PPL_MLM, "PASS", 0),
    (0.0, MetricKind.ACCURACY, "PASS", 0),
    (0.2, MetricKind.ACCURACY, "FAIL", 1),
])
def test_authentic_certificates_verify(shift, kind, verdict, code):
    cert = synthetic_certificate(shift=shift, kind=kind, n=48, seed=3)
    report = verify_certificate(cert)
    assert report.differences == ()
    assert report.verdict == verdict and report.exit_code == code
    assert {"schema", "digest", "policy", "pairing", "primary metric", "verdict"} <= set(
        report.checked)


def test_editing_the_digest_is_caught(passing):
    cert = {**passing, "digest": "sha256:" + "0" * 64}
    report = verify_certificate(cert)
    assert report.exit_code == 2 and mentions(report, "digest", "edited after it was sealed")


def test_flipping_one_window_number_is_caught_sealed_or_resealed(passing):
    def flip(c):
        c["windows"]["final"]["subject"][5] += 40.0

    plain = verify_certificate(edited(passing, flip))
    assert mentions(plain, "digest")
    resealed = verify_certificate(reseal(edited(passing, flip)))
    assert not mentions(resealed, "digest")
    assert mentions(resealed, "primary_metric.final.subject")
    assert mentions(resealed, "primary_metric.ratio")
    assert resealed.exit_code == 2


def test_changing_the_limit_is_caught(failing):
    def loosen(c):
        c["primary_metric"]["limit"] = 1.5

    report = verify_certificate(reseal(edited(failing, loosen)))
    assert mentions(report, "primary_metric.limit", "1.5", "1.1")


def test_changing_the_policy_limit_and_every_number_after_it_is_caught(failing):
    """A thorough attacker: new limit in the policy, policy digest, flags, verdict, digest."""
    def rejudge(c):
        values = c["policy"]["values"]
        values["primary_metric"]["ratio_limit"] = 1.5
        c["policy"]["digest"] = policy_digest(values)
        _rejudge(c)

    cert = reseal(edited(failing, rejudge))
    assert cert["verdict"]["status"] == "PASS"
    report = verify_certificate(cert)
    assert report.exit_code == 2
    assert mentions(report, "primary_metric.ratio_limit", "not declared in policy.overrides")


def test_a_declared_override_verifies_and_stays_visible(failing):
    def override(c):
        values = c["policy"]["values"]
        values["primary_metric"]["ratio_limit"] = 1.5
        c["policy"]["overrides"] = sorted([*c["policy"]["overrides"],
                                           "primary_metric.ratio_limit"])
        c["policy"]["digest"] = policy_digest(values)
        _rejudge(c)

    cert = reseal(edited(failing, override))
    report = verify_certificate(cert)
    assert report.differences == () and report.verdict == "PASS"
    assert "primary_metric.ratio_limit 1.5 > 1.1" in cert["evidence"]["shortfalls"]


def test_a_weakening_override_cannot_claim_the_evidence_meets_the_profile(failing):
    """Declared overrides that ask for less (a 55% interval, a higher limit, a guard turned
    down) are recomputed from the recorded policy into the evidence, whatever it claims."""
    def talk_down(c):
        values = c["policy"]["values"]
        values["primary_metric"]["ratio_limit"] = 1.5
        values["bootstrap"]["alpha"] = 0.45
        values["guards"]["spectral"]["mode"] = "monitor"
        c["policy"]["overrides"] = sorted([*c["policy"]["overrides"], "bootstrap.alpha",
                                           "guards.spectral.mode", "primary_metric.ratio_limit"])
        c["policy"]["digest"] = policy_digest(values)
        _rejudge(c)
        c["evidence"]["shortfalls"] = c["evidence"]["shortfalls"][:3]

    report = verify_certificate(reseal(edited(failing, talk_down)))
    assert report.differences == ("evidence.shortfalls: certificate has ['preview_n 32 < 64', "
                                  "'final_n 32 < 64', 'bootstrap replicates 200 < 500'], "
                                  "recomputed 7 entries",)
    honest = reseal(edited(failing, _rejudge_after(talk_down)))
    assert verify_certificate(honest).differences == ()
    assert {"bootstrap.alpha 0.45 > 0.05 (a 55% interval, the profile promises 95%)",
            "guards.spectral.mode monitor instead of gate",
            "primary_metric.ratio_limit 1.5 > 1.1"} <= set(honest["evidence"]["shortfalls"])


def _rejudge_after(change):
    def both(c):
        change(c)
        _rejudge(c)
    return both


def test_another_versions_weakened_settings_are_a_note_not_a_difference(passing):
    """Defaults change between releases: a certificate from another version whose recorded
    values differ from this installation's tier keeps its own list, with a note."""
    def older(c):
        c["tool"]["version"] = "0.0.1"
        c["policy"]["values"]["guards"]["spectral"]["module_change_limit"] = 0.2

    report = verify_certificate(reseal(edited(passing, older)))
    assert not any(d.startswith("evidence") for d in report.differences)
    assert any("guards.spectral.module_change_limit 0.2 > 0.08" in n for n in report.notes)


def test_a_context_length_shorter_than_the_windows_is_caught(passing):
    def shorten(c):
        c["evidence"]["context_length"] = 64  # the windows hold 128 tokens

    report = verify_certificate(reseal(edited(passing, shorten)))
    assert mentions(report, "evidence.context_length", "64", "128-token")


def _rejudge(c: dict) -> None:
    """Recompute primary metric, flags and verdict under the certificate's own policy."""
    from invarlock import distribution_gate
    from invarlock.policy import ResolvedPolicy, evidence_floor

    p = c["policy"]
    policy = ResolvedPolicy(p["tier"], p["profile"], p["values"], tuple(p["overrides"]))
    arrays = {n: gate.PairedArrays(*(
        __import__("numpy").asarray(c["windows"][n][k], dtype=float)
        for k in ("tokens", "baseline", "subject"))) for n in ("preview", "final")}
    pm = gate.primary_metric(MetricKind(c["windows"]["kind"]), arrays["preview"],
                             arrays["final"], policy.primary_metric, policy.bootstrap)
    n = len(c["windows"]["final"]["ids"])
    ev = c["evidence"]
    evidence = gate.Evidence(evidence_floor(ev["profile"], ev["context_length"]), n, n,
                             c["windows"]["seq_len"], policy.bootstrap.replicates, (n, n),
                             ev["allow_underpowered"], ev["context_length"],
                             policy.weakened + distribution_gate.shortfall(
                                 distribution_gate.Limits.from_policy(p["values"].get(
                                     "distribution")), "distribution" in c, True))
    checks = [gate.pairing_check(1.0, 0.0, n, n), *gate.primary_checks(pm, policy.primary_metric),
              evidence.check()]
    decision = gate.decide(checks, gate.primary_gating(evidence.floor))
    c.update(primary_metric=pm.as_dict(), validation=decision.validation,
             verdict=decision.verdict_section(), evidence=evidence.as_dict())


def test_changing_the_verdict_is_caught(failing):
    def to_pass(c):
        c["verdict"]["status"] = "PASS"
        c["verdict"]["reasons"] = ["all 4 gating checks passed"]
        c["validation"]["primary_metric_acceptable"] = True

    report = verify_certificate(reseal(edited(failing, to_pass)))
    assert report.exit_code == 2
    assert mentions(report, "verdict.status", "'PASS'", "'FAIL'")
    assert mentions(report, "validation.primary_metric_acceptable")


def test_dropping_a_window_is_caught(passing):
    def drop(c):
        for field in ("ids", "sha256", "tokens", "baseline", "subject"):
            del c["windows"]["final"][field][0]

    report = verify_certificate(reseal(edited(passing, drop)))
    assert report.exit_code == 2
    assert mentions(report, "pairing.final_n")
    assert mentions(report, "primary_metric")  # the numbers no longer follow either


def test_dropping_a_window_and_fixing_the_counts_is_still_caught(passing):
    def drop(c):
        for field in ("ids", "sha256", "tokens", "baseline", "subject"):
            del c["windows"]["final"][field][0]
        c["pairing"]["final_n"] -= 1

    report = verify_certificate(reseal(edited(passing, drop)))
    assert mentions(report, "pairing_acceptable") or mentions(report, "windows.final")


def test_overlapping_windows_are_recomputed_from_the_hashes(passing):
    def overlap(c):
        c["windows"]["final"]["sha256"][0] = c["windows"]["preview"]["sha256"][0]

    report = verify_certificate(reseal(edited(passing, overlap)))
    assert mentions(report, "pairing.overlap", "0.0")
    assert mentions(report, "validation.pairing_acceptable")


def test_token_counts_must_fit_the_window_length(passing):
    report = verify_certificate(reseal(edited(
        passing, lambda c: c["windows"]["preview"]["tokens"].__setitem__(2, 500))))
    assert mentions(report, "windows.preview.tokens[2]", "500")


def test_bootstrap_seed_must_be_the_policy_seed(passing):
    def reseed(c):
        c["primary_metric"]["bootstrap"]["seed"] = 7
        c["seeds"]["bootstrap"] = 7

    report = verify_certificate(reseal(edited(passing, reseed)))
    assert mentions(report, "seeds.bootstrap") and mentions(report, "bootstrap.seed")


def test_malformed_certificates_are_reported_not_crashed(passing):
    report = verify_certificate(reseal(edited(passing, lambda c: c.pop("windows"))))
    assert report.exit_code == 2 and mentions(report, "schema", "windows")
    report = verify_certificate(reseal(edited(
        passing, lambda c: c["policy"]["values"].pop("bootstrap"))))
    assert report.exit_code == 2 and mentions(report, "policy")


def test_guard_sections_need_their_guard_to_recheck(passing, monkeypatch):
    cert = with_guard_sections(passing, {"spectral": spectral_section(violations=1)})
    monkeypatch.setitem(sys.modules, "invarlock.guards", None)  # not installed
    report = verify_certificate(cert)
    assert report.exit_code == 2 and mentions(report, "cannot re-check guard spectral")


def _stand_in_guards(monkeypatch) -> None:
    """A guard package whose recheck recomputes `passed` from the measurements."""
    def recheck(name, section, policy_values):
        if name != "spectral":
            raise LookupError(f"unknown guard {name}")
        over = [m for m in section["measurements"]["modules"]
                if abs(m["z"]) > section["measurements"]["families"][m["family"]]["kappa"]]
        cap = section["measurements"]["max_caps"]
        return gate.Check("spectral_stable", len(over) <= cap,
                          f"{len(over)} module(s) beyond their family cap; at most {cap} allowed")

    module = types.ModuleType("invarlock.guards")
    module.recheck = recheck
    monkeypatch.setitem(sys.modules, "invarlock.guards", module)


def test_guard_sections_are_rechecked_and_tampering_caught(passing, monkeypatch):
    _stand_in_guards(monkeypatch)
    cert = with_guard_sections(passing, {"spectral": spectral_section(violations=4)})
    report = verify_certificate(cert)
    assert report.differences == () and report.verdict == "FAIL"

    def hide(c):  # claim the guard passed: flags, gating verdict all made consistent
        section = c["guards"]["spectral"]
        section["passed"] = True
        c["validation"]["spectral_stable"] = True

    report = verify_certificate(reseal(edited(cert, hide)))
    assert mentions(report, "guards.spectral.passed")


def test_a_gate_mode_guard_must_be_in_gating(passing, monkeypatch):
    _stand_in_guards(monkeypatch)
    cert = with_guard_sections(passing, {"spectral": spectral_section(violations=4)})
    report = verify_certificate(reseal(edited(
        cert, lambda c: c.__setitem__("gating", list(gate.PRIMARY_GATING)))))
    assert mentions(report, "gating")


def test_baseline_evidence_must_match_the_reference():
    one = synthetic_certificate(shift=0.0, seed=4)
    two = synthetic_certificate(shift=0.0, seed=4)  # same baseline arrays, same windows
    assert baseline_evidence_differences(one, two) == []
    other = synthetic_certificate(shift=0.0, seed=5)
    lines = baseline_evidence_differences(one, other)
    assert any(line.startswith("windows.final.baseline") for line in lines)
    moved = edited(one, lambda c: c["baseline"].__setitem__("weights_digest",
                                                            "sha256:" + "ef" * 32))
    assert any("baseline.weights_digest" in line
               for line in baseline_evidence_differences(moved, two))


# --- the command ----------------------------------------------------------------------------

def write(tmp_path: Path, name: str, cert: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cert), encoding="utf-8")
    return str(path)


def run(*args: str):
    return CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)


def test_cli_exit_codes_and_json(tmp_path, passing, failing):
    good, bad = write(tmp_path, "p.json", passing), write(tmp_path, "f.json", failing)
    assert run(good).exit_code == 0
    assert run(good, bad).exit_code == 1
    tampered = write(tmp_path, "t.json", {**failing, "digest": "sha256:" + "1" * 64})
    result = run(good, tampered, "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2 and payload["tolerance"]["relative"] == 1e-12
    assert [c["verified"] for c in payload["certificates"]] == [True, False]
    text = run(tampered).stdout
    assert "NOT VERIFIED" in text and "digest" in text


def test_cli_run_folder_missing_file_and_not_json(tmp_path, passing):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / document.CERT_FILENAME).write_text(json.dumps(passing))
    assert run(str(folder)).exit_code == 0
    result = run(str(tmp_path / "missing.json"), "--json")
    assert result.exit_code == 2
    assert "not found" in json.loads(result.stdout)["certificates"][0]["differences"][0]
    (tmp_path / "x.json").write_text("{nope")
    assert run(str(tmp_path / "x.json")).exit_code == 2


def test_cli_baseline_cert(tmp_path):
    one = write(tmp_path, "a.json", synthetic_certificate(shift=0.0, seed=6))
    same = write(tmp_path, "b.json", synthetic_certificate(shift=0.01, seed=6))
    other = write(tmp_path, "c.json", synthetic_certificate(shift=0.0, seed=7))
    assert run(same, "--baseline-cert", one).exit_code == 0
    result = run(other, "--baseline-cert", one)
    assert result.exit_code == 2 and "baseline evidence" in result.stdout
