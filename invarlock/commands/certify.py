"""`invarlock certify` and `invarlock run`: one pipeline, from flags or from config files.

Both build a `CertifyRequest`, add the cache secret and the reference's pins, run it (one
subject, or several against one baseline evaluation) and print the verdict with the one
number it rests on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from invarlock.commands.common import (
    EXIT_FAIL,
    EXIT_PASS,
    configure_logging,
    require_hf,
    run_guarded,
)

_CERTIFY_EPILOG = """\b
Exit codes: 0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced.
\b
Examples:
  invarlock certify
  invarlock certify --baseline ./base --subject ./int8 --dataset ./eval.txt --profile ci
  invarlock certify --baseline ./base --edit quant_rtn --edit-config rtn4.yaml \\
      --dataset demo --tier conservative --out reports/rtn4 --json
"""


@click.command(epilog=_CERTIFY_EPILOG)
@click.option("--baseline", metavar="MODEL",
              help="Baseline: local directory, hub id (hf:ID), or 'demo' (default).")
@click.option("--subject", metavar="MODEL", multiple=True,
              help="Subject checkpoint to compare; repeat it to certify several against one "
                   "baseline evaluation (one folder each, plus index.json / index.md).")
@click.option("--edit", "edit_name", metavar="NAME",
              help="Build the subject in memory with an edit (quant_rtn, or an edit plugin).")
@click.option("--edit-config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML with `edit: {name: quant_rtn, plan: {...}}`.")
@click.option("--dataset", "dataset_spec", metavar="SPEC",
              help="Evaluation text: a .txt file, a folder of .txt, a .jsonl file, 'demo', "
                   "'wikitext2', or hf:NAME[:CONFIG[:SPLIT]].")
@click.option("--text-field", help="JSONL/HF field holding the text (default: text).")
@click.option("--label-field", help="JSONL/HF field holding classifier labels (default: label).")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]),
              help="Evidence size (default: ci).")
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]),
              help="Acceptance thresholds (default: balanced).")
@click.option("--preset", "presets", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Config file(s) merged in order (seed shape); flags win.")
@click.option("--adapter", help="auto (default), hf_causal, hf_mlm, hf_seq_cls, or a plugin.")
@click.option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")
@click.option("--device-map",
              type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
              help="Spread each model over the GPUs (accelerate), CPU and disk offload last.")
@click.option("--max-memory", metavar="DEV=SIZE,...",
              help="Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for windows and bootstrap.")
@click.option("--allow-pickle", is_flag=True, default=None,
              help="Allow .bin/.pt checkpoints (loaded with weights_only).")
@click.option("--allow-underpowered", is_flag=True, default=None,
              help="Run below the ci/release evidence floor or with settings weaker than "
                   "the tier's and profile's (alpha, calibration windows, limits, guard "
                   "modes); the certificate records evidence_meets_profile: false and lists "
                   "them (a gating flag in release, which then cannot PASS).")
@click.option("--sequential/--no-sequential", default=None,
              help="Stop the final set as soon as a look decides (default: on in dev and ci, "
                   "off in release).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the certificate (default: runs/<run id>).")
@click.option("--save-subject", type=click.Path(file_okay=False, path_type=Path),
              help="With --edit: write the edited checkpoint here, only when PASS.")
@click.option("--save-format", type=click.Choice(["safetensors", "gguf"]),
              help="Format of --save-subject: safetensors (default) or gguf (Q8_0 for 8 bits, "
                   "Q4_0 for 4; the certified weights are the stored ones).")
@click.option("--gguf-file", metavar="NAME",
              help="The GGUF file to use in a model folder that holds several.")
@click.option("--dequantize", is_flag=True, default=None,
              help="Evaluate a quantized model's dequantized float weights where its backend "
                   "has no kernels for the device (recorded in the certificate).")
@click.option("--runtime", type=click.Choice(["auto", "llama.cpp", "transformers"]),
              help="What evaluates a GGUF model: llama.cpp's own kernels, as served (the "
                   "default when the 'llamacpp' extra is installed), or transformers' "
                   "dequantized float forward.")
@click.option("--write-ve-subject", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a copy of the subject with the VE guard's proposed scales "
                   "folded into its weights (the subject itself is never changed).")
@click.option("--no-cache", is_flag=True, help="Always re-evaluate the baseline.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Baseline cache folder (default: $INVARLOCK_CACHE_DIR or ~/.cache).")
@click.option("--cache-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="INVARLOCK_CACHE_SECRET_FILE", show_envvar=True,
              help="Secret that signs baseline cache entries (HMAC-SHA256); entries without "
                   "a valid signature are ignored and re-evaluated.")
@click.option("--cache-namespace", type=click.Choice(["trusted", "untrusted"]),
              help="Trust level of this run: its own cache folder and key (a fork's run is "
                   "untrusted; a trusted run never reads untrusted entries).")
@click.option("--baseline-digest", metavar="sha256:HEX",
              help="Pin the baseline: stop (exit 2) before evaluating when its weights "
                   "digest differs.")
@click.option("--policy-digest", metavar="sha256:HEX",
              help="Pin the resolved policy: stop (exit 2) before evaluating when its digest "
                   "differs.")
@click.option("--dataset-digest", metavar="sha256:HEX",
              help="Pin the evaluation data: stop (exit 2) before evaluating when the corpus "
                   "digest differs.")
@click.option("--reference-origin", type=click.Choice(["local", "base-checkout",
                                                       "pull-request"]),
              help="Where the baseline, dataset and presets were read from (recorded in the "
                   "certificate; default: local).")
@click.option("--reference-changed", "reference_changed", multiple=True,
              metavar="baseline|dataset|preset:PATH|none",
              help="What the pull request changed, compared with the base checkout (repeat; "
                   "`none` when nothing did); recorded per item in the certificate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def certify(as_json: bool, quiet: bool, **flags: Any) -> None:
    """Compare a subject with its baseline on paired windows and write a certificate.

    With no --baseline, the bundled demo model, tokenizer and corpus are used, and with no
    --subject the demo applies quant_rtn (INT8): `invarlock certify` alone is a real run.
    """
    configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.run_config import config_from_certify_flags, request_from_config

        require_hf("invarlock certify")
        trust = {k: flags.pop(k) for k in _TRUST_FLAGS}
        config = config_from_certify_flags(flags)
        progress = not quiet and sys.stderr.isatty()
        request = _with_trust(request_from_config(config, progress=progress), trust,
                              flags.get("presets") or ())
        return _certify_and_report(request, as_json)

    run_guarded(as_json, body)


_TRUST_FLAGS = ("cache_secret_file", "cache_namespace", "baseline_digest", "policy_digest",
                "dataset_digest", "reference_origin", "reference_changed")


def _with_trust(request: Any, trust: dict[str, Any], presets: tuple[Path, ...]) -> Any:
    """The request with the cache secret and namespace, and the reference's origin and pins
    (a bad secret file or digest stops here, before anything is loaded)."""
    import dataclasses

    from invarlock.cache import Namespace, read_secret
    from invarlock.provenance import Origin, Reference, parse_digest

    secret = read_secret(trust["cache_secret_file"]) if trust["cache_secret_file"] else None
    namespace = Namespace(trust["cache_namespace"]) if trust["cache_namespace"] else None
    reference = Reference(
        origin=Origin(trust["reference_origin"] or "local"),
        baseline_digest=(parse_digest(trust["baseline_digest"], "--baseline-digest")
                         if trust["baseline_digest"] else None),
        policy_digest=(parse_digest(trust["policy_digest"], "--policy-digest")
                       if trust["policy_digest"] else None),
        dataset_digest=(parse_digest(trust["dataset_digest"], "--dataset-digest")
                        if trust["dataset_digest"] else None),
        presets=tuple(Path(p) for p in presets),
        changed=(None if not trust["reference_changed"]
                 else tuple(c for c in trust["reference_changed"] if c != "none")))
    return dataclasses.replace(request, cache_secret=secret, cache_namespace=namespace,
                               reference=reference)


def _certify_and_report(request: Any, as_json: bool) -> tuple[int, dict[str, Any] | None]:
    from invarlock.certify import certify as run_certify

    if len(request.subjects) > 1:
        return _certify_many(request, as_json)
    outcome = run_certify(request)
    summary = outcome.summary()
    if not as_json:
        click.echo(human_summary(summary))
    return (EXIT_PASS if outcome.verdict == "PASS" else EXIT_FAIL), summary


def _certify_many(request: Any, as_json: bool) -> tuple[int, dict[str, Any] | None]:
    """Repeated --subject: one baseline evaluation, a certificate per subject, an index."""
    from invarlock.subjects import certify_subjects

    run = certify_subjects(request, request.subjects)
    rows = []
    for r in run.results:
        if r.outcome is None:
            rows.append({"subject": r.spec, "verdict": "ERROR", "exit_code": r.exit_code,
                         "error": r.error})
            continue
        summary = r.outcome.summary()
        rows.append({"subject": r.spec, "exit_code": r.exit_code, **summary})
    if not as_json:
        for row in rows:
            if row["verdict"] == "ERROR":
                click.echo(f"{row['subject']}: ERROR: {row['error']}")
            else:
                click.echo(f"{row['subject']}: " + human_summary(row))
        click.echo(f"index: {run.index_path}")
    return run.exit_code, {"verdict": "PASS" if run.exit_code == 0 else "FAIL",
                           "exit_code": run.exit_code, "index": str(run.index_path),
                           "subjects": rows}


def _level(alpha: float) -> str:
    """The interval's confidence level as recorded (1 − α), e.g. '95%'."""
    return f"{100 * (1 - alpha):g}%"


