"""What every stage function receives: the run's folders, settings, caches and bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from dynamicid.curation import analysis
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.neighbors import cosine_threshold
from dynamicid.curation.tables import WorkDir

STAGES: tuple[str, ...] = ("scan", "detect", "identify", "dedupe", "align", "label", "select", "write")

# Columns every per-photo stage table starts with; `reason` is null while the photo is still a candidate.
PHOTO_FIELDS: list[tuple[str, pa.DataType]] = [
    ("source_path", pa.string()),
    ("identity", pa.string()),
    ("sha256", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
]


@dataclass
class StageStats:
    computed: int = 0  # photos (or faces) whose expensive work ran in this call
    reused: int = 0  # photos whose result came from the work folder
    seconds: float = 0.0
    skipped: bool = False  # the stage's table was current: nothing ran


@dataclass
class Run:
    photos_dir: Path
    out_dir: Path
    work: WorkDir
    config: CurationConfig
    progress: bool = True
    stats: dict[str, StageStats] = field(default_factory=dict)

    @cached_property
    def analyzer(self) -> Any:
        return analysis.analyzer(self.config.face_backend)

    @cached_property
    def same_person_cos(self) -> float:
        """Cosine similarity equivalent of the analyzer's own same-person distance threshold."""
        a = self.analyzer
        return cosine_threshold(a.distance, a.same_person_threshold, a.embedding_dim)

    @cached_property
    def duplicate_cos(self) -> float:
        a = self.analyzer
        return cosine_threshold(
            a.distance, self.config.dup_embedding_fraction * a.same_person_threshold, a.embedding_dim
        )

    def source(self, relative: str) -> str:
        return str(self.photos_dir / relative)

    def stage_timer(self, stage: str) -> _Timer:
        return _Timer(self.stats.setdefault(stage, StageStats()))

    def compute_missing(
        self,
        stage: str,
        func: Any,
        jobs: list,
        *,
        cache: Any,
        done: dict,
        key: str,
        distinct: int,
        uses_models: bool = True,
    ) -> None:
        """Run `func` on `jobs` (the work not in `done`), adding each result to `done` and to the work-folder
        `cache` as it arrives, so a killed run keeps what finished; `distinct` counts all the stage's work."""
        with self.stage_timer(stage) as stats:
            for row in analysis.run_jobs(
                func,
                jobs,
                backend=self.config.face_backend,
                workers=self.config.workers,
                desc=stage,
                uses_models=uses_models,
                progress=self.progress,
            ):
                done[row[key]] = row
                cache.add(row)
            cache.compact()
            stats.computed += len(jobs)
            stats.reused += distinct - len(jobs)


class _Timer:
    def __init__(self, stats: StageStats):
        self.stats = stats

    def __enter__(self) -> StageStats:
        self._start = time.perf_counter()
        return self.stats

    def __exit__(self, *exc: object) -> None:
        self.stats.seconds += time.perf_counter() - self._start


def photo_schema(*extra: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([*PHOTO_FIELDS, *extra])


def candidates(table: pa.Table) -> list[dict]:
    """Rows of a stage table that are still in the running (no reason), in source_path order."""
    rows = [r for r in table.to_pylist() if r["reason"] is None]
    return sorted(rows, key=lambda r: r["source_path"])


def rejected(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if r["reason"] is not None]
