"""Curation: raw photo folders -> a DynamicID face dataset that `datasets.load_dataset(out_dir)` reads.

    from dynamicid.curation import build_dataset
    summary = build_dataset("photos/", "dataset/", per_identity=35)

Steps (each reads the previous table in the work folder and writes its own): scan, detect, identify, dedupe,
align, label, select, write, declared once in `chain.py` (each step's command, stage classes, the settings they
depend on, and `merge`'s role); `pipeline.py` runs them. The stage contract every engine runs: `stages.py`; the
engines (`--engine local|ray`) and their shared helpers: `engines/`.

To add a stage: its class (`stages.Stage`) in a module of its own, one `StageEntry` in its step in `chain.py`
(the settings it depends on), and its tests; the pipeline, the command line's options and `merge` follow.
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
