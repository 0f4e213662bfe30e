"""The Dataset tab: a `dynamicid-curate` output folder, browsed by identity, expression and pose bin."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dynamicid.curation.report import counts_line
from dynamicid.schemas import EXPRESSIONS
from dynamicid.schemas.dataset_folder import DATA_DIR, IDENTITIES_FILE, REJECTS_FILE, SHARD_GLOB
from dynamicid.schemas.labels import POSE_NAMES

ALL = "all"
MAX_CROPS = 48  # crops shown at once (the filters narrow them down)
LABEL_COLUMNS = ["identity", "expression", "pose_bin", "yaw", "source_path"]
IDENTITY_HEADERS = {
    "num_images": "faces kept",
    "num_scanned": "files scanned",
    "num_rejected": "files rejected",
    "grid_cells_covered": f"grid cells covered (of {len(EXPRESSIONS) * len(POSE_NAMES)})",
}


@dataclass
class DatasetBrowser:
    """The labels of every row (images are read only for the crops shown), identities and rejects."""

    folder: Path
    shards: list[Path]
    labels: pd.DataFrame  # one row per dataset row: LABEL_COLUMNS + shard, row (position in its shard)
    identities: pd.DataFrame
    rejects: pd.DataFrame

    @classmethod
    def open(cls, folder: Path) -> DatasetBrowser:
        shards = sorted((folder / DATA_DIR).glob(SHARD_GLOB))
        needed = [folder / IDENTITIES_FILE, folder / REJECTS_FILE]
        if not shards or not all(p.is_file() for p in needed):
            raise ValueError(
                f"--dataset {folder}: not a dynamicid-curate output folder (expected {DATA_DIR}/{SHARD_GLOB}, "
                "identities.parquet and rejects.parquet)"
            )
        frames = []
        for k, shard in enumerate(shards):
            frame = pq.read_table(shard, columns=LABEL_COLUMNS).to_pandas()
            frames.append(frame.assign(shard=k, row=range(len(frame))))
        labels = pd.concat(frames, ignore_index=True)
        labels["expression"] = [EXPRESSIONS[i] for i in labels["expression"]]
        labels["pose_bin"] = [POSE_NAMES[i] for i in labels["pose_bin"]]
        identities = pq.read_table(
            needed[0], columns=["identity", "num_images", "num_scanned", "num_rejected", "grid_cells_covered"]
        ).to_pandas()
        rejects = pq.read_table(needed[1], columns=["source_path", "stage", "reason", "detail"]).to_pandas()
        return cls(folder, shards, labels, identities, rejects)

    # ---- queries ----

    def select(self, identity: str, expression: str, pose: str) -> pd.DataFrame:
        rows = self.labels
        for column, value in (("identity", identity), ("expression", expression), ("pose_bin", pose)):
            if value != ALL:
                rows = rows[rows[column] == value]
        return rows

    def grid(self, identity: str) -> pd.DataFrame:
        """Rows per expression (rows) x pose bin (columns) of one identity, or of all."""
        rows = self.select(identity, ALL, ALL)
        counts = pd.crosstab(rows["expression"], rows["pose_bin"]).reindex(
            index=list(EXPRESSIONS), columns=list(POSE_NAMES), fill_value=0
        )
        return counts.rename_axis(index=None, columns=None).reset_index(names="expression")

    def crops(self, rows: pd.DataFrame) -> list[tuple[Image.Image, str]]:
        """The first MAX_CROPS crops of `rows`, each with its labels."""
        shown = rows.head(MAX_CROPS)
        images: dict[int, Any] = {}
        for shard, group in shown.groupby("shard"):
            column = pq.read_table(self.shards[shard], columns=["image"]).column("image")
            taken = pc.take(column, pa.array(group["row"].to_numpy()))
            images.update(zip(group.index, taken.to_pylist(), strict=True))
        return [
            (
                Image.open(io.BytesIO(images[i]["bytes"])),
                f"{r.identity} · {r.expression} · {r.pose_bin} · yaw {r.yaw:+.0f}° · {r.source_path}",
            )
            for i, r in shown.iterrows()
        ]

    def rejected(self, identity: str) -> pd.DataFrame:
        if identity == ALL:
            return self.rejects
        return self.rejects[self.rejects["source_path"].str.startswith(identity + "/")]

    def summary(self) -> str:
        """The CLI's and report.html's counts line; identities with no image kept (all rejected) do not count."""
        kept, rejected = len(self.labels), len(self.rejects)
        identities = int((self.identities["num_images"] > 0).sum())
        counts = {"kept": kept, "identities": identities, "rejected": rejected, "scanned": kept + rejected}
        return f"`{self.folder}`: {counts_line(counts)}."

    # ---- page ----

    def build(self) -> None:
        gr.Markdown(self.summary(), elem_id="dataset-summary")
        gr.Dataframe(
            self.identities.rename(columns=IDENTITY_HEADERS),
            label="Identities",
            interactive=False,
            elem_id="dataset-identities",
        )
        with gr.Row():
            identity = gr.Dropdown(
                [ALL, *self.identities["identity"]], value=ALL, label="Identity", elem_id="filter-identity"
            )
            expression = gr.Dropdown([ALL, *EXPRESSIONS], value=ALL, label="Expression", elem_id="filter-expression")
            pose = gr.Dropdown([ALL, *POSE_NAMES], value=ALL, label="Pose bin", elem_id="filter-pose")
        grid_value, count_value, crops_value, rejects_value = self.show(ALL, ALL, ALL)
        grid = gr.Dataframe(
            grid_value, label="Expression x pose grid (faces per cell)", interactive=False, elem_id="dataset-grid"
        )
        count = gr.Markdown(count_value, elem_id="dataset-count")
        crops = gr.Gallery(
            crops_value, label="Crops", columns=8, height=460, object_fit="contain", elem_id="dataset-crops"
        )
        rejects = gr.Dataframe(rejects_value, label="Rejected files", interactive=False, elem_id="dataset-rejects")
        filters = [identity, expression, pose]
        for component in filters:
            component.change(self.show, filters, [grid, count, crops, rejects], concurrency_limit=None)

    def show(self, identity: str, expression: str, pose: str) -> tuple[Any, ...]:
        rows = self.select(identity, expression, pose)
        shown = min(len(rows), MAX_CROPS)
        count = f"{len(rows)} faces match; showing {shown}."
        return self.grid(identity), count, self.crops(rows), self.rejected(identity)
