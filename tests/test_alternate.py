"""One model resident at a time: the subject's parameters emptied in place while the
baseline scores a block, refilled from a fresh copy, and refused when the copy is not the
subject that was let go."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from invarlock.errors import EvidenceError
from invarlock.models import loading
from invarlock.stages import alternate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.arange(12).reshape(1, 12)).logits


def test_a_subject_let_go_holds_nothing_and_refilled_is_the_same_model():
    subject = _model()
    before, digest = _logits(subject), loading.tensor_digest(subject)
    modules = dict(subject.named_modules())
    loading.empty_parameters(subject)
    assert sum(p.numel() for p in subject.parameters()) == 0
    assert subject.lm_head.weight is subject.transformer.wte.weight  # still tied
    loading.refill_parameters(subject, _model())
    assert dict(subject.named_modules()) == modules  # the same module objects
    assert loading.tensor_digest(subject) == digest
    assert torch.equal(_logits(subject), before)
    assert subject.lm_head.weight is subject.transformer.wte.weight


def test_a_copy_of_another_architecture_is_refused():
    subject = _model()
    loading.empty_parameters(subject)
    other = _model()
    other.transformer.h = other.transformer.h[:1]
    with pytest.raises(EvidenceError, match="other parameters than the one let go"):
        loading.refill_parameters(subject, other)


class _Resident:
    """The baseline as `stages.baseline._ResidentBaseline` hands it out: loaded on demand."""

    def __init__(self) -> None:
        self.model = None
        self.loads = 0

    def score(self, windows):
        self.model = SimpleNamespace(model=_model())
        self.loads += 1
        return f"baseline scores on {windows.name}"

    def take(self):
        model, self.model = self.model, None
        return model

    def release(self) -> None:
        self.model = None


def _swap(apply):
    """An Alternation over an edited subject (`apply` is the edit), as `stages.subject`
    builds it: the edit applied to a baseline load, its digest the fingerprint."""
    edit = SimpleNamespace(impl=SimpleNamespace(name="e", apply=apply), plan=None)
    subject = _model()
    apply(subject, None)
    prepared = SimpleNamespace(loaded=SimpleNamespace(model=subject),
                               fingerprint=loading.tensor_digest(subject))
    resident = _Resident()
    inputs = SimpleNamespace(edit=edit)
    req = SimpleNamespace(save_format="safetensors")
    timer = SimpleNamespace(add=lambda *_: None)
    swap = alternate.Alternation(inputs, req, timer, SimpleNamespace(resident=resident),
                                 prepared)
    return swap, subject, resident


def test_the_edit_applied_again_to_the_baseline_brings_the_subject_back():
    def halve(model, _plan):
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)

    swap, subject, resident = _swap(halve)
    before = _logits(subject)
    assert swap.score(SimpleNamespace(name="final[32:64]")) == "baseline scores on final[32:64]"
    assert (swap.swaps, resident.loads, resident.model) == (1, 1, None)  # consumed by the edit
    assert torch.equal(_logits(subject), before)


def test_an_edit_that_does_not_reproduce_its_weights_stops_the_run():
    draws = torch.Generator().manual_seed(1)  # a stream the baseline loads do not reseed

    def noise(model, _plan):
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.add_(
                torch.randn(16, 64, generator=draws) * 1e-3)

    swap, _, _ = _swap(noise)
    with pytest.raises(EvidenceError, match="is not the one let go"):
        swap.score(SimpleNamespace(name="final[32:64]"))


def test_a_device_map_keeps_the_model_loaded_once():
    """A model spread over the budget by a device map is not let go between blocks: the
    baseline's whole plan is scored ahead, for this reason."""
    why = alternate.obstacle(SimpleNamespace(), SimpleNamespace(device_map="balanced"), 64)
    assert why == "a device map places the model: it is loaded once and kept"


def test_a_baseline_block_that_fails_leaves_no_model_behind():
    """A run that stops in the baseline's block (say, non-finite outputs) does not keep the
    baseline resident for whatever is certified next (the next of several subjects)."""
    swap, _, resident = _swap(lambda model, _plan: None)

    def broken(windows):
        resident.model = SimpleNamespace(model=_model())
        raise EvidenceError("the baseline produced non-finite outputs")

    resident.score = broken
    with pytest.raises(EvidenceError, match="non-finite"):
        swap.score(SimpleNamespace(name="final[32:64]"))
    assert resident.model is None
