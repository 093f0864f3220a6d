"""`invarlock version` and `invarlock plugins`: what this installation holds.

Neither needs torch: they answer on a light install too.
"""

from __future__ import annotations

from typing import Any

import click

from invarlock import __version__
from invarlock.commands.common import EXIT_PASS, configure_logging, run_guarded


@click.command(epilog="""\b
Examples:
  invarlock version
  invarlock -V          # the version only
""")
def version() -> None:
    """Print the version of invarlock and of the libraries it uses."""
    from invarlock.environment import library_versions

    click.echo(f"invarlock {__version__}")
    for name, ver in library_versions().items():
        click.echo(f"  {name} {ver or 'not installed'}")


_PLUGINS_EPILOG = """\b
Distributions add components through the entry-point groups invarlock.adapters,
invarlock.edits and invarlock.guards; see docs/cli.md for what each must provide.
\b
Examples:
  invarlock plugins
  invarlock plugins adapters
  invarlock plugins guards --json
"""


@click.command(epilog=_PLUGINS_EPILOG)
@click.argument("kind", required=False, type=click.Choice(["adapters", "edits", "guards"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plugins(kind: str | None, as_json: bool) -> None:
    """List adapters, edits and guards: built-in and from installed plugins."""
    configure_logging(quiet=True)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock import catalog as registry

        found = registry.components(kind)
        if not as_json:
            click.echo(_plugins_text(found, (kind,) if kind else registry.KINDS))
        return EXIT_PASS, {"format_version": 1,
                           "components": [c.as_dict() for c in found]}

    run_guarded(as_json, body)


def _plugins_text(found: list[Any], kinds: tuple[str, ...]) -> str:
    lines = []
    for kind in kinds:
        lines.append(f"{kind}:")
        rows = [c for c in found if c.kind == kind]
        if not rows:
            lines.append("  (none)")
        width = max((len(c.name) for c in rows), default=0)
        for c in rows:
            origin = f"{c.origin} {c.version or ''}".strip()
            extra = f" (aliases: {', '.join(c.aliases)})" if c.aliases else ""
            if c.origin != "builtin":
                extra += f" [{c.target}]"
            if c.error:
                extra += f" UNUSABLE: {c.error}"
            lines.append(f"  {c.name:<{width}}  {origin:<24}  {c.summary}{extra}")
    return "\n".join(lines)
