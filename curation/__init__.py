"""Curation: raw photo folders -> a DynamicID face dataset that `datasets.load_dataset(out_dir)` reads.

    from dynamicid.curation import build_dataset
    summary = build_dataset("photos/", "dataset/", per_identity=35)

Steps (each reads the previous table in the work folder and writes its own): scan, detect, identify, dedupe,
align, label, select, write (`pipeline.py`). The stage classes between scan and write and the contract every
engine runs them by: `stages.py`; the engines (`--engine local|ray`): `engines/`.
"""

from dynamicid.curation.config import CurationConfig
from dynamicid.curation.pipeline import STAGES, CurationError, build_dataset, open_run, run_stage

__all__ = ["STAGES", "CurationConfig", "CurationError", "build_dataset", "open_run", "run_stage"]
