"""End to end on the bundled demo model (dev profile, 64 + 64 windows of 128 tokens): a clear
PASS (INT8) and a clear FAIL (2-bit) stop at the first look and score only the design's 32
preview windows, with the baseline scored no further than the decision needed (windows
forwarded are counted, not timed); a subject at its limit runs to the maximum and extends the
cached baseline; one model at a time (blocks) scores the baseline in blocks doubling from
the first look, swapping the models when a look needs the next block, and gives the same
decision; every certificate verifies, and `verify` rejects altered or reordered looks."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock.certificate import document
from invarlock.cli import main
from invarlock.verify import verify_certificate

pytest.importorskip("transformers")

PRESET = ("dataset: {seq_len: 128, preview_n: 64, final_n: 64}\n"
          "eval: {bootstrap: {replicates: 500}}\n")
EDITS = {
    "int8": "edit: {name: quant_rtn, plan: {bitwidth: 8}}\n",
    # 2-bit is beyond the catastrophe limit on the preview; raise it so the final set is reached
    "rtn2": "edit: {name: quant_rtn, plan: {bitwidth: 2}}\n",
}
EXTRA = {
    "int8": "", "rtn2": "eval: {primary_metric: {catastrophic_ratio: 50.0}}\n",
    # INT8 changes the demo's perplexity by ~1e-4: a limit right there is a borderline subject
    "borderline": "eval: {primary_metric: {ratio_limit: 1.0001}}\n",
}


def _certify(tmp: Path, name: str, cache: Path, out: str | None = None, *,
             blocks: bool = False, subject: Path | None = None, save: Path | None = None,
             ) -> tuple[int, dict, dict, dict[str, int]]:
    """One certify run (the edit `name`, or the checkpoint `subject` with `name`'s preset;
    `blocks`: no memory for a second model); also the windows each side forwarded through
    its model."""
    from invarlock.models import device
    from invarlock.stages import common

    forwarded = {"baseline": 0, "subject": 0}
    score = common.score

    earlier = _live_models()  # other tests' models still alive are not this run's

    def counted(inputs, req, timer, model, windows, label, *args, **kwargs):
        forwarded[label] += windows.n
        if blocks and label == "baseline":
            forwarded["weights_beside_baseline"] = max(
                forwarded.get("weights_beside_baseline", 0), _weights_beside(model, earlier))
        return score(inputs, req, timer, model, windows, label, *args, **kwargs)

    edit = tmp / f"{name}.edit.yaml"
    edit.write_text(EDITS.get(name, EDITS["int8"]))
    preset = tmp / f"{name}.yaml"
    preset.write_text(PRESET + EXTRA[name])
    out_dir = tmp / (out or name)
    side = (["--edit", "quant_rtn", "--edit-config", str(edit)] if subject is None else
            ["--baseline", "demo", "--dataset", "demo", "--subject", str(subject)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "score", counted)
        if blocks:
            mp.setattr(device, "free_memory", lambda _device: 0)
        result = CliRunner().invoke(main, [
            "certify", "--profile", "dev", *side, "--preset", str(preset), "--out", str(out_dir),
            "--cache-dir", str(cache), "--json",
            *(["--save-subject", str(save)] if save else [])], catch_exceptions=False)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    cert = json.loads((out_dir / document.CERT_FILENAME).read_text(encoding="utf-8"))
    return result.exit_code, summary, cert, forwarded


def _live_models() -> weakref.WeakSet:
    import gc

    from transformers import PreTrainedModel

    return weakref.WeakSet(m for m in gc.get_objects() if isinstance(m, PreTrainedModel))


def _weights_beside(model, earlier: weakref.WeakSet) -> int:
    """Parameters held by every other live model of this run while `model` scores (the
    subject's); models alive before the run started (`earlier`) are not counted."""
    own = {id(m) for m in model.modules()}  # its body is a PreTrainedModel too
    return sum(p.numel() for m in _live_models()
               if id(m) not in own and m not in earlier for p in m.parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, dict, dict, dict[str, int]]]:
    """In order, one cache: int8 fills it (32 preview + 32 final baseline windows), rtn2
    reads it, borderline extends it to every final window."""
    tmp = tmp_path_factory.mktemp("seqdemo")
    cache = tmp / "cache"
    out = {name: _certify(tmp, name, cache) for name in ("int8", "rtn2", "borderline")}
    entries = list(cache.rglob("*.json"))
    assert len(entries) == 1
    out["cache_entry"] = json.loads(entries[0].read_text(encoding="utf-8"))
    return out


