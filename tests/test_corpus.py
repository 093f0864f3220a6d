"""Dataset specs, corpus loading (text, folder, JSONL, labelled, demo, HF) and digests."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from invarlock.data import corpus as corpus_mod
from invarlock.data.corpus import (
    DatasetSource,
    build_corpus,
    dataset_source_from_config,
    load_corpus,
    parse_dataset_spec,
    wikitext_articles,
)
from invarlock.errors import InputError, MissingExtraError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, provider, name, config, split, canonical", [
    ("demo", "demo", None, None, None, "demo"),
    ("wikitext2", "wikitext2", "wikitext", "wikitext-2-raw-v1", "validation",
     "hf:wikitext:wikitext-2-raw-v1:validation"),
    ("hf:imdb", "hf", "imdb", None, "test", "hf:imdb::test"),
    ("hf:glue:sst2", "hf", "glue", "sst2", "test", "hf:glue:sst2:test"),
    ("hf:glue:sst2:validation", "hf", "glue", "sst2", "validation",
     "hf:glue:sst2:validation"),
    ("hf:org/data::train", "hf", "org/data", None, "train", "hf:org/data::train"),
])
def test_keyword_and_hf_specs_parse_with_documented_defaults(spec, provider, name, config,
                                                             split, canonical):
    src = parse_dataset_spec(spec)
    assert (src.provider, src.name, src.config, src.split) == (provider, name, config, split)
    assert src.spec() == canonical


def test_hf_canonical_spec_round_trips():
    src = parse_dataset_spec("hf:glue:sst2:validation")
    assert parse_dataset_spec(src.spec()) == src


@pytest.mark.parametrize("spec", ["hf:", "hf::cfg", "hf:a:b:c:d"])
def test_malformed_hf_spec_is_an_input_error(spec):
    with pytest.raises(InputError, match=r"hf:NAME\[:CONFIG\[:SPLIT\]\]"):
        parse_dataset_spec(spec)


def test_path_specs_pick_provider_by_kind(tmp_path, sonnets_path, labelled_jsonl):
    (tmp_path / "a.txt").write_text("x")
    assert parse_dataset_spec(str(sonnets_path)).provider == "text"
    assert parse_dataset_spec(str(tmp_path)).provider == "text"
    assert parse_dataset_spec(str(labelled_jsonl)).provider == "jsonl"
    assert parse_dataset_spec(str(labelled_jsonl)).spec() == str(labelled_jsonl)


def test_missing_path_names_the_spec_forms(tmp_path):
    with pytest.raises(InputError, match=r"dataset '.*nope.txt' not found: .*wikitext2"):
        parse_dataset_spec(str(tmp_path / "nope.txt"))


def test_unsupported_file_type_is_an_input_error(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"unsupported type '\.csv'"):
        parse_dataset_spec(str(tmp_path / "d.csv"))


def test_config_section_gives_source_with_fields(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    src = dataset_source_from_config({"provider": "jsonl", "path": str(data),
                                      "text_field": "body", "seq_len": 128})
    assert (src.provider, src.path, src.text_field) == ("jsonl", str(data), "body")
    assert dataset_source_from_config({"path": str(data)}).provider == "jsonl"
    assert dataset_source_from_config({}).provider == "demo"
    wt = dataset_source_from_config({"provider": "wikitext2", "split": "test"})
    assert wt.spec() == "hf:wikitext:wikitext-2-raw-v1:test"
    hf = dataset_source_from_config({"name": "imdb", "label_field": "y"})
    assert (hf.provider, hf.split, hf.label_field) == ("hf", "test", "y")


@pytest.mark.parametrize("section, message", [
    ({"provider": "text"}, "dataset.provider 'text' needs dataset.path"),
    ({"provider": "hf"}, "dataset.provider 'hf' needs dataset.name"),
    ({"provider": "csv"}, "dataset.provider must be one of"),
])
def test_incomplete_config_section_is_an_input_error(section, message):
    with pytest.raises(InputError, match=message):
        dataset_source_from_config(section)


# --- text files and folders ------------------------------------------------------------------

def test_text_file_is_one_document(sonnets_path):
    c = load_corpus(parse_dataset_spec(str(sonnets_path)), labelled=False)
    assert len(c.documents) == 1 and c.labels is None and c.pairs is None
    assert c.documents[0].startswith(sonnets_path.read_text()[:50].strip())


def test_form_feeds_separate_documents_and_whitespace_is_normalised(tmp_path):
    f = tmp_path / "d.txt"
    f.write_bytes(b"  first doc\r\nline two \n\f\nsecond\n\f\n\n\f third")
    c = load_corpus(parse_dataset_spec(str(f)), labelled=False)
    assert c.documents == ("first doc\nline two", "second", "third")


def test_folder_gives_one_document_per_txt_file_in_name_order(tmp_path):
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "ignored"), ("e.txt", " ")]:
        (tmp_path / name).write_text(text)
    c = load_corpus(parse_dataset_spec(str(tmp_path)), labelled=False)
    assert c.documents == ("ay", "bee")


def test_empty_inputs_are_input_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="is empty"):
        load_corpus(parse_dataset_spec(str(tmp_path / "empty.txt")), labelled=False)
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match=r"contains no \.txt files"):
        load_corpus(parse_dataset_spec(str(tmp_path / "sub")), labelled=False)


def test_non_utf8_text_is_an_input_error(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_corpus(parse_dataset_spec(str(tmp_path / "bin.txt")), labelled=False)


def test_text_cannot_feed_a_classifier(sonnets_path):
    with pytest.raises(InputError, match="a classifier needs labelled examples"):
        load_corpus(parse_dataset_spec(str(sonnets_path)), labelled=True)


# --- digests ---------------------------------------------------------------------------------

def test_digest_depends_on_content_not_on_path_or_layout(tmp_path):
    """A file with form feeds and a folder holding the same documents digest alike."""
    (tmp_path / "one.txt").write_text("alpha\n\fbeta\n")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "1.txt").write_text("alpha")
    (folder / "2.txt").write_text("beta\n")
    copy = tmp_path / "copy.txt"
    copy.write_text((tmp_path / "one.txt").read_text())
    digests = {load_corpus(parse_dataset_spec(str(p)), labelled=False).digest
               for p in (tmp_path / "one.txt", folder, copy)}
    assert len(digests) == 1 and digests.pop().startswith("sha256:")


def test_digest_changes_with_content_order_and_labels():
    src = DatasetSource("text", path="x")
    base = build_corpus(src, ["a", "b"]).digest
    assert build_corpus(src, ["b", "a"]).digest != base
    assert build_corpus(src, ["ab"]).digest != base  # length-prefixed: no concatenation clash
    assert build_corpus(src, ["a", "b"], labels=[0, 1]).digest != \
        build_corpus(src, ["a", "b"], labels=[1, 0]).digest
    assert build_corpus(DatasetSource("jsonl", path="y"), ["a", "b"]).digest == base


# --- JSONL -----------------------------------------------------------------------------------

def test_jsonl_reads_the_text_field_option(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"body": "one", "text": "no"}, "", {"body": "two"}])
    src = DatasetSource("jsonl", path=str(data), text_field="body")
    assert load_corpus(src, labelled=False).documents == ("one", "two")


def test_malformed_json_line_is_named(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "", '{"text": "broken'])
    with pytest.raises(InputError, match=r"d.jsonl line 3: invalid JSON"):
        load_corpus(parse_dataset_spec(str(data)), labelled=False)


def test_non_object_json_line_is_named(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, [1, 2]])
    with pytest.raises(InputError, match=r"line 2: expected a JSON object, got list"):
        load_corpus(parse_dataset_spec(str(data)), labelled=False)


def test_missing_field_is_named_with_the_fields_present(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    with pytest.raises(InputError, match=r"line 2: missing field 'text' \(fields: txt\)"):
        load_corpus(parse_dataset_spec(str(data)), labelled=False)
    data = _jsonl(tmp_path / "l.jsonl", [{"text": "ok", "label": 1}, {"text": "x"}])
    with pytest.raises(InputError, match=r"line 2: missing field 'label'"):
        load_corpus(parse_dataset_spec(str(data)), labelled=True)


def test_non_string_text_is_named(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": 5}])
    with pytest.raises(InputError, match=r"line 1: field 'text' must be a string, got 5"):
        load_corpus(parse_dataset_spec(str(data)), labelled=False)


def test_empty_jsonl_is_an_input_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n\n")
    with pytest.raises(InputError, match="is empty"):
        load_corpus(parse_dataset_spec(str(data)), labelled=False)


def test_labelled_fixture_loads_integer_labels(labelled_jsonl):
    c = load_corpus(parse_dataset_spec(str(labelled_jsonl)), labelled=True)
    assert len(c.documents) == len(c.labels) == 120
    assert set(c.labels) == {0, 1} and c.label_names is None and c.pairs is None


def test_string_labels_map_to_ints_in_sorted_order(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"},
                                         {"text": "b", "label": "neg"},
                                         {"text": "c", "label": "neutral"}])
    c = load_corpus(parse_dataset_spec(str(data)), labelled=True)
    assert c.label_names == ("neg", "neutral", "pos")
    assert c.labels == (2, 0, 1)


def test_integral_float_labels_are_accepted(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0}])
    assert load_corpus(parse_dataset_spec(str(data)), labelled=True).labels == (1, 0)


@pytest.mark.parametrize("labels, message", [
    ([0, 0.5], r"line 2: 'label' must be an integer or a string, got 0.5"),
    ([1, True], r"line 2: 'label' must be an integer or a string, got true"),
    ([None, 1], r"line 1: 'label' must be an integer or a string, got null"),
    ([0, "pos"], r"line 2: 'label' mixes integer and string labels"),
    ([1, -1], r"line 2: 'label' is -1; labels must be >= 0"),
])
def test_labels_that_cannot_be_mapped_are_named(tmp_path, labels, message):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": y} for y in labels])
    with pytest.raises(InputError, match=message):
        load_corpus(parse_dataset_spec(str(data)), labelled=True)


def test_text_pairs_are_read_from_the_pair_field(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"q": "a", "p": "b", "y": 1},
                                         {"q": "c", "p": "d", "y": 0}])
    src = DatasetSource("jsonl", path=str(data), text_field="q", text_pair_field="p",
                        label_field="y")
    c = load_corpus(src, labelled=True)
    assert (c.documents, c.pairs, c.labels) == (("a", "c"), ("b", "d"), (1, 0))


# --- demo ------------------------------------------------------------------------------------

def test_demo_reads_the_bundled_gzip_split_on_form_feed_lines(tmp_path, monkeypatch):
    gz = tmp_path / "corpus.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("First story.\nStill first.\n\f\nSecond story.\n\f\n")
    monkeypatch.setattr(corpus_mod, "demo_corpus_path", lambda: gz)
    c = load_corpus(parse_dataset_spec("demo"), labelled=False)
    assert c.documents == ("First story.\nStill first.", "Second story.")


def test_demo_absent_from_the_installation_is_an_input_error(monkeypatch):
    import invarlock

    monkeypatch.setitem(sys.modules, "invarlock.demo", None)
    monkeypatch.delattr(invarlock, "demo", raising=False)
    with pytest.raises(InputError, match="demo corpus is not part of this installation"):
        load_corpus(parse_dataset_spec("demo"), labelled=False)


def test_demo_file_missing_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "demo_corpus_path", lambda: tmp_path / "gone.gz")
    with pytest.raises(InputError, match="demo corpus is missing"):
        load_corpus(parse_dataset_spec("demo"), labelled=False)


# --- Hugging Face ----------------------------------------------------------------------------

def test_wikitext_lines_join_into_articles():
    lines = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Section = = \n", " more \n",
             "", " = Beta = \n", " Beta text \n", ""]
    assert wikitext_articles(lines) == [
        "= Alpha =\nAlpha text .\n= = Section = =\nmore", "= Beta =\nBeta text"]


def _local_table(tmp_path: Path, builder: str, data_file: Path):
    """A real `datasets.Dataset`, built offline from a local file."""
    import datasets

    return datasets.load_dataset(builder, data_files=str(data_file), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


def test_wikitext2_loads_offline_as_articles(tmp_path, monkeypatch):
    """Network off: HF offline flags are forced and the loader gets the documented split."""
    raw = tmp_path / "wiki.txt"
    raw.write_text(" = Alpha = \n\n Alpha text . \n\n = Beta = \n\n Beta text . \n")
    table = _local_table(tmp_path, "text", raw)
    calls = []

    def fake_load(name, config, split):
        import datasets

        calls.append((name, config, split, os.environ.get("HF_DATASETS_OFFLINE"),
                      datasets.config.HF_HUB_OFFLINE))
        return table

    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpus_mod, "_hf_load_dataset", fake_load)
    c = load_corpus(parse_dataset_spec("wikitext2"), labelled=False)
    assert c.documents == ("= Alpha =\nAlpha text .", "= Beta =\nBeta text .")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", "1", True)]


def test_hf_missing_offline_names_the_network_switch():
    """The real loader, offline, on a dataset that is not cached: one clear input error."""
    with pytest.raises(InputError, match=r"not in the local Hugging Face cache and network "
                                         r"access is off; set INVARLOCK_ALLOW_NETWORK=1"):
        load_corpus(parse_dataset_spec("hf:invarlock-tests/absent-dataset"), labelled=False)


def test_hf_errors_online_and_unknown_split_are_translated(monkeypatch):
    def unreachable(name, config, split):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    def no_split(name, config, split):
        raise ValueError('Unknown split "dev". Should be one of [\'train\'].')

    from invarlock import network

    monkeypatch.setenv("INVARLOCK_ALLOW_NETWORK", "1")
    monkeypatch.setattr(network, "hub_unreachable", lambda: None)  # the Hub answers
    monkeypatch.setattr(corpus_mod, "_hf_load_dataset", unreachable)
    with pytest.raises(InputError, match=r"cannot load dataset 'hf:x::test': Couldn't reach"):
        load_corpus(parse_dataset_spec("hf:x"), labelled=False)
    monkeypatch.setattr(corpus_mod, "_hf_load_dataset", no_split)
    with pytest.raises(InputError, match=r"dataset 'hf:x::dev' has no split 'dev'"):
        load_corpus(parse_dataset_spec("hf:x::dev"), labelled=False)


def test_hf_labelled_rows_map_string_labels_and_check_columns(tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", [{"sentence": "good", "label": "pos"},
                                         {"sentence": "bad", "label": "neg"}])
    table = _local_table(tmp_path, "json", data)
    monkeypatch.setattr(corpus_mod, "_hf_load_dataset", lambda *a: table)
    src = DatasetSource("hf", name="local", split="test", text_field="sentence")
    c = load_corpus(src, labelled=True)
    assert (c.documents, c.labels, c.label_names) == (("good", "bad"), (1, 0), ("neg", "pos"))
    with pytest.raises(InputError, match=r"has no column 'text' \(columns: sentence, label\)"):
        load_corpus(DatasetSource("hf", name="local", split="test"), labelled=True)


def test_hf_class_label_names_are_recorded(monkeypatch):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]},
                                       features=features)
    monkeypatch.setattr(corpus_mod, "_hf_load_dataset", lambda *a: table)
    c = load_corpus(parse_dataset_spec("hf:sst"), labelled=True)
    assert c.labels == (1, 0, 1) and c.label_names == ("neg", "pos")


def test_hf_without_datasets_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"invarlock\[hf\]"):
        load_corpus(parse_dataset_spec("hf:x"), labelled=False)
