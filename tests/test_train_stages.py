"""The two training stages on a dataset curated here from the real photos, with the tiny-random FAKE base.

One anchoring run and one reconfiguration run are shared by the tests of this module (module fixtures).
"""

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from dynamicid.curation.pipeline import build_dataset
from dynamicid.models import (
    FaceEncoder,
    load_dynamicid,
    load_ip_adapter_faceid,
    load_release_checkpoint,
    saa_processors,
    save_dynamicid,
)
from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning import Conditioner
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT, CheckpointMetadata
from dynamicid.train.anchor import AnchorModel, AnchorObjective, train_anchor
from dynamicid.train.cache_tokens import cache_tokens
from dynamicid.train.cli import main
from dynamicid.train.config import AnchorConfig, ReconfigureConfig
from dynamicid.train.data import ANCHOR_COLUMNS, AnchorSamples, load_curated
from dynamicid.train.reconfigure import train_reconfigure
from dynamicid.train.runner import FixedEvaluation, checkpoint_dirs, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITIES = ("obama", "biden", "Matt_Damon", "kit_harington")
TINY = {"base_model": "tiny-random", "resolution": 64, "report_to": "none"}
SMALL_IMR = {"train_batch_size": 2, "targets_per_identity": 2, "imr_dim": 32, "imr_heads": 2, "imr_dim_head": 16}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_faces) -> Path:
    """A dataset curated from 5 photos of each of 4 real identities (copied to tmp first)."""
    photos = tmp_path_factory.mktemp("photos")
    for identity in IDENTITIES:
        files = sorted((shared_faces / "identities" / identity).iterdir())[:5]
        (photos / identity).mkdir()
        for file in files:
            shutil.copy(file, photos / identity / file.name)
    out = tmp_path_factory.mktemp("curated")
    summary = build_dataset(photos, out, per_identity=5, progress=False)
    assert summary["identities"] == len(IDENTITIES) and summary["kept"] >= 8
    return out


def frozen_checksums(base, skip_saa: bool) -> dict[str, str]:
    """sha256 of every tensor of the frozen modules (the SAA processors' own weights left out when asked)."""
    sums = {}
    for part in ("unet", "vae", "text_encoder", "image_encoder"):
        for name, tensor in getattr(base, part).state_dict().items():
            if skip_saa and ".processor." in name:
                continue
            sums[f"{part}.{name}"] = hashlib.sha256(tensor.detach().cpu().numpy().tobytes()).hexdigest()
    return sums


@pytest.fixture(scope="module")
def anchor_run(curated, tmp_path_factory):
    base = load_base_model("tiny-random")
    before = frozen_checksums(base, skip_saa=True)
    config = AnchorConfig(
        **{**TINY, "report_to": "tensorboard"},
        dataset=str(curated),
        output_dir=str(tmp_path_factory.mktemp("anchor")),
        train_batch_size=4,
        max_steps=30,
        learning_rate=1e-2,
        lora_rank=4,
        checkpointing_steps=10,
        checkpoints_total_limit=2,
        eval_samples=8,
        validation_steps=30,
        validation_inference_steps=2,
    )
    weights = train_anchor(config, base=base)
    return {"config": config, "base": base, "before": before, "weights": weights}


def test_anchoring_lowers_the_fixed_set_loss(anchor_run):
    metrics = read_metrics(anchor_run["config"].output_dir)
    evals = [row["eval_loss"] for row in metrics if "eval_loss" in row]
    assert evals[-1] <= 0.8 * evals[0], evals
    assert sum("loss" in row for row in metrics) == 30


def test_anchoring_trains_only_saa_and_face_encoder(anchor_run):
    base = anchor_run["base"]
    assert frozen_checksums(base, skip_saa=True) == anchor_run["before"]
    assert all(not p.requires_grad for n, p in base.unet.named_parameters() if ".processor." not in n)
    run = Path(anchor_run["config"].output_dir)
    first = load_file(str(checkpoint_dirs(run)[0] / "weights.safetensors"))
    final = load_file(str(anchor_run["weights"]))
    assert {k.split(".")[0] for k in final} == {"saa", "face_encoder"}
    assert all(not torch.equal(first[k], final[k]) for k in final), "every trained tensor moves"


def test_anchor_run_folder(anchor_run):
    run = Path(anchor_run["config"].output_dir)
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint-20", "checkpoint-30"]  # last 2 kept
    assert (run / "config.yaml").read_text().count("learning_rate: 0.01") == 1
    assert list((run / "samples" / "step-000030").glob("*.png"))
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert load_dynamicid(run / "weights.safetensors").metadata.source == "random"