def test_clear_cases_score_only_the_preview_cut_and_the_baseline_the_decision_needs(runs):
    """Fixed design: 64 + 64 windows through each model (256). INT8 with a fresh cache
    forwards 32 + 32 per side; 2-bit, with the baseline from the cache, only its own."""
    for name in ("int8", "rtn2"):
        cert = runs[name][2]
        assert [len(cert["windows"]["preview"][k]) for k in ("ids", "subject", "baseline")] \
            == [64, 32, 32]
        assert len(cert["windows"]["final"]["baseline"]) == 32
        assert cert["sequential"]["design"]["preview_n"] == 32
        assert cert["baseline"]["schedule"] == "lockstep"
    assert runs["int8"][3] == {"baseline": 64, "subject": 64}
    assert runs["rtn2"][3] == {"baseline": 0, "subject": 64}
    assert runs["rtn2"][2]["baseline"]["results_from_cache"]


def test_a_borderline_run_extends_the_cached_baseline_look_by_look(runs):
    """The cache held 32 final windows: the borderline run scores the baseline's other 32
    beside its own, and the entry then holds all 64 for later subjects."""
    assert runs["borderline"][3] == {"baseline": 32, "subject": 32 + 64}
    sets = runs["cache_entry"]["payload"]["sets"]
    assert (len(sets["preview"]["values"]), len(sets["final"]["values"])) == (32, 64)
    cert = runs["borderline"][2]
    assert cert["baseline"]["cache_payload_digest"] == runs["cache_entry"]["payload_digest"]


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> dict[str, tuple[int, dict, dict, dict[str, int]]]:
    """No memory for a second model (blocks), in order: INT8 fills a fresh cache with the
    first block and saves its subject; the borderline edit reads that block and has the
    baseline score the next one in the subject's place; the saved INT8 checkpoint, as a
    borderline subject from its path with a fresh cache, scores both blocks itself."""
    tmp = tmp_path_factory.mktemp("blocks")
    saved = tmp / "int8-subject"
    out = {"int8": _certify(tmp, "int8", tmp / "cache", blocks=True, save=saved),
           "borderline": _certify(tmp, "borderline", tmp / "cache", blocks=True),
           "path": _certify(tmp, "borderline", tmp / "fresh", "path", blocks=True,
                            subject=saved)}
    entries = list((tmp / "cache").rglob("*.json"))
    assert len(entries) == 1
    out["cache_entry"] = json.loads(entries[0].read_text(encoding="utf-8"))
    return out


def test_one_model_at_a_time_a_clear_run_scores_the_baseline_on_the_first_block_only(
        runs, blocks):
    """With no memory for a second model the baseline scores the final windows up to the
    first look before the subject loads, and a subject decided there needs no more: 32 + 32
    baseline windows, as in lockstep, where the whole plan (32 + 64) used to be scored."""
    code, _, cert, forwarded = blocks["int8"]
    assert (code, cert["sequential"]["stopped_at"]) == (0, 32)
    assert cert["baseline"]["schedule"] == "blocks"
    assert "blocks end at 32, 64 windows" in cert["baseline"]["schedule_note"]
    assert cert["baseline"]["final_blocks"] == [[0, 32]]
    assert forwarded == {"baseline": 32 + 32, "subject": 32 + 32, "weights_beside_baseline": 0}
    assert cert["sequential"] == runs["int8"][2]["sequential"]
    assert verify_certificate(cert).differences == ()


