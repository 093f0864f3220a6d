"""From command-line flags and config files to one merged config, and from that to a request.

`certify` flags and `run -c` config files take the same road: sources merge in order
(bundled demo preset, presets, edit config, flags), defaults for the bundled demo are filled,
and the combination is checked once before any model is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from invarlock.config import get, load_yaml, merge_sources
from invarlock.errors import InputError
from invarlock.outdir import shown
from invarlock.policy import resolve

DEMO = "demo"
DEFAULT_DEMO_EDIT = {"name": "quant_rtn", "plan": {"bitwidth": 8, "per_channel": True,
                                                   "scope": "all"}}


def config_from_certify_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Merge presets, the edit config and flags (in that order; flags win)."""
    sources: list[tuple[str, dict[str, Any]]] = []
    for preset in flags.get("presets") or ():
        sources.append((str(preset), load_yaml(preset)))
    if flags.get("edit_config") is not None:
        edit_file = load_yaml(flags["edit_config"])
        if set(edit_file) != {"edit"}:
            raise InputError(f"{flags['edit_config']}: an edit config holds one top-level key, "
                             "`edit: {name: ..., plan: {...}}`")
        sources.append((str(flags["edit_config"]), edit_file))
    sources.append(("command line", flags_to_config(flags)))
    return finalize(sources)


def config_from_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """`run -c A -c B ...`: the files merge in order (later wins), then the certify checks."""
    if not paths:
        raise InputError("give at least one config file with -c/--config")
    return finalize([(str(path), load_yaml(path)) for path in paths])