def human_summary(s: dict[str, Any]) -> str:
    """The verdict and the one number, saying exactly what was and was not measured."""
    if s["ratio_ci"] is not None:
        lo, hi = s["ratio_ci"]
        number = (f"ratio {s['ratio']:.4f}, {_level(s['alpha'])} CI [{lo:.4f}, {hi:.4f}], "
                  f"limit {s['limit']:.2f}")
    elif s["delta_ci"] is not None:
        lo, hi = s["delta_ci"]
        number = (f"accuracy change {_level(s['alpha'])} CI [{lo:+.2f}, {hi:+.2f}] pp, "
                  f"limit {s['limit']:+.2f} pp")
    elif s.get("stopped"):
        number = f"stopped: {s['stopped']}, final set not evaluated"
    elif s["catastrophic"]:
        number = "catastrophic preview, final set not evaluated"
    else:
        number = "final set not evaluated"
    if s.get("sequential"):
        number += f"; {s['sequential']}"
    lines = [f"{s['verdict']}: {number}"]
    if s["verdict"] == "FAIL":
        lines += [f"  - {r}" for r in s["reasons"]]
    if s.get("guards"):
        lines.append("guards: " + ", ".join(
            f"{name} {_guard_word(g)}{' (monitor)' if g['mode'] == 'monitor' else ''}"
            for name, g in s["guards"].items()))
    lines.append(f"certificate: {s['certificate']}")
    return "\n".join(lines)


