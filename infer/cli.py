"""Command line: dynamicid-infer."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-infer")
def main() -> None:
    """Generate images of several people with DynamicID."""
