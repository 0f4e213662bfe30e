"""XLabs' FLUX.1 IP-Adapter (`flux-ip-adapter.safetensors`, the layout diffusers' `FluxIPAdapterMixin` loads) as
the start of a Flux anchoring run, as SD 1.5 starts from IP-Adapter FaceID-PlusV2.

The file holds, for each of the transformer's double-stream blocks i,
`double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}` (Linear T5 width -> width: 4096 ->
3072 on FLUX.1-dev), and `ip_adapter_proj_model.{proj,norm}.{weight,bias}`: a Linear from a CLIP ViT-L image
embedding (768) to `num_tokens` tokens of T5's width and a LayerNorm over them. So a run started from it takes ID
tokens as wide as T5's states (the transformer's `joint_attention_dim`, 4096; XLabs' tokens stand where T5's do):
SAA is installed with `id_dim` = that width, the face encoder makes tokens of that width, and the weights record it
(`cross_attention_dim`, and the face encoder's MLP hidden width as `face_proj_dim`), so inference, cache-tokens and
reconfiguration rebuild the same shapes. Mapping (every tensor of the file is used):
- `double_blocks.{i}...ip_adapter_double_stream_{k,v}_proj` -> `transformer_blocks.{i}.attn.processor.to_{k,v}_id`;
- `ip_adapter_proj_model.proj` -> the face encoder's `proj.2` (its MLP built with hidden width = the CLIP width);
- `ip_adapter_proj_model.norm` -> the face encoder's `norm`.
The face encoder's first MLP layer (ID embedding -> hidden), its perceiver and SAA's LoRA start fresh. Loading is
strict: a missing, unexpected or misshapen tensor, or a file for another number of double-stream blocks, is one
line naming the file and the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynamicid.models.face_encoder import FaceEncoder

PROJ_PREFIX = "ip_adapter_proj_model."
_BLOCK_KEY = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")
PARTS = ["face_encoder", "saa"]


def is_xlabs_layout(keys: list[str]) -> bool:
    """Whether a safetensors file's tensor names are XLabs' Flux IP-Adapter's."""
    return any(k.startswith(PROJ_PREFIX) or "ip_adapter_double_stream_" in k for k in keys)


