"""The three command lines under mistakes and long runs (issue 12): one error convention, nothing written or lost.

Real photos, the tiny-random FAKE base and random FAKE weights; every error case asserts the exit code, the one
`error:` line naming the flag or file, and that no output appeared.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from dynamicid.clitools import ToolGroup
from dynamicid.curation.cli import main as curate
from dynamicid.curation.pipeline import build_dataset
from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.cli import main as infer
from dynamicid.models import WeightsFileError, load_dynamicid
from dynamicid.models.base import load_base_model
from dynamicid.models.checkpoints import read_weights_only
from dynamicid.testing import random_parts, save_random_weights
from dynamicid.train.cli import main as train
from dynamicid.train.runner import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITIES = ("obama", "biden")
SCRIPTS = Path(sys.executable).parent
# What MediaPipe, TFLite and absl print on their own (glog/absl prefixes, the XNNPACK notice).
NATIVE_NOISE = re.compile(r"^[IWEF]\d{4} |absl|XNNPACK|TensorFlow Lite|inference_feedback_manager|landmark_projection")


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_faces) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for identity in IDENTITIES:
        (folder / identity).mkdir()
        for file in sorted((shared_faces / "identities" / identity).iterdir())[:4]:
            shutil.copy(file, folder / identity / file.name)
    return folder


@pytest.fixture(scope="module")
def curated(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curated") / "ds"
    assert build_dataset(photos, out, progress=False)["kept"] >= 4
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """A truncated and a garbage safetensors file, a truncated torch .bin, and a pickle that would run code."""
    folder = tmp_path_factory.mktemp("bad")
    weights = save_random_weights(
        random_parts(load_base_model("tiny-random"), FaceAnalyzer("embedded")), folder / "ok.safetensors"
    )
    data = weights.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 64)
    torch.save({"SAA_module": {"0.weight": torch.zeros(64, 64)}}, folder / "release.bin")
    release = (folder / "release.bin").read_bytes()
    (folder / "truncated.bin").write_bytes(release[: len(release) // 2])

    class Payload:  # unpickling it would call print(); weights_only loading must refuse it
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"SAA_module": Payload()}, folder / "malicious.bin")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()} | {"ok": weights}


@pytest.fixture(scope="module")
def anchor_run(curated, tmp_path_factory) -> dict:
    """`dynamicid-train anchor` from the command line: 2 steps, a checkpoint after each."""
    run = tmp_path_factory.mktemp("anchor") / "run"
    args = anchor_args(curated, run, "--max-steps", "2", "--checkpointing-steps", "1")
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    return {"dir": run, "args": args, "result": result}


def anchor_args(dataset: Path, run: Path, *extra: str) -> list[str]:
    args = ["anchor", "--base-model", "tiny-random", "--dataset", str(dataset), "--output-dir", str(run)]
    return [*args, "--train-batch-size", "2", "--eval-samples", "2", "--report-to", "none", *extra]


# ---- item 1: corrupt weights -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("truncated_safetensors", "not a readable safetensors file .*incomplete metadata"),
        ("garbage_safetensors", "not a readable safetensors file .*header too large"),
        ("truncated_bin", "not a readable torch checkpoint"),
        ("malicious_bin", "could run code when loaded, so it was refused"),
    ],
)
def test_loaders_raise_a_typed_error_naming_the_file(bad_files, bad, why):
    path = bad_files[bad]
    loader = load_dynamicid if path.suffix == ".safetensors" else read_weights_only
    with pytest.raises(WeightsFileError, match=why) as caught:
        loader(path)
    assert caught.value.path == path and str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        ("generate --weights", "truncated_safetensors"),
        ("generate --saa", "truncated_bin"),
        ("generate --saa", "malicious_bin"),
        ("cache-tokens --anchor", "garbage_safetensors"),
        ("anchor --init-from", "truncated_safetensors"),
        ("anchor --init-from", "malicious_bin"),
    ],
)
def test_corrupt_weights_are_one_line_exit_2_and_nothing_is_written(
    command, bad, bad_files, curated, shared_faces, tmp_path, capfd
):
    name, flag = command.split()
    path = str(bad_files[bad])
    out = tmp_path / "out"
    if name == "generate":
        person = str(shared_faces / "identities" / "obama" / "obama.jpg")
        out.mkdir()
        args = ["generate", "--base-model", "tiny-random", flag, path, "--prompt", "p", "--person", person]
        result = CliRunner().invoke(infer, [*args, "--steps", "1", "--out", str(out / "x.png")])
        assert list(out.iterdir()) == []
    elif name == "cache-tokens":
        args = ["cache-tokens", "--base-model", "tiny-random", "--dataset", str(curated), flag, path]
        result = CliRunner().invoke(train, [*args, "--output", str(out)])
        assert not out.exists()
    else:
        result = CliRunner().invoke(train, anchor_args(curated, out, flag, path))
        assert not out.exists()
    assert result.exit_code == 2, result.output
    assert path in error_line(result.stderr)
    assert "this ran" not in result.output + capfd.readouterr().out  # the malicious pickle never ran


# ---- item 2: an existing run is neither overwritten nor appended to ----------------------------------------


def test_training_refuses_an_existing_run_unless_resume_or_overwrite(anchor_run, curated):
    run = anchor_run["dir"]
    weights, metrics = (run / "weights.safetensors").read_bytes(), (run / "logs" / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(train, anchor_run["args"])
    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert f"--output-dir {run} already holds a run" in line and "--resume latest" in line and "--overwrite" in line
    assert (run / "weights.safetensors").read_bytes() == weights
    assert (run / "logs" / "metrics.jsonl").read_bytes() == metrics

    both = CliRunner().invoke(train, [*anchor_run["args"], "--resume", "latest", "--overwrite"])
    assert both.exit_code == 2 and "give one of them" in error_line(both.stderr)

    again = CliRunner().invoke(train, [*anchor_run["args"], "--overwrite", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert [row["step"] for row in read_metrics(run) if "loss" in row] == [1, 2]  # a fresh log, not appended


# ---- item 3: progress ----------------------------------------------------------------------------------------


def test_training_shows_step_loss_lr_speed_and_checkpoints(anchor_run, curated, tmp_path):
    stderr = anchor_run["result"].stderr
    bar = stderr.replace("\r", "\n")
    assert re.search(r"anchor: 100%.* 2/2 \[.*<.*(it/s|s/it), loss=[\d.e+-]+, lr=[\d.e+-]+\]", bar), stderr
    assert f"step 1: checkpoint {anchor_run['dir'] / 'checkpoints' / 'checkpoint-1'}" in stderr

    quiet = CliRunner().invoke(train, anchor_args(curated, tmp_path / "r", "--max-steps", "1", "--no-progress"))
    assert quiet.exit_code == 0, quiet.output
    assert "loss=" not in quiet.stderr and "it/s" not in quiet.stderr


# ---- item 7 (and 3, 6): the tiny-random smoke path stays small ---------------------------------------------


def test_tiny_random_smoke_run_picks_small_sizes_and_says_so(anchor_run, curated, tmp_path):
    assert "tiny-random base: --resolution 64 --lora-rank 4" in anchor_run["result"].stderr
    weights = anchor_run["dir"] / "weights.safetensors"
    tokens = tmp_path / "tokens"
    args = ["cache-tokens", "--base-model", "tiny-random", "--anchor", str(weights), "--dataset", str(curated)]
    result = CliRunner().invoke(train, [*args, "--output", str(tokens)])
    assert result.exit_code == 0, result.output
    assert "cache-tokens: 100%" in result.stderr
    run = tmp_path / "run2"
    args = ["reconfigure", "--base-model", "tiny-random", "--anchor", str(weights), "--tokens", str(tokens)]
    args += ["--dataset", str(curated), "--output-dir", str(run), "--max-steps", "2", "--report-to", "none"]
    result = CliRunner().invoke(train, [*args, "--eval-samples", "1", "--targets-per-identity", "4"])
    assert result.exit_code == 0, result.output
    assert "tiny-random base: --resolution 64 --imr-dim 64" in result.stderr
    assert (run / "weights.safetensors").stat().st_size < 5_000_000
    # item 6: weights and token files follow the umask like config.yaml (safetensors alone makes them 0600)
    mode = (run / "config.yaml").stat().st_mode & 0o777
    assert (run / "weights.safetensors").stat().st_mode & 0o777 == mode
    assert (tokens / "tokens.safetensors").stat().st_mode & 0o777 == mode


# ---- item 5: one convention, flags checked before anything is loaded or written ------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("curate", ["build", "PHOTOS", "OUT", "--per-identity", "0"], "--per-identity must be >= 1, got 0"),
        ("curate", ["build", "PHOTOS", "OUT", "--min-face-size", "-5"], "--min-face-size must be >= 0, got -5"),
        ("curate", ["build", "PHOTOS", "OUT", "--workers", "0"], "--workers must be >= 1, got 0"),
        ("train", ["anchor", "--dataset", "DATASET", "--lora-rank", "-4"], "--lora-rank must be >= 1, got -4"),
        ("train", ["anchor", "--dataset", "DATASET", "--max-steps", "-1"], "--max-steps must be >= 1, got -1"),
        ("train", ["anchor", "--dataset", "PHOTOS"], "--dataset .* is not a dynamicid-curate output folder"),
        ("train", ["cache-tokens", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("infer", ["generate", "--steps", "0"], "--steps must be >= 1, got 0"),
        ("infer", ["generate", "--face-backend", "dlib"], "--face-backend: 'dlib' is not one of"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag_exit_2_nothing_written(tool, args, message, photos, curated, tmp_path):
    out = tmp_path / "out"
    paths = {"PHOTOS": str(photos), "OUT": str(out), "DATASET": str(curated)}
    args = [paths.get(a, a) for a in args]
    if tool == "train" and args[0] == "anchor":
        args += ["--base-model", "tiny-random", "--output-dir", str(out)]
    if tool == "train" and args[0] == "cache-tokens":
        args += ["--base-model", "tiny-random", "--anchor", "a", "--dataset", str(curated), "--output", str(out)]
    if tool == "infer":
        args += ["--base-model", "tiny-random", "--weights", "w", "--prompt", "p", "--person", "x.jpg"]
        args += ["--out", str(out / "x.png")]
    result = CliRunner().invoke({"curate": curate, "train": train, "infer": infer}[tool], args)
    assert result.exit_code == 2, result.output
    assert re.search(message, error_line(result.stderr)), result.stderr
    assert not out.exists()  # no config.yaml, no work folder


@click.group(cls=ToolGroup)
def fake_tool() -> None:
    """A FAKE command line: commands that fail the three ways a real one can."""


@fake_tool.command(interrupted="rerun to resume")
@click.argument("kind")
def fail(kind: str) -> None:
    raise {
        "input": ValueError("--thing x: no such thing"),
        "bug": ZeroDivisionError("oops"),
        "ctrl-c": KeyboardInterrupt,
    }[kind]


@pytest.mark.parametrize(
    ("kind", "code", "line"),
    [
        ("input", 2, "error: --thing x: no such thing"),
        ("bug", 1, "error: internal error ZeroDivisionError: oops (rerun with --verbose for the traceback)"),
        ("ctrl-c", 130, "interrupted: rerun to resume"),
    ],
)
def test_the_convention_exit_codes_and_lines(kind, code, line, monkeypatch):
    monkeypatch.setenv("DYNAMICID_VERBOSE", "0")  # restored after the test, though --verbose sets it
    result = CliRunner().invoke(fake_tool, ["fail", kind])
    assert (result.exit_code, result.stderr.strip()) == (code, line)
    verbose = CliRunner().invoke(fake_tool, ["fail", kind, "--verbose"])
    assert verbose.exit_code == code
    assert ("Traceback" in verbose.stderr) == (kind == "bug")


# ---- item 4: no native log noise -----------------------------------------------------------------------------


def test_curate_and_infer_print_no_mediapipe_tflite_or_absl_lines(photos, bad_files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DYNAMICID_VERBOSE"}
    curate_run = subprocess.run(
        [SCRIPTS / "dynamicid-curate", "build", photos, tmp_path / "ds", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert curate_run.returncode == 0, curate_run.stderr
    person = sorted((photos / "obama").iterdir())[0]
    args = ["--prompt", "p", "--person", person, "--steps", "2", "--out", tmp_path / "x.png"]
    infer_run = subprocess.run(
        [SCRIPTS / "dynamicid-infer", "generate", "--base-model", "tiny-random", "--weights", bad_files["ok"], *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert infer_run.returncode == 0, infer_run.stderr
    for run in (curate_run, infer_run):
        assert [line for line in run.stderr.splitlines() if NATIVE_NOISE.search(line)] == [], run.stderr


# ---- Ctrl-C: exit 130 with how to resume; the rerun resumes, or nothing was written -------------------------


def interrupt_when(command: list, ready, tmp_path: Path, timeout: float = 300) -> tuple[int, str]:
    """Start `command`, send SIGINT once `ready(stderr_so_far)` holds, return (exit code, stderr)."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy machine
        # A job started in the background by a shell (as CI may be) inherits SIGINT ignored; the child must not.
        process = subprocess.Popen(
            [str(c) for c in command],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + timeout
        while not ready(log.read_text()) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"finished before it could be interrupted: {log.read_text()}"
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)
    return code, log.read_text()


