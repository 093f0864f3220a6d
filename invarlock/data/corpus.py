"""Corpora: the text windows are cut from, read the same way on every run.

A dataset spec names where the text lives; `load_corpus` turns it into an ordered tuple of
documents (plus labels and optional text pairs for classifiers) and a digest over the content,
so a certificate records exactly which text was evaluated, wherever it was stored.

Document rules (the same everywhere, so one corpus always yields one stream):
- a .txt file is one document, unless it contains form feeds (``\\f``), which separate documents;
- a folder holds one document per ``*.txt`` file directly inside it (each split on form feeds),
  in file-name order;
- a .jsonl file holds one document (or labelled example) per non-blank line;
- ``demo`` is the bundled corpus (gzip text, documents separated by form-feed lines);
- ``wikitext2`` and ``hf:wikitext...`` join the dataset's lines into articles: a top-level
  heading `` = Title = `` starts a new article and empty lines are dropped;
- any other ``hf:`` dataset gives one document per row of ``text_field``.
Language-model documents are normalised (``\\r\\n`` → ``\\n``, outer whitespace stripped,
empty documents dropped); labelled examples are kept exactly as written.

Hugging Face datasets are read through the network only when ``INVARLOCK_ALLOW_NETWORK=1``;
otherwise the HF libraries are forced offline and only the local cache is used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import struct
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invarlock.errors import EvidenceError, InputError, MissingExtraError

logger = logging.getLogger(__name__)

PROVIDERS = ("demo", "text", "jsonl", "hf", "wikitext2")
TEXT_SUFFIXES = (".txt", ".text", "")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# `wikitext2` is shorthand for this HF dataset; validation is the split perplexity is
# conventionally reported on.
WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1", "validation")
# Other HF datasets default to their held-out test split.
HF_DEFAULT_SPLIT = "test"
NETWORK_ENV = "INVARLOCK_ALLOW_NETWORK"
_SPEC_FORMS = "a .txt file, a folder of .txt files, a .jsonl file, demo, wikitext2, " \
              "or hf:NAME[:CONFIG[:SPLIT]]"


@dataclass(frozen=True)
class DatasetSource:
    """What the user asked for; recorded in the certificate next to the content digest."""

    provider: str               # "demo" | "text" | "jsonl" | "hf" | "wikitext2"
    path: str | None = None     # text/jsonl file or folder, as given
    name: str | None = None     # hf dataset name
    config: str | None = None   # hf config name
    split: str | None = None    # hf split ("validation" for wikitext2, "test" for other hf)
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"

    def spec(self) -> str:
        """Canonical one-line form: `demo`, `hf:NAME[:CONFIG]:SPLIT`, or the path."""
        if self.provider == "demo":
            return "demo"
        if self.provider in ("hf", "wikitext2"):
            return f"hf:{self.name}:{self.config or ''}:{self.split}"
        return str(self.path)

    @property
    def is_wikitext(self) -> bool:
        return self.provider == "wikitext2" or (self.name or "").split("/")[-1] == "wikitext"


@dataclass(frozen=True)
class Corpus:
    """Ordered documents (or labelled examples) and a digest over exactly that content."""

    source: DatasetSource
    documents: tuple[str, ...]             # text (or the first text of a pair)
    pairs: tuple[str, ...] | None          # second text for pair classification, else None
    labels: tuple[int, ...] | None         # classifier labels, else None
    digest: str                            # "sha256:<hex>" over the canonical content
    label_names: tuple[str, ...] | None = None  # label i was the string label_names[i]


def parse_dataset_spec(spec: str) -> DatasetSource:
    """`demo` | `wikitext2` | `hf:NAME[:CONFIG[:SPLIT]]` | a .txt file, folder or .jsonl file.

    Keywords win over same-named paths (write `./demo` for a folder called demo).
    """
    spec = spec.strip()
    if spec == "demo":
        return DatasetSource("demo")
    if spec == "wikitext2":
        name, config, split = WIKITEXT2
        return DatasetSource("wikitext2", name=name, config=config, split=split)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) > 3 or not parts[0]:
            raise InputError(f"dataset spec '{spec}' is not of the form hf:NAME[:CONFIG[:SPLIT]]")
        parts += [""] * (3 - len(parts))
        return DatasetSource("hf", name=parts[0], config=parts[1] or None,
                             split=parts[2] or HF_DEFAULT_SPLIT)
    return _source_from_path(spec)


def dataset_source_from_config(section: dict[str, Any]) -> DatasetSource:
    """The config's `dataset:` section → a source (window keys there belong to the policy)."""
    fields = {
        "text_field": section.get("text_field") or "text",
        "text_pair_field": section.get("text_pair_field"),
        "label_field": section.get("label_field") or "label",
    }
    provider, path, name = section.get("provider"), section.get("path"), section.get("name")
    if provider is None:  # infer: a path says text/jsonl, a name says hf, nothing says demo
        provider = _source_from_path(path).provider if path else ("hf" if name else "demo")
    if provider not in PROVIDERS:
        raise InputError(f"dataset.provider must be one of {', '.join(PROVIDERS)}, "
                         f"got {provider!r}")
    _check_unused_keys(section, provider)
    if provider == "demo":
        return DatasetSource("demo", **fields)
    if provider in ("text", "jsonl"):
        if not path:
            raise InputError(f"dataset.provider '{provider}' needs dataset.path")
        found = _source_from_path(path)
        return DatasetSource(provider, path=found.path, **fields)
    if provider == "wikitext2":
        name_, config, split = WIKITEXT2
        return DatasetSource("wikitext2", name=name or name_,
                             config=section.get("config") or config,
                             split=section.get("split") or split, **fields)
    if not name:
        raise InputError("dataset.provider 'hf' needs dataset.name")
    return DatasetSource("hf", name=name, config=section.get("config"),
                         split=section.get("split") or HF_DEFAULT_SPLIT, **fields)


