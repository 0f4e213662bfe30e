"""What a newcomer meets first (issue 34): the README's own commands, run as written, and their output.

The Quickstart's and the whole path's fenced shell blocks are parsed out of README.md and run verbatim, each in
its own `bash -e`, in a temporary folder that stands in for the clone (its `.venv` is the environment running
these tests); each must exit 0, write only into `scratch/` (which git ignores), and print no library chatter
or progress bars run together. Two parts of the Quickstart's two commands are not run here: the install, which
`.ci/run` performs word for word on a fresh machine before the tests (checked below), and the test command itself.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Quickstart", "The whole path in one sitting")
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
TEST_COMMAND = ".venv/bin/python -m pytest -q"


def ci_commands() -> set[str]:
    """The lines of .ci/run, as a reader types them (CI installs quietly)."""
    return {line.strip() for line in (ROOT / ".ci" / "run").read_text().replace(" --quiet", "").splitlines()}


def readme_blocks() -> list[tuple[str, str]]:
    """(section, block) for each ```bash block of the runnable sections, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if title.startswith(SECTIONS):
            blocks += [(title, fence.group(1)) for fence in FENCE.finditer(section)]
    return blocks


def runnable(block: str) -> str:
    """The block less what CI runs itself: each line's `&&`-chained install steps and the test command."""
    kept = ci_commands() | {TEST_COMMAND}
    lines = [" && ".join(c for c in line.split(" && ") if c.strip() not in kept) for line in block.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def test_the_readme_runner_finds_the_sections_blocks():
    blocks = readme_blocks()
    assert [title for title, _ in blocks][:1] == ["Quickstart"] and len(blocks) == 2, blocks
    quickstart = blocks[0][1].strip().splitlines()
    assert len(quickstart) == 2, "the Quickstart is two commands: install + demo, install + tests"
    install = "python3 -m venv .venv && .venv/bin/pip install --no-deps -r requirements/lock.txt -e ."
    assert all(line.startswith(install) for line in quickstart)
    assert quickstart[1].endswith(TEST_COMMAND)
    # The install is what CI runs on a fresh machine, word for word (there quietly).
    assert set(install.split(" && ")) <= ci_commands()
    assert runnable(blocks[0][1]) == "mkdir -p scratch && .venv/bin/dynamicid-curate demo scratch/demo_dataset"


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.prefix))
    for title, block in readme_blocks():
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", runnable(block)],
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert result.returncode == 0, f"{title}:\n{block}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        assert "requires torchvision" not in result.stderr, title
        # stderr is a pipe here: progress comes as whole lines, never bars redrawn along one line
        assert not [line for line in result.stderr.splitlines() if "\r" in line or line.count("%|") > 1], title
    assert sorted(p.name for p in clone.iterdir()) == [".venv", "scratch"]
    scratch = clone / "scratch"
    for name in ("demo_dataset/report.html", "ds/summary.json", "run2/weights.safetensors", "out.png", "scores"):
        assert (scratch / name).exists(), name
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", "scratch/demo_dataset"])
    assert ignored.returncode == 0, "scratch/ is not in .gitignore"


def test_no_torchvision_notice_on_import_or_model_load():
    code = (
        "import dynamicid.infer\n"
        "from dynamicid.models.base import load_base_model\n"
        "from dynamicid.infer import DynamicIDPipeline\n"
        "DynamicIDPipeline.from_base(load_base_model('tiny-random'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr, result.stderr


def test_api_errors_name_arguments_and_the_cli_shows_its_flags():
    """The library's message names `image_encoder=`; through a command with an `--image-encoder` option the same
    message names the flag (dynamicid.clitools)."""
    import dataclasses

    import click

    from dynamicid.clitools import ToolGroup
    from dynamicid.models.base import load_base_model

    base = dataclasses.replace(load_base_model("tiny-random"), image_encoder=None)
    with pytest.raises(ValueError, match=r"pass image_encoder=DIR") as raised:
        _ = base.clip_dim

    @click.group(cls=ToolGroup)
    def tool():
        pass

    @tool.command()
    @click.option("--image-encoder")
    def run(image_encoder):
        raise ValueError(str(raised.value))

    result = CliRunner().invoke(tool, ["run"])
    assert result.exit_code == 2
    assert (
        result.stderr == "error: no CLIP image encoder loaded: pass --image-encoder DIR (a CLIP vision model folder)\n"
    )


def test_a_missing_shared_folder_stops_the_run_in_one_line(tmp_path):
    """tests/conftest.py, copied into a clone whose ../shared holds only data/faces."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    (tests / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tests / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    (tmp_path / "shared" / "data" / "faces").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, lines
    assert lines == [
        f"ERROR: the tests read {tmp_path / 'shared'} beside the clone; missing there: golden/official, "
        "spec/METHOD.md, spec/official-keys-sd15.tsv, vendor (README.md, 'Running the tests')"
    ]
