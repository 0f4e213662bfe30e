"""Inference: `DynamicIDPipeline` (diffusers) for several people with a layout and per-person expressions.

from dynamicid.infer import DynamicIDPipeline, Person
"""

from dynamicid.infer.people import Person
from dynamicid.infer.pipeline import DynamicIDPipeline, DynamicIDPipelineOutput
from dynamicid.infer.weights import ReleaseFiles

__all__ = ["DynamicIDPipeline", "DynamicIDPipelineOutput", "Person", "ReleaseFiles"]
