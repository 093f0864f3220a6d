"""Formats an edited subject can ship in: safetensors (float) or GGUF (Q8_0 / Q4_0 blocks).

With `--save-format gguf` the edited weights are stored as GGUF blocks. So that the file holds
exactly what was certified, the edited modules go through the GGUF quantizer in memory right
after the edit (quantize, then dequantize in llama.cpp's layout), the subject is evaluated with
those weights, and on PASS the very same blocks are written. Bit widths map to GGUF types:
8 → Q8_0, 4 → Q4_0 (blocks of 32 inputs, one fp16 scale each). Unedited tensors are stored in
float, as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from invarlock.errors import InputError

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "gguf")
GGUF_TYPES = {8: "Q8_0", 4: "Q4_0"}
GGUF_FILE = "model-{qtype}.gguf"


def check_save_format(save_format: str, edit: dict[str, Any] | None) -> None:
    """Validate `--save-format` against the edit's plan before anything loads."""
    if save_format not in SAVE_FORMATS:
        raise InputError(f"--save-format must be one of {', '.join(SAVE_FORMATS)}, "
                         f"got {save_format!r}")
    if save_format == "gguf":
        bits = ((edit or {}).get("plan") or {}).get("bitwidth", 8)
        if bits not in GGUF_TYPES:
            raise InputError(f"--save-format gguf stores Q8_0 or Q4_0 blocks: the edit's "
                             f"bitwidth must be 8 or 4, got {bits!r}")


def gguf_type(plan: dict[str, Any]) -> str:
    bits = plan.get("bitwidth", 8)
    if bits not in GGUF_TYPES:
        raise InputError(f"--save-format gguf needs bitwidth 8 or 4, got {bits!r}")
    return GGUF_TYPES[bits]


def shipped_as(save_format: str, subject: Any, result: Any) -> Any:
    """Put the edited modules through the format's quantizer (in memory); the new result."""
    from invarlock.models.gguf_file import round_trip_

    qtype = gguf_type(result.plan)
    names = [f"{m}.weight" for m in result.modules_changed]
    stored = round_trip_(subject.model, names, qtype)
    logger.info("stored %d edited weight(s) as GGUF %s blocks (%d kept in float: rows do not "
                "fit the blocks)", len(stored), qtype, len(names) - len(stored))
    plan = {**result.plan, "stored_as": f"gguf:{qtype}", "stored_weights": len(stored)}
    return dataclasses.replace(result, plan=plan)


def edit_format(save_format: str, result: Any, model: Any) -> dict[str, Any] | None:
    """The certificate's `format` record of an edited subject (None: float safetensors)."""
    if save_format == "safetensors":
        return None
    from invarlock.models.effective import module_digests
    from invarlock.models.quantized import FORWARD_DEQUANTIZED, GGUF_BITS, version_of

    qtype = gguf_type(result.plan)
    return {"name": "gguf", "method": "gguf", "bits": GGUF_BITS[qtype], "group_size": 32,
            "backend": "gguf", "backend_version": version_of("gguf"),
            "forward": FORWARD_DEQUANTIZED, "dequantize_requested": False,
            "file": GGUF_FILE.format(qtype=qtype), "file_type": qtype,
            "quantized_modules": int(result.plan.get("stored_weights", 0)),
            "module_digests": module_digests(model)}


def save_as(save_format: str, subject: Any, edit_record: dict[str, Any], out_dir: Path) -> Path:
    """Write the subject as a GGUF file plus its tokenizer files, all-or-nothing."""
    from invarlock.atomic import default_mode
    from invarlock.models.gguf_file import write_gguf

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"refusing to overwrite '{out_dir}': it exists and is not empty")
    plan = edit_record["plan"]
    qtype = gguf_type(plan)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    try:
        counts = write_gguf(subject.model, subject.tokenizer,
                            staging / GGUF_FILE.format(qtype=qtype), qtype,
                            [f"{m}.weight" for m in edit_record["modules_changed"]])
        subject.tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.chmod(staging, default_mode(0o777))
        os.replace(staging, out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"cannot write GGUF checkpoint '{out_dir}': {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved GGUF checkpoint to %s (%s)", out_dir, counts)
    return out_dir