def test_one_model_at_a_time_an_undecided_edit_swaps_the_models_for_the_next_block(
        runs, blocks):
    """The borderline edit is undecided at 32 windows, past the 32 the cache held: the
    subject is let go (its parameters hold nothing while the baseline scores), the baseline
    scores windows 32..64, the edit is applied again to that baseline and the subject carries
    on from its look. Nothing is scored twice, and the looks, differences and decision are
    the lockstep run's."""
    code, _, cert, forwarded = blocks["borderline"]
    assert forwarded == {"baseline": 32, "subject": 32 + 64, "weights_beside_baseline": 0}
    assert cert["baseline"]["final_blocks"] == [[32, 64]]
    assert cert["baseline"]["results_from_cache"]
    lockstep = runs["borderline"]
    assert code == lockstep[0]
    assert cert["sequential"] == lockstep[2]["sequential"]
    assert cert["windows"]["final"] == lockstep[2]["windows"]["final"]
    assert cert["subject"]["weights_digest"] == lockstep[2]["subject"]["weights_digest"]
    assert verify_certificate(cert).differences == ()


def test_one_model_at_a_time_a_subject_from_its_path_is_read_again_after_each_block(
        runs, blocks):
    """The saved INT8 checkpoint against a fresh cache: both baseline blocks are scored, the
    subject read from its path again after the second, with the same decision and per-window
    differences as the in-memory edit in lockstep."""
    code, _, cert, forwarded = blocks["path"]
    assert forwarded == {"baseline": 32 + 32 + 32, "subject": 32 + 64,
                         "weights_beside_baseline": 0}
    assert cert["baseline"]["final_blocks"] == [[0, 32], [32, 64]]
    lockstep = runs["borderline"][2]["sequential"]
    assert (code, cert["sequential"]["decision"]) == (runs["borderline"][0], lockstep["decision"])
    assert cert["sequential"]["differences"] == pytest.approx(lockstep["differences"],
                                                              abs=1e-9)
    assert verify_certificate(cert).differences == ()


def test_one_model_at_a_time_the_cache_is_extended_for_later_subjects(blocks):
    sets = blocks["cache_entry"]["payload"]["sets"]
    assert (len(sets["preview"]["values"]), len(sets["final"]["values"])) == (32, 64)
    cert = blocks["borderline"][2]
    assert cert["baseline"]["cache_payload_digest"] == blocks["cache_entry"]["payload_digest"]


BLOCK_TAMPERING = {
    "a block past the doubling": ([[0, 32], [32, 40]], "which is not a block end"),
    "a gap": ([[0, 32], [40, 64]], "does not follow on"),
    "too few for the subject": ([[0, 32]], "the baseline was scored on 32"),
}


@pytest.mark.parametrize("what", sorted(BLOCK_TAMPERING))
def test_verify_rejects_baseline_blocks_the_schedule_cannot_have_scored(blocks, what):
    ranges, message = BLOCK_TAMPERING[what]
    report = verify_certificate(_resealed(
        blocks["path"][2], lambda c: c["baseline"].__setitem__("final_blocks", ranges)))
    assert any(d.startswith("baseline.final_blocks") and message in d
               for d in report.differences), report.differences


def test_an_edit_not_known_to_reproduce_keeps_the_whole_plan_ahead(tmp_path, monkeypatch):
    """The subject could not be rebuilt after a swap: the baseline scores the whole plan
    before the subject loads, and the certificate says why."""
    import dataclasses

    from invarlock import edits

    monkeypatch.setitem(edits.EDITS, "quant_rtn",
                        dataclasses.replace(edits.EDITS["quant_rtn"], reproducible=False))
    code, _, cert, forwarded = _certify(tmp_path, "int8", tmp_path / "cache", blocks=True)
    assert (code, forwarded["baseline"], forwarded["weights_beside_baseline"]) == (0, 32 + 64, 0)
    assert cert["baseline"]["final_blocks"] == [[0, 32], [32, 64]]
    assert "does not declare that it reproduces" in cert["baseline"]["schedule_note"]
    assert verify_certificate(cert).differences == ()


def test_verify_rejects_a_preview_other_than_the_designs_cut(runs):
    def more(c: dict) -> None:
        ws = c["windows"]["preview"]
        for field in ("tokens", "baseline", "subject"):
            ws[field] = ws[field] + ws[field][:1]
    report = verify_certificate(_resealed(runs["int8"][2], more))
    assert any("the design scores the first 32" in d for d in report.differences)