def test_saved_anchor_weights_reload_with_the_same_outputs(anchor_run, curated):
    weights = load_dynamicid(anchor_run["weights"], lora_rank=4, num_tokens=4)
    assert weights.metadata.id_embed_model == "dlib-resnet-128" and weights.metadata.id_embed_dim == 128
    fresh = load_base_model("tiny-random")
    weights.load_saa_into(fresh.unet)
    model = AnchorModel(fresh.unet, weights.build_face_encoder())
    samples = AnchorSamples(load_curated(curated, ANCHOR_COLUMNS), Conditioner.from_parts(fresh).token_ids, 64)
    batch = torch.utils.data.default_collate([samples[i] for i in range(8)])
    evaluation = FixedEvaluation(AnchorObjective(fresh, torch.float32), batch, seed=0)
    logged = [row["eval_loss"] for row in read_metrics(anchor_run["config"].output_dir) if "eval_loss" in row][-1]
    assert evaluation(model)["eval_loss"] == pytest.approx(logged, rel=1e-5)


def _pipeline_for(weights: list[Path]):
    """A fresh tiny-random pipeline loading the saved weights the way users do (`load_dynamicid`)."""
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.infer import DynamicIDPipeline

    pipe = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_dynamicid([str(w) for w in weights], face_analyzer=FaceAnalyzer("embedded"))
    return pipe


def _curated_reference(row: dict, **labels):
    """A curated row (decoded by datasets) as the pipeline's reference."""
    from dynamicid.infer.references import Reference

    image = np.asarray(row["image"].convert("RGB"))
    return Reference.from_crop(
        image, kps5=row["kps5"], embedding=row["embedding"], landmarks=row["landmarks"], **labels
    )


def _generate(pipe, config, prompt: str, people: list) -> np.ndarray:
    """One image with the run's validation settings (--validation-inference-steps, --validation-guidance-scale)."""
    settings = {"num_inference_steps": config.validation_inference_steps, "height": config.resolution}
    settings |= {"guidance_scale": config.validation_guidance_scale, "width": config.resolution}
    result = pipe(prompt, people, generator=torch.Generator().manual_seed(config.seed), **settings)
    return np.asarray(result.images[0])


def test_anchor_sample_images_are_the_pipelines_images(anchor_run, curated):
    """The images written at the last step (weights = the final weights) are what `DynamicIDPipeline` makes from
    the saved file for the first curated rows, their captions, the run's seed and validation settings."""
    import datasets
    from PIL import Image

    from dynamicid.infer import Person

    config = anchor_run["config"]
    rows = datasets.load_dataset(str(curated), split="train")
    pipe = _pipeline_for([anchor_run["weights"]])
    written = sorted((Path(config.output_dir) / "samples" / "step-000030").glob("*.png"))
    assert len(written) == config.num_validation_images == 2
    for index, path in enumerate(written):
        row = rows[index]
        expected = _generate(pipe, config, row["caption"], [Person(_curated_reference(row))])
        assert np.array_equal(np.asarray(Image.open(path)), expected), path


