"""`build --captioner DIR`: a scene caption of every kept crop from a local captioner, recorded, stored, reused.

Real photos (rose_leslie and kit_harington: 4 kept faces) and the real embedded face backend; the captioners are a
tiny random SmolVLM (Idefics3) and a tiny random BLIP built in the test (`dynamicid.testing`) from a transformers config and a tokenizer
made in code. Oracle: the same folder run directly with transformers, one dataset image at a time.
"""

from __future__ import annotations

import io
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dynamicid.curation.captioner import SUPPORTED
from dynamicid.curation.cli import main
from dynamicid.schemas import EXPRESSIONS, anchor_caption
from dynamicid.schemas.labels import POSE_NAMES
from dynamicid.schemas.prompts import CAPTION_INSTRUCTION
from dynamicid.testing import save_tiny_blip, save_tiny_smolvlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(photos, out, *options: str) -> dict:
    arguments = ["build", str(photos), str(out), "--face-backend", "embedded", "--no-progress", "--json", *options]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows(out) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


@pytest.fixture(scope="module")
def templated(identity_photos, tmp_path_factory):
    """A build without --captioner: PHOTOS_DIR and OUT_DIR (its work folder holds every face result)."""
    photos = identity_photos("rose_leslie", "kit_harington")
    out = tmp_path_factory.mktemp("templated") / "out"
    build(photos, out)
    return photos, out


def copy_of(templated, tmp_path):
    """A copy of the templated build's OUT_DIR (work folder included): only `write` runs again on it."""
    photos, out = templated
    shutil.copytree(out, tmp_path / "out")
    return photos, tmp_path / "out"


def vlm_caption(folder, image: Image.Image, prompt: str) -> str:
    """The SmolVLM folder on one image, straight through transformers: chat template, greedy, the new tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=SUPPORTED["idefics3"].max_new_tokens, do_sample=False)
    return processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def blip_caption(folder, image: Image.Image, prefix: str) -> str:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    inputs = processor(images=[image], text=[prefix], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=SUPPORTED["blip"].max_new_tokens, do_sample=False)
    return processor.decode(tokens[0], skip_special_tokens=True).strip()


def files(out) -> dict:
    """Every file of OUT_DIR (work folder included) with its size and time, but the writer's lock."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"}


def crop(row: dict) -> Image.Image:
    """The row's crop, as the caption stage feeds it to the captioner."""
    return Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")


def test_without_a_captioner_rows_keep_the_template_caption(templated):
    out = templated[1]
    assert json.loads((out / "summary.json").read_text())["caption_model"] is None
    assert (
        "Captions: the template `a photo of a person, {expression} expression, {pose}`"
        in (out / "README.md").read_text()
    )
    kept = rows(out)
    assert len(kept) == 4
    for row in kept:
        expression, pose = EXPRESSIONS[row["expression"]], POSE_NAMES[row["pose_bin"]]
        assert row["caption"] == anchor_caption(expression, pose) and row["caption_model"] is None
    assert not (out / ".work" / "stores" / "captions").exists()  # no captioner, no store


def test_a_tiny_vlm_captions_every_kept_crop_and_a_rerun_reuses_them(templated, tmp_path):
    photos, out = copy_of(templated, tmp_path)
    folder = save_tiny_smolvlm(tmp_path / "tiny-smolvlm", seed=0)
    summary = build(photos, out, "--captioner", str(folder))
    kept = rows(out)
    assert summary["stages"]["write"]["computed"] == len(kept) == 4  # the captions (the crops were stored)
    models = {row["caption_model"] for row in kept}
    assert len(models) == 1 and models == {summary["caption_model"]}
    assert summary["caption_model"].startswith("idefics3:tiny-smolvlm:")
    assert f"scene captions of the crops by `{summary['caption_model']}`" in (out / "README.md").read_text()
    for row in kept:
        assert row["caption"] and row["caption"] == vlm_caption(folder, crop(row), CAPTION_INSTRUCTION)

    # Without the caption table, the stage runs again: the captions come from the store.
    (out / ".work" / "caption.parquet").unlink()
    again = build(photos, out, "--captioner", str(folder))
    assert (out / ".work" / "caption.parquet").exists() and again["stages"]["write"]["computed"] == 0
    assert [(r["caption"], r["caption_model"]) for r in rows(out)] == [(r["caption"], r["caption_model"]) for r in kept]

    # The same folder holding another model (seed 1): every caption is made again, by it.
    shutil.rmtree(folder)
    save_tiny_smolvlm(folder, seed=1)
    changed = build(photos, out, "--captioner", str(folder))
    assert changed["stages"]["write"]["computed"] == 4
    recaptioned = rows(out)
    assert {r["caption_model"] for r in recaptioned} != {r["caption_model"] for r in kept}
    for row in recaptioned:
        assert row["caption"] == vlm_caption(folder, crop(row), CAPTION_INSTRUCTION)
    assert [r["caption"] for r in recaptioned] != [r["caption"] for r in kept]


