"""Training on the cards people have: `dynamicid-train cache-prompts` and `--prompt-cache` (both stages train from
cached text embeddings without the text encoders, with the losses of the run that encodes its prompts; a cache
made for other rows, captions, base or precision is refused in one line), and `--base-dtype float8` (the frozen
denoiser's weights stored in float8 by diffusers layerwise casting, the helper inference's `--weights-dtype` uses;
the trained SAA and face encoder stay float32 and train: the gradient reaches the face encoder through the
float8-stored layers; its effect on the loss is measured in benchmarks/train_fp8.py, BENCHMARKS.md).

Tolerance: the cached run's per-step losses equal the live run's within rtol 1e-5 (float32; the cache encodes the
prompts in batches of 16 where training encoded a training batch at a time, so float sums may round differently).
"""

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dynamicid.curation.pipeline import build_dataset
from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning import Conditioner
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT
from dynamicid.train import runner
from dynamicid.train.anchor import train_anchor
from dynamicid.train.cache_prompts import PromptCache, base_identity
from dynamicid.train.cache_tokens import cache_tokens
from dynamicid.train.cli import main
from dynamicid.train.config import AnchorConfig, ReconfigureConfig
from dynamicid.train.reconfigure import train_reconfigure
from dynamicid.train.runner import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"resolution": 64, "report_to": "none", "eval_samples": 2, "train_batch_size": 2}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, identity_photos) -> Path:
    """3 photos each of 2 real identities, curated at 256 px."""
    out = tmp_path_factory.mktemp("curated")
    photos = identity_photos("obama", "kit_harington", first=3)
    build_dataset(photos, out, per_identity=3, progress=False, crop_size=256)
    return out


def _cli(arguments: list[str]):
    return CliRunner().invoke(main, arguments)


def _cache(curated: Path, folder: Path, base_model: str, *more: str) -> Path:
    arguments = ["cache-prompts", "--base-model", base_model, "--dataset", str(curated), "--output", str(folder)]
    result = _cli([*arguments, "--shard-size", "2", "--no-progress", *more])  # several shards
    assert result.exit_code == 0, result.output
    return folder


def _losses(output_dir: Path, name: str = "loss") -> list[float]:
    return [row[name] for row in read_metrics(output_dir) if name in row]


@pytest.fixture
def loaded_bases(monkeypatch) -> list:
    """The bases the training stages load (a spy on the runner's `load_base_model`: the real one runs)."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(load_base_model(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(runner, "load_base_model", spy)
    return seen


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-flux"])
def test_both_stages_train_from_the_cache_with_the_losses_of_the_text_encoders(family, curated, tmp_path, loaded_bases):
    prompts = _cache(curated, tmp_path / "prompts", family)
    anchor = {**SMALL, "base_model": family, "dataset": str(curated), "max_steps": 2, "drop_text": 0.5, "lora_rank": 4}
    live = train_anchor(AnchorConfig(**anchor, output_dir=str(tmp_path / "a-live")))
    cached = train_anchor(AnchorConfig(**anchor, output_dir=str(tmp_path / "a-cached"), prompt_cache=str(prompts)))
    assert loaded_bases[0].text_encoder is not None  # the live run encodes with them
    assert loaded_bases[1].text_encoder is None and loaded_bases[1].text_encoder_2 is None  # never loaded
    expected = _losses(tmp_path / "a-live")
    assert len(expected) == 2 and _losses(tmp_path / "a-cached") == pytest.approx(expected, rel=1e-5)
    # (seed 0: the first step drops a caption: the cached empty prompt takes its place)
    assert _losses(tmp_path / "a-cached", "eval_loss") == pytest.approx(_losses(tmp_path / "a-live", "eval_loss"), 1e-5)

    tokens = cache_tokens(live, curated, tmp_path / "tokens", base_model=family).parent
    stage = {**SMALL, "base_model": family, "dataset": str(curated), "anchor": str(live), "tokens": str(tokens)}
    stage |= {"max_steps": 1, "targets_per_identity": 2, "imr_dim": 32, "imr_heads": 2, "imr_dim_head": 16}
    train_reconfigure(ReconfigureConfig(**stage, output_dir=str(tmp_path / "r-live")))
    config = ReconfigureConfig(**stage, output_dir=str(tmp_path / "r-cached"), prompt_cache=str(prompts))
    train_reconfigure(config)
    assert loaded_bases[-1].text_encoder is None
    for name in ("dfm", "ldc"):
        assert _losses(tmp_path / "r-cached", name) == pytest.approx(_losses(tmp_path / "r-live", name), rel=1e-5)
    assert cached.is_file()


def test_cached_embeddings_are_the_encoders_outputs_row_by_row(curated, tmp_path):
    """Each prompt's cached states and pooled vector (read lazily, across shards) against the conditioner run on
    that prompt alone; the face prompts' vectors likewise."""
    prompts = PromptCache.open(
        _cache(curated, tmp_path / "p", "tiny-random-sdxl"), curated, "tiny-random-sdxl", 0, "no"
    )
    conditioner = Conditioner.from_parts(load_base_model("tiny-random-sdxl"))
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert len(index["shards"]) == -(-len(index["prompts"]) // 2) > 1 and {"", RECONFIGURE_UNET_PROMPT} <= set(
        index["prompts"]
    )
    for prompt in index["prompts"]:
        expected = conditioner.text_embeddings(conditioner.token_ids([prompt]))
        cached = prompts.embeddings(prompt)
        assert cached.keys() == expected.keys() == {"states", "pooled"}
        assert all(torch.allclose(cached[k], expected[k][0], atol=1e-6) for k in cached)
    faces = index["face_prompts"]
    assert torch.allclose(prompts.face_vectors(faces), conditioner.face_prompt_vectors(faces), atol=1e-6)
    assert prompts.face_dim == load_base_model("tiny-random-sdxl").pooled_dim


