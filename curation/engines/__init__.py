"""Engines run the stages of `curation.stages` (one set of stage classes for all of them).

`local` (the default): this process plus a process pool, streaming Parquet record batches; memory bounded
whatever the photo count. `ray`: Ray Data operators (optional extra `dynamicid[ray]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dynamicid.curation.stages import BackendInfo, Stage, StageStats

ENGINES = ("local", "ray")


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (one line: what to install or do)."""


class Engine(Protocol):
    name: str

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        """Run `stage` on the candidate rows of the table at `source`; write its table to `target`."""
        ...

    def resolve_backend(self, requested: str, dup_embedding_fraction: float) -> BackendInfo:
        """`backend.resolve_backend` where the face models will run (a worker that keeps them, or this process)."""
        ...

    def close(self) -> None:
        """Release workers (a process pool; a Ray this engine started)."""
        ...


def make_engine(name: str, *, workers: int, progress: bool, ray_address: str | None = None) -> Engine:
    if name == "local":
        from dynamicid.curation.engines.local import LocalEngine

        return LocalEngine(workers=workers, progress=progress)
    if name == "ray":
        from dynamicid.curation.engines.ray_engine import RayEngine

        return RayEngine(workers=workers, progress=progress, address=ray_address)
    raise EngineUnavailable(f"unknown --engine {name!r}; valid: {', '.join(ENGINES)}")