def test_a_tiny_blip_captions_with_the_caption_prompt(templated, tmp_path):
    photos, out = copy_of(templated, tmp_path)
    folder = save_tiny_blip(tmp_path / "tiny-blip", seed=0)
    build(photos, out, "--captioner", str(folder), "--caption-prompt", "a photo of")
    for row in rows(out):
        assert row["caption_model"].startswith("blip:tiny-blip:")
        assert row["caption"].startswith("a photo of") and row["caption"] == blip_caption(
            folder, crop(row), "a photo of"
        )


@pytest.mark.parametrize("config", [None, {"model_type": "bert"}], ids=["no-config", "unsupported"])
def test_a_folder_that_is_no_captioner_stops_with_one_line_and_loses_nothing(templated, tmp_path, config):
    photos, out = copy_of(templated, tmp_path)
    folder = tmp_path / "not-a-captioner"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    before = files(out)
    result = CliRunner().invoke(main, ["build", str(photos), str(out), "--captioner", str(folder), "--no-progress"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and f"captioner folder {folder}" in result.output
    assert files(out) == before


def test_ray_captions_equal_local_ones(templated, tmp_path, ray_cluster):
    folder = save_tiny_smolvlm(tmp_path / "tiny-smolvlm", seed=2)
    photos, local = copy_of(templated, tmp_path / "local")
    _, on_ray = copy_of(templated, tmp_path / "ray")
    build(photos, local, "--captioner", str(folder))
    summary = build(photos, on_ray, "--captioner", str(folder), "--engine", "ray", "--ray-address", ray_cluster)
    assert summary["stages"]["write"]["computed"] == 4
    assert rows(on_ray) == rows(local) and all(row["caption_model"] for row in rows(local))


def test_merged_captioned_shards_equal_one_captioned_build(templated, tmp_path):
    folder = save_tiny_smolvlm(tmp_path / "tiny-smolvlm", seed=3)
    photos, single = copy_of(templated, tmp_path / "single")
    build(photos, single, "--captioner", str(folder))
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for index, part in enumerate(parts):
        build(photos, part, "--captioner", str(folder), "--shard", f"{index}/2")
    merge = ["merge", *map(str, parts)]
    result = CliRunner().invoke(main, [*merge, str(tmp_path / "merged"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stages"]["write"]["computed"] == 0  # the shards' stored captions
    assert rows(tmp_path / "merged") == rows(single)

    folder.rename(tmp_path / "moved")
    result = CliRunner().invoke(main, [*merge, str(tmp_path / "merged-again")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "merge needs it at that path" in result.output


def test_the_caption_stage_asks_for_a_gpu_only_with_a_captioner(tmp_path):
    from dynamicid.curation.caption import CaptionStage
    from dynamicid.curation.config import CurationConfig
    from dynamicid.curation.stages import BackendInfo, StageContext

    def stage(**settings) -> CaptionStage:
        backend = BackendInfo("embedded", None, "d", "m", 0.4, 0.9, 0.95)
        return CaptionStage(StageContext(tmp_path, tmp_path, CurationConfig(**settings), backend))

    assert stage().resources.gpus == 0 and not stage().pooled  # the driver passes the rows through
    assert stage(captioner="/models/blip").resources.gpus == 1.0 and stage(captioner="/models/blip").pooled
    assert stage(captioner="/models/blip", device="cpu").resources.gpus == 0