def _rewrite(curated: Path, out: Path, change) -> Path:
    import datasets

    dataset = change(datasets.load_dataset(str(curated), split="train"))
    dataset.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    return out


def test_a_stale_cache_is_refused_in_one_line(curated, tmp_path):
    prompts = _cache(curated, tmp_path / "p", "tiny-random")
    recaptioned = _rewrite(curated, tmp_path / "recaptioned", lambda d: d.map(lambda r: {"caption": "a new caption"}))
    fewer = _rewrite(curated, tmp_path / "fewer", lambda d: d.select(range(len(d) - 1)))
    run = ["anchor", "--output-dir", str(tmp_path / "run"), "--prompt-cache", str(prompts), "--max-steps", "1"]
    for dataset, more, message in (
        (fewer, [], "was cached from other dataset rows"),
        (recaptioned, [], "was cached from other captions or face prompts"),
        (curated, ["--base-model", "tiny-random-sdxl"], "was cached from another base model (tiny-random seed 0"),
        (curated, ["--seed", "3"], "was cached from another base model"),
        (curated, ["--mixed-precision", "bf16"], "was cached for --mixed-precision no, this run has bf16"),
    ):
        base = [] if "--base-model" in more else ["--base-model", "tiny-random"]
        result = _cli([*run, "--dataset", str(dataset), *base, *more])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0] and "rerun `dynamicid-train cache-prompts`" in lines[0]
    assert not (tmp_path / "run").exists()
    result = _cli([*run, "--dataset", str(curated), "--base-model", "tiny-random", "--validation-steps", "5"])
    assert result.exit_code == 2 and "needs the text encoders that --prompt-cache leaves unloaded" in result.output