# keys of the dataset section that mean something only for some providers
_RECORD_KEYS = ("text_field", "text_pair_field", "label_field")   # JSONL and HF records
_HUB_KEYS = ("name", "config", "split")                           # HF datasets


def _check_unused_keys(section: dict[str, Any], provider: str) -> None:
    """A key the provider ignores is refused: a user who set it believes it applies."""
    ignored = [k for k in _HUB_KEYS if section.get(k) is not None] if provider in (
        "demo", "text", "jsonl") else []
    if provider in ("demo", "text"):
        ignored += [k for k in _RECORD_KEYS if section.get(k) is not None]
    if ignored:
        what = {"demo": "the bundled demo corpus", "text": "a plain-text dataset",
                "jsonl": "a local JSONL dataset"}[provider]
        raise InputError(f"dataset.{ignored[0]} does nothing for {what}; remove it (record "
                         "fields apply to JSONL/HF data, name/config/split to HF datasets)")


def load_corpus(source: DatasetSource, *, labelled: bool) -> Corpus:
    """Read the source into a Corpus; `labelled` asks for classifier examples with labels."""
    if labelled and source.provider in ("demo", "text"):
        raise InputError(f"a classifier needs labelled examples, but dataset '{source.spec()}' "
                         f"is plain text; use a .jsonl file with '{source.text_field}' and "
                         f"'{source.label_field}' fields or an hf dataset with a label column")
    if source.provider == "demo":
        corpus = build_corpus(source, _split_documents(_read_demo()))
    elif source.provider == "text":
        corpus = build_corpus(source, _read_text_documents(Path(str(source.path))))
    elif source.provider == "jsonl":
        corpus = _read_jsonl(source, labelled=labelled)
    elif source.provider in ("hf", "wikitext2"):
        corpus = _load_hf_corpus(source, labelled=labelled)
    else:
        raise InputError(f"unknown dataset provider {source.provider!r}; "
                         f"use one of {', '.join(PROVIDERS)}")
    logger.info("dataset %s: %d documents, %s", source.spec(), len(corpus.documents),
                corpus.digest)
    return corpus


