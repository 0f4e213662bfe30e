"""DynamicID for ComfyUI: load the weights, analyse each person's reference face, lay the people out, and patch
a MODEL so that its attention runs DynamicID's SAA (SD 1.5, SDXL: cross-attention; FLUX.1: double-stream blocks).

Install by linking or copying this folder into ComfyUI's `custom_nodes/` (with the `dynamicid` package
installed in ComfyUI's Python). Licence: GPL-3.0 (this folder only; see LICENSE), as code that imports ComfyUI
must be; the rest of the DynamicID project is Apache-2.0.
"""

from .nodes import DynamicIDExtension


async def comfy_entrypoint() -> DynamicIDExtension:
    return DynamicIDExtension()
