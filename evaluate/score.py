"""Score a set of images: per_person.parquet, per_image.parquet, summary.json and report.html, all or nothing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamicid.evaluate.cases import Case
from dynamicid.evaluate.clip_t import ClipScorer
from dynamicid.evaluate.face_metrics import FaceScorer
from dynamicid.evaluate.report import write_report
from dynamicid.evaluate.stats import summarise
from dynamicid.faces import load_image
from dynamicid.infer.outputs import Staging
from dynamicid.schemas.evaluation import PER_IMAGE_COLUMNS, PER_PERSON_COLUMNS, evaluation_arrow_schema

OUTPUTS = ("per_person.parquet", "per_image.parquet", "summary.json", "report.html")
NO_CLIP_NOTE = "CLIP-T left out: no --clip-model given (a local CLIP folder in transformers layout, e.g. ViT-L/14)"


@dataclass
class Scores:
    """What `measure` found: the rows of both tables and the summary."""

    per_person: list[dict[str, Any]]
    per_image: list[dict[str, Any]]
    summary: dict[str, Any]


def measure(cases: list[Case], faces: FaceScorer, clip: ClipScorer | None = None) -> Scores:
    """Every case's per-person and per-image records, and the summary (no file written)."""
    per_person, per_image = [], []
    clock = time.perf_counter()
    for case in cases:
        records, found = faces.score(case)
        sims = [r["face_sim"] for r in records]
        per_person += [{"id": case.id, "image": str(case.image), **r} for r in records]
        per_image.append(
            {
                "id": case.id,
                "image": str(case.image),
                "prompt": case.prompt,
                "people": len(case.people),
                "faces_found": found,
                "missing": max(len(case.people) - found, 0),
                "extra": max(found - len(case.people), 0),
                "face_sim_mean": float(np.mean(sims)),
                "face_sim_min": float(np.min(sims)),
                "id_confused": sum(bool(r.get("id_confused")) for r in records),
                "clip_t": None if clip is None else clip.score(load_image(case.image), case.prompt),
            }
        )
    seconds = time.perf_counter() - clock
    tables = {"per_person": per_person, "per_image": per_image}
    models = faces.models() | {"clip_t": clip.model_name if clip is not None else None}
    notes = [] if clip is not None else [NO_CLIP_NOTE]
    notes.append(
        f"FaceSim is the cosine of {models['face_sim']} embeddings ({models['face_backend']} backend); the paper's "
        "figures use ArcFace (insightface), so compare figures only between runs of the same face model"
    )
    summary = {
        "images": len(per_image),
        "people": len(per_person),
        "seconds": round(seconds, 3),
        "models": models,
        "notes": notes,
        **summarise(tables),
    }
    return Scores(per_person, per_image, summary)


def write_scores(scores: Scores, cases: list[Case], out_dir: str | Path) -> dict[str, Path]:
    """The four output files in `out_dir`, moved into place together."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUTS}
    with Staging(out).open() as staging:
        _write_table(scores.per_person, PER_PERSON_COLUMNS, staging.path(paths["per_person.parquet"]))
        _write_table(scores.per_image, PER_IMAGE_COLUMNS, staging.path(paths["per_image.parquet"]))
        staging.write_json(paths["summary.json"], scores.summary)
        write_report(
            staging.path(paths["report.html"]),
            scores.per_image,
            scores.per_person,
            {case.id: [p.box for p in case.people] for case in cases},
            {case.id: case.image for case in cases},
            scores.summary,
        )
    return paths


def _write_table(rows: list[dict[str, Any]], columns: tuple, path: Path) -> None:
    schema = evaluation_arrow_schema(columns)
    table = pa.Table.from_pylist([{c.name: row.get(c.name) for c in columns} for row in rows], schema=schema)
    pq.write_table(table, path)


def read_scores(folder: str | Path) -> Scores:
    """A score folder written by `write_scores`."""
    folder = Path(folder)
    missing = [name for name in OUTPUTS[:3] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a dynamicid-eval score folder (no {', '.join(missing)})")
    return Scores(
        pq.read_table(folder / "per_person.parquet").to_pylist(),
        pq.read_table(folder / "per_image.parquet").to_pylist(),
        json.loads((folder / "summary.json").read_text(encoding="utf-8")),
    )