def build_corpus(source: DatasetSource, documents: Sequence[str], *,
                 pairs: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                 label_names: Sequence[str] | None = None) -> Corpus:
    """Assemble a Corpus and its digest; an empty corpus is an input error."""
    if not documents:
        raise InputError(f"dataset '{source.spec()}' contains no text")
    for other, what in ((pairs, "text pairs"), (labels, "labels")):
        if other is not None and len(other) != len(documents):
            raise InputError(f"dataset '{source.spec()}': {len(other)} {what} for "
                             f"{len(documents)} examples")
    docs = tuple(documents)
    pairs_t = tuple(pairs) if pairs is not None else None
    labels_t = tuple(int(x) for x in labels) if labels is not None else None
    names_t = tuple(label_names) if label_names is not None else None
    return Corpus(source, docs, pairs_t, labels_t,
                  corpus_digest(docs, pairs_t, labels_t, names_t), names_t)


def corpus_digest(documents: Sequence[str], pairs: Sequence[str] | None = None,
                  labels: Sequence[int] | None = None,
                  label_names: Sequence[str] | None = None) -> str:
    """sha256 over length-prefixed UTF-8 texts and int64 labels, in order (no paths)."""
    h = hashlib.sha256(b"invarlock.corpus.v1\0")

    def texts(tag: bytes, items: Sequence[str] | None) -> None:
        if items is None:
            return
        h.update(tag + struct.pack("<Q", len(items)))
        for text in items:
            data = text.encode("utf-8")
            h.update(struct.pack("<Q", len(data)) + data)

    texts(b"documents", documents)
    texts(b"pairs", pairs)
    if labels is not None:
        h.update(b"labels" + struct.pack("<Q", len(labels)))
        h.update(struct.pack(f"<{len(labels)}q", *labels))
    texts(b"label_names", label_names)
    return "sha256:" + h.hexdigest()


def network_allowed() -> bool:
    """Network use is opt-in, by exactly `INVARLOCK_ALLOW_NETWORK=1`."""
    return os.environ.get(NETWORK_ENV) == "1"


