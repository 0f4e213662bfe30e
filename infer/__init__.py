"""Inference: `DynamicIDPipeline` / `DynamicIDXLPipeline` / `DynamicIDFluxPipeline` (diffusers; SD 1.5 / SDXL /
FLUX.1) for several people with a layout and per-person expressions; `pipeline_for(base)` picks the one of a
loaded SD 1.5 / SDXL base model.

from dynamicid.infer import DynamicIDPipeline, Person

The names are imported on first use, so the `dynamicid-infer` command can quiet the libraries before they load.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DynamicIDPipeline": "dynamicid.infer.pipeline",
    "DynamicIDPipelineOutput": "dynamicid.infer.pipeline",
    "DynamicIDXLPipeline": "dynamicid.infer.pipeline",
    "DynamicIDFluxPipeline": "dynamicid.infer.pipeline_flux",
    "pipeline_for": "dynamicid.infer.pipeline",
    "Person": "dynamicid.infer.people",
    "ReleaseFiles": "dynamicid.infer.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynamicid.infer' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
