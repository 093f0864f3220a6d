"""Reports for reviewers: golden files, GitHub's size limits, the chart's numbers."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

from invarlock.certificate import document
from invarlock.github import charts, render
from invarlock.github.checks import OUTPUT_LIMIT
from invarlock.github.comments import BODY_LIMIT
from invarlock.github.outcome import Outcome
from invarlock.github.summary import SUMMARY_LIMIT, append_summary, fit_bytes
from tests.certs import synthetic_certificate
from tests.github.golden_cases import CASES, GOLDEN, LINKS, rendered, with_guards


def _without_certificate_digest(text: str, digest: str | None) -> str:
    """`text` with the certificate's own digest (whole, or its 12-digit prefix) masked."""
    if not digest:
        return text
    hexdigits = digest.removeprefix("sha256:")
    return text.replace(hexdigits, "<digest>").replace(hexdigits[:12], "<digest>")


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    """Rendering changed? Run `python scripts/regenerate_golden.py` and review the diff.

    The certificate digest hashes floats whose last bits follow the CPU's vector path (numpy
    sums differently with AVX-512): it is compared as the rendered certificate's own digest,
    and masked in both texts; every other character is compared as it is."""
    outcome = CASES[name]()
    digest = (outcome.certificate or {}).get("digest")
    for filename, text in rendered(name).items():
        golden = (GOLDEN / filename).read_text(encoding="utf-8")
        if digest and filename.endswith(".comment.md"):
            assert digest in text and digest.removeprefix("sha256:")[:12] + "…" in text
        shown = _GOLDEN_DIGEST.findall(golden)
        assert len(set(shown)) <= 1, (filename, shown)  # one certificate, one digest
        golden = _without_certificate_digest(golden, shown[0] if shown else None)
        assert golden == _without_certificate_digest(text, digest), filename


_GOLDEN_DIGEST = re.compile(r"Certificate digest \| `(sha256:[0-9a-f]{64})`")


def test_no_stale_golden_files():
    expected = {f for name in CASES for f in rendered(name)}
    assert {p.name for p in GOLDEN.iterdir()} == expected


def _report(outcome: Outcome, links: render.Links = LINKS) -> render.Report:
    return render.Report("InvarLock", outcome, links)


def _outcome(cert) -> Outcome:
    from invarlock.enums import Verdict

    verdict = Verdict(cert["verdict"]["status"])
    return Outcome(0 if verdict is Verdict.PASS else 1, verdict, cert, None, None)


def test_reports_lead_with_the_verdict_and_the_deciding_number(certificates):
    fail = render.comment(_report(_outcome(certificates["fail"])), BODY_LIMIT)
    pm = certificates["fail"]["primary_metric"]
    first = fail.split("\n\n")
    assert first[0] == "### ❌ InvarLock: FAIL"
    assert f"upper bound **{pm['ratio_ci'][1]:.4f} > {pm['limit']:.2f}**" in first[1]
    accuracy = render.comment(_report(_outcome(certificates["accuracy"])), BODY_LIMIT)
    lower = certificates["accuracy"]["primary_metric"]["delta"]["ci"][0]
    assert f"lower bound **{lower:+.2f} ≥" in accuracy.split("\n\n")[1]
    sections = [s.split("\n")[0] for s in fail.split("\n\n") if s.startswith("####")]
    assert sections == ["#### Gate: the interval against the limit", "#### Gates",
                        "#### Reference", "#### Primary metric", "#### Guards",
                        "#### Per-window deltas"]


