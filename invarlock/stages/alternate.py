"""One model resident at a time: the subject let go while the baseline scores its next block
of final windows, then brought back exactly as it was.

Under the blocks schedule the baseline holds the final windows up to a block end
(`baseline_run.block_ends`); when one of the subject's looks reaches past them, the
baseline's `score` is `Alternation.score`: the subject's parameters are emptied in place,
the baseline is loaded again from its path and scores the next block, and the subject's
parameters are refilled from a fresh copy of it — the baseline just used, with the edit
applied again (an in-memory edit that declares itself reproducible), or the subject's
checkpoint read again from its path (never written to). The module objects stay the same,
so the guards' taps and context and the saved-subject writer still hold the subject, and
nothing it already scored is scored again. Its tensor digest must equal the one it had
before it was let go, or the run stops (exit 3): no window is scored by other weights.

Where a side cannot be let go and brought back exactly, `obstacle` says why, and the
baseline scores the whole plan before the subject loads instead (`stages.baseline`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from invarlock.data.windows import WindowSet
from invarlock.errors import EvidenceError
from invarlock.stages.common import release_memory
from invarlock.stages.records import (
    BaselineEvidence,
    CertifyRequest,
    PreparedSubject,
    RunInputs,
    Timer,
)
from invarlock.stages.served import runtime_settings

log = logging.getLogger(__name__)


def obstacle(inputs: RunInputs, req: CertifyRequest, seq_len: int) -> str | None:
    """Why the subject cannot be let go and brought back exactly (None: it can)."""
    from invarlock.models import formats

    if req.device_map is not None:
        return "a device map places the model: it is loaded once and kept"
    if any(runtime_settings(inputs, req, side, seq_len) is not None
           for side in ("baseline", "subject")):
        return "llama.cpp serves a side: its models are opened once per side"
    if inputs.edit is not None:
        if not inputs.edit.impl.reproducible:
            return (f"the edit {inputs.edit.impl.name!r} does not declare that it reproduces "
                    "its weights when applied again")
        side = inputs.baseline
    else:
        assert inputs.subject is not None
        side = inputs.subject
    if formats.describe_files(side.source, side.config, inputs.device, req.dequantize):
        return "the subject's weights come from a quantized checkpoint, not plain tensors"
    return None


@contextmanager
def alternating(inputs: RunInputs, req: CertifyRequest, timer: Timer,
                baseline: BaselineEvidence, subject: PreparedSubject) -> Iterator[None]:
    """While the subject is scored, further baseline blocks swap the two models (blocks
    schedule with block ends set); otherwise nothing changes."""
    scores = baseline.scores
    if scores.ends is None:
        yield
        return
    before = scores.score
    scores.score = Alternation(inputs, req, timer, baseline, subject).score
    try:
        yield
    finally:
        scores.score = before


class Alternation:
    """The baseline scoring a block while the subject waits emptied, then the subject back."""

    def __init__(self, inputs: RunInputs, req: CertifyRequest, timer: Timer,
                 baseline: BaselineEvidence, subject: PreparedSubject) -> None:
        self.inputs, self.req, self.timer = inputs, req, timer
        self.resident = baseline.resident
        self.model = subject.loaded.model
        self.digest = subject.fingerprint  # an edit's; a checkpoint's is taken when let go
        self.swaps = 0

    def score(self, windows: WindowSet) -> Any:
        from invarlock.models import loading

        if self.digest is None:
            self.digest = loading.tensor_digest(self.model)
        log.info("one model at a time: the subject leaves while the baseline scores %s",
                 windows.name)
        loading.empty_parameters(self.model)
        release_memory()
        try:
            scores = self.resident.score(windows)
        except BaseException:
            self.resident.release()  # the run stops here; no model is left behind for the next
            raise
        self._bring_back()
        self.swaps += 1
        return scores

    def _bring_back(self) -> None:
        from invarlock.models import loading

        fresh = self._fresh_subject()
        loading.refill_parameters(self.model, fresh.model)
        del fresh
        release_memory()
        now = loading.tensor_digest(self.model)
        if now != self.digest:
            raise EvidenceError(f"the subject brought back after the baseline's block is not "
                                f"the one let go (tensor digest {now} != {self.digest}); "
                                "certify with memory for both models (lockstep)")

    def _fresh_subject(self) -> Any:
        """A fresh copy of the subject: the baseline just used, edited again, or the
        subject's checkpoint read again (the baseline let go first)."""
        from invarlock.stages.subject import apply_edit, load_checkpoint

        t = time.perf_counter()
        if self.inputs.edit is not None:
            fresh = self.resident.take()
            apply_edit(self.inputs, fresh, self.timer, self.req.save_format)
        else:
            self.resident.release()
            fresh = load_checkpoint(self.inputs, self.req)
        self.timer.add("load_s", t)
        return fresh
