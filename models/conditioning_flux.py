"""FLUX.1's conditioning: the prompt as T5 states + CLIP's pooled vector, faces as the SD families' (`Conditioner`).

`FluxConditioner` encodes text as diffusers' `FluxPipeline.encode_prompt` does (T5 last hidden states padded to
`max_sequence_length`, CLIP's pooled output, text position ids all zero) and leaves the faces to `Conditioner`:
the CLIP image encoder's penultimate states for the face encoder, the unconditional face, and the IMR's
face-prompt vector, which on Flux is the same CLIP text encoder's pooled output that conditions the transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dynamicid.models.conditioning import Conditioner, padded_ids, two_text_encoder_parts
from dynamicid.models.families.flux import T5_MAX_LENGTH

TEXT_ID_AXES = 3  # Flux's rotary position ids: (modality, row, column); all zero for text


class FluxConditioner(Conditioner):
    """The frozen encoders of a FLUX.1 base: CLIP text (pooled), T5 (states) and the CLIP image encoder.

    Args:
        tokenizer, text_encoder: CLIP (77 tokens); tokenizer_2, text_encoder_2: T5.
        image_encoder: the CLIP vision tower of the face encoder (None: text only).
        max_sequence_length: T5 tokens of a prompt (FLUX.1-dev: 512).
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        text_encoder: Any,
        tokenizer_2: Any,
        text_encoder_2: Any,
        image_encoder: Any | None,
        max_sequence_length: int = T5_MAX_LENGTH,
    ):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_parts(cls, parts: Any, max_sequence_length: int = T5_MAX_LENGTH) -> FluxConditioner:
        """The conditioner over a Flux `BaseModel`'s or a Flux pipeline's parts."""
        return cls(**two_text_encoder_parts(parts), max_sequence_length=max_sequence_length)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, 77 + max_sequence_length): CLIP's, then T5's (cacheable ahead of training)."""
        t5 = padded_ids(self.tokenizer_2, prompts, self.max_sequence_length)
        return torch.cat([padded_ids(self.tokenizer, prompts), t5], dim=1)

    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 last hidden states (N, L, 4096), CLIP pooled output (N, 768)) of `token_ids`' output."""
        clip_ids, t5_ids = input_ids.split([input_ids.shape[1] - self.max_sequence_length, self.max_sequence_length], 1)
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        states = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return states, pooled

    @torch.no_grad()
    def face_prompt_vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's pooled outputs (N, 768) of face prompts: the IMR's text input (the vector Flux is conditioned on)."""
        ids = padded_ids(self.tokenizer, prompts).to(self.text_encoder.device)
        return self.text_encoder(ids, output_hidden_states=False).pooler_output

    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._encode(input_ids)[0]

    def condition_from(
        self, embeddings: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(T5 states, the transformer's other text inputs: `pooled_projections` and `txt_ids`)."""
        states, pooled = embeddings["states"], embeddings["pooled"]
        txt_ids = torch.zeros(states.shape[1], TEXT_ID_AXES, device=states.device, dtype=states.dtype)
        return states, {"pooled_projections": pooled, "txt_ids": txt_ids}