@pytest.mark.parametrize("name", ["pass", "fail", "accuracy"])
def test_the_gate_chart_draws_the_certificates_interval_and_limit(certificates, name):
    """The Mermaid chart's bars are the CI bounds and the point; its line is the limit; the
    axis holds all of them (what a reviewer reads off the picture is the certificate)."""
    cert = certificates[name]
    pm = cert["primary_metric"]
    chart = charts.gate_chart(cert)
    assert chart.count("```mermaid") == 1 and "xychart-beta" in chart
    bars = [float(x) for x in re.search(r"bar \[(.*)\]", chart).group(1).split(", ")]
    line = [float(x) for x in re.search(r"line \[(.*)\]", chart).group(1).split(", ")]
    low, high = (float(x) for x in re.search(r"y-axis \"[^\"]*\" (\S+) --> (\S+)", chart).groups())
    if pm["basis"] == "ratio_ci_upper":
        expected = [pm["ratio_ci"][0], pm["ratio"], pm["ratio_ci"][1]]
    else:
        expected = [pm["delta"]["ci"][0], pm["delta"]["estimate"], pm["delta"]["ci"][1]]
    assert bars == pytest.approx(expected, abs=1e-2)
    assert line == [pytest.approx(pm["limit"], abs=1e-2)] * 3
    assert low < min(*bars, *line) and high > max(*bars, *line)


def test_no_gate_chart_without_an_interval(certificates):
    assert charts.gate_chart(certificates["catastrophic"]) == ""


def test_titles(certificates):
    assert render.title(_report(_outcome(certificates["pass"]))).startswith("PASS: ratio ")
    assert render.title(_report(Outcome.failed(2, ""))) == "Could not certify (exit 2): no message"


def test_the_chart_counts_every_window_and_its_caption_matches_the_data(certificates):
    cert = certificates["fail"]
    chart = charts.delta_chart(cert)
    bars = [int(x) for x in re.search(r"bar \[(.*)\]", chart).group(1).split(", ")]
    labels = re.search(r'x-axis "[^"]*" \[(.*)\]', chart).group(1).split(", ")
    assert sum(bars) == len(cert["windows"]["final"]["ids"])
    assert len(labels) == len(bars) <= 12
    assert int(re.search(r"0 --> (\d+)", chart).group(1)) == max(bars)
    final = cert["windows"]["final"]
    deltas = (np.array(final["subject"]) - np.array(final["baseline"])) / np.array(
        final["tokens"])
    median = f"{np.median(deltas):+.4f}".replace("-", "−")
    assert f"Median Δ {median} nats/token" in chart
    assert f"ln 1.10 = +{math.log(1.1):.4f}" in chart
    assert chart.count("```") == 2


def test_the_chart_uses_the_preview_set_when_the_final_set_was_skipped(certificates):
    chart = charts.delta_chart(certificates["catastrophic"])
    assert "preview set" in chart


def test_the_chart_reports_non_finite_windows():
    cert = synthetic_certificate(shift=0.0, seed=8)
    body = {k: v for k, v in cert.items() if k != "digest"}
    body["windows"]["final"]["subject"][3] = None
    deltas = charts.window_deltas(document.seal(body))
    assert deltas.nonfinite == 1 and deltas.values.size == 31


def test_identical_deltas_make_one_bar():
    labels, counts = charts._histogram(np.full(10, 0.25))
    assert counts == [10] and labels == ["+0.2500"]


def test_guard_findings_lead_with_one_row_per_guard_then_named_modules(certificates):
    assert render.guard_findings(certificates["pass"]).endswith(
        "No guard results in this certificate.")
    section = {"mode": "gate", "flag": "invariants_pass", "passed": False,
               "reason": "subject has non-finite weights in 1 tensor(s): h.2.mlp",
               "findings": [{"module": "h.2.mlp", "family": "ffn", "kind": "nonfinite",
                             "message": "1 non-finite value(s)"}]}
    text = render.guard_findings({"guards": {"invariants": section}})
    assert text.startswith("#### Guards\n")
    assert "| invariants | gate | ❌ `invariants_pass` | subject has non\\-finite" in text
    assert "##### invariants" in text and "- `h.2.mlp` (ffn): nonfinite: 1 non\\-finite" in text


def _oversized(cert):
    body = copy.deepcopy({k: v for k, v in cert.items() if k != "digest"})  # the fixture's own
    # verdict stays as it is: the session's certificates are shared with other test files
    body["verdict"]["reasons"] = [f"reason {i}: " + "x" * 90 for i in range(2000)]
    return document.seal(body)