def test_resume_matches_a_straight_run_bit_for_bit(curated, tmp_path):
    settings = {**TINY, "dataset": str(curated), "train_batch_size": 2, "lora_rank": 4, "eval_samples": 2}
    settings |= {"learning_rate": 1e-3, "checkpointing_steps": 3}
    straight = train_anchor(AnchorConfig(**settings, output_dir=str(tmp_path / "a"), max_steps=6))
    train_anchor(AnchorConfig(**settings, output_dir=str(tmp_path / "b"), max_steps=3))
    resumed = train_anchor(AnchorConfig(**settings, output_dir=str(tmp_path / "b"), max_steps=6, resume="latest"))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [row["step"] for row in read_metrics(tmp_path / "b") if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def tokens(anchor_run, curated, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    arguments = ["cache-tokens", "--anchor", str(anchor_run["weights"]), "--dataset", str(curated)]
    result = CliRunner().invoke(main, [*arguments, "--output", str(folder), "--base-model", "tiny-random"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def reconfigure_run(anchor_run, curated, tokens, tmp_path_factory):
    base = load_base_model("tiny-random")
    config = ReconfigureConfig(
        **TINY,
        dataset=str(curated),
        output_dir=str(tmp_path_factory.mktemp("reconfigure")),
        anchor=str(anchor_run["weights"]),
        tokens=str(tokens),
        **SMALL_IMR,
        max_steps=8,
        learning_rate=1e-3,
        checkpointing_steps=8,
        eval_samples=4,
        validation_steps=8,
        validation_inference_steps=2,
    )
    before = frozen_checksums(base, skip_saa=True)
    weights = train_reconfigure(config, base=base)
    return {"config": config, "base": base, "before": before, "weights": weights}


def test_reconfiguration_logs_dfm_and_ldc_and_lowers_the_fixed_set_loss(reconfigure_run):
    metrics = read_metrics(reconfigure_run["config"].output_dir)
    steps = [row for row in metrics if "loss" in row]
    assert len(steps) == 8 and all(row["dfm"] > 0 and row["ldc"] > 0 for row in steps)
    assert all(row["loss"] == pytest.approx(row["dfm"] + row["ldc"], rel=1e-5) for row in steps)
    evals = [row for row in metrics if "eval_loss" in row]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_dfm"] < evals[0]["eval_dfm"]
    assert list((Path(reconfigure_run["config"].output_dir) / "samples" / "step-000008").glob("*.png"))


def test_reconfigure_sample_images_are_the_pipelines_edits(reconfigure_run, anchor_run, curated):
    """The reconfiguration stage's images: the first evaluation identity's source, rewritten by the IMR towards
    each target's landmarks and labels, as `DynamicIDPipeline` makes it from the two saved files."""
    import datasets
    from PIL import Image

    from dynamicid.infer import Person
    from dynamicid.train.data import IdentitySamples

    config = reconfigure_run["config"]
    rows = datasets.load_dataset(str(curated), split="train")
    source, targets = IdentitySamples(
        rows, None, config.resolution, config.targets_per_identity, config.seed + 7919
    ).draw(0)
    features = rows.features

    def labelled(index: int):
        row = rows[index]
        expression = features["expression"].int2str(row["expression"])
        return _curated_reference(row, expression=expression, pose=features["pose_bin"].int2str(row["pose_bin"]))

    pipe = _pipeline_for([anchor_run["weights"], reconfigure_run["weights"]])
    written = sorted((Path(config.output_dir) / "samples" / "step-000008").glob("*.png"))
    assert len(written) == config.num_validation_images
    for path, target in zip(written, targets, strict=False):
        person = Person(labelled(source), landmark_image=labelled(target))
        expected = _generate(pipe, config, RECONFIGURE_UNET_PROMPT, [person])
        assert np.array_equal(np.asarray(Image.open(path)), expected), path


def test_reconfiguration_resumes_bit_for_bit(reconfigure_run, tmp_path):
    settings = dataclasses.asdict(reconfigure_run["config"]) | {"checkpointing_steps": 2, "eval_samples": 1}
    settings |= {"train_batch_size": 1, "targets_per_identity": 1}
    straight = train_reconfigure(ReconfigureConfig(**settings | {"output_dir": str(tmp_path / "a"), "max_steps": 4}))
    train_reconfigure(ReconfigureConfig(**settings | {"output_dir": str(tmp_path / "b"), "max_steps": 2}))
    resumed = ReconfigureConfig(**settings | {"output_dir": str(tmp_path / "b"), "max_steps": 4, "resume": "latest"})
    a, b = load_file(str(straight)), load_file(str(train_reconfigure(resumed)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconfiguration_trains_only_imr_and_keypoint_encoder(reconfigure_run):
    base = reconfigure_run["base"]
    anchor = load_dynamicid(reconfigure_run["config"].anchor)
    saa = {k: v for k, v in base.unet.state_dict().items() if ".processor." in k}
    assert all(torch.equal(anchor.state_dicts["saa"][k], v) for k, v in saa.items())  # SAA as anchored
    assert frozen_checksums(base, skip_saa=True) == reconfigure_run["before"]
    weights = load_dynamicid(reconfigure_run["weights"])
    assert weights.metadata.parts == ["imr", "keypoint_encoder"]
    assert weights.metadata.source.startswith("anchor:")
    imr, keypoints = weights.build_imr(), weights.build_keypoint_encoder()
    assert imr.config["dim"] == 32 and keypoints.embedding_dim == anchor.metadata.cross_attention_dim
    assert len(saa_processors(base.unet)) > 0


def _launch(stage: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """Two CPU processes through accelerate (gloo); see README "Training" for the command."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port, so parallel test runs do not collide on 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", str(port)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "dynamicid.train", stage, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _rows_seen(run: Path, rank: int) -> list[int]:
    lines = (run / "logs" / f"samples-rank{rank}.txt").read_text().splitlines()
    return [int(v) for line in lines for v in line.split()[1:]]


def test_two_processes_train_both_stages_on_disjoint_shares(curated, tokens, anchor_run, tmp_path):
    common = ["--base-model", "tiny-random", "--dataset", str(curated), "--resolution", "64", "--report-to", "none"]
    common += ["--record-samples", "--eval-samples", "2", "--max-steps", "2", "--checkpointing-steps", "2"]
    anchor = _launch(
        "anchor", [*common, "--output-dir", str(tmp_path / "a"), "--lora-rank", "4", "--train-batch-size", "2"]
    )
    assert anchor.returncode == 0, anchor.stderr[-3000:]
    assert "MULTI_CPU" in anchor.stdout and "gloo" in anchor.stdout
    imr = ["--targets-per-identity", "1", "--imr-dim", "32", "--imr-heads", "2", "--imr-dim-head", "16"]
    inputs = ["--anchor", str(anchor_run["weights"]), "--tokens", str(tokens)]
    reconfigure = _launch("reconfigure", [*common, *imr, *inputs, "--output-dir", str(tmp_path / "r")])
    assert reconfigure.returncode == 0, reconfigure.stderr[-3000:]
    for run, parts in ((tmp_path / "a", ["face_encoder", "saa"]), (tmp_path / "r", ["imr", "keypoint_encoder"])):
        assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint-2"]
        assert sorted(p.name for p in checkpoint_dirs(run)[0].glob("random_states_*.pkl")) == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]
        assert load_dynamicid(checkpoint_dirs(run)[0] / "weights.safetensors").metadata.parts == parts
        assert load_dynamicid(run / "weights.safetensors").metadata.parts == parts
    rank0, rank1 = _rows_seen(tmp_path / "a", 0), _rows_seen(tmp_path / "a", 1)
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
    identities0, identities1 = _rows_seen(tmp_path / "r", 0), _rows_seen(tmp_path / "r", 1)
    assert identities0 and identities1 and not set(identities0) & set(identities1)  # rows of other identities


# ---- bad inputs stop at start-up with a message naming the problem ----


def _rewrite(curated: Path, out: Path, change) -> Path:
    """A copy of the curated dataset with `change(dataset)` applied, written as the curation writer does."""
    import datasets

    dataset = change(datasets.load_dataset(str(curated), split="train"))
    dataset.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    return out


def test_dataset_missing_a_column_is_refused_with_the_valid_names(curated, tmp_path):
    broken = _rewrite(curated, tmp_path / "ds", lambda d: d.remove_columns(["kps5"]))
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(broken), "--output-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert "no column(s) kps5" in result.output and "embedding_model" in result.output
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_empty_dataset_is_refused(curated, tmp_path):
    empty = _rewrite(curated, tmp_path / "ds", lambda d: d.select([]))
    with pytest.raises(ValueError, match="is empty"):
        train_anchor(AnchorConfig(**TINY, dataset=str(empty), output_dir=str(tmp_path / "r")))


def test_embedding_width_that_does_not_fit_the_weights_is_refused(curated, tmp_path):
    metadata = CheckpointMetadata(cross_attention_dim=32, num_tokens=4, id_embed_dim=512, clip_embed_dim=48)
    weights = save_dynamicid(
        tmp_path / "arcface.safetensors",
        metadata=metadata,
        face_encoder=FaceEncoder(cross_attention_dim=32, id_embeddings_dim=512, clip_embeddings_dim=48),
    )
    config = AnchorConfig(**TINY, dataset=str(curated), output_dir=str(tmp_path / "r"), init_from=str(weights))
    with pytest.raises(ValueError, match=r"id_embed_dim=512 .*width 128"):
        train_anchor(config)
    with pytest.raises(ValueError, match=r"width 512 .*has width 128"):
        cache_tokens(weights, curated, tmp_path / "tokens", base_model="tiny-random")


def test_base_model_folder_without_unet_is_refused(curated, tmp_path):
    base = tmp_path / "sd15"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (base / part).mkdir(parents=True)
    config = AnchorConfig(**{**TINY, "base_model": str(base)}, dataset=str(curated), output_dir=str(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match=r"has no unet subfolder"):
        train_anchor(config)
    assert not (tmp_path / "r").exists()


# ---- starting points and precision settings ----


def _release_style_files(tmp_path: Path) -> dict[str, Path]:
    """A tiny IP-Adapter FaceID-Plus file and a release SAA file for the tiny UNet (random, seeded values)."""
    from dynamicid.models import install_saa

    torch.manual_seed(1)
    unet = load_base_model("tiny-random").unet
    install_saa(unet, rank=4, num_tokens=4)
    for p in unet.parameters():
        p.data.normal_()
    index_keyed = {
        f"{i}.{key}": tensor.clone()
        for i, processor in enumerate(saa_processors(unet).values())
        for key, tensor in processor.state_dict().items()
    }
    encoder = {
        key: torch.randn_like(t)
        for key, t in FaceEncoder(cross_attention_dim=32, id_embeddings_dim=128, clip_embeddings_dim=48)
        .state_dict()
        .items()
    }
    torch.save({"image_proj": encoder, "ip_adapter": index_keyed}, tmp_path / "ip-adapter-faceid-plusv2.bin")
    torch.save({"SAA_module": index_keyed}, tmp_path / "SAA.bin")
    return {"ip-adapter-faceid": tmp_path / "ip-adapter-faceid-plusv2.bin", "release": tmp_path / "SAA.bin"}


@pytest.mark.parametrize("kind", ["dynamicid", "ip-adapter-faceid", "release"])
def test_init_from_starts_from_the_given_weights_and_records_them(kind, anchor_run, curated, tmp_path):
    init = anchor_run["weights"] if kind == "dynamicid" else _release_style_files(tmp_path)[kind]
    config = AnchorConfig(
        **TINY,
        dataset=str(curated),
        output_dir=str(tmp_path / "run"),
        init_from=str(init),
        lora_rank=4,
        train_batch_size=2,
        max_steps=1,
        learning_rate=0.0,  # AdamW with lr 0 leaves every weight as loaded
        eval_samples=2,
    )
    weights = load_dynamicid(train_anchor(config))
    assert weights.metadata.source.startswith(f"{kind}:{init.name}:")
    expected = load_base_model("tiny-random").unet
    if kind == "dynamicid":
        source = load_dynamicid(init)
        source.load_saa_into(expected)
        assert all(
            torch.equal(v, weights.state_dicts["face_encoder"][k])
            for k, v in source.state_dicts["face_encoder"].items()
        )
    else:
        loaded = load_ip_adapter_faceid(init) if kind == "ip-adapter-faceid" else load_release_checkpoint(init)
        loaded.load_saa_into(expected)
        if kind == "ip-adapter-faceid":
            encoder = loaded.build_face_encoder().state_dict()
            assert all(torch.equal(v, weights.state_dicts["face_encoder"][k]) for k, v in encoder.items())
    saa = {k: v for k, v in expected.state_dict().items() if ".processor." in k}
    trained = weights.state_dicts["saa"]
    assert saa.keys() == trained.keys() and all(torch.equal(trained[k], v) for k, v in saa.items())


def test_gradient_checkpointing_gives_the_same_steps(curated, tmp_path):
    settings = {**TINY, "dataset": str(curated), "train_batch_size": 2, "lora_rank": 4, "eval_samples": 2}
    settings |= {"max_steps": 2, "learning_rate": 1e-3}
    plain = load_file(str(train_anchor(AnchorConfig(**settings, output_dir=str(tmp_path / "a")))))
    config = AnchorConfig(**settings, output_dir=str(tmp_path / "b"), gradient_checkpointing=True)
    recomputed = load_file(str(train_anchor(config)))
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)


def test_gradient_accumulation_steps_once_per_group_of_batches(curated, tmp_path):
    config = AnchorConfig(
        **TINY,
        dataset=str(curated),
        output_dir=str(tmp_path / "run"),
        train_batch_size=2,
        lora_rank=4,
        eval_samples=2,
        max_steps=2,
        gradient_accumulation_steps=2,
        record_samples=True,
    )
    train_anchor(config)
    batches = (tmp_path / "run" / "logs" / "samples-rank0.txt").read_text().splitlines()
    assert [line.split()[0] for line in batches] == ["1", "1", "2", "2"]
    assert [row["step"] for row in read_metrics(tmp_path / "run") if "loss" in row] == [1, 2]


def test_command_line_run_from_yaml_in_bf16(curated, tmp_path):
    """`python -m dynamicid.train anchor --config run.yaml` with a flag on top (a fresh process: accelerate's
    precision is fixed per process)."""
    settings = {**TINY, "dataset": str(curated), "output_dir": str(tmp_path / "run"), "train_batch_size": 2}
    settings |= {"lora_rank": 4, "eval_samples": 2, "max_steps": 3, "mixed_precision": "fp16"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "dynamicid.train", "anchor", "--config", str(tmp_path / "run.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--mixed-precision", "bf16"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Mixed precision type: bf16" in result.stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["mixed_precision"] == "bf16"
    weights = load_file(str(tmp_path / "run" / "weights.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # trained weights stay float32
    losses = [row["loss"] for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)


def test_token_cache_must_match_the_dataset_rows_and_the_anchor(curated, tokens, anchor_run, tmp_path):
    settings = {**TINY, "output_dir": str(tmp_path / "r"), "tokens": str(tokens)}
    fewer = _rewrite(curated, tmp_path / "ds", lambda d: d.select(range(len(d) - 1)))
    with pytest.raises(ValueError, match="cached from other dataset rows"):
        train_reconfigure(ReconfigureConfig(**settings, dataset=str(fewer), anchor=str(anchor_run["weights"])))
    other_anchor = sorted(checkpoint_dirs(anchor_run["config"].output_dir))[0] / "weights.safetensors"
    with pytest.raises(ValueError, match="cached with other anchor weights"):
        train_reconfigure(ReconfigureConfig(**settings, dataset=str(curated), anchor=str(other_anchor)))
    assert not (tmp_path / "r").exists()


def test_trained_weights_of_both_stages_drive_inference(anchor_run, reconfigure_run, shared_faces, tmp_path):
    """The whole path: curated photos -> anchoring -> reconfiguration -> `dynamicid-infer generate` with both files."""
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from dynamicid.infer.cli import main as infer
    from dynamicid.models import IMR

    out = tmp_path / "out.png"
    people = []
    for identity, expression in (("obama", "surprised"), ("biden", "happy")):
        people += [
            "--person",
            str(shared_faces / "identities" / identity / f"{identity}.jpg"),
            "--expression",
            expression,
        ]
    arguments = ["generate", "--base-model", "tiny-random", "--prompt", "two friends", "--steps", "2"]
    arguments += ["--weights", str(anchor_run["weights"]), "--weights", str(reconfigure_run["weights"])]
    seen = {"imr": [], "unet": []}

    def observe(module, args, kwargs, output):
        if isinstance(module, IMR):
            seen["imr"].append((module.state_dict(), output.detach().clone()))
        elif isinstance(module, UNet2DConditionModel):
            seen["unet"].append(kwargs["encoder_hidden_states"].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(observe, with_kwargs=True)
    try:
        result = CliRunner().invoke(infer, [*arguments, *people, "--size", "64x48", "--out", str(out), "--json"])
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 48)
    sidecar = yaml.safe_load(out.with_suffix(".json").read_text())
    assert [person["target_expression"] for person in sidecar["people"]] == ["surprised", "happy"]
    assert all(person["edited"] for person in sidecar["people"])
    # The trained IMR ran once per person and its tokens are the ones the UNet attends to (conditional half).
    trained = load_dynamicid(reconfigure_run["weights"]).state_dicts["imr"]
    assert len(seen["imr"]) == 2
    assert all(torch.equal(state[k], trained[k]) for state, _ in seen["imr"] for k in trained)
    rewritten = torch.cat([tokens for _, tokens in seen["imr"]], dim=1)[0]  # (2 people x 4 tokens, C)
    torch.testing.assert_close(seen["unet"][0][1, -8:], rewritten, rtol=0, atol=0)
    unedited = [p for p in people if p not in ("--expression", "surprised", "happy")]
    plain = tmp_path / "plain.png"
    result = CliRunner().invoke(infer, [*arguments, *unedited, "--size", "64x48", "--out", str(plain)])
    assert result.exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


# ---- SDXL, the second base family (tiny-random-sdxl FAKE) ----


def _fake_ip_adapter_faceid_sdxl(path: Path, id_dim: int) -> Path:
    """A FAKE IP-Adapter FaceID-PlusV2 SDXL checkpoint for the tiny SDXL UNet (`image_proj.` + index-keyed
    `ip_adapter.` safetensors keys, its published layout; the real weights cannot be downloaded)."""
    from dynamicid.models import install_saa
    from dynamicid.testing import save_ip_adapter_faceid

    base = load_base_model("tiny-random-sdxl", seed=1)
    install_saa(base.unet, rank=4, num_tokens=4)
    encoder = FaceEncoder(
        cross_attention_dim=base.cross_attention_dim, id_embeddings_dim=id_dim, clip_embeddings_dim=48
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for p in [*saa_processors(base.unet).values(), encoder]:
            for tensor in p.parameters():
                tensor.data.normal_(std=0.02)
    return save_ip_adapter_faceid(base.unet, encoder, path)


def test_whole_path_on_tiny_random_sdxl(curated, anchor_run, shared_faces, tmp_path):
    """curate -> anchor (warm-started from IP-Adapter FaceID-PlusV2 SDXL weights) -> cache-tokens -> reconfigure ->
    `dynamicid-infer generate` with two people, on the SDXL-shaped FAKE base."""
    from diffusers import UNet2DConditionModel

    from dynamicid.infer.cli import main as infer
    from dynamicid.models import IMR
    from dynamicid.train.data import embedding_info

    sdxl = {**TINY, "base_model": "tiny-random-sdxl", "dataset": str(curated)}
    _, id_dim = embedding_info(load_curated(curated, ANCHOR_COLUMNS), curated)
    init = _fake_ip_adapter_faceid_sdxl(tmp_path / "ip-adapter-faceid-plusv2_sdxl.safetensors", id_dim)
    anchor_config = AnchorConfig(
        **sdxl,
        output_dir=str(tmp_path / "anchor"),
        init_from=str(init),
        lora_rank=4,
        train_batch_size=4,
        max_steps=12,
        learning_rate=1e-2,
        eval_samples=8,
        validation_steps=12,
        validation_inference_steps=2,
    )
    anchor = train_anchor(anchor_config)
    metadata = load_dynamicid(anchor).metadata
    assert metadata.base_family == "sdxl" and metadata.cross_attention_dim == 64
    assert metadata.source.startswith(f"ip-adapter-faceid:{init.name}:")
    evals = [row["eval_loss"] for row in read_metrics(tmp_path / "anchor") if "eval_loss" in row]
    assert evals[-1] < evals[0], evals
    assert list((tmp_path / "anchor" / "samples" / "step-000012").glob("*.png"))

    tokens = tmp_path / "tokens"
    arguments = ["cache-tokens", "--anchor", str(anchor), "--dataset", str(curated), "--output", str(tokens)]
    result = CliRunner().invoke(main, [*arguments, "--base-model", "tiny-random-sdxl"])
    assert result.exit_code == 0, result.output
    reconfigure_config = ReconfigureConfig(
        **sdxl,
        output_dir=str(tmp_path / "reconfigure"),
        anchor=str(anchor),
        tokens=str(tokens),
        **SMALL_IMR,
        max_steps=6,
        learning_rate=1e-3,
        eval_samples=4,
    )
    reconfigured = train_reconfigure(reconfigure_config)
    evals = [row["eval_dfm"] for row in read_metrics(tmp_path / "reconfigure") if "eval_dfm" in row]
    assert evals[-1] < evals[0], evals
    assert load_dynamicid(reconfigured).metadata.base_family == "sdxl"

    out = tmp_path / "out.png"
    people = []
    for identity, expression in (("obama", "surprised"), ("biden", "happy")):
        photo = shared_faces / "identities" / identity / f"{identity}.jpg"
        people += ["--person", str(photo), "--expression", expression]
    arguments = ["generate", "--base-model", "tiny-random-sdxl", "--prompt", "two friends", "--steps", "2"]
    arguments += ["--weights", str(anchor), "--weights", str(reconfigured), "--size", "64x64", "--out", str(out)]
    seen = {"imr": [], "unet": []}

    def observe(module, args, kwargs, output):
        if isinstance(module, IMR):
            seen["imr"].append(output.detach().clone())
        elif isinstance(module, UNet2DConditionModel):
            seen["unet"].append(kwargs)

    handle = torch.nn.modules.module.register_module_forward_hook(observe, with_kwargs=True)
    try:
        result = CliRunner().invoke(infer, [*arguments, *people, "--json"])
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    sidecar = yaml.safe_load(out.with_suffix(".json").read_text())
    assert [person["target_expression"] for person in sidecar["people"]] == ["surprised", "happy"]
    assert all(person["edited"] for person in sidecar["people"])
    # The UNet saw both people's IMR-rewritten tokens after the text, and SDXL's pooled text and size ids.
    call = seen["unet"][0]
    rewritten = torch.cat(seen["imr"], dim=1)[0]
    torch.testing.assert_close(call["encoder_hidden_states"][1, -8:], rewritten, rtol=0, atol=0)
    assert call["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert call["cross_attention_kwargs"]["saa"].num_ids == 2

    # SD 1.5 weights on the SDXL base stop before a run folder is made, naming the file and both families.
    config = AnchorConfig(
        **sdxl, output_dir=str(tmp_path / "refused"), init_from=str(anchor_run["weights"]), lora_rank=4
    )
    with pytest.raises(ValueError, match=r"'sd15'.*'sdxl'") as error:
        train_anchor(config)
    assert str(anchor_run["weights"]) in str(error.value) and "\n" not in str(error.value)


class _Payload:
    """A FAKE attacker's object: unpickling it creates the file `marker` (what a tampered checkpoint would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resume_runs_no_code_from_a_tampered_checkpoint(planted, curated, tmp_path):
    run = tmp_path / "run"
    settings = {**TINY, "dataset": str(curated), "train_batch_size": 2, "lora_rank": 4, "eval_samples": 2}
    train_anchor(AnchorConfig(**settings, output_dir=str(run), max_steps=2, checkpointing_steps=2))
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "generators.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "run_state.json",
        "scheduler.bin",
        "weights.safetensors",
    ]
    marker = tmp_path / "PWNED"
    torch.save({"state": _Payload(marker)}, checkpoint / planted)
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(run)]
    arguments += ["--resolution", "64", "--train-batch-size", "2", "--max-steps", "4", "--resume", "latest"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume: "), result.output
    assert str(checkpoint / planted) in errors[0]
    assert not marker.exists()
    assert checkpoint_dirs(run) == [checkpoint]  # nothing trained on


def test_failed_fresh_run_leaves_no_run_folder(curated, tmp_path):
    run = tmp_path / "run"
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(run)]
    arguments += ["--resolution", "64", "--lora-rank", "4", "--eval-samples", "2", "--max-steps", "1"]
    result = CliRunner().invoke(main, [*arguments, "--train-batch-size", "1000"])
    assert result.exit_code == 2 and "lower --train-batch-size" in result.stderr, result.output
    assert not run.exists()  # made for the run (config.yaml, logs), removed with it
    assert CliRunner().invoke(main, [*arguments, "--train-batch-size", "2"]).exit_code == 0  # no --overwrite needed


def test_second_command_on_a_run_folder_stops_at_once_naming_the_holder(curated, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from dynamicid.locks import hold_folder\nwith hold_folder({str(run)!r}, 'x'):\n"
         "    print('held', flush=True)\n    input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(run)]
        arguments += ["--resolution", "64", "--lora-rank", "4", "--eval-samples", "2", "--max-steps", "1"]
        arguments += ["--train-batch-size", "2"]
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [
            f"error: --output-dir {run} is in use by another command (pid {holder.pid} on {socket.gethostname()}, "
            f"started {_lock_info(run)['started']}: -c); wait for it to end, or stop it and rerun "
            "(a killed command's lock is taken over)"
        ]
        assert sorted(p.name for p in run.iterdir()) == [".dynamicid.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    stale = run / "checkpoints" / "checkpoint-7.partial"  # as a run killed while saving a checkpoint leaves it
    stale.mkdir(parents=True)
    (stale / "optimizer.bin").write_bytes(b"half")
    result = CliRunner().invoke(main, [*arguments, "--resume", "latest"])
    assert result.exit_code == 0, result.output  # the killed holder's lock is taken over
    assert (run / "weights.safetensors").is_file() and (run / ".dynamicid.lock").read_text() == ""
    assert [p.name for p in (run / "checkpoints").iterdir()] == []


def _lock_info(folder: Path) -> dict:
    import json

    return json.loads((folder / ".dynamicid.lock").read_text())


def test_a_deleted_dataset_file_is_named(curated, tmp_path):
    """A dataset of two files, the first deleted (what remains is the second, as curation names it)."""
    broken = tmp_path / "ds"
    shutil.copytree(curated, broken)
    (broken / "data" / "train-00000-of-00001.parquet").rename(broken / "data" / "train-00001-of-00002.parquet")
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(broken), "--output-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        f"error: --dataset {broken}: data/train-00000-of-00002.parquet is missing (1 of 2 files); restore it or "
        "curate the dataset again"
    )
    assert not (tmp_path / "r").exists()


def test_caption_token_memo_is_bounded_and_reuses_recent_captions():
    """One caption per row (a VLM's) must not grow the memo with the dataset; repeated captions are tokenized once."""
    from dynamicid.train.data import Tokenize

    calls: list[str] = []

    def token_ids(texts: list[str]) -> torch.Tensor:
        calls.extend(texts)
        return torch.tensor([[len(text), 7]])

    tokenize = Tokenize(token_ids, max_entries=3)
    for text in ["a", "bb", "a", "ccc", "dddd", "a", "bb"]:
        assert tokenize(text).tolist() == [len(text), 7]
    # "a" stays recent through its reuse; "bb" falls out when "dddd" arrives and is tokenized again at the end
    assert calls == ["a", "bb", "ccc", "dddd", "bb"]
    assert len(tokenize.memo) == 3
