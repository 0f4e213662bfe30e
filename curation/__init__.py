"""Curation: raw photo folders -> a DynamicID face dataset that `datasets.load_dataset(out_dir)` reads.

    from dynamicid.curation import build_dataset
    summary = build_dataset("photos/", "dataset/", per_identity=35)

Steps (each reads the previous table in the work folder and writes its own): scan, detect, identify, dedupe,
align, label, select, write (`pipeline.py`). The stage classes between scan and write and the contract every
engine runs them by: `stages.py`; the engines (`--engine local|ray`): `engines/`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STAGES", "CurationConfig", "CurationError", "build_dataset", "open_run", "run_stage"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a worker process that only unpickles a stage (and so imports this package) does not
    # pay for the pipeline's imports (every step's module: about 0.2 CPU-seconds per process).
    if name == "CurationConfig":
        from dynamicid.curation.config import CurationConfig

        return CurationConfig
    if name in __all__:
        from dynamicid.curation import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
