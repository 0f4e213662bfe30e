"""The DynamicID conditioning: one path from faces to the UNet's inputs, for training, validation and inference.

```
aligned face (ArcFace-aligned 224 crop, uint8) + ID embedding      dataset row (train) | analysed photo (infer)
  -> CLIP input (mean/std) -> penultimate CLIP states              Conditioner.face_encoder_inputs
     a dropped / unconditional face: zero embedding + all-zero image (the same rule for CFG and drops)
  -> face tokens (face encoder)                                    (B, num_tokens, C)
  -> IMR edit towards target landmark maps + face-prompt vectors   edit_tokens, Conditioner.face_prompt_vectors
  -> [text ; ID tokens], persons in order                          encoder_states
  -> SAA inputs of each UNet call: persons, boxes (default strips), gating,   saa_calls (training: TRAINING_SAA)
     this denoising step's boost                                               cross_attention_kwargs={"saa": ...}
```

`Conditioner` holds the frozen encoders of one base family and is the only place that turns prompts and faces
into tensors; the anchoring stage, the reconfiguration stage, `cache-tokens` and `DynamicIDPipeline` (which the
training stages also use for their sample images) all call it. SD 1.5 has one CLIP text encoder and no extra
UNet inputs; SDXL (`SDXLConditioner`: two text encoders, `added_cond_kwargs`) subclasses it and overrides
`token_ids`, `text_states`, `text_embeddings` / `condition_from` (its `added_cond_kwargs`) and
`face_prompt_vectors`; `text_condition` = `condition_from(text_embeddings(ids))`, split so that
`dynamicid-train cache-prompts` can store the embeddings and training rebuild the condition without the encoders;
`Conditioner.from_parts(base_or_pipeline)` asks the base family (`dynamicid.models.families`) for its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamicid.models.base import CLIP_IMAGE_SIZE
from dynamicid.models.families import parts_family
from dynamicid.models.saa import SAACall, boost_for_step

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FULL_IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)
TRAINING_SAA = SAACall(num_ids=1, gating=True, boxes=(FULL_IMAGE_BOX,))  # both stages train one ID, whole image


def padded_ids(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
    """A tokenizer's ids (N, max_length), padded and truncated to `max_length` (default its model_max_length)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length if max_length is None else max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


TWO_TEXT_ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "image_encoder")


def two_text_encoder_parts(parts: Any) -> dict[str, Any]:
    """The encoders of a two-text-encoder base (SDXL, Flux) from `parts` (a BaseModel or a pipeline), by name."""
    return {name: getattr(parts, name) for name in TWO_TEXT_ENCODER_PARTS}


