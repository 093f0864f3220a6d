"""A checkpoint's format is what its weights hold, not what its metadata claims.

A float checkpoint whose config.json names a quantization method is refused (exit 2) before
anything is evaluated, saying it is float; a GGUF file that mixes types is labelled by the
type that holds most of its parameters, with every type's share recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from invarlock import evaluate
from tests.faults.conftest import certify, error_lines


@pytest.fixture
def no_evaluation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was evaluated before the bad input was reported")

    monkeypatch.setattr(evaluate, "evaluate_windows", refuse)


@pytest.mark.parametrize("qc", [
    {"quant_method": "bitsandbytes", "load_in_8bit": True},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    {"quant_method": "fp8", "weight_block_size": [128, 128]},
    {"quant_method": "quanto", "weights": "int8"},
    {"quant_method": "gptq", "bits": 4, "group_size": 128},
    {"quant_method": "hqq", "nbits": 4},
    {"quant_method": "torchao", "quant_type": "int8_weight_only"},
    {"quant_method": "no-such-method"},
])
def test_float_weights_declared_quantized_are_refused_as_float(
        qc, no_evaluation, tiny_gpt2_dir, sonnets_path, fast_preset, tmp_path):
    subject = tmp_path / "subject"
    shutil.copytree(tiny_gpt2_dir, subject)
    config = json.loads((subject / "config.json").read_text())
    config["quantization_config"] = qc
    (subject / "config.json").write_text(json.dumps(config))
    code, payload, stderr = certify(tiny_gpt2_dir, subject, tmp_path / "o", sonnets_path,
                                    fast_preset)
    assert code == 2 and len(error_lines(stderr)) == 1, payload
    assert "no quantized tensor" in payload["error"] and "float checkpoint" in payload["error"]
    assert qc["quant_method"] in payload["error"]
    assert not (tmp_path / "o").exists()


def test_sharded_float_weights_declared_quantized_are_refused(tiny_gpt2_dir, tmp_path):
    from invarlock.errors import InputError
    from invarlock.models import formats
    from invarlock.models.source import resolve_model_source

    subject = tmp_path / "subject"
    shutil.copytree(tiny_gpt2_dir, subject)
    (subject / "model.safetensors").rename(subject / "model-00001-of-00001.safetensors")
    (subject / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}))
    config = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    with pytest.raises(InputError, match="float checkpoint"):
        formats.check_loadable(resolve_model_source(str(subject)), config, "cpu", False)


def test_weights_with_quantized_codes_pass_the_claim_check(tmp_path):
    """The check reads dtypes, so an int8 code tensor beside float scales is quantized."""
    from safetensors.numpy import save_file

    from invarlock.models import quantized

    path = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((4, 4), np.int8), "s": np.ones(4, np.float16)}, str(path))
    quantized.check_claim({"quantization_config": {"quant_method": "quanto"}}, [path], "m")
    assert quantized.stored_dtypes([path]) == {"I8": 1, "F16": 1}


# --- GGUF files mixing types -----------------------------------------------------------------

def _write_gguf(path: Path, tensors: list[tuple[str, str, tuple[int, int]]]) -> None:
    """A GGUF file holding `tensors` (name, GGML type, shape) and no model metadata."""
    import gguf

    from invarlock.models.gguf_file import quantize_block_array

    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    for name, qtype, shape in tensors:
        array = rng.standard_normal(shape).astype(np.float32)
        if qtype == "F32":
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quantize_block_array(array, qtype),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _info(path: Path):
    import gguf

    from invarlock.models.gguf_file import GGUFInfo, type_counts

    tensors, parameters = type_counts(gguf.GGUFReader(str(path)))
    return GGUFInfo(path=path, architecture="llama", config={}, carried_keys=(),
                    tensor_types=tensors, has_tokenizer=False, type_parameters=parameters)


@pytest.mark.parametrize(("tensors", "majority", "bits"), [
    # many small 8-bit tensors, one large 4-bit matrix: the 4-bit type holds the weights
    ([(f"small.{i}", "Q8_0", (32, 32)) for i in range(6)] + [("big", "Q4_0", (256, 256))],
     "Q4_0", 4),
    # the reverse: many small 4-bit tensors, one large 8-bit matrix
    ([(f"small.{i}", "Q4_0", (32, 32)) for i in range(6)] + [("big", "Q8_0", (256, 256))],
     "Q8_0", 8),
    # F32 norms outnumbering both types are not the format
    ([(f"norm.{i}", "F32", (1, 4096)) for i in range(20)] + [("a", "Q8_0", (64, 64))]
     + [("b", "Q4_0", (128, 128))] + [("c", "Q8_0", (32, 64))], "Q4_0", 4),
])
def test_a_mixed_gguf_is_labelled_by_what_holds_most_weights(tensors, majority, bits, tmp_path):
    from invarlock.models import quantized

    path = tmp_path / "mixed.gguf"
    _write_gguf(path, tensors)
    info = _info(path)
    assert info.file_type == majority
    record = quantized.gguf_format(info)
    assert (record["file_type"], record["bits"]) == (majority, bits)
    assert record["mixed_types"] is True
    expected: dict[str, int] = {}
    for _, qtype, shape in tensors:
        expected[qtype] = expected.get(qtype, 0) + shape[0] * shape[1]
    assert record["tensor_parameters"] == expected


def test_a_single_type_gguf_is_not_called_mixed(tmp_path):
    from invarlock.models import quantized

    path = tmp_path / "one.gguf"
    _write_gguf(path, [("a", "Q8_0", (64, 64)), ("n", "F32", (1, 64))])
    record = quantized.gguf_format(_info(path))
    assert (record["file_type"], record["mixed_types"]) == ("Q8_0", False)


@pytest.mark.parametrize("relabel", [
    {"file_type": "Q8_0", "bits": 8},  # the minority type, with its own bit width
    {"bits": 8},  # the majority's name with another width
    {"mixed_types": False},
])
def test_verify_rederives_a_gguf_records_labels_from_its_tensor_table(relabel, tmp_path):
    """`verify` recomputes file_type, bits and mixed_types from the record's own
    tensor_parameters: a certificate re-sealed after relabelling a mixed file does not
    verify, the genuine record does."""
    from invarlock.models import quantized
    from invarlock.verify import verify_certificate
    from tests.certs import synthetic_certificate
    from tests.test_verify import mentions, reseal

    path = tmp_path / "mixed.gguf"
    _write_gguf(path, [(f"small.{i}", "Q8_0", (32, 32)) for i in range(6)]
                + [("big", "Q4_0", (256, 256))])
    record = quantized.gguf_format(_info(path))
    cert = synthetic_certificate()
    cert["subject"]["format"] = record
    genuine = verify_certificate(reseal(cert))
    assert genuine.verified, genuine.differences
    cert["subject"]["format"] = {**record, **relabel}
    report = verify_certificate(reseal(cert))
    assert mentions(report, f"subject.format.{next(iter(relabel))}")
    assert not report.verified