@dataclass
class XLabsIPAdapter:
    """The tensors of an XLabs Flux IP-Adapter file; `load_saa_into` and `build_face_encoder` map them strictly."""

    path: Path
    tensors: dict[str, torch.Tensor]
    num_tokens: int = 4
    lora_rank: int = 0  # SAA's LoRA on the image stream (none in the file: it starts at zero)

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.path}: missing tensor {key} of XLabs' Flux IP-Adapter layout")
        return self.tensors[key]

    def _copy(self, key: str, target: torch.Tensor) -> None:
        tensor = self.tensors[key]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{self.path}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}"
            )
        target.copy_(tensor)

    @property
    def id_dim(self) -> int:
        """The ID tokens' width (T5's, 4096 for FLUX.1)."""
        return int(self._tensor(PROJ_PREFIX + "norm.weight").shape[0])

    @property
    def clip_dim(self) -> int:
        """The width of the CLIP image embedding the projection takes (768 for ViT-L)."""
        return int(self._tensor(PROJ_PREFIX + "proj.weight").shape[1])

    def mapping(self) -> dict[str, tuple[str, str]]:
        """File tensor name -> (part, name in that part's state dict: `flux_saa_state_dict`'s or the encoder's)."""
        mapped = {}
        for key in self.tensors:
            block = _BLOCK_KEY.fullmatch(key)
            if block:
                index, kv, param = block.groups()
                mapped[key] = ("saa", f"transformer_blocks.{index}.attn.processor.to_{kv}_id.{param}")
            elif key.removeprefix(PROJ_PREFIX) in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
                name = key.removeprefix(PROJ_PREFIX)
                mapped[key] = ("face_encoder", name.replace("proj.", "proj.2.") if name.startswith("proj.") else name)
            else:
                raise ValueError(f"{self.path}: unexpected tensor {key} for XLabs' Flux IP-Adapter layout")
        return mapped

    def check(self, transformer: nn.Module) -> None:
        """The file fits `transformer` (its double-stream block count, width and T5 width) and `num_tokens`."""
        blocks = {int(m.group(1)) for k in self.tensors if (m := _BLOCK_KEY.fullmatch(k))}
        expected_blocks = len(transformer.transformer_blocks)
        if len(blocks) != expected_blocks:
            raise ValueError(
                f"{self.path}: XLabs IP-Adapter for {len(blocks)} double-stream blocks, but the base transformer "
                f"has {expected_blocks}; use the adapter made for this base"
            )
        width, id_dim = int(transformer.inner_dim), int(transformer.config.joint_attention_dim)
        tokens_key = PROJ_PREFIX + "proj.weight"
        expected = {
            tokens_key: (self.num_tokens * id_dim, self.clip_dim),
            PROJ_PREFIX + "proj.bias": (self.num_tokens * id_dim,),
        }
        expected |= {PROJ_PREFIX + "norm.weight": (id_dim,), PROJ_PREFIX + "norm.bias": (id_dim,)}
        for i in range(expected_blocks):
            for kv in "kv":
                key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
                expected |= {key + "weight": (width, id_dim), key + "bias": (width,)}
        self.mapping()  # names an unexpected tensor
        for key, shape in expected.items():
            found = tuple(self._tensor(key).shape)
            if found != shape:
                tokens = found[0] // id_dim if key == tokens_key and found[0] % id_dim == 0 else None
                hint = f" ({tokens} ID tokens per face: set num_tokens={tokens})" if tokens else ""
                raise ValueError(
                    f"{self.path}: {key} has shape {found}, but this base (width {width}, T5 width {id_dim}, "
                    f"num_tokens={self.num_tokens}) needs {shape}{hint}"
                )

    def load_saa_into(self, transformer: nn.Module) -> None:
        """Install SAA with ID tokens of the file's width and load every block's to_k_id/to_v_id strictly."""
        from dynamicid.models.saa_flux import flux_saa_processors, install_flux_saa

        self.check(transformer)
        install_flux_saa(transformer, rank=self.lora_rank, num_tokens=self.num_tokens, id_dim=self.id_dim)
        processors = flux_saa_processors(transformer)
        with torch.no_grad():
            for key, (part, name) in self.mapping().items():
                if part == "saa":
                    processor, parameter = name.rsplit(".processor.", 1)
                    self._copy(key, processors[f"{processor}.processor"].get_parameter(parameter))

    def build_face_encoder(self, *, id_embeddings_dim: int, clip_embeddings_dim: int) -> FaceEncoder:
        """The face encoder at the file's token width, its `proj.2` and `norm` from the file (the rest fresh)."""
        encoder = FaceEncoder(
            cross_attention_dim=self.id_dim,
            id_embeddings_dim=id_embeddings_dim,
            clip_embeddings_dim=clip_embeddings_dim,
            num_tokens=self.num_tokens,
            proj_dim=self.clip_dim,
        )
        with torch.no_grad():
            for key, (part, name) in self.mapping().items():
                if part == "face_encoder":
                    self._copy(key, encoder.get_parameter(name))
        return encoder

    def report(self) -> str:
        """One line: what was loaded and what starts fresh."""
        blocks = sum(1 for part, _ in self.mapping().values() if part == "saa") // 4
        lora = f", SAA's LoRA (rank {self.lora_rank})" if self.lora_rank else ""
        return (
            f"--init-from {self.path.name} (XLabs Flux IP-Adapter): loaded to_k_id/to_v_id of {blocks} double-stream "
            f"blocks and the face encoder's proj.2 and norm ({self.num_tokens} tokens x {self.id_dim}); fresh: the "
            f"face encoder's proj.0 and perceiver_resampler{lora}"
        )
