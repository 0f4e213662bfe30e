"""Command line: dynamicid-curate."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-curate")
def main() -> None:
    """Curate raw photo folders into a DynamicID face dataset."""
