"""`invarlock doctor`: the preflight, which reads metadata and evaluates nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from invarlock.commands.common import configure_logging, run_guarded

_DOCTOR_EPILOG = """\b
Preflight without evaluating: config keys and types, tier and profile, models as metadata
(config.json, safetensors headers), architecture and shapes, tokenizers, enough unique
windows for the profile, device, free memory, network policy. Findings print as
SEVERITY [INVARLOCK:Dnnn] message; the codes are listed in docs/cli.md.
\b
Exit codes: 0 no ERROR finding; 2 at least one ERROR.
\b
Examples:
  invarlock doctor --config run.yaml
  invarlock doctor --baseline ./base --subject ./int8 --dataset eval.txt --profile ci --json
"""


@click.command(epilog=_DOCTOR_EPILOG)
@click.option("-c", "--config", "configs", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Run config file(s) in the seed shape, merged in order.")
@click.option("--baseline", metavar="MODEL", help="Baseline checkpoint (overrides model.id).")
@click.option("--subject", metavar="MODEL", help="Subject checkpoint (overrides model.subject).")
@click.option("--dataset", "dataset_spec", metavar="SPEC", help="Dataset spec, as for certify.")
@click.option("--edit", "edit_name", metavar="NAME", help="Edit to build the subject with.")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]))
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]))
@click.option("--adapter", help="auto (default), hf_causal, hf_mlm, hf_seq_cls, or a plugin.")
@click.option("--device", help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--allow-pickle", is_flag=True, default=None, help="Accept .bin/.pt weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def doctor(configs: tuple[Path, ...], as_json: bool, **flags: Any) -> None:
    """Check a run before spending compute on it: config, models, data, device."""
    configure_logging(quiet=True)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.doctor import diagnose

        result = diagnose(configs=configs, flags=flags)
        if not as_json:
            click.echo(result.text())
        return result.exit_code, result.as_dict()

    run_guarded(as_json, body)
