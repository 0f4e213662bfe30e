"""The local engine: this process plus a pool of worker processes, streaming Parquet record batches."""

from __future__ import annotations

from pathlib import Path

from dynamicid.curation.stages import Stage, StageStats


class LocalEngine:
    name = "local"

    def __init__(self, *, workers: int, progress: bool):
        self.workers = workers
        self.progress = progress

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        raise NotImplementedError

    def close(self) -> None:
        pass
