"""Enumerations shared across stages (values are the strings written to certificates)."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A str-valued enum that prints as its value (Python 3.10 lacks enum.StrEnum)."""

    def __str__(self) -> str:
        return str(self.value)


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"


class MetricKind(StrEnum):
    """Primary metric: perplexity for language models, accuracy for classifiers."""

    PPL_CAUSAL = "ppl_causal"
    PPL_MLM = "ppl_mlm"
    ACCURACY = "accuracy"

    @property
    def is_perplexity(self) -> bool:
        return self is not MetricKind.ACCURACY


class AdapterKind(StrEnum):
    """How a checkpoint is loaded and scored."""

    CAUSAL_LM = "hf_causal"
    MASKED_LM = "hf_mlm"
    SEQ_CLS = "hf_seq_cls"

    @property
    def metric(self) -> MetricKind:
        return {
            AdapterKind.CAUSAL_LM: MetricKind.PPL_CAUSAL,
            AdapterKind.MASKED_LM: MetricKind.PPL_MLM,
            AdapterKind.SEQ_CLS: MetricKind.ACCURACY,
        }[self]


# Names `--adapter` accepts for the built-in kinds (a plugin adapter cannot take them).
ADAPTER_ALIASES: dict[str, AdapterKind] = {
    "hf_causal": AdapterKind.CAUSAL_LM,
    "hf_gpt2": AdapterKind.CAUSAL_LM,
    "hf_llama": AdapterKind.CAUSAL_LM,
    "hf_mistral": AdapterKind.CAUSAL_LM,
    "hf_qwen2": AdapterKind.CAUSAL_LM,
    "hf_mlm": AdapterKind.MASKED_LM,
    "hf_bert": AdapterKind.MASKED_LM,
    "hf_seq_cls": AdapterKind.SEQ_CLS,
    "hf_bert_cls": AdapterKind.SEQ_CLS,
}


class GuardMode(StrEnum):
    OFF = "off"
    MONITOR = "monitor"
    GATE = "gate"


class Family(StrEnum):
    """Module families used by edits (scope) and guards (per-family thresholds)."""

    ATTN = "attn"
    FFN = "ffn"
    EMBED = "embed"
    OTHER = "other"
