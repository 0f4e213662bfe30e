"""SAA: the LoRA + ID-branch attention processors with query-level activation gating (METHOD.md "SAA").

`install_saa(unet)` puts one `SAAProcessor` on every attention layer. The processors hold weights only: what
changes per call (persons, boxes, gating, this step's boost) comes as `cross_attention_kwargs={"saa": SAACall(...)}`.
Cross-attention layers receive the encoder states `[text tokens ; ID tokens]`, the last `num_tokens * num_ids`
positions being the ID tokens, persons in order.

Overlapping boxes: people are listed back to front, and where boxes overlap the later person is in front. A query
cell inside several boxes attends only to the tokens of the last person whose box holds it (every other person's
tokens are hidden there), so the person in front shows their own face over the overlap, not a blend of both, and
the person behind shows in the rest of their box, as if partly hidden. (Read literally, METHOD.md's "every other
person's tokens set to -inf in each box" hides every person's tokens in an overlap, a softmax over nothing.)
A box lying wholly inside a later person's box (identical boxes included) would leave its person no cell at all:
refused (`covered_box`); list that person later to put them in front, or blend persons in one box with
`mix_scale`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dynamicid.models.lora import LoRALinear
from dynamicid.models.state_dicts import load_strict

GATE_THRESHOLD = 0.3  # normalised activations below this are set to 0 (the release's value)

Box = tuple[float, float, float, float]  # (y0, x0, y1, x1) in [0, 1]


@dataclass(frozen=True)
class SAACall:
    """The SAA inputs of one UNet call, passed as `cross_attention_kwargs={"saa": SAACall(...)}`.

    Every SAA processor reads them on each call (as diffusers' IP-Adapter processors read `ip_adapter_masks`);
    nothing is kept between calls, so a sampler decides per denoising step, e.g. the boost through
    `boost_for_step`. A UNet call without it uses `SAACall()`: single-person training (one person, gating on,
    the whole image as that person's box).

    Args:
        num_ids: persons whose ID tokens end the encoder states, `num_tokens` each (the processors' token
            count), persons in order: `[text ; person 1 ; person 2 ...]`; 0 = text only (LoRA attention).
        id_scale: weight of the ID branch (0 = the LoRA-only model).
        gating: query-level activation gating and box routing; off = plain LoRA + IP attention.
        boxes: one (y0, x0, y1, x1) box in [0, 1] per person; None = equal vertical strips. With `mix_scale`,
            a single box for several persons blended into one.
        boost: this call's gate boost inside the boxes (the release's infer_scale, applied while the step is
            below infer_end; see `boost_for_step`); 0 = none.
        mix_scale: weight of the first person's logits when persons are blended into one box.
        image_size: (height, width) in pixels, needed when the image is not square.
        return_activation_maps: each cross-attention processor keeps this call's gate map and ID attention
            probabilities (`saa_activation_maps`, `saa_id_attention_probs`).
    """

    num_ids: int = 1
    id_scale: float = 1.0
    gating: bool = True
    boxes: tuple[Box, ...] | None = None
    boost: float = 0.0
    mix_scale: float | None = None
    image_size: tuple[int, int] | None = None
    return_activation_maps: bool = False

    def __post_init__(self) -> None:
        if self.num_ids < 0:
            raise ValueError(f"num_ids must be >= 0, got {self.num_ids}")
        if self.mix_scale is not None:
            if not 0.0 <= self.mix_scale <= 1.0:
                raise ValueError(f"mix_scale must be in [0, 1], got {self.mix_scale}")
            if self.num_ids < 2 or self.boxes is None or len(self.boxes) != 1:
                raise ValueError(
                    "mix_scale blends several persons into one box: needs num_ids >= 2 and exactly one box"
                )
        boxes = self.boxes
        if boxes is not None:
            if self.num_ids == 0:
                raise ValueError("boxes were given but num_ids is 0")
            boxes = _check_boxes(boxes, 1 if self.mix_scale is not None else self.num_ids)
        if self.boost < 0:
            raise ValueError(f"boost must be >= 0, got {self.boost}")
        image_size = self.image_size
        if image_size is not None:
            if len(image_size) != 2 or min(image_size) <= 0:
                raise ValueError(f"image_size must be (height, width) in pixels, got {image_size}")
            image_size = (int(image_size[0]), int(image_size[1]))
        # Normalised once (tuples of floats), so that equal layouts compare and hash equal.
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "image_size", image_size)


TRAINING_CALL = SAACall()  # what a UNet call without `cross_attention_kwargs["saa"]` computes


def boost_for_step(step: int, boost: float, boost_steps: int) -> float:
    """The release's schedule: `boost` during the first `boost_steps` denoising steps (`step` from 0), then 0.

    A step, not a UNet call: a sampler that runs the UNet twice per step passes the same boost to both.
    """
    if boost < 0 or boost_steps < 0:
        raise ValueError(f"boost ({boost}) and boost_steps ({boost_steps}) must be >= 0")
    return boost if step < boost_steps else 0.0


def query_grid(num_queries: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of the query grid: square unless the image's (height, width) says otherwise."""
    if image_size is None:
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(f"{num_queries} attention queries do not form a square grid: SAACall(image_size=(h, w))")
        return side, side
    height, width = image_size
    r = int(math.sqrt(width * height // num_queries))
    grid = (height // r, width // r)
    if grid[0] * grid[1] != num_queries:
        raise ValueError(f"image_size {image_size} gives a {grid} grid, but the layer has {num_queries} queries")
    return grid


def box_cells(box: Box, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H*W,) bool: the grid cells of a box, rows int(y0*H)..int(y1*H), columns int(x0*W)..int(x1*W), end-exclusive."""
    (y0, x0, y1, x1), (h, w) = box, grid
    cells = torch.zeros(h, w, dtype=torch.bool, device=device)
    cells[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = True
    return cells.flatten()


def default_boxes(num_ids: int) -> tuple[Box, ...]:
    """Equal vertical strips: person i gets x in [i/n, (i+1)/n], the full height."""
    return tuple((0.0, i / num_ids, 1.0, (i + 1) / num_ids) for i in range(num_ids))


class SAAProcessor(nn.Module):
    """LoRA-adapted attention; on cross-attention layers also the gated ID branch (diffusers processor API).

    Args:
        hidden_size: the layer's query width (its to_q in/out features).
        cross_attention_dim: the encoder states' width on cross-attention layers, None on self-attention.
        rank: LoRA rank. num_tokens: ID tokens per person.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, rank: int = 128, num_tokens: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.rank = rank
        self.num_tokens = num_tokens
        context_dim = cross_attention_dim or hidden_size
        self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_v_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank)
        if cross_attention_dim is not None:
            self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        # Recorded outputs of the last call that asked for them (SAACall.return_activation_maps), else None.
        self.activation_map: torch.Tensor | None = None
        self.id_attention_probs: torch.Tensor | None = None
        # How the layer's own projections are run (`keep_saa`): attention heads per slice of the text branch
        # (None = all at once), and whether q/k/v come from the layer's fused to_qkv / to_kv.
        self.slice_size: int | None = None
        self.fused = False

    @property
    def is_cross_attention(self) -> bool:
        return self.cross_attention_dim is not None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        saa: SAACall | None = None,
    ) -> torch.Tensor:
        """diffusers' processor call; `saa` (from `cross_attention_kwargs`) = this call's inputs, None = training's."""
        call = TRAINING_CALL if saa is None else saa
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            height, width = hidden_states.shape[2:]
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        id_states = None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        else:
            if self.is_cross_attention:
                encoder_hidden_states, id_states = self._split_id_tokens(encoder_hidden_states, call.num_ids)
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = self._projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (rearrange(t, "b n (h d) -> b h n d", h=attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Text branch: one fused attention call (or one per slice of heads).
        hidden_states = self._text_attention(attn, query, key, value, attention_mask)
        if self.is_cross_attention:
            self.activation_map = self.id_attention_probs = None
        if id_states is not None and (call.id_scale != 0 or call.return_activation_maps):
            hidden_states = self.add_id_branch(
                query, id_states, call, hidden_states, heads=attn.heads, scale=attn.scale
            )
        hidden_states = rearrange(hidden_states, "b h n d -> b n (h d)").to(query.dtype)

        hidden_states = self.to_out_lora.adapt(attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = rearrange(hidden_states, "b (h w) c -> b c h w", h=height, w=width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _projections(
        self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LoRA-adapted q, k, v: the layer's projections called as modules (fused ones when `fused`)."""
        if self.fused and not self.is_cross_attention and getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif self.fused and self.is_cross_attention and getattr(attn, "to_kv", None) is not None:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        return (
            query + self.to_q_lora(hidden_states),
            key + self.to_k_lora(context),
            value + self.to_v_lora(context),
        )

    def _text_attention(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """SDPA over (b, heads, n, d), in slices of `slice_size` heads when set (attention slicing)."""
        step = self.slice_size or query.shape[1]
        outputs = []
        for start in range(0, query.shape[1], step):
            heads = slice(start, start + step)
            mask = attention_mask
            if mask is not None and mask.shape[1] > 1:
                mask = mask[:, heads]
            outputs.append(
                F.scaled_dot_product_attention(
                    query[:, heads], key[:, heads], value[:, heads], attn_mask=mask, scale=attn.scale
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _split_id_tokens(
        self, encoder_hidden_states: torch.Tensor, num_ids: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_id_tokens = self.num_tokens * num_ids
        if num_id_tokens == 0:
            return encoder_hidden_states, None
        if encoder_hidden_states.shape[1] <= num_id_tokens:
            raise ValueError(
                f"SAA expects [text tokens ; {num_id_tokens} ID tokens] ({num_ids} person(s) x "
                f"{self.num_tokens}) but got {encoder_hidden_states.shape[1]} encoder tokens; "
                "check SAACall(num_ids=...)"
            )
        # Contiguous copies (a few hundred KB): matmuls on the sliced views took 3x as long on CPU.
        text, ids = encoder_hidden_states[:, :-num_id_tokens], encoder_hidden_states[:, -num_id_tokens:]
        return text.contiguous(), ids.contiguous()

    def add_id_branch(
        self,
        query: torch.Tensor,
        id_states: torch.Tensor,
        call: SAACall,
        text: torch.Tensor,
        *,
        heads: int,
        scale: float,
    ) -> torch.Tensor:
        """text + id_scale * gate * O_id (b, heads, Q, d): the LoRA-adapted queries attend to the ID tokens only.

        Public for front ends that run the text branch with their own attention (the ComfyUI pack): `query` and
        `text` (b, heads, Q, d), `id_states` (b, N_id, C), `heads` and `scale` (head_dim^-0.5) of the layer.
        Without gradients the result is written over `query`.

        Logits are kept as (b, heads, N_id, Q), one small matmul per batch element on the queries as they are
        laid out (no copy); a softmax over that short leading axis is far faster on CPU than over a last axis
        of 4 or 8 entries.
        """
        key = rearrange(self.to_k_ip(id_states) * scale, "b n (h d) -> b h n d", h=heads)
        value = rearrange(self.to_v_ip(id_states), "b n (h d) -> b h n d", h=heads)
        logits = torch.stack([torch.bmm(k, q.transpose(1, 2)) for k, q in zip(key, query, strict=True)]).float()

        # Scaling the (N_id, Q) probabilities is cheaper than scaling the (Q, head_dim) output; same product.
        return _add_attention_output(text, gated_id_probs(self, logits, call), value, spare=query)


def gated_id_probs(processor: nn.Module, logits: torch.Tensor, call: SAACall) -> torch.Tensor:
    """id_scale x gate x softmax of the routed ID logits (b, heads, N_id, Q), the weights of the ID values.

    Shared by the UNet's and Flux's processors: with `call.return_activation_maps` it records the gate map
    (b, H, W) and the ID attention probabilities (b, heads, Q, N_id) on `processor`.
    """
    logits, gate = route_id_logits(logits, call, processor.num_tokens)
    probs = logits.softmax(dim=2)
    if call.return_activation_maps:
        processor.activation_map = gate.unflatten(-1, query_grid(logits.shape[-1], call.image_size)).detach()
        processor.id_attention_probs = probs.detach().transpose(2, 3)
    weight = call.id_scale * gate[:, None, None, :] if call.gating else call.id_scale
    return probs * weight


def id_activation(logits: torch.Tensor) -> torch.Tensor:
    """a(q) (b, Q) of ID logits (b, heads, N_id, Q): summed over heads and ID tokens, min-max normalised over the
    queries, < 0.3 -> 0."""
    activation = logits.sum(dim=(1, 2))
    low = activation.amin(dim=-1, keepdim=True)
    span = activation.amax(dim=-1, keepdim=True) - low
    # A constant row would divide by zero in the release; here it gates to 0.
    activation = torch.where(span > 0, (activation - low) / span.clamp_min(torch.finfo(span.dtype).tiny), 0.0)
    return activation.masked_fill(activation < GATE_THRESHOLD, 0.0)


def route_id_logits(logits: torch.Tensor, call: SAACall, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """METHOD.md's gating and box routing on ID logits (b, heads, N_id, Q), the Q queries an image grid (see
    `query_grid`), `num_tokens` tokens per person: (logits with the other persons' tokens hidden inside each box,
    or blended, the gate a(q) (b, Q) boosted inside the boxes). Gating off: logits unchanged and the gate None,
    or only the gate when `call.return_activation_maps`. Shared by the UNet and Flux processors."""
    if not (call.gating or call.return_activation_maps):
        return logits, None
    gate = id_activation(logits)
    if call.gating:
        grid = query_grid(logits.shape[-1], call.image_size)
        logits, gate = _routing(call, grid, num_tokens, logits.device).apply(logits, gate)
    return logits, gate


def _add_attention_output(
    out: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, spare: torch.Tensor
) -> torch.Tensor:
    """out + probs^T value: out (b, heads, Q, d), probs (b, heads, N_id, Q), value (b, heads, N_id, d).

    Without gradients the product is written into `spare`, a (b, heads, Q, d) tensor of the caller's that is no
    longer needed (the queries: laid out (b, Q, heads, d) in memory, as SDPA's output is on CPU), and out is added
    there: no 10 MB buffer allocated (and page-faulted) per call, one contiguous add, and the caller's
    rearrange to (b, Q, heads*d) copies nothing.
    """
    probs, value = probs.to(out.dtype), value.to(out.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, probs, value)):
        return out + torch.einsum("b h n q, b h n d -> b h q d", probs, value)
    for p, v, o in zip(probs, value, spare, strict=True):
        torch.bmm(p.transpose(1, 2), v, out=o)
    return spare.add_(out)


@dataclass(frozen=True)
class _Routing:
    """The box layout of one SAACall on one query grid, as tensors (see METHOD.md "Gating")."""

    gate_scale: torch.Tensor | None  # (Q,): with a boost s, a cell inside k boxes gets a*(s+1)^(k-1) + (s+1)^k - 1
    gate_offset: torch.Tensor | None  # (Q,)
    hidden: torch.Tensor | None  # (N_id, Q) bool: the other persons' tokens inside a person's box
    token_weights: torch.Tensor | None  # (N_id, 1): mix_scale for the first person's tokens, 1 - mix_scale after

    def apply(self, logits: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boost the gate inside the boxes and hide (or blend) the persons' tokens: logits (b, heads, N_id, Q)."""
        if self.gate_scale is not None:
            gate = torch.addcmul(self.gate_offset, gate, self.gate_scale)
        if self.hidden is not None:
            logits = logits.masked_fill(self.hidden, float("-inf"))
        if self.token_weights is not None:
            logits = logits * self.token_weights
        return logits, gate


@functools.lru_cache(maxsize=64)
def _routing(call: SAACall, grid: tuple[int, int], num_tokens: int, device: torch.device) -> _Routing:
    """Built once per call and grid (every layer of a resolution shares it)."""
    boxes = call.boxes if call.boxes is not None else default_boxes(call.num_ids)
    cells = torch.stack([box_cells(box, grid, device) for box in boxes])  # (boxes, Q)
    gate_scale = gate_offset = None
    if call.boost:
        # The release's a <- a / (s+1), then a <- a*(s+1) + s once per box containing the cell, in closed form.
        power = (call.boost + 1.0) ** cells.sum(dim=0, dtype=torch.float32)
        gate_scale, gate_offset = power / (call.boost + 1.0), power - 1.0
    num_id_tokens = call.num_ids * num_tokens
    if call.mix_scale is not None:
        # Persons blended into one box: nothing hidden; the first person's logits weighted by mix_scale.
        weights = torch.full((num_id_tokens, 1), 1 - call.mix_scale, device=device)
        weights[:num_tokens] = call.mix_scale
        return _Routing(gate_scale, gate_offset, None, weights)
    owner = torch.full((cells.shape[1],), -1, dtype=torch.long, device=device)
    for person, inside in enumerate(cells):
        owner[inside] = person  # where boxes overlap, the later person is in front (module docstring)
    token_person = torch.arange(num_id_tokens, device=device) // num_tokens
    hidden = (owner[None, :] >= 0) & (owner[None, :] != token_person[:, None])
    return _Routing(gate_scale, gate_offset, hidden if bool(hidden.any()) else None, None)


def saa_processors(unet: nn.Module) -> dict[str, SAAProcessor]:
    """The UNet's SAA processors by name, in `unet.attn_processors` order; fails if SAA is not installed."""
    processors = unet.attn_processors
    saa = {name: p for name, p in processors.items() if isinstance(p, SAAProcessor)}
    if not saa:
        raise ValueError("this UNet has no SAA processors: call dynamicid.models.install_saa(unet) first")
    if len(saa) != len(processors):
        others = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, SAAProcessor)})
        raise ValueError(f"only some attention layers have SAA processors (others: {others}); reinstall SAA")
    return saa


def install_saa(unet: nn.Module, rank: int = 128, num_tokens: int = 4) -> None:
    """Put an SAA processor on every attention layer (LoRA on all; ID branch on cross-attention layers).

    `to_k_ip`/`to_v_ip` start as copies of the layer's to_k/to_v, LoRA `up` weights at zero, so a freshly
    installed UNet called with `SAACall(id_scale=0)` computes what it computed before. Calling it again with the same rank
    and token count does nothing; with others it fails. The UNet's attention switches then keep SAA (`keep_saa`).
    """
    from dynamicid.models.saa_unet import keep_saa  # imports this module

    current = unet.attn_processors
    installed = [p for p in current.values() if isinstance(p, SAAProcessor)]
    if installed:
        found = {(p.rank, p.num_tokens) for p in installed}
        if len(installed) == len(current) and found == {(rank, num_tokens)}:
            keep_saa(unet)
            return
        raise ValueError(
            f"SAA is already installed on this UNet with (rank, num_tokens) {sorted(found)}; "
            f"cannot install rank={rank}, num_tokens={num_tokens} over it"
        )
    processors = {}
    for name in current:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        weight = attn.to_q.weight
        cross_dim = attn.to_k.in_features if attn.is_cross_attention else None
        with torch.device(weight.device):
            processor = SAAProcessor(attn.to_q.in_features, cross_dim, rank=rank, num_tokens=num_tokens)
        processor.to(dtype=weight.dtype)
        if cross_dim is not None:
            with torch.no_grad():
                processor.to_k_ip.weight.copy_(attn.to_k.weight)
                processor.to_v_ip.weight.copy_(attn.to_v.weight)
        processors[name] = processor
    unet.set_attn_processor(processors)
    keep_saa(unet)


def covered_box(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """(i, j) for the first box i lying wholly inside a later box j (whose person is in front of all of it), else None."""
    for i, inner in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            outer = boxes[j]
            if outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]:
                return i, j
    return None


def _check_boxes(boxes: Sequence[Sequence[float]], expected: int) -> tuple[Box, ...]:
    if len(boxes) != expected:
        raise ValueError(f"got {len(boxes)} boxes for {expected} person(s); give one (y0, x0, y1, x1) box per person")
    checked = []
    for i, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"box {i} {list(box)} must have 4 numbers (y0, x0, y1, x1)")
        y0, x0, y1, x1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (y0, x0, y1, x1)):
            raise ValueError(f"box {i} {list(box)}: coordinates must be fractions of the image in [0, 1]")
        if not (y0 < y1 and x0 < x1):
            raise ValueError(f"box {i} {list(box)} is empty: need y0 < y1 and x0 < x1 (order is y0, x0, y1, x1)")
        checked.append((y0, x0, y1, x1))
    covered = covered_box(checked) if expected > 1 else None
    if covered is not None:
        i, j = covered
        raise ValueError(
            f"box {i} {list(checked[i])} lies inside box {j} {list(checked[j])}, whose person is in front: person {i} "
            "would not appear; list persons back to front (the later one is in front), or use mix_scale to blend"
        )
    return tuple(checked)


def saa_activation_maps(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Gate maps (B, H, W) of each cross-attention layer's last call (one with SAACall(return_activation_maps=True))."""
    return {n: p.activation_map for n, p in saa_processors(unet).items() if p.activation_map is not None}


def saa_id_attention_probs(unet: nn.Module) -> dict[str, torch.Tensor]:
    """ID-branch attention probabilities (B, heads, Q, N_id) of the last call (as `saa_activation_maps`)."""
    return {n: p.id_attention_probs for n, p in saa_processors(unet).items() if p.id_attention_probs is not None}


def saa_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """All SAA weights keyed `<processor name>.<parameter>` (e.g. `mid_block....attn2.processor.to_k_ip.weight`)."""
    return processors_state_dict(saa_processors(unet))


def load_saa_state_dict(unet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load name-keyed SAA weights (as `saa_state_dict` writes them) strictly into installed processors."""
    load_processors_state_dict(saa_processors(unet), state_dict, "attention layer of this UNet")


def processors_state_dict(processors: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Processors' weights keyed `<processor name>.<parameter>` (any base family's identity attention)."""
    return {
        f"{name}.{key}": tensor
        for name, processor in processors.items()
        for key, tensor in processor.state_dict().items()
    }


def load_processors_state_dict(
    processors: Mapping[str, nn.Module], state_dict: Mapping[str, torch.Tensor], layers: str
) -> None:
    """Load `processors_state_dict`-keyed weights strictly; a key naming none of them is an error naming `layers`."""
    by_processor: dict[str, dict[str, torch.Tensor]] = {name: {} for name in processors}
    unknown = []
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".processor.")
        if f"{name}.processor" in by_processor:
            by_processor[f"{name}.processor"][param] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} SAA weights name no {layers} (e.g. {unknown[0]}); were they saved from another base model?"
        )
    for name, processor in processors.items():
        load_strict(processor, by_processor[name], what=f"SAA weights for {name}")
