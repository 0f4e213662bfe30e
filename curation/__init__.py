"""Curation: raw photo folders -> a DynamicID face dataset that `datasets.load_dataset(out_dir)` reads.

    from dynamicid.curation import build_dataset
    summary = build_dataset("photos/", "dataset/", per_identity=35)

Stages (each reads the previous stage's table in the work folder and writes its own):
scan, detect, identify, dedupe, align, label, select, write. See `pipeline.py`.
"""

from dynamicid.curation.config import CurationConfig
from dynamicid.curation.pipeline import STAGES, CurationError, build_dataset, open_run, run_stage

__all__ = ["STAGES", "CurationConfig", "CurationError", "build_dataset", "open_run", "run_stage"]
