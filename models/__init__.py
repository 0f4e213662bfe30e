"""DynamicID's modules: face encoder, IMR, keypoint encoder, SAA attention processors, checkpoint I/O.

Parameter names follow the authors' release (../shared/spec/METHOD.md), so its checkpoints and IP-Adapter
FaceID-Plus's load strictly; `dynamicid.models.base` (base-model loading) is imported on its own.
"""

from dynamicid.models.blocks import FeedForward, MultAttention, PerceiverAttention
from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.release import from_release

__all__ = [
    "IMR",
    "FaceEncoder",
    "FeedForward",
    "KeypointEncoder",
    "MultAttention",
    "PerceiverAttention",
    "from_release",
]