def test_oversized_reports_fit_github_limits_and_link_to_the_run(certificates):
    report = _report(_outcome(_oversized(certificates["fail"])))
    limit = BODY_LIMIT - 60
    body = render.comment(report, limit)
    assert len(body) <= limit
    assert "Report truncated to fit GitHub's size limit" in body
    assert LINKS.run_url in body.split("Report truncated")[1]
    assert body.rstrip().endswith("</sub>")  # the footer survives
    output = render.check_output(report)
    assert len(output.summary) <= OUTPUT_LIMIT and len(output.text) <= OUTPUT_LIMIT
    assert output.summary.count("```") % 2 == 0


def test_fit_drops_later_parts_first_and_closes_open_blocks():
    parts = ["head", "```mermaid\n" + "line\n" * 50 + "```", "tail part"]
    out = render.fit(parts, "footer", 120, "NOTICE")
    assert out.startswith("head\n\nNOTICE") and out.endswith("footer") and len(out) <= 120
    assert "```" not in out
    assert render.fit(["a", "b"], "f", 100, "N") == "a\n\nb\n\nf"
    with pytest.raises(ValueError):
        render.fit(["a" * 50], "f" * 50, 40, "NOTICE")


def test_untrusted_text_cannot_inject_html_or_break_tables():
    assert render._plain("<img src=x> | a\nb") == "&lt;img src\\=x&gt; \\| a b"
    assert render._code("a`b") == "a\\`b"  # escaped: no code span can open
    assert render._code("ec26c3e57ca3") == "`ec26c3e57ca3`"  # a plain token keeps code style


