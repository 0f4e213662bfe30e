"""Engines run the stages of `curation.stages` (one set of stage classes for all of them).

`local` (the default): this process plus a process pool, streaming Parquet record batches; memory bounded
whatever the photo count. `ray`: Ray Data operators, tasks, and actor pools for the stages that ask for a GPU
on a cluster that has GPUs (optional extra `dynamicid[ray]`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from dynamicid.curation.chain import Resources
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.inputs import CurationError
from dynamicid.curation.stages import Stage, StageStats

ENGINES = ("local", "ray")
Call = tuple[Callable[..., Any], tuple]  # (a module-level function, its arguments): work an engine can ship
Pending = Callable[[], list[Any]]  # waits for work an engine started, and returns its results


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (one line: what to install or do)."""


class Engine(Protocol):
    name: str

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        """Run `stage` on the candidate rows of the table at `source`; write its table to `target`."""
        ...

    def map_calls(self, calls: Iterable[Call], what: str) -> Iterator[Any]:
        """`function(*arguments)` of each call, results in call order; the calls are taken as results come back.
        `what` names the work in an error message."""
        ...

    def prepare(self, call: Call, resources: Resources) -> Pending:
        """Begin `function(*arguments)` once in each worker that will run stages asking for `resources` (this
        process where the engine runs them here): a setup whose result the worker keeps for those stages (models it
        builds). Returns at once where it can, so that the caller's own start-up overlaps the workers'; the
        returned function waits and gives one result per worker."""
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


def start_engine(config: CurationConfig, *, progress: bool) -> Engine:
    """The run's engine. Settings it cannot run (a bad value, an engine that is not installed) raise
    `CurationError` before any worker starts."""
    try:
        config.check()
        return make_engine(config.engine, workers=config.workers, progress=progress, ray_address=config.ray_address)
    except (ValueError, EngineUnavailable) as error:
        raise CurationError(str(error)) from error
