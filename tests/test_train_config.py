"""Stage configurations: METHOD.md defaults, YAML file < flags, refused settings, the CLI built from the fields."""

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from dynamicid.train.cli import main
from dynamicid.train.config import AnchorConfig, ReconfigureConfig, resolve_config, write_config

REQUIRED = {"base_model": "tiny-random", "dataset": "ds", "output_dir": "run"}


def test_defaults_follow_the_method():
    anchor = AnchorConfig(**REQUIRED)
    assert (anchor.learning_rate, anchor.adam_weight_decay, anchor.train_batch_size, anchor.resolution) == (
        1e-4,
        1e-2,
        8,
        512,
    )
    assert (anchor.lora_rank, anchor.num_tokens) == (128, 4)
    assert (anchor.drop_text, anchor.drop_id, anchor.drop_both) == (0.05, 0.05, 0.05)
    reconfigure = ReconfigureConfig(**REQUIRED, anchor="a.safetensors", tokens="t")
    assert reconfigure.targets_per_identity == 32 and reconfigure.dfm_weight == reconfigure.ldc_weight == 1.0


def test_flags_override_the_yaml_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "learning_rate": 3e-4, "train_batch_size": 2}))
    config = resolve_config(AnchorConfig, path, {"train_batch_size": 4, "seed": None})
    assert (config.learning_rate, config.train_batch_size, config.seed) == (3e-4, 4, 0)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = AnchorConfig(**REQUIRED, max_steps=7, resume="latest", gradient_checkpointing=True)
    written = write_config(config, tmp_path / "config.yaml")
    assert resolve_config(AnchorConfig, written, {}) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mixed_precision": "fp8"}, "--mixed-precision 'fp8'; valid: no, fp16, bf16"),
        ({"drop_text": 0.6, "drop_id": 0.6}, "together <= 1"),
        ({"resolution": 100}, "multiple of 8"),
        ({"output_dir": ""}, "--output-dir"),
    ],
)
def test_impossible_settings_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(AnchorConfig, None, {**REQUIRED, **values})


def test_unknown_yaml_keys_list_the_valid_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rat'\]; valid: .*learning_rate"):
        resolve_config(AnchorConfig, path, {})


@pytest.mark.parametrize(("command", "cls"), [("anchor", AnchorConfig), ("reconfigure", ReconfigureConfig)])
def test_every_config_field_is_a_flag(command, cls):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for field in dataclasses.fields(cls):
        assert "--" + field.name.replace("_", "-") in result.output


def test_reconfigure_without_its_inputs_is_a_usage_error():
    result = CliRunner().invoke(
        main, ["reconfigure", "--base-model", "tiny-random", "--dataset", "d", "--output-dir", "r"]
    )
    assert result.exit_code == 2
    assert "--anchor, --tokens" in result.output


def test_convert_release_reports_a_missing_file(tmp_path):
    result = CliRunner().invoke(
        main, ["convert-release", "--saa", str(tmp_path / "no.bin"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "no.bin" in result.output
