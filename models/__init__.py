"""DynamicID's modules: face encoder, IMR, keypoint encoder, SAA attention processors, checkpoint I/O.

Parameter names follow the authors' release (../shared/spec/METHOD.md), so its checkpoints and IP-Adapter
FaceID-Plus's load strictly; `dynamicid.models.base` (base-model loading) and `dynamicid.models.conditioning`
(faces and prompts -> the UNet's inputs, shared by training and inference) are imported on their own.
"""

from dynamicid.models.blocks import FeedForward, MultAttention, PerceiverAttention
from dynamicid.models.checkpoints import (
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    DynamicIDWeights,
    ReleaseCheckpoint,
    WeightsFileError,
    convert_release,
    load_dynamicid,
    load_ip_adapter_faceid,
    load_release_checkpoint,
    save_dynamicid,
)
from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.lora import LoRALinear
from dynamicid.models.release import from_release, load_release_saa
from dynamicid.models.saa import (
    SAACall,
    SAAProcessor,
    boost_for_step,
    install_saa,
    load_saa_state_dict,
    saa_activation_maps,
    saa_id_attention_probs,
    saa_processors,
    saa_state_dict,
)

__all__ = [
    "IMR",
    "SD15_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "DynamicIDWeights",
    "FaceEncoder",
    "FeedForward",
    "KeypointEncoder",
    "LoRALinear",
    "MultAttention",
    "PerceiverAttention",
    "ReleaseCheckpoint",
    "SAACall",
    "SAAProcessor",
    "WeightsFileError",
    "boost_for_step",
    "convert_release",
    "from_release",
    "install_saa",
    "load_dynamicid",
    "load_ip_adapter_faceid",
    "load_release_checkpoint",
    "load_release_saa",
    "load_saa_state_dict",
    "saa_activation_maps",
    "saa_id_attention_probs",
    "saa_processors",
    "saa_state_dict",
    "save_dynamicid",
]