def normalise_document(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def map_labels(values: Sequence[Any], *, field: str, where: str,
               positions: Sequence[int] | None = None) -> tuple[list[int], list[str] | None]:
    """Integer labels pass through; string labels map to 0..K-1 in sorted order.

    `where` ("line" / "row") and `positions` name the offending example in errors.
    Returns the integer labels and, for string labels, the names in index order.
    """
    pos = list(positions) if positions is not None else list(range(1, len(values) + 1))
    ints: list[int] = []
    strings: list[str] = []
    for p, value in zip(pos, values, strict=True):
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            ints.append(value)
        elif isinstance(value, float) and value.is_integer():
            ints.append(int(value))
        else:
            raise InputError(f"{where} {p}: '{field}' must be an integer or a string, "
                             f"got {json.dumps(value)}")
        if ints and strings:
            raise InputError(f"{where} {p}: '{field}' mixes integer and string labels; "
                             f"use one kind throughout")
        if ints and ints[-1] < 0:
            raise InputError(f"{where} {p}: '{field}' is {ints[-1]}; labels must be >= 0 "
                             f"(a negative label usually marks an unlabelled test split)")
    if strings:
        names = sorted(set(strings))
        index = {name: i for i, name in enumerate(names)}
        return [index[s] for s in strings], names
    return ints, None


# --- local files -----------------------------------------------------------------------------

def _source_from_path(spec: str) -> DatasetSource:
    path = Path(spec).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # a name too long, a loop of links
        shown = spec if len(spec) <= 80 else f"{spec[:40]}…{spec[-30:]}"
        raise InputError(f"dataset '{shown}' cannot be used: {exc.strerror or exc}") from None
    if is_dir:
        return DatasetSource("text", path=spec)
    if is_file:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return DatasetSource("jsonl", path=spec)
        if suffix in TEXT_SUFFIXES:
            return DatasetSource("text", path=spec)
        raise InputError(f"dataset file '{spec}' has an unsupported type '{suffix}'; "
                         f"use {_SPEC_FORMS}")
    if path.exists():
        raise InputError(f"dataset '{spec}' is not a regular file (a FIFO, socket or device); "
                         "give a file or folder")
    raise InputError(f"dataset '{spec}' not found: it is not an existing file or folder, "
                     f"nor one of demo, wikitext2, hf:NAME[:CONFIG[:SPLIT]]")


MAX_DATASET_BYTES = 2 * 2**30  # read whole: a corpus this size holds far more windows than used


def _read_text(path: Path) -> str:
    from invarlock.input_files import check_text_file

    check_text_file(path, "dataset file", MAX_DATASET_BYTES)  # binary or huge: refused unread
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"dataset file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"cannot read dataset file {path}: {exc.strerror}") from None


def _split_documents(text: str) -> list[str]:
    """Form feeds separate documents; everything else stays inside one."""
    docs = (normalise_document(part) for part in text.split("\f"))
    return [d for d in docs if d]


def _read_text_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise InputError(f"dataset folder {path} contains no .txt files")
        return [doc for f in files for doc in _split_documents(_read_text(f))]
    docs = _split_documents(_read_text(path))
    if not docs:
        raise InputError(f"dataset file {path} is empty")
    return docs


def _read_jsonl(source: DatasetSource, *, labelled: bool) -> Corpus:
    path = Path(str(source.path))
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[Any] = []
    lines: list[int] = []
    wanted = [source.text_field]
    if source.text_pair_field:
        wanted.append(source.text_pair_field)
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number}: expected a JSON object, "
                             f"got {type(row).__name__}")
        for field in [*wanted, *([source.label_field] if labelled else [])]:
            if field not in row:
                raise InputError(f"{path} line {number}: missing field '{field}' "
                                 f"(fields: {', '.join(sorted(row)) or 'none'})")
        for field in wanted:
            if not isinstance(row[field], str):
                raise InputError(f"{path} line {number}: field '{field}' must be a string, "
                                 f"got {json.dumps(row[field])}")
        texts.append(row[source.text_field])
        if source.text_pair_field:
            pairs.append(row[source.text_pair_field])
        if labelled:
            labels.append(row[source.label_field])
        lines.append(number)
    if not lines:
        raise InputError(f"dataset file {path} is empty")
    if not labelled:
        docs = [d for d in (normalise_document(t) for t in texts) if d]
        return build_corpus(source, docs)
    ints, names = map_labels(labels, field=source.label_field, where=f"{path} line",
                             positions=lines)
    return build_corpus(source, texts, pairs=pairs if source.text_pair_field else None,
                        labels=ints, label_names=names)


# --- bundled demo ----------------------------------------------------------------------------

def demo_corpus_path() -> Path:
    """Where the bundled demo corpus lives (the `invarlock.demo` package knows)."""
    try:
        from invarlock import demo
    except ImportError:
        raise InputError("the bundled demo corpus is not part of this installation; "
                         "pass --dataset with a file, folder or hf: dataset") from None
    return Path(demo.corpus_path())