def test_a_base_folder_trained_from_the_cache_never_builds_its_text_encoders(curated, tmp_path, monkeypatch):
    """A saved Flux folder: `cache-prompts` builds no transformer, training builds no T5 or CLIP text model
    (constructors counted), and replacing the T5's weights file makes the cache stale."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from dynamicid.testing import build_tiny_random_flux

    base = build_tiny_random_flux()
    folder = tmp_path / "flux"
    FluxPipeline(**base.components(), scheduler=base.noise_scheduler).save_pretrained(folder)
    base.image_encoder.save_pretrained(folder / "image_encoder")
    built = []
    for cls in (FluxTransformer2DModel, T5EncoderModel, CLIPTextModel):
        init = cls.__init__

        @functools.wraps(init)  # (diffusers reads the config names from the signature)
        def counted(self, *args, _cls=cls, _init=init, **kwargs):
            built.append(_cls)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    prompts = _cache(curated, tmp_path / "p", str(folder))
    assert set(built) == {T5EncoderModel, CLIPTextModel}  # the text encoders only
    built.clear()
    config = AnchorConfig(
        **SMALL,
        base_model=str(folder),
        dataset=str(curated),
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        lora_rank=4,
    )
    train_anchor(dataclasses.replace(config, prompt_cache=str(prompts)))
    assert built == [FluxTransformer2DModel]  # no T5, no CLIP text model
    assert len(_losses(tmp_path / "run")) == 1

    identity = base_identity(folder, 0)
    weights = next((folder / "text_encoder_2").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one changed byte of the T5's weights
    weights.write_bytes(bytes(data))
    assert base_identity(folder, 0) != identity
    with pytest.raises(ValueError, match="was cached from another base model"):
        PromptCache.open(prompts, curated, str(folder), 0, "no")


def test_cache_is_stored_in_the_runs_precision_and_read_lazily(curated, tmp_path):
    folder = _cache(curated, tmp_path / "p", "tiny-random-flux", "--mixed-precision", "bf16")
    prompts = PromptCache.open(folder, curated, "tiny-random-flux", 0, "bf16")
    assert prompts._handles == {}  # nothing read when opened
    empty = prompts.embeddings("")
    assert len(prompts._handles) == 1  # one shard opened (memory-mapped) for one prompt
    assert {t.dtype for t in empty.values()} == {torch.bfloat16} and empty["states"].shape == (512, 32)  # T5's 512


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-sdxl", "tiny-random-flux"])
def test_frozen_denoiser_is_stored_in_float8_and_the_trained_parts_train_in_float32(
    family, curated, tmp_path, loaded_bases
):
    settings = {"base_model": family, "dataset": str(curated), "resolution": 64, "report_to": "none"}
    settings |= {"train_batch_size": 2, "eval_samples": 2, "lora_rank": 4, "max_steps": 2, "learning_rate": 1e-2}
    config = AnchorConfig(**settings, output_dir=str(tmp_path / "run"), base_dtype="float8", checkpointing_steps=1)
    weights = train_anchor(config)

    denoiser = loaded_bases[0].denoiser
    frozen = {name: p.dtype for name, p in denoiser.named_parameters() if not p.requires_grad}
    trained = {name: p.dtype for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}  # SAA's LoRA and ID projections
    assert all(".processor." in name for name in trained)
    projections = [name for name in frozen if name.endswith(("to_q.weight", "to_k.weight", "ff.net.2.weight"))]
    assert projections and all(frozen[name] == torch.float8_e4m3fn for name in projections)
    convolutions = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(frozen[f"{name}.weight"] == torch.float32 for name in convolutions)  # (models/layerwise.py: why)

    losses = [row["loss"] for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    after_one, after_two = (
        load_file(str(tmp_path / "run/checkpoints/checkpoint-1/weights.safetensors")),
        load_file(str(weights)),
    )
    assert all(t.dtype == torch.float32 for t in after_two.values())
    for part in ("face_encoder.", "saa."):  # step 2 moved both: the gradient crossed the float8-stored layers
        names = [k for k in after_two if k.startswith(part)]
        assert names and any(not torch.equal(after_one[k], after_two[k]) for k in names), part

    # reconfiguration: the whole denoiser is frozen, its SAA included, so that is stored in float8 too
    tokens = cache_tokens(weights, curated, tmp_path / "tokens", base_model=family).parent
    small = {"targets_per_identity": 2, "imr_dim": 32, "imr_heads": 2, "imr_dim_head": 16}
    stage = {**settings, **small, "anchor": str(weights), "tokens": str(tokens), "base_dtype": "float8"}
    del stage["lora_rank"]
    train_reconfigure(ReconfigureConfig(**stage, output_dir=str(tmp_path / "reconfigure")))
    saa = [
        p.dtype
        for n, p in loaded_bases[-1].denoiser.named_parameters()
        if n.endswith(("to_k_id.weight", "to_k_ip.weight"))
    ]
    assert saa and set(saa) == {torch.float8_e4m3fn}
    losses = [row["loss"] for row in read_metrics(tmp_path / "reconfigure") if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)


def test_an_unknown_base_dtype_is_refused_naming_the_flag(curated, tmp_path):
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(tmp_path)]
    result = CliRunner().invoke(main, [*arguments, "--base-dtype", "int4"])
    assert result.exit_code == 2 and "--base-dtype 'int4'; valid: float8" in result.output