def finalize(sources: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge sources (the demo preset first when the baseline is the demo) and fill defaults."""
    from invarlock import plugins

    plugins.register_guard_plugins()  # plugin guards can then be configured like built-ins
    merged = merge_sources(sources)
    baseline = get(merged, "model.id", DEMO)
    if baseline == DEMO:
        from invarlock import demo

        sources = [("bundled demo preset", load_yaml(demo.preset_path())), *sources]
        merged = merge_sources(sources)
        merged.setdefault("model", {})["id"] = DEMO
        if not _has_dataset(merged):
            merged.setdefault("dataset", {})["provider"] = DEMO
        if not get(merged, "model.subject") and not get(merged, "edit"):
            merged["edit"] = dict(DEFAULT_DEMO_EDIT)
    _check_combination(merged)
    _check_flags_that_do_nothing(merged)
    _check_save_targets(merged)
    resolve(merged)  # tier/profile/window rules fail here, before anything is loaded
    return merged


def _has_dataset(config: dict[str, Any]) -> bool:
    return bool(get(config, "dataset.provider") or get(config, "dataset.path"))


def _check_combination(config: dict[str, Any]) -> None:
    subject, edit = get(config, "model.subject"), get(config, "edit")
    if subject and edit:
        raise InputError("give either a subject (--subject) or an edit (--edit), not both")
    if not subject and not edit:
        raise InputError("nothing to compare: give --subject MODEL or --edit quant_rtn")
    if not _has_dataset(config):
        raise InputError("--dataset is required unless the baseline is the bundled demo")
    if get(config, "output.save_subject") and not edit:
        raise InputError("--save-subject writes an edited subject; it needs --edit")
    if get(config, "output.save_model") and not edit:
        raise InputError("output.save_model saves the edited subject; it needs an edit "
                         "(a subject checkpoint is already on disk)")
    if edit:
        from invarlock.edits import get_edit

        get_edit(edit.get("name", "")).parse_plan(edit)  # a bad plan fails before any loading
    if get(config, "output.save_format"):
        from invarlock.edits.formats import check_save_format

        check_save_format(get(config, "output.save_format"), edit)


def _check_flags_that_do_nothing(config: dict[str, Any]) -> None:
    """A setting the combination ignores is refused with why: the user believes it applies."""
    if get(config, "model.max_memory") is not None and get(config, "model.device_map") is None:
        raise InputError("--max-memory sizes the devices of a device map; it does nothing "
                         "without --device-map")
    if get(config, "output.cache_dir") and get(config, "output.cache", True) is False:
        raise InputError("--cache-dir names where the baseline cache lives; it does nothing "
                         "with --no-cache (output.cache: false)")


def _check_save_targets(config: dict[str, Any]) -> None:
    """Folders a run writes a checkpoint into must be new or empty, found before evaluation
    (a refusal after both evaluations wastes them and leaves a certificate without its
    copy)."""
    targets = [(get(config, key), flag) for key, flag in (
        ("output.save_subject", "--save-subject"),
        ("output.write_ve_subject", "--write-ve-subject"))]
    targets = [(Path(str(t)), flag) for t, flag in targets if t]
    if len(targets) == 2 and targets[0][0].resolve() == targets[1][0].resolve():
        raise InputError("--save-subject and --write-ve-subject name the same folder; give "
                         "each its own")
    for path, flag in targets:
        try:
            occupied = path.is_dir() and any(path.iterdir())
        except OSError as exc:
            raise InputError(f"{flag} {shown(path)} cannot be used: "
                             f"{exc.strerror or exc}") from None
        if occupied:
            raise InputError(f"{flag} {shown(path)} exists and is not empty; a checkpoint is "
                             "never written over other files: give a new or empty folder")


def flags_to_config(flags: dict[str, Any]) -> dict[str, Any]:
    """Only the flags the user gave; unset flags leave presets alone."""
    config: dict[str, Any] = {}

    def put(dotted: str, value: Any) -> None:
        if value is None:
            return
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    put("model.id", flags.get("baseline"))
    subjects = flags.get("subject")
    if isinstance(subjects, (tuple, list)):  # --subject may be repeated
        subjects = subjects[0] if len(subjects) == 1 else list(subjects) or None
    put("model.subject", subjects)
    put("model.adapter", flags.get("adapter"))
    put("model.device", flags.get("device"))
    put("model.device_map", flags.get("device_map"))
    put("model.max_memory", flags.get("max_memory"))
    put("model.dtype", flags.get("dtype"))
    put("model.allow_pickle", flags.get("allow_pickle"))
    put("model.gguf_file", flags.get("gguf_file"))
    put("model.dequantize", flags.get("dequantize"))
    put("model.runtime", flags.get("runtime"))
    put("output.save_format", flags.get("save_format"))
    if flags.get("dataset_spec"):
        from invarlock.data.corpus import parse_dataset_spec

        source = parse_dataset_spec(flags["dataset_spec"])
        for key in ("provider", "path", "name", "config", "split"):
            config.setdefault("dataset", {})[key] = getattr(source, key)
    put("dataset.text_field", flags.get("text_field"))
    put("dataset.label_field", flags.get("label_field"))
    put("dataset.seed", flags.get("seed"))
    put("eval.bootstrap.seed", flags.get("seed"))
    put("eval.batch_size", flags.get("batch_size"))
    put("auto.profile", flags.get("profile"))
    put("auto.tier", flags.get("tier"))
    put("auto.allow_underpowered", flags.get("allow_underpowered"))
    put("auto.sequential", flags.get("sequential"))
    put("edit.name", flags.get("edit_name"))
    put("output.dir", _str(flags.get("out_dir")))
    put("output.save_subject", _str(flags.get("save_subject")))
    put("output.write_ve_subject", _str(flags.get("write_ve_subject")))
    put("output.cache_dir", _str(flags.get("cache_dir")))
    if flags.get("no_cache"):
        put("output.cache", False)
    return config


def _subjects(config: dict[str, Any]) -> tuple[str, ...]:
    """model.subject as a tuple: one checkpoint, or several compared with one baseline."""
    value = get(config, "model.subject")
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def request_from_config(config: dict[str, Any], *, progress: bool = False,
                        report: bool | None = None) -> Any:
    """The `CertifyRequest` a merged config describes (`report` overrides output.save_report)."""
    from invarlock.certify import CertifyRequest
    from invarlock.data.corpus import dataset_source_from_config
    from invarlock.models.device import parse_max_memory, resolve_device_map

    out = get(config, "output.dir")
    save = get(config, "output.save_subject")
    ve_out = get(config, "output.write_ve_subject")
    cache_dir = get(config, "output.cache_dir")
    return CertifyRequest(
        config=config,
        baseline=get(config, "model.id", DEMO),
        subject=_subjects(config)[0] if _subjects(config) else None,
        subjects=_subjects(config),
        edit=get(config, "edit"),
        dataset=dataset_source_from_config(config.get("dataset") or {}),
        out_dir=Path(out) if out else None,
        adapter=get(config, "model.adapter", "auto"),
        device=get(config, "model.device", "auto"),
        dtype=get(config, "model.dtype", "auto"),
        allow_pickle=bool(get(config, "model.allow_pickle", False)),
        device_map=resolve_device_map(get(config, "model.device_map")),
        max_memory=parse_max_memory(get(config, "model.max_memory")),
        revision=get(config, "model.revision"),
        batch_size=get(config, "eval.batch_size"),
        save_subject=Path(save) if save else None,
        write_ve_subject=Path(ve_out) if ve_out else None,
        save_model=bool(get(config, "output.save_model", False)),
        save_report=bool(get(config, "output.save_report", True) if report is None else report),
        use_cache=bool(get(config, "output.cache", True)),
        cache_dir=Path(cache_dir) if cache_dir else None,
        progress=progress,
        gguf_file=get(config, "model.gguf_file"),
        dequantize=bool(get(config, "model.dequantize", False)),
        runtime=get(config, "model.runtime", "auto"),
        save_format=get(config, "output.save_format", "safetensors"),
    )