def _guard_word(g: dict[str, Any]) -> str:
    if not g.get("measured", True):
        return "not measured"
    return "ok" if g["passed"] else "FAILED"


_RUN_EPILOG = """\b
The config files (the seed's shape: model, dataset, edit, eval, guards, auto, output) merge
in order, later files win; then the run is exactly `certify` with that configuration.
output.dir: the certificate folder (default runs/<run id>); output.save_report (default
true): also write the HTML report there; output.save_model: with an edit, save the edited
subject to <output.dir>/model, only on PASS.
\b
Exit codes: 0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced.
\b
Examples:
  invarlock run -c run.yaml
  invarlock run -c configs/base.yaml -c configs/int4.yaml --json
"""


@click.command(epilog=_RUN_EPILOG)
@click.option("-c", "--config", "configs", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Run config file; repeat to layer overrides (later wins).")
@click.option("--cache-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="INVARLOCK_CACHE_SECRET_FILE", show_envvar=True,
              help="Secret that signs baseline cache entries (as for certify).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def run(configs: tuple[Path, ...], cache_secret_file: Path | None, as_json: bool,
        quiet: bool) -> None:
    """Certify as a config file describes it (the same pipeline as certify)."""
    configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.run_config import config_from_files, request_from_config

        require_hf("invarlock run")
        config = config_from_files(configs)
        progress = not quiet and sys.stderr.isatty()
        trust = {**dict.fromkeys(_TRUST_FLAGS), "cache_secret_file": cache_secret_file}
        request = _with_trust(request_from_config(config, progress=progress), trust, ())
        return _certify_and_report(request, as_json)

    run_guarded(as_json, body)
