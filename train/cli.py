"""Command line: dynamicid-train."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-train")
def main() -> None:
    """Train the DynamicID anchoring and reconfiguration stages."""
