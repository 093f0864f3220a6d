"""Stage 2: the corpus read and cut into the paired preview/final windows both models are
scored on."""

from __future__ import annotations

import time

from invarlock import provenance
from invarlock.data.corpus import load_corpus
from invarlock.data.windows import plan_windows
from invarlock.enums import MetricKind
from invarlock.stages.records import CertifyRequest, EvaluationPlan, RunInputs, Timer


def plan_evaluation(inputs: RunInputs, req: CertifyRequest, timer: Timer) -> EvaluationPlan:
    """Read the corpus and cut the paired windows both models will be scored on."""
    t = time.perf_counter()
    corpus = load_corpus(req.dataset, labelled=inputs.kind is MetricKind.ACCURACY)
    provenance.check_dataset_pin(req.reference, corpus.digest)
    wp = inputs.policy.windows
    windows = plan_windows(corpus, inputs.tokenizer, kind=inputs.kind, seq_len=wp.seq_len,
                           stride=wp.stride, preview_n=wp.preview_n, final_n=wp.final_n,
                           seed=wp.seed, strict=wp.strict, tokenizer_hash=inputs.tokenizer_hash)
    timer.add("windows_s", t)
    return EvaluationPlan(corpus, windows)