class Conditioner:
    """The frozen encoders of an SD 1.5-family base: tokenizer, CLIP text encoder, CLIP image encoder.

    Args:
        tokenizer, text_encoder: the base's CLIP tokenizer and text model.
        image_encoder: the CLIP vision tower whose penultimate states feed the face encoder (None: text only).
    """

    def __init__(self, *, tokenizer: Any, text_encoder: Any, image_encoder: Any | None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder

    @staticmethod
    def from_parts(parts: Any) -> Conditioner:
        """The conditioner of the base family of `parts` (anything holding the base's parts as attributes: a
        `BaseModel` or a pipeline): `Conditioner` for SD 1.5, `SDXLConditioner` for SDXL (by its denoiser)."""
        return parts_family(parts).conditioner(parts)

    # ---- text (base-family specific) ----

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Padded token ids (N, 77) of the UNet's text condition."""
        return padded_ids(self.tokenizer, prompts)

    @torch.no_grad()
    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states (N, 77, text_dim): the UNet's text condition."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def face_prompt_vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        """Pooled CLIP text outputs (N, text_dim) of face prompts: the IMR's text input."""
        return self.text_encoder(self.token_ids(prompts).to(self.text_encoder.device)).pooler_output

    def _encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text states, the pooled vector the denoiser also takes: none for SD 1.5)."""
        return self.text_states(input_ids), None

    def text_embeddings(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the text encoders give the denoiser's condition, per prompt (what `cache-prompts` stores):
        the states, and the pooled vector where the family has one (SDXL, Flux)."""
        states, pooled = self._encode(input_ids)
        return {"states": states} if pooled is None else {"states": states, "pooled": pooled}

    def condition_from(
        self, embeddings: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(text states, the denoiser's other text inputs) from `text_embeddings`' output; needs no text encoder.
        SD 1.5's UNet takes no added inputs."""
        return embeddings["states"], None

    def text_condition(
        self, input_ids: torch.Tensor, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(text states, the UNet's `added_cond_kwargs`) of token ids for images of `size` (height, width)."""
        return self.condition_from(self.text_embeddings(input_ids), size)

    # ---- faces ----

    def clip_input(self, faces: torch.Tensor | Sequence[Any] | np.ndarray) -> torch.Tensor:
        """CLIP's mean/std-normalised input (N, 3, 224, 224) float32 of aligned faces, on the encoder's device.

        `faces`: uint8 (N, 3, 224, 224) tensor, or RGB 224x224 PIL images / uint8 arrays (no resize or crop: the
        faces are aligned by `dynamicid.faces.align.arcface_align(..., size=224)` already).
        """
        if not isinstance(faces, torch.Tensor):
            arrays = np.stack([np.asarray(face, dtype=np.uint8) for face in faces])
            if arrays.ndim != 4 or arrays.shape[-1] != 3:
                raise ValueError(f"CLIP input must be RGB faces, got an array of shape {arrays.shape}")
            faces = torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))
        if faces.shape[1:] != (3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE):
            raise ValueError(
                f"CLIP input must be RGB {CLIP_IMAGE_SIZE}x{CLIP_IMAGE_SIZE} faces, got {tuple(faces.shape[1:])}"
            )
        device = self._image_encoder().device
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        return (faces.to(device, torch.float32) / 255.0 - mean) / std

    @torch.no_grad()
    def clip_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The penultimate hidden states (N, tokens, clip_dim) of the CLIP image encoder."""
        encoder = self._image_encoder()
        pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
        return encoder(pixel_values, output_hidden_states=True).hidden_states[-2]

    def face_encoder_inputs(
        self, faces: torch.Tensor | Sequence[Any], id_embeds: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ID embeddings, CLIP states) for the face encoder; rows where `keep` is False are the unconditional
        face: a zero ID embedding and the CLIP states of an all-zero image tensor (METHOD.md, classifier-free
        guidance; the anchoring stage's ID drop)."""
        pixels = self.clip_input(faces)
        if keep is not None:
            pixels = pixels * keep.to(pixels.device)[:, None, None, None].to(pixels.dtype)
            id_embeds = id_embeds * keep.to(id_embeds.device)[:, None].to(id_embeds.dtype)
        return id_embeds, self.clip_states(pixels)

    def _image_encoder(self) -> Any:
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder loaded: pass image_encoder=DIR (a CLIP vision model folder)")
        return self.image_encoder


class SDXLConditioner(Conditioner):
    """The frozen encoders of an SDXL base: two CLIP text encoders and the CLIP image encoder.

    Text is encoded as SDXL's pipeline encodes it: each encoder's penultimate hidden states, side by side, and
    the second encoder's projected pooled vector, which goes to the UNet with the size ids
    (`added_cond_kwargs` text_embeds / time_ids) and is the IMR's text vector of a face prompt.
    """

    def __init__(
        self, *, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any, image_encoder: Any | None
    ):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2

    def _pairs(self) -> list[tuple[Any, Any]]:
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Padded token ids (N, 2 x 77): the first tokenizer's, then the second's."""
        return torch.cat([padded_ids(tokenizer, prompts) for tokenizer, _ in self._pairs()], dim=1)

    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate states of both encoders side by side (N, 77, C), the second's pooled vector (N, pooled))."""
        states, pooled = [], None
        for ids, (_, encoder) in zip(input_ids.chunk(2, dim=1), self._pairs(), strict=True):
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the text_embeds of CLIPTextModelWithProjection (the second encoder)
        return torch.cat(states, dim=-1), pooled

    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._encode(input_ids)[0]

    def face_prompt_vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        """The second encoder's pooled, projected vectors (N, projection_dim) of face prompts."""
        return self._encode(self.token_ids(prompts))[1]

    def condition_from(
        self, embeddings: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(text states, `added_cond_kwargs`): the pooled vector and the time ids (original size = target size =
        `size`, crop top-left (0, 0)), as SDXL's pipeline builds them."""
        if size is None:
            raise ValueError("an SDXL text condition needs the image size (height, width) for its time ids")
        states, pooled = embeddings["states"], embeddings["pooled"]
        height, width = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return states, {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)}


def landmark_vectors(keypoint_encoder: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """Keypoint-encoder vectors (N, emb) of landmark maps (N, 1, 96, 96) in [-1, 1]."""
    weight = next(keypoint_encoder.parameters())
    return keypoint_encoder(maps.to(weight.device, weight.dtype)).flatten(1)


def edit_tokens(imr: nn.Module, tokens: torch.Tensor, landmarks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """IMR: one face's tokens (1, n, C) -> one token set per target (K, n, C).

    `landmarks` (1 + K, emb) and `text` (1 + K, txt): the source first, then the targets.
    """
    weight = next(imr.parameters())
    landmarks, text = landmarks.to(weight.device, weight.dtype), text.to(weight.device, weight.dtype)
    return imr(tokens.to(weight.device, weight.dtype), landmarks[:1], landmarks[1:], text[:1], text[1:])


def encoder_states(text: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
    """`[text ; ID tokens]`: text (B, L, C) followed by ID tokens (B or 1, N_id, C), persons in order."""
    id_tokens = id_tokens.to(text.dtype)
    if id_tokens.shape[0] != text.shape[0]:
        id_tokens = id_tokens.expand(text.shape[0], -1, -1)
    return torch.cat([text, id_tokens], dim=1)


def saa_calls(
    *,
    num_ids: int,
    steps: int,
    boxes: Sequence[Sequence[float]] | None = None,
    id_scale: float = 1.0,
    gating: bool = True,
    boost: float = 0.0,
    boost_steps: int = 0,
    image_size: tuple[int, int] | None = None,
    return_activation_maps: bool = False,
) -> list[SAACall]:
    """The SAA inputs of each of `steps` denoising steps (`cross_attention_kwargs={"saa": calls[i]}`): one layout,
    the gate boosted during the first `boost_steps` steps (the release's infer_scale / infer_end)."""
    layout = SAACall(
        num_ids=num_ids,
        id_scale=id_scale,
        gating=gating,
        boxes=None if boxes is None else tuple(tuple(box) for box in boxes),
        image_size=image_size,
        return_activation_maps=return_activation_maps,
    )
    return [dataclasses.replace(layout, boost=boost_for_step(step, boost, boost_steps)) for step in range(steps)]