def last_line(stderr: str) -> str:
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_ctrl_c_during_build_exits_130_and_the_rerun_resumes(photos, tmp_path):
    out = tmp_path / "ds"

    def detect_started(_: str) -> bool:
        return any((out / ".work" / "stores").glob("detect-*/part-*.parquet"))  # a detect batch is stored

    code, stderr = interrupt_when([SCRIPTS / "dynamicid-curate", "build", photos, out], detect_started, tmp_path)
    assert code == 130, stderr
    assert (
        last_line(stderr) == "interrupted: finished work is kept in the work folder; rerun the same command to resume"
    )
    assert not (out / "summary.json").exists()
    rerun = CliRunner().invoke(curate, ["build", str(photos), str(out), "--json", "--no-progress"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["stages"]["detect"]["reused"] > 0  # detection picked up, not redone


def test_ctrl_c_during_anchor_exits_130_and_resume_latest_continues(curated, tmp_path):
    run = tmp_path / "run"
    args = anchor_args(curated, run, "--max-steps", "100000", "--checkpointing-steps", "1")
    code, stderr = interrupt_when(
        [SCRIPTS / "dynamicid-train", *args], lambda text: "step 1: checkpoint" in text, tmp_path
    )
    assert code == 130, stderr
    assert last_line(stderr).startswith("interrupted: rerun with --resume latest")
    assert not list((run / "checkpoints").glob("*.partial"))
    result = CliRunner().invoke(train, [*args[:-4], "--max-steps", "2", "--resume", "latest", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and (run / "weights.safetensors").is_file()


def test_ctrl_c_during_generate_exits_130_and_writes_nothing(bad_files, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    person = sorted((photos / "obama").iterdir())[0]
    command = [SCRIPTS / "dynamicid-infer", "generate", "--base-model", "tiny-random", "--weights", bad_files["ok"]]
    command += ["--prompt", "p", "--person", person, "--steps", "900", "--out", out / "x.png"]  # minutes of steps
    code, stderr = interrupt_when(command, lambda text: re.search(r" [1-9]\d*/900 ", text) is not None, tmp_path)
    assert code == 130, stderr
    assert last_line(stderr) == "interrupted: nothing was written (outputs appear only once complete)"
    assert list(out.iterdir()) == []


# ---- item 6: help texts say what can be typed ----------------------------------------------------------------


def test_help_lists_only_what_the_command_reads_and_what_can_be_typed():
    def help_of(tool, *command: str) -> str:
        result = CliRunner().invoke(tool, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output

    for stage in ("scan", "detect", "align", "label", "write"):
        assert "--per-identity" not in help_of(curate, stage), stage
    assert "--per-identity" in help_of(curate, "dedupe")  # its near-duplicate rule reads it (curation/chain.py)
    assert "--cluster" not in help_of(curate, "detect")
    assert "--per-identity" in help_of(curate, "select") and "--cluster" in help_of(curate, "identify")
    assert "--insightface-root" in help_of(curate, "build")  # the README advertises it
    for command in ("anchor", "reconfigure", "cache-tokens"):
        text = help_of(train, command)
        assert "[default: None]" not in text and "None keeps all" not in text and "--verbose" in text
    assert "(0 keeps all)" in help_of(train, "anchor")
    assert "[default: None]" not in help_of(infer, "generate")


def test_cross_flag_settings_name_both_flags(photos, tmp_path):
    result = CliRunner().invoke(
        curate, ["build", str(photos), str(tmp_path / "o"), "--per-identity", "2", "--min-per-identity", "3"]
    )
    assert result.exit_code == 2
    assert "--min-per-identity 3 is larger than --per-identity 2" in error_line(result.stderr)
    assert not (tmp_path / "o").exists()


def test_more_denoising_steps_than_the_scheduler_has_is_an_input_error(bad_files, photos, tmp_path):
    person = str(sorted((photos / "obama").iterdir())[0])
    args = ["generate", "--base-model", "tiny-random", "--weights", str(bad_files["ok"]), "--prompt", "p"]
    result = CliRunner().invoke(infer, [*args, "--person", person, "--steps", "1000", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert "(--steps) must be in 1..999, got 1000" in error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []
