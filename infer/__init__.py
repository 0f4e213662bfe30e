"""Inference: `DynamicIDPipeline` / `DynamicIDXLPipeline` (diffusers; SD 1.5 / SDXL) for several people with a
layout and per-person expressions; `pipeline_for(base)` picks the one of a loaded base model.

from dynamicid.infer import DynamicIDPipeline, Person

The names are imported on first use, so the `dynamicid-infer` command can quiet the libraries before they load.
"""

from dynamicid import lazy_exports

_EXPORTS = {
    "DynamicIDPipeline": "dynamicid.infer.pipeline",
    "DynamicIDPipelineOutput": "dynamicid.infer.pipeline",
    "DynamicIDXLPipeline": "dynamicid.infer.pipeline",
    "pipeline_for": "dynamicid.infer.pipeline",
    "Person": "dynamicid.infer.people",
    "ReleaseFiles": "dynamicid.infer.weights",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
