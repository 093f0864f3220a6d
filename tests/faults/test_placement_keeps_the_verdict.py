"""Where a model's weights live (whole on one device, or spread by a device map over memory
and disk) never changes what the guards see, nor the verdict.

A baseline cached by an ordinary run, then a subject placed by `--device-map` with
`--max-memory cpu=1KB` (every weight offloaded to disk), used to fail the invariants with
"weight tying differs": each offloaded module loaded its own copy of a tied weight.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import certify

pytest.importorskip("accelerate")


def _run(tiny_gpt2_dir, sonnets_path, fast_preset, out, cache, *placement):
    return certify(tiny_gpt2_dir, tiny_gpt2_dir, out, sonnets_path, fast_preset,
                   "--cache-dir", str(cache), *placement)


def _invariants(payload) -> tuple[bool, str]:
    from invarlock.certificate import document

    cert = document.load_certificate(payload["certificate"])
    decision = cert["guards"]["invariants"]
    return bool(cert["validation"]["invariants_pass"]), str(decision.get("reason", ""))


@pytest.mark.parametrize("placement", [
    ("--device-map", "auto", "--max-memory", "cpu=1KB"),
    ("--device-map", "sequential", "--max-memory", "cpu=1KB"),
    ("--device-map", "balanced", "--max-memory", "cpu=1KB"),
    ("--device-map", "sequential", "--max-memory", "cpu=60KB"),   # split: memory and disk
])
@pytest.mark.parametrize("cached_by", ["ordinary run", "placed run"])
def test_placement_never_changes_the_verdict(placement, cached_by, tiny_gpt2_dir, sonnets_path,
                                             fast_preset, tmp_path):
    cache = tmp_path / "cache"
    first = placement if cached_by == "placed run" else ()
    second = () if cached_by == "placed run" else placement
    code, payload, _ = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "a", cache,
                            *first)
    assert code == 0, payload
    assert list((cache / "baseline").glob("*.json")), "the first run caches the baseline"
    code, payload, _ = _run(tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path / "b", cache,
                            *second)
    ok, reason = _invariants(payload)
    assert ok and "differs" not in reason, reason
    assert code == 0, payload


def test_offloaded_tied_weights_stay_tied_inside_the_block_and_after(tiny_gpt2_dir):
    from invarlock.guards.measure.invariants import structure
    from invarlock.models.loading import load_model, weights_on_host
    from invarlock.models.source import resolve_model_source

    source = resolve_model_source(str(tiny_gpt2_dir))
    whole = load_model(source, device="cpu")
    placed = load_model(source, device="cpu", device_map="auto", max_memory={"cpu": 1024})
    model = placed.model
    assert model.lm_head.weight is model.transformer.wte.weight
    with weights_on_host(model):
        assert model.lm_head.weight.device.type == "cpu"
        assert structure(model)["tying"] == structure(whole.model)["tying"]
        assert structure(model)["tying"] == [["lm_head.weight", "transformer.wte.weight"]]
    assert model.lm_head.weight is model.transformer.wte.weight  # as it was
    assert model.lm_head.weight.device.type == "meta"
