"""Every console script answers --help."""

import pytest
from click.testing import CliRunner

from dynamicid.app.cli import main as app
from dynamicid.curation.cli import main as curate
from dynamicid.infer.cli import main as infer
from dynamicid.train.cli import main as train


@pytest.mark.parametrize("cli", [curate, train, infer, app])
def test_help(cli):
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