def _read_demo() -> str:
    path = demo_corpus_path()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise InputError(f"the bundled demo corpus is missing: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"the bundled demo corpus {path} is unreadable: {exc}") from None


# --- Hugging Face datasets -------------------------------------------------------------------

def _force_hf_offline() -> None:
    """Make the HF libraries read only their local cache.

    They read these flags when first imported, so modules already imported get them set too.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        loaded = sys.modules.get(module)
        for attr in attrs if loaded is not None else ():
            setattr(loaded, attr, True)


def _import_datasets() -> types.ModuleType:
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("loading Hugging Face datasets", "hf") from None
    return datasets


def _hf_load_dataset(name: str, config: str | None, split: str) -> Any:
    """The one call into `datasets.load_dataset` (tests replace it to stay offline)."""
    datasets = _import_datasets()
    datasets.disable_progress_bars()
    return datasets.load_dataset(name, config, split=split)


def _load_hf_corpus(source: DatasetSource, *, labelled: bool) -> Corpus:
    online = network_allowed()
    spec = source.spec()
    unreachable = None
    if online:
        from invarlock.network import hub_endpoint, hub_unreachable

        unreachable = hub_unreachable()
        online = unreachable is None
    if not online:
        _force_hf_offline()
    datasets = _import_datasets()
    try:
        table = _hf_load_dataset(str(source.name), source.config, str(source.split))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        # The one place HF dataset errors become input errors.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, ValueError) and "split" in detail.lower():
            raise InputError(f"dataset '{spec}' has no split '{source.split}': {detail}") from None
        if unreachable:
            raise EvidenceError(f"dataset '{spec}' cannot be downloaded: {hub_endpoint()} is "
                                f"unreachable ({unreachable}) and the dataset is not in the "
                                "local Hugging Face cache") from None
        if not online and isinstance(exc, (ConnectionError, FileNotFoundError)):
            raise InputError(f"dataset '{spec}' is not in the local Hugging Face cache and "
                             f"network access is off; set {NETWORK_ENV}=1 to download it"
                             ) from None
        raise InputError(f"cannot load dataset '{spec}': {detail}") from None
    if unreachable:
        logger.warning("cannot reach %s (%s): dataset '%s' read from the local cache",
                       hub_endpoint(), unreachable, spec)
    return corpus_from_table(source, table, labelled=labelled)


def corpus_from_table(source: DatasetSource, table: Any, *, labelled: bool) -> Corpus:
    """Rows of a loaded HF `Dataset` → Corpus (wikitext lines joined into articles)."""
    columns = list(table.column_names)
    wanted = [source.text_field, *([source.text_pair_field] if source.text_pair_field else []),
              *([source.label_field] if labelled else [])]
    for field in wanted:
        if field not in columns:
            raise InputError(f"dataset '{source.spec()}' has no column '{field}' "
                             f"(columns: {', '.join(columns)})")
    texts = list(table[source.text_field])
    if not labelled:
        if source.is_wikitext:
            return build_corpus(source, wikitext_articles(texts))
        docs = (normalise_document(t) for t in texts if isinstance(t, str))
        return build_corpus(source, [d for d in docs if d])
    pairs = list(table[source.text_pair_field]) if source.text_pair_field else None
    for field, values in ((source.text_field, texts), (source.text_pair_field, pairs or [])):
        bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"dataset '{source.spec()}' row {bad}: column '{field}' must be "
                             f"text, got {values[bad]!r}")
    raw = list(table[source.label_field])
    names = getattr(table.features.get(source.label_field), "names", None)
    ints, mapped = map_labels(raw, field=source.label_field, where=f"{source.spec()} row",
                              positions=range(len(raw)))
    return build_corpus(source, texts, pairs=pairs, labels=ints, label_names=mapped or names)


def wikitext_articles(lines: Sequence[str | None]) -> list[str]:
    """Join wikitext's one-line rows into articles.

    A top-level heading (`` = Title = ``, not `` = = Section = = ``) starts a new article;
    empty lines are dropped; the remaining lines are stripped and joined with newlines.
    """
    articles: list[list[str]] = []
    for raw in lines:
        line = (raw or "").strip()
        if not line:
            continue
        heading = line.startswith("= ") and line.endswith(" =") and not line.startswith("= =")
        if heading or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(a) for a in articles]
