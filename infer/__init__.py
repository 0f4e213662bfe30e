"""Inference: `DynamicIDPipeline` / `DynamicIDXLPipeline` (diffusers; SD 1.5 / SDXL) for several people with a
layout and per-person expressions, and the public generate API every front end calls.

    from dynamicid.infer import GenerateRequest, ModelOptions, Person, load_pipeline
    from dynamicid.infer.generate import generate

A new front end (CLI, app, node pack, training samples) builds a `GenerateRequest`, loads once with
`load_pipeline(ModelOptions)` and calls `generate(pipe, request)` (`dynamicid.infer.generate`); it never calls
a CLI function. A new base family adds its pipeline class where `pipeline_for` finds it; nothing here changes.

The names are imported on first use, so the `dynamicid-infer` command can quiet the libraries before they load.
(`generate` itself is not re-exported: `dynamicid.infer.generate` is its module.)
"""

from dynamicid import lazy_exports

_MODULES = {
    "dynamicid.infer.pipeline": (
        "DynamicIDPipeline",
        "DynamicIDPipelineOutput",
        "DynamicIDXLPipeline",
        "pipeline_for",
    ),
    "dynamicid.infer.generate": (
        "GenerateRequest",
        "Generated",
        "ModelOptions",
        "load_pipeline",
    ),
    "dynamicid.infer.people": ("Person",),
    "dynamicid.infer.weights": ("ReleaseFiles",),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)

__getattr__ = lazy_exports("dynamicid.infer", _MODULES)
