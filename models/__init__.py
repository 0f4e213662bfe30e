"""DynamicID's modules and the base families they plug into.

```
families/   one module per base family (sd15, sdxl, flux) and one registry, FAMILIES: each family
            recognises its folder / single-file checkpoint / denoiser, loads its parts, builds its tiny FAKE,
            gives its Conditioner, installs the identity attention (SAA) in its denoiser, names its pipeline
base        BaseModel (the frozen parts: denoiser, VAE, text encoders, image encoder) and load_base_model
conditioning  faces and prompts -> the denoiser's inputs, shared by training and inference
saa, face_encoder, imr, keypoint_encoder, blocks, lora   the method's modules
saa_unet    keeps SAA on a UNet through its own attention switches (slicing, QKV fusion)
saa_flux    SAA on Flux's double-stream joint attention (`install_flux_saa`)
conditioning_flux   Flux's conditioner (T5 states, CLIP pooled vector, text ids)
objectives  epsilon, v-prediction and flow-matching training targets, picked by the family
adapter     DynamicIDAdapter: the weights as a diffusers component (`id_adapter`) for save_pretrained
layerwise   frozen denoiser weights stored in float8 (inference --weights-dtype, training --base-dtype)
checkpoints, release, state_dicts, xlabs   weights I/O (ours, the release's, IP-Adapter FaceID-Plus, XLabs' Flux)
```

Nothing outside `families/` branches on the base family: it asks the registry (`detect_family(source)`,
`denoiser_family(module)`, `family_named(name)`). Parameter names follow the authors' release
(../shared/spec/METHOD.md), so its checkpoints and IP-Adapter FaceID-Plus's load strictly. The names below are
imported on first use, so torch-free code (the training CLI, the registry) can import `dynamicid.models.families`
without loading torch.
"""

from dynamicid import lazy_exports

_MODULES = {
    "blocks": ("FeedForward", "MultAttention", "PerceiverAttention"),
    "checkpoints": (
        "SD15_UNET_CONFIG",
        "SDXL_UNET_CONFIG",
        "DynamicIDWeights",
        "ReleaseCheckpoint",
        "WeightsFileError",
        "convert_release",
        "load_dynamicid",
        "load_ip_adapter_faceid",
        "load_release_checkpoint",
        "save_dynamicid",
    ),
    "face_encoder": ("FaceEncoder",),
    "imr": ("IMR",),
    "keypoint_encoder": ("KeypointEncoder",),
    "lora": ("LoRALinear",),
    "release": ("from_release", "load_release_saa"),
    "saa": (
        "SAACall",
        "SAAProcessor",
        "boost_for_step",
        "install_saa",
        "load_saa_state_dict",
        "saa_activation_maps",
        "saa_id_attention_probs",
        "saa_processors",
        "saa_state_dict",
    ),
}
_EXPORTS = {name: f"dynamicid.models.{module}" for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
