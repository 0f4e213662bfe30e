"""The app's Dataset tab and command-line checks, without a browser: a small real curated dataset."""

import shutil

import gradio as gr
import pytest
from click.testing import CliRunner

from dynamicid.app.cli import main
from dynamicid.app.dataset_tab import ALL, MAX_CROPS, DatasetBrowser
from dynamicid.curation import build_dataset
from dynamicid.schemas import EXPRESSIONS
from dynamicid.schemas.labels import POSE_NAMES


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_faces):
    root = tmp_path_factory.mktemp("app-dataset")
    photos = root / "photos"
    for name in ("obama", "kit_harington"):
        shutil.copytree(shared_faces / "identities" / name, photos / name)
    shutil.copy(shared_faces / "no_face" / "dog.jpg", photos / "obama" / "dog.jpg")
    shutil.copy(shared_faces / "broken" / "text_file_named.png", photos / "kit_harington" / "notes.png")
    build_dataset(photos, root / "out", face_backend="embedded", progress=False)
    return DatasetBrowser.open(root / "out")


def test_counts_grid_and_filters(dataset):
    labels = dataset.labels
    assert set(dataset.identities["identity"]) == {"obama", "kit_harington"}
    for row in dataset.identities.itertuples():
        assert row.num_images == (labels["identity"] == row.identity).sum() > 0
        grid = dataset.grid(row.identity)
        assert list(grid["expression"]) == list(EXPRESSIONS) and list(grid.columns[1:]) == list(POSE_NAMES)
        assert grid[list(POSE_NAMES)].to_numpy().sum() == row.num_images
        assert (grid[list(POSE_NAMES)].to_numpy() > 0).sum() == row.grid_cells_covered
    expression = labels["expression"].iloc[0]
    chosen = dataset.select("obama", expression, ALL)
    assert len(chosen) > 0 and set(chosen["identity"]) == {"obama"} and set(chosen["expression"]) == {expression}
    assert len(dataset.select(ALL, ALL, ALL)) == len(labels)


def test_crops_have_their_labels(dataset):
    rows = dataset.select("kit_harington", ALL, ALL)
    crops = dataset.crops(rows)
    assert len(crops) == min(len(rows), MAX_CROPS) > 0
    for (image, caption), row in zip(crops, rows.itertuples(), strict=False):
        assert image.size == (512, 512)
        assert caption.startswith(f"kit_harington · {row.expression} · {row.pose_bin}") and row.source_path in caption


def test_rejects_with_reasons_per_identity(dataset):
    obama = dataset.rejected("obama").set_index("source_path")
    assert obama.loc["obama/dog.jpg", "reason"] == "no_face"
    kit = dataset.rejected("kit_harington").set_index("source_path")
    assert kit.loc["kit_harington/notes.png", "reason"] == "undecodable"
    assert len(dataset.rejected(ALL)) == len(dataset.rejects) >= 2


def test_the_tab_lays_out_and_answers_filters(dataset):
    with gr.Blocks():
        dataset.build()
    grid, count, crops, rejects = dataset.show("obama", ALL, ALL)
    assert grid.equals(dataset.grid("obama"))
    assert count.startswith(f"{(dataset.labels['identity'] == 'obama').sum()} faces match")
    assert len(crops) > 0 and "obama/dog.jpg" in set(rejects["source_path"])


def test_cli_errors_exit_2_before_loading_models(tmp_path):
    result = CliRunner().invoke(main, ["--base-model", "tiny-random"])
    assert result.exit_code == 2 and result.stderr.startswith("error: no weights: give --weights FILE")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    result = CliRunner().invoke(main, ["--base-model", "tiny-random", "--weights", str(weights), "--dataset", "."])
    assert result.exit_code == 2, result.output
    assert "error: --dataset .: not a dynamicid-curate output folder" in result.stderr


def test_the_tab_counts_as_the_cli_and_the_report_do(tmp_path):
    """The demo has an identity with every photo rejected (masked_woman): it is scanned, not counted as kept."""
    import json

    from dynamicid.curation.cli import main as curate

    result = CliRunner().invoke(curate, ["demo", str(tmp_path / "demo"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    counts = (
        f"{summary['kept']} images of {summary['identities']} identities kept, {summary['rejected']} rejected, "
        f"of {summary['scanned']} files scanned"
    )
    assert result.output.startswith(counts + " -> ")
    assert counts in (tmp_path / "demo" / "report.html").read_text()
    browser = DatasetBrowser.open(tmp_path / "demo")
    assert counts in browser.summary()
    assert len(browser.identities) > summary["identities"]  # the tab still lists the all-rejected identity
