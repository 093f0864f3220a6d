"""Data stage: corpora in, evaluation windows out (see `corpus`, `windows`, `masking`)."""

from invarlock.data.corpus import (
    Corpus,
    DatasetSource,
    build_corpus,
    corpus_digest,
    dataset_source_from_config,
    load_corpus,
    parse_dataset_spec,
)
from invarlock.data.masking import mask_windows
from invarlock.data.windows import WindowPlan, WindowSet, plan_windows

__all__ = [
    "Corpus",
    "DatasetSource",
    "WindowPlan",
    "WindowSet",
    "build_corpus",
    "corpus_digest",
    "dataset_source_from_config",
    "load_corpus",
    "mask_windows",
    "parse_dataset_spec",
    "plan_windows",
]