def test_int8_passes_at_the_first_look(runs):
    code, summary, cert, _ = runs["int8"]
    seq = cert["sequential"]
    assert (code, summary["verdict"], seq["decision"], seq["stopped_at"]) == (0, "PASS", "pass", 32)
    assert len(cert["windows"]["final"]["subject"]) == 32 < len(cert["windows"]["final"]["ids"])
    assert summary["sequential"] == "decided after 32 of 64 windows (PASS)"
    assert cert["validation"]["evidence_meets_profile"]


def test_the_markdown_says_where_it_decided_and_lists_every_look(runs):
    from invarlock.certificate import markdown

    text = markdown.render(runs["int8"][2])
    assert "Sequential test: decided after 32 of 64 windows \\(PASS\\)." in text.splitlines()[2]
    assert "| 1 | 32 |" in text and "| final | 32 of 64 |" in text
    looks = markdown.sequential_section(runs["borderline"][2])
    assert [row.split("|")[2].strip() for row in looks if row.startswith("| ")][1:] == [
        "32", "40", "48", "56", "64"]
    assert "ran to the maximum of 64 windows undecided" in markdown.render(runs["borderline"][2])


def test_2bit_fails_at_the_first_look(runs):
    code, summary, cert, _ = runs["rtn2"]
    assert (code, summary["verdict"], cert["sequential"]["decision"]) == (1, "FAIL", "fail")
    assert cert["sequential"]["stopped_at"] == 32
    assert "decided after 32 of 64" in cert["verdict"]["explanations"]["primary_metric_acceptable"]


def test_a_subject_at_its_limit_runs_to_the_maximum(runs):
    _, _, cert, _ = runs["borderline"]
    seq = cert["sequential"]
    assert (seq["decision"], seq["early"], seq["stopped_at"]) == ("continue", False, 64)
    assert [look["windows"] for look in seq["looks"]] == [32, 40, 48, 56, 64]
    assert cert["primary_metric"]["bootstrap"]["alpha"] == pytest.approx(0.04)


@pytest.mark.parametrize("name", ["int8", "rtn2", "borderline"])
def test_every_certificate_verifies(runs, name):
    report = verify_certificate(runs[name][2])
    assert report.differences == () and "sequential" in report.checked


def _resealed(cert: dict, change) -> dict:
    c = copy.deepcopy({k: v for k, v in cert.items() if k != "digest"})
    change(c)
    return document.seal(c)


def _swap_final_windows(c: dict, i: int, j: int) -> None:
    """Reorder the evaluation: two evaluated final windows trade places in every array."""
    ws = c["windows"]["final"]
    for key in ("ids", "sha256", "tokens", "baseline", "subject"):
        ws[key][i], ws[key][j] = ws[key][j], ws[key][i]


TAMPERING = {
    "a bound moved": lambda c: c["sequential"]["looks"][-1].__setitem__("high", -1.0),
    "differences reordered": lambda c: c["sequential"]["differences"].reverse(),
    "a look dropped": lambda c: c["sequential"]["looks"].pop(),
    "a later stop claimed": lambda c: c["sequential"].__setitem__("stopped_at", 40),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_verify_rejects_altered_looks(runs, what):
    report = verify_certificate(_resealed(runs["borderline"][2], TAMPERING[what]))
    assert any(d.startswith("sequential") for d in report.differences), report.differences


def test_verify_rejects_windows_evaluated_past_the_deciding_look(runs):
    """An early PASS padded with more windows (a run that did not stop where it decided)."""
    int8, borderline = runs["int8"][2], runs["borderline"][2]

    def pad(c: dict) -> None:
        for field in ("tokens", "baseline", "subject"):
            c["windows"]["final"][field] = borderline["windows"]["final"][field][:40]
        c["sequential"]["stopped_at"] = 40
    report = verify_certificate(_resealed(int8, pad))
    assert any("already decided" in d for d in report.differences), report.differences


def test_verify_rejects_a_reordered_evaluation(runs):
    report = verify_certificate(_resealed(runs["borderline"][2],
                                          lambda c: _swap_final_windows(c, 0, 50)))
    assert any(d.startswith("sequential") for d in report.differences), report.differences
