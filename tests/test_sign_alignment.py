"""A negative scale is a rescaling too: flipping the sign of a channel class on both sides of
a function-preserving pair (v→o, up→down, q/k per key head and rotary pair, fused q/k/v)
leaves the model's function unchanged, and the guards must see nothing; flipping one side
only changes the function, and the guards must still see it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

TIERS = yaml.safe_load((Path(__file__).resolve().parents[1] / "policies" /
                        "tiers.yaml").read_text())


def _flip(model, seed: int, sides: tuple[str, ...] = ("a", "b")) -> int:
    """A random sign per channel class of every pair the guards balance, on `sides` of each
    (weights and, on a producer's output axis, its bias). Returns the classes flipped."""
    from invarlock.guards.measure.fold import _channels
    from invarlock.guards.measure.pairs import pair_relations

    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    flipped = 0
    for rel in pair_relations(model):
        n = int(_channels(rel["a"])[2])
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        flipped += int((sign < 0).sum())
        for key in sides:
            side = rel[key]
            index, cls, _ = _channels(side)
            weight = params[side["weight"]]
            axis = int(side["axis"])
            shape = [1, 1]
            shape[axis] = -1
            factor = sign[cls].view(shape)
            weight.index_copy_(axis, index, weight.index_select(axis, index) * factor)
            module = modules[side["weight"].rsplit(".", 1)[0]]
            output_axis = 1 if type(module).__name__ == "Conv1D" else 0
            bias = getattr(module, "bias", None)
            if axis == output_axis and bias is not None:
                bias.index_copy_(0, index, bias.index_select(0, index) * sign[cls])
    return flipped


def _measure(model_dir: Path, edit, text: Path) -> tuple[dict, dict, bool]:
    """(spectral, rows) measurements of `edit(model)` against the checkpoint, and whether
    the logits stayed the same."""
    from transformers import AutoModelForCausalLM

    from invarlock.guards.measure.probe import SubjectContext
    from invarlock.guards.measure.rows import RowsProbe
    from invarlock.models.source import weight_files
    from tests.guardkit import sketched_spectral_baseline

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    spectral_probe, _, _ = sketched_spectral_baseline(model, model_dir, text)
    rows_probe = RowsProbe({"tau": TIERS["balanced"]["guards"]["rows"]["tau"]})
    rows_probe.baseline_loaded(model)
    states = spectral_probe.baseline_state(), rows_probe.baseline_state()
    ids = torch.arange(1, 17)[None, :]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        edit(model)
        after = model(input_ids=ids).logits
    ctx = SubjectContext(info=None, model=model, config=model.config.to_dict(),
                         baseline_config={}, baseline_files=weight_files(model_dir),
                         tokenizer_hashes=("", ""), base_model_prefix=model.base_model_prefix)
    measured = []
    for probe, state in zip((spectral_probe, rows_probe), states, strict=True):
        probe.subject_loaded(ctx, state)
        measured.append(probe.measure(ctx, state))
    same = torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    return measured[0], measured[1], same


ARCHS = ("llama", "qwen2", "gemma", "gpt2", "gpt_neox", "phi3")


@pytest.mark.parametrize("arch", ARCHS)
def test_sign_flips_on_both_sides_of_every_pair_are_invisible_to_the_guards(
        arch, tiny_llama_dir, tiny_gpt2_dir, tiny_qwen2_dir, tiny_causal_dirs, sonnets_path):
    """Random signs on every balanced pair (both sides): the logits stay, σ, the edit size
    and the edit along the data stay 0 on every module, no row or bias changes, and the
    balanced tier's spectral and rows guards pass. Before the signs were aligned with the
    baseline's, the o_proj of a flipped v→o pair moved by -80% along the data."""
    from invarlock.guards import rows, spectral

    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir,
                 "qwen2": tiny_qwen2_dir}.get(arch) or tiny_causal_dirs[arch]
    flipped = []
    measured, rows_measured, same = _measure(
        model_dir, lambda m: flipped.append(_flip(m, seed=3)), sonnets_path)
    assert same and flipped[0] > 0  # the weights did change, the function did not
    for m in measured["modules"]:
        assert abs(m["sigma_subject"] / m["sigma_baseline"] - 1) < 1e-4, m["name"]
        assert m["edit_size"] < 1e-5, m["name"]
        if m.get("edit_along_data") is not None:
            assert m["edit_along_data"] < 1e-5, m["name"]
            assert abs(m["sigma_data_subject"] / m["sigma_data_baseline"] - 1) < 1e-4
    assert all(t["max_change"] is not None and t["max_change"] < 1e-5
               for t in rows_measured["tensors"]), rows_measured["tensors"]
    policy = TIERS["balanced"]["guards"]
    assert spectral.decide(measured, policy["spectral"]).passed
    assert rows.decide(rows_measured, policy["rows"]).passed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_sign_flip_on_one_side_of_a_pair_is_still_caught(arch, tiny_llama_dir, tiny_gpt2_dir,
                                                           sonnets_path):
    """The consumers' columns flipped alone (not a symmetry: the logits move): the signs
    are aligned per class over both sides, so the half of the pair left unflipped keeps the
    class's sign and the flipped columns show as an edit of twice their size."""
    from invarlock.guards import spectral

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    measured, _, same = _measure(model_dir, lambda m: _flip(m, seed=3, sides=("b",)),
                                 sonnets_path)
    assert not same
    consumers = [m for m in measured["modules"] if m["changed"]]
    assert consumers and max(m["edit_size"] for m in consumers) > 0.5
    assert not spectral.decide(measured, TIERS["balanced"]["guards"]["spectral"]).passed