def test_job_summary_is_bounded_in_bytes(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("earlier step\n", encoding="utf-8")
    big = "ü" * (SUMMARY_LIMIT // 2 + 10) + "\n" + "tail\n"  # 2 bytes per ü
    append_summary(path, big, run_url="https://example.com/run")
    written = path.read_text(encoding="utf-8")
    assert written.startswith("earlier step\n")
    added = written[len("earlier step\n"):]
    assert len(added.encode("utf-8")) <= SUMMARY_LIMIT
    assert "Summary truncated" in added and "https://example.com/run" in added
    assert fit_bytes("short", 100, "N") == "short"


HOSTILE = ("x</details><img src=x onerror=alert(1)>\n::set-output name=v::1 "
           "[a](https://evil.example) @org/team `code` | cell")


def _hostile_certificate(alpha: float = 0.05) -> dict:
    cert = with_guards(synthetic_certificate(shift=0.2, seed=2))
    cert["environment"]["device"]["name"] = HOSTILE
    cert["environment"]["python"] = HOSTILE
    cert["environment"]["libraries"]["torch"] = HOSTILE
    cert["baseline"]["source"] = HOSTILE
    cert["subject"]["source"] = HOSTILE
    cert["subject"]["format"] = {"name": "hf_quantized", "method": HOSTILE, "bits": 4,
                                 "backend": HOSTILE, "backend_version": HOSTILE,
                                 "forward": "quantized-kernels"}
    cert["verdict"]["reasons"] = [HOSTILE]
    assert cert["guards"]
    for guard in cert["guards"].values():
        guard["reason"] = HOSTILE
        guard["findings"] = [{"module": HOSTILE, "family": HOSTILE, "kind": HOSTILE,
                              "message": HOSTILE}]
    cert["primary_metric"]["bootstrap"]["alpha"] = alpha
    return cert


def _assert_inert(text: str) -> None:
    # code spans show their content literally (no HTML, links or mentions inside them)
    text = re.sub(r"`[^`\n]*`", "CODE", text)
    assert "<img" not in text
    assert "](https://evil" not in text and "@org" not in text
    assert all(not line.lstrip().startswith("::") for line in text.splitlines())
    assert text.count("</details>") == text.count("<details>")


def test_hostile_certificate_text_is_inert_in_every_github_rendering():
    """A fork's certificate (its digest proves nothing) names a device, a Python version,
    sources, a backend and reasons: none of it becomes HTML, a link, a mention, a table
    break or a workflow command in the comment, the check run or the job summary."""
    report = render.Report("InvarLock", Outcome(1, None, _hostile_certificate(), None, None),
                           LINKS)
    output = render.check_output(report)
    for text in (render.comment(report, BODY_LIMIT), render.job_summary(report),
                 output.summary, output.text, output.title):
        _assert_inert(text)
    assert "&lt;img" in render.comment(report, BODY_LIMIT)  # shown, as text


def test_the_confidence_level_printed_is_the_recorded_one():
    cert = _hostile_certificate(alpha=0.10)
    report = render.Report("InvarLock", Outcome(1, None, cert, None, None), LINKS)
    assert charts.confidence_level(cert) == "90%"
    assert "90% CI against the limit" in render.comment(report, BODY_LIMIT)
    assert "95% CI" not in charts.gate_chart(cert)
    from invarlock.github import aggregate

    row = aggregate.Row("int4", Outcome(1, None, cert, None, None))
    assert "| 90% CI |" in aggregate.render_comment("InvarLock", [row], run_url=None)


def _sequential(shift: float, n: int, seed: int) -> Outcome:
    return _outcome(synthetic_certificate(shift=shift, n=n, seed=seed, sequential=True))


def test_every_report_of_an_early_stop_says_where_it_decided():
    report = _report(_sequential(0.0, 200, 11))
    output = render.check_output(report)
    phrase = "decided after 32 of 200 windows"
    assert output.title.endswith(f"; {phrase} (PASS)")
    for text in (render.comment(report, BODY_LIMIT), render.job_summary(report),
                 output.summary, output.text):
        assert phrase in text and "## Sequential test" in text
    assert "· 200 + 32 of 200 windows" in render.headline(report)


def test_the_delta_chart_of_an_early_stop_uses_the_windows_evaluated():
    """The baseline holds all 200 planned windows, the subject the 32 evaluated: the chart
    pairs those 32 (it used to find the lengths unequal and chart nothing)."""
    cert = _sequential(0.0, 200, 11).certificate
    deltas = charts.window_deltas(cert)
    assert (deltas.set_name, deltas.values.size, deltas.nonfinite) == ("final", 32, 0)
    assert "(32 windows)" in charts.delta_chart(cert)
    assert "Only the first 32 of 200 final windows were evaluated" in charts.delta_chart(cert)


def test_the_matrix_aggregate_shows_the_windows_each_subject_used():
    from invarlock.github import aggregate

    rows = [aggregate.Row("int8", _sequential(0.0, 200, 11)),
            aggregate.Row("q2", _sequential(0.2, 200, 12)),
            aggregate.Row("fixed", _outcome(synthetic_certificate(seed=1))),
            aggregate.Row("crash", Outcome.failed(3, "killed"))]
    body = aggregate.render_comment("InvarLock", rows, run_url=None)
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip()
             for line in body.splitlines() if line.startswith("| ") and "Subject" not in line}
    assert cells == {"int8": "32/200", "q2": "32/200", "fixed": "32/32", "crash": ""}
    assert "| Limit | Windows |" in body


def test_the_bounds_chart_draws_every_look_and_only_when_there_are_several():
    early = _sequential(0.0, 200, 11).certificate
    assert charts.bounds_chart(early) == ""  # one look: nothing narrows
    chart = charts.bounds_chart(_sequential(0.0953, 64, 7).certificate)
    assert '["32", "40", "48", "56", "64"]' in chart
    lines = [line for line in chart.splitlines() if line.startswith("    line [")]
    upper, lower, threshold = ([float(v) for v in line[10:-1].split(", ")] for line in lines)
    assert all(lo < hi for lo, hi in zip(lower, upper, strict=True))
    assert set(threshold) == {0.09531} and upper[-1] - lower[-1] < upper[0] - lower[0]


def test_a_classifier_that_stopped_early_says_so_under_its_outcome_chart():
    from invarlock.enums import MetricKind

    cert = synthetic_certificate(kind=MetricKind.ACCURACY, n=96, seed=4, sequential=True)
    chart = charts.delta_chart(cert)
    assert "0 examples newly wrong, 0 newly right. Only the first 32 of 96 final" in chart
