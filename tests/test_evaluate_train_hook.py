"""`dynamicid-train anchor|reconfigure --eval-manifest M`: the manifest is generated with the modules in training
(tiny-random FAKE base) and scored; the figures land in metrics.jsonl, the images and scores in RUN/eval/."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dynamicid.curation import build_dataset
from dynamicid.train.anchor import train_anchor
from dynamicid.train.cli import main
from dynamicid.train.config import AnchorConfig, ReconfigureConfig
from dynamicid.train.reconfigure import train_reconfigure
from dynamicid.train.runner import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"base_model": "tiny-random", "resolution": 64, "report_to": "none", "validation_inference_steps": 2}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_faces) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for identity in ("obama", "biden"):
        shutil.copytree(shared_faces / "identities" / identity, photos / identity)
    out = tmp_path_factory.mktemp("curated")
    build_dataset(photos, out, per_identity=4, progress=False)
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shared_faces) -> Path:
    obama = str(shared_faces / "identities" / "obama" / "obama2.jpg")
    biden = str(shared_faces / "identities" / "biden" / "biden2.jpg")
    rows = [
        {"id": "one", "prompt": "a portrait", "seed": 1, "people": [{"references": [obama], "expression": "happy"}]},
        {"id": "two", "prompt": "two men", "seed": 2, "people": [{"references": [obama]}, {"references": [biden]}]},
    ]
    path = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def anchor_settings(curated, output_dir, **extra):
    return AnchorConfig(
        **TINY, dataset=str(curated), output_dir=str(output_dir), train_batch_size=2, max_steps=2, lora_rank=4, **extra
    )


@pytest.fixture(scope="module")
def anchor_runs(curated, manifest, tmp_path_factory):
    plain = train_anchor(anchor_settings(curated, tmp_path_factory.mktemp("plain")))
    config = anchor_settings(curated, tmp_path_factory.mktemp("bench-run"), eval_manifest=str(manifest), eval_steps=1)
    return {"plain": plain, "bench": train_anchor(config), "config": config}


def test_anchor_logs_benchmark_figures_at_each_evaluation(anchor_runs):
    run = Path(anchor_runs["config"].output_dir)
    rows = [r for r in read_metrics(run) if "bench/all/face_sim" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["bench/single_id/face_found"] >= 0 and "bench/multi_id/face_sim" in row
        assert "bench/all/expr" not in row  # anchoring has no IMR: expression targets are left out
    for step in (0, 1, 2):
        folder = run / "eval" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.glob("*.png")) == ["one.png", "two.png"]
        per_person = pq.read_table(folder / "per_person.parquet").to_pylist()
        assert len(per_person) == 3 and all(r["expression_requested"] is None for r in per_person)


def test_the_benchmark_does_not_change_training(anchor_runs):
    plain, bench = load_file(str(anchor_runs["plain"])), load_file(str(anchor_runs["bench"]))
    assert plain.keys() == bench.keys() and all(torch.equal(plain[k], bench[k]) for k in plain)


def test_reconfigure_scores_expressions(anchor_runs, curated, manifest, tmp_path):
    tokens = tmp_path / "tokens"
    args = ["cache-tokens", "--anchor", str(anchor_runs["plain"]), "--dataset", str(curated)]
    result = CliRunner().invoke(main, [*args, "--output", str(tokens), "--base-model", "tiny-random"])
    assert result.exit_code == 0, result.output
    config = ReconfigureConfig(
        **TINY,
        dataset=str(curated),
        output_dir=str(tmp_path / "reconf"),
        anchor=str(anchor_runs["plain"]),
        tokens=str(tokens),
        max_steps=1,
        targets_per_identity=2,
        imr_dim=64,
        imr_heads=1,
        eval_manifest=str(manifest),
    )
    train_reconfigure(config)
    rows = [r for r in read_metrics(config.output_dir) if "bench/all/face_sim" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(0.0 <= r["bench/single_id/expr"] <= 1.0 for r in rows)
    summary = json.loads((tmp_path / "reconf" / "eval" / "step-000001" / "summary.json").read_text())
    assert summary["single_id"]["expr"]["n"] == 1


def test_missing_eval_manifest_is_a_usage_error(curated, tmp_path):
    args = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(main, [*args, "--eval-manifest", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "--eval-manifest" in result.output and "not found" in result.output
    assert not (tmp_path / "r").exists()
