"""Inference: `DynamicIDPipeline` / `DynamicIDXLPipeline` / `DynamicIDFluxPipeline` (diffusers; SD 1.5 / SDXL /
FLUX.1) for several people with a layout and per-person expressions, and the public generate API every front end
calls.

    from dynamicid.infer import GenerateRequest, ModelOptions, Person, load_pipeline
    from dynamicid.infer.generate import generate

A new front end (CLI, app, node pack, training samples) builds a `GenerateRequest`, loads once with
`load_pipeline(ModelOptions)` and calls `generate(pipe, request)` (`dynamicid.infer.generate`); it never calls
a CLI function. A new base family adds its pipeline class where `pipeline_for` finds it; nothing here changes.

The names are imported on first use, so the `dynamicid-infer` command can quiet the libraries before they load.
(`generate` itself is not re-exported: `dynamicid.infer.generate` is its module.)
"""

from dynamicid import lazy_exports

_EXPORTS = {
    "DynamicIDPipeline": "dynamicid.infer.pipeline",
    "DynamicIDPipelineOutput": "dynamicid.infer.pipeline",
    "DynamicIDXLPipeline": "dynamicid.infer.pipeline",
    "DynamicIDFluxPipeline": "dynamicid.infer.pipeline_flux",
    "pipeline_for": "dynamicid.infer.pipeline",
    "GenerateRequest": "dynamicid.infer.generate",
    "Generated": "dynamicid.infer.generate",
    "ModelOptions": "dynamicid.infer.generate",
    "load_pipeline": "dynamicid.infer.generate",
    "Person": "dynamicid.infer.people",
    "ReleaseFiles": "dynamicid.infer.weights",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
