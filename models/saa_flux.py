"""SAA on FLUX.1's joint attention: the image-token queries attend to each person's ID tokens, gated and routed.

`install_flux_saa(transformer)` puts a `FluxSAAProcessor` on the attention of every double-stream block
(`transformer_blocks.*`). It computes Flux's own joint attention exactly as diffusers' `FluxAttnProcessor` does
and adds the ID branch of METHOD.md ("SAA"): the image stream's queries (after Flux's q-norm, before RoPE: ID
tokens have no position) attend to the ID tokens through `to_k_id`/`to_v_id`; the logits go through the same
query-level activation gating, per-person box routing and boost as on the UNet (`dynamicid.models.saa`'s
`route_id_logits`), on the packed latent token grid (one query per 2x2 latent patch, rows first, any aspect
ratio: `SAACall.image_size`). The result, scaled by `id_scale` and the gate, is the processor's third output,
which `FluxTransformerBlock` adds to the image stream after the block (where diffusers' Flux IP-Adapter adds its
output). Per-call inputs: `joint_attention_kwargs={"saa": SAACall(...), "id_tokens": (B or 1, N_id, id_dim)}`,
persons in order, `num_tokens` each; without `id_tokens`, or with `id_scale` 0, the block computes what Flux
computes.

Double-stream blocks only, because:
- there the image tokens have their own stream, projections and output, so the ID branch joins the image stream
  alone; in a single-stream block text and image share one sequence and the attention output is mixed with the
  MLP by `proj_out`, so an added output would reach the text tokens too;
- XLabs' Flux IP-Adapter and diffusers' `FluxIPAdapterAttnProcessor` inject in the 19 double-stream blocks and
  add the output after the block, as here, so their weights map one-to-one onto `to_k_id`/`to_v_id` (they take
  4096-wide tokens: `install_flux_saa(..., id_dim=4096)`);
- cost: 19 of FLUX.1's 57 attention layers carry the branch, which keeps a step within 1.15x of Flux's
  (BENCHMARKS.md, `benchmarks/flux_step.py`).
The single-stream blocks get `FluxSAASingleStreamProcessor`: Flux's attention, accepting (and ignoring) the SAA
inputs so that diffusers does not warn on every call.

Optional LoRA (`rank` > 0) on the image stream's to_q/to_k/to_v/to_out of the double-stream blocks, as SAA's
LoRA on the UNet (`up` at zero: a fresh install changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from dynamicid.models.lora import LoRALinear
from dynamicid.models.saa import (
    SAACall,
    gated_id_probs,
    load_processors_state_dict,
    processors_state_dict,
)

DOUBLE_STREAM_PREFIX = "transformer_blocks."


class FluxSAASingleStreamProcessor(FluxAttnProcessor):
    """Flux's own attention for single-stream blocks; takes the SAA inputs that every block receives."""

    def __call__(
        self, attn: nn.Module, *args: object, saa: SAACall | None = None, id_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Named `saa` and `id_tokens` so that diffusers passes them here (it reads this signature) and not warns.
        return super().__call__(attn, *args)


class FluxSAAProcessor(nn.Module):
    """Flux's joint attention plus the gated, box-routed ID branch (diffusers processor API, double-stream blocks).

    Args:
        hidden_size: the block's width (3072 for FLUX.1). id_dim: the ID tokens' width (default hidden_size).
        rank: LoRA rank on the image stream's projections; 0 = none. num_tokens: ID tokens per person.
    """

    _attention_backend = None  # set by diffusers' `set_attention_backend`, as on its own processors
    _parallel_config = None

    def __init__(self, hidden_size: int, id_dim: int | None = None, rank: int = 0, num_tokens: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.id_dim = id_dim or hidden_size
        self.rank = rank
        self.num_tokens = num_tokens
        self.to_k_id = nn.Linear(self.id_dim, hidden_size)
        self.to_v_id = nn.Linear(self.id_dim, hidden_size)
        if rank:
            self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank)
            self.to_k_lora = LoRALinear(hidden_size, hidden_size, rank)
            self.to_v_lora = LoRALinear(hidden_size, hidden_size, rank)
            self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank)
        # Recorded outputs of the last call that asked for them (SAACall.return_activation_maps), else None.
        self.activation_map: torch.Tensor | None = None
        self.id_attention_probs: torch.Tensor | None = None

    def _project(self, name: str, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{name}_lora").adapt(base, x) if self.rank else base(x)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,  # diffusers passes it positionally: None on single-stream
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        saa: SAACall | None = None,
        id_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """(image output, text output[, ID output]): `saa` and `id_tokens` from `joint_attention_kwargs`."""
        if encoder_hidden_states is None:
            raise ValueError("FluxSAAProcessor belongs on double-stream blocks (they pass encoder_hidden_states)")
        call = saa if saa is not None else SAACall()
        # Flux's joint attention (diffusers' FluxAttnProcessor), keeping the image queries for the ID branch.
        query = attn.norm_q(self._project("to_q", attn.to_q, hidden_states).unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(self._project("to_k", attn.to_k, hidden_states).unflatten(-1, (-1, attn.head_dim)))
        value = self._project("to_v", attn.to_v, hidden_states).unflatten(-1, (-1, attn.head_dim))
        text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        joint_query = torch.cat([text_query, query], dim=1)
        joint_key = torch.cat([text_key, key], dim=1)
        joint_value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            joint_query = apply_rotary_emb(joint_query, image_rotary_emb, sequence_dim=1)
            joint_key = apply_rotary_emb(joint_key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            joint_query,
            joint_key,
            joint_value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(joint_query.dtype)
        text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image_out = attn.to_out[1](self._project("to_out", attn.to_out[0], image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())

        self.activation_map = self.id_attention_probs = None
        if id_tokens is None or call.num_ids == 0 or (call.id_scale == 0 and not call.return_activation_maps):
            return image_out, text_out
        return image_out, text_out, self.id_branch(query, id_tokens, call)

    def id_branch(self, query: torch.Tensor, id_tokens: torch.Tensor, call: SAACall) -> torch.Tensor:
        """id_scale x gate x softmax(q k_id^T / sqrt(d)) v_id (B, Q, hidden): query (B, Q, heads, d) after q-norm."""
        expected = call.num_ids * self.num_tokens
        if id_tokens.shape[1] != expected:
            raise ValueError(
                f"SAA on Flux expects {expected} ID tokens ({call.num_ids} person(s) x {self.num_tokens}) in "
                f"joint_attention_kwargs['id_tokens'], got {tuple(id_tokens.shape)}; check SAACall(num_ids=...)"
            )
        heads, head_dim = query.shape[2], query.shape[3]
        id_tokens = id_tokens.to(query.dtype).expand(query.shape[0], -1, -1)  # compute dtype (fp8-stored weights too)
        key = self.to_k_id(id_tokens).unflatten(-1, (heads, head_dim))
        value = self.to_v_id(id_tokens).unflatten(-1, (heads, head_dim))
        logits = torch.einsum("b q h d, b n h d -> b h n q", query, key * head_dim**-0.5).float()
        weights = gated_id_probs(self, logits, call)
        out = torch.einsum("b h n q, b n h d -> b q h d", weights.to(value.dtype), value)
        return out.flatten(2).to(query.dtype)


def flux_saa_processors(transformer: nn.Module) -> dict[str, FluxSAAProcessor]:
    """The transformer's SAA processors by name (double-stream blocks, in order); fails if SAA is not installed."""
    saa = {name: p for name, p in transformer.attn_processors.items() if isinstance(p, FluxSAAProcessor)}
    if not saa:
        raise ValueError("this Flux transformer has no SAA processors: call install_flux_saa(transformer) first")
    return saa


def flux_saa_activation_maps(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Gate maps (B, H, W) of each SAA processor's last call with SAACall(return_activation_maps=True)."""
    return {n: p.activation_map for n, p in flux_saa_processors(transformer).items() if p.activation_map is not None}


def flux_saa_id_attention_probs(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """ID attention probabilities (B, heads, Q, N_id) of the last call (as `flux_saa_activation_maps`)."""
    processors = flux_saa_processors(transformer).items()
    return {n: p.id_attention_probs for n, p in processors if p.id_attention_probs is not None}


def install_flux_saa(transformer: nn.Module, *, rank: int = 0, num_tokens: int = 4, id_dim: int | None = None) -> None:
    """Put a `FluxSAAProcessor` on every double-stream block and a pass-through on every single-stream block.

    `id_dim` (default the transformer's width): the width of the ID tokens. When it equals the width,
    `to_k_id`/`to_v_id` start as copies of the block's text-stream key/value projections (the ID tokens stand
    where the text tokens stand, as SAA's `to_k_ip` starts from the UNet's to_k); LoRA `up` weights start at zero.
    Installing again with the same settings does nothing; with others it fails.
    """
    width = int(transformer.inner_dim)
    id_dim = id_dim or width
    current = transformer.attn_processors
    installed = [p for p in current.values() if isinstance(p, FluxSAAProcessor)]
    if installed:
        found = {(p.rank, p.num_tokens, p.id_dim) for p in installed}
        if found == {(rank, num_tokens, id_dim)}:
            return
        raise ValueError(
            f"SAA is already installed on this transformer with (rank, num_tokens, id_dim) {sorted(found)}; "
            f"cannot install rank={rank}, num_tokens={num_tokens}, id_dim={id_dim} over it"
        )
    processors: dict[str, nn.Module] = {}
    for name in current:
        if not name.startswith(DOUBLE_STREAM_PREFIX):
            processors[name] = FluxSAASingleStreamProcessor()
            continue
        attn = transformer.get_submodule(name.removesuffix(".processor"))
        weight = attn.to_q.weight
        with torch.device(weight.device):
            processor = FluxSAAProcessor(width, id_dim, rank=rank, num_tokens=num_tokens)
        processor.to(dtype=weight.dtype)
        if id_dim == width:
            with torch.no_grad():
                processor.to_k_id.load_state_dict(attn.add_k_proj.state_dict())
                processor.to_v_id.load_state_dict(attn.add_v_proj.state_dict())
        processors[name] = processor
    transformer.set_attn_processor(processors)


def flux_saa_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """All SAA weights keyed `<processor name>.<parameter>` (e.g. `transformer_blocks.0.attn.processor.to_k_id.weight`)."""
    return processors_state_dict(flux_saa_processors(transformer))


def load_flux_saa_state_dict(transformer: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load name-keyed SAA weights (as `flux_saa_state_dict` writes them) strictly into installed processors."""
    load_processors_state_dict(
        flux_saa_processors(transformer), state_dict, "double-stream attention of this Flux transformer"
    )
