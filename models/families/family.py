"""The interface every base family implements (`BaseFamily`) and what a folder says about itself (`FolderLayout`).

Nothing here imports torch, diffusers or transformers: the registry is read by torch-free code (the training
CLI's smoke defaults, error messages), and each family imports its libraries inside the methods that need them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynamicid.models.base import BaseModel
    from dynamicid.models.conditioning import Conditioner


@dataclass(frozen=True)
class FolderLayout:
    """A diffusers folder as model_index.json describes it (or, without one, as its subfolders do)."""

    class_name: str | None  # model_index.json `_class_name`
    components: frozenset[str]  # components present (model_index [library, class] entries, or subfolders)

    @classmethod
    def read(cls, folder: Path) -> FolderLayout:
        index = folder / "model_index.json"
        if not index.is_file():
            return cls(
                None, frozenset(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else frozenset()
            )
        try:
            entries = json.loads(index.read_text())
            # components are [library, class] pairs; other entries are pipeline settings (force_zeros_...)
            present = {k for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None}
            return cls(entries.get("_class_name"), frozenset(present))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(
                f"{index} is not a diffusers model index (a JSON object); copy the model folder again"
            ) from None


class BaseFamily:
    """One base family: how to recognise, load and fake it, and what DynamicID plugs into it.

    A family module subclasses this, sets the class attributes and implements the methods; the registry
    (`dynamicid.models.families.FAMILIES`) holds one instance of it. Methods import their libraries lazily.
    """

    name: str  # recorded as `base_family` in weights ("sd15")
    label: str  # what messages call it ("Stable Diffusion 1.5")
    tiny_name: str  # its tiny-random FAKE's `--base-model` value
    parts: tuple[str, ...]  # the subfolders of its diffusers folder
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name` values that name the family
    markers: frozenset[str]  # components that set its folders apart (the family with most markers present wins)
    checkpoint_keys: tuple[str, ...]  # tensor names found only in its single-file checkpoints
    denoiser_name: str = "unet"  # the denoiser's diffusers component name ("transformer" for a DiT)
    attention_kwargs: str = "cross_attention_kwargs"  # the denoiser argument carrying per-call SAA inputs

    def __repr__(self) -> str:
        return f"<base family {self.name}>"

    def describe(self) -> str:
        """e.g. "SDXL (base_family 'sdxl')"."""
        return f"{self.label} (base_family {self.name!r})"

    # ---- recognise ----

    def recognises_denoiser(self, denoiser: Any) -> bool:
        """Whether a loaded denoiser (UNet or transformer) is this family's."""
        raise NotImplementedError

    def check_folder(self, folder: Path) -> None:
        """A clear error naming the missing subfolders of an incomplete diffusers folder."""
        missing = [part for part in self.parts if not (folder / part).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"base model folder {folder} has no {', '.join(missing)} subfolder(s); a {self.label} checkpoint "
                f"in diffusers layout has {', '.join(self.parts)}"
            )

    # ---- load and fake ----

    def load(self, folder: Path, *, without: Collection[str] = ()) -> BaseModel:
        """The frozen parts of a diffusers folder of this family (no image encoder: the caller adds it); the
        parts named in `without` (e.g. "text_encoder", "text_encoder_2", the denoiser) are not loaded (None)."""
        raise NotImplementedError

    def build_tiny(self, *, seed: int = 0, with_image_encoder: bool = True) -> BaseModel:
        """The seeded tiny-random FAKE (`dynamicid.testing`, imported here only), global RNG untouched."""
        raise NotImplementedError

    # ---- what DynamicID plugs in ----

    def conditioner(self, parts: Any) -> Conditioner:
        """The text and image encoders of `parts` (a BaseModel or a pipeline) as DynamicID conditioning."""
        raise NotImplementedError

    def token_dim(self, denoiser: Any) -> int:
        """Width of the tokens the identity attention reads (text states and ID tokens)."""
        raise NotImplementedError

    def text_dim(self, base: BaseModel) -> int:
        """Width of the per-token text states."""
        raise NotImplementedError

    def pooled_dim(self, base: BaseModel) -> int:
        """Width of the pooled text vector (the IMR's text input): by default the CLIP text encoder's width."""
        return int(base.text_encoder.config.hidden_size)

    def install_identity_attention(
        self, denoiser: Any, *, rank: int, num_tokens: int, token_dim: int | None = None
    ) -> None:
        """Put SAA processors on the denoiser's attention layers (a no-op when installed with the same settings).

        `token_dim`: the ID tokens' width where the denoiser lets it vary (Flux); a UNet's is its cross-attention
        width. By default a UNet's (`dynamicid.models.saa`); a family with another denoiser overrides it."""
        from dynamicid.models.saa import install_saa

        install_saa(denoiser, rank=rank, num_tokens=num_tokens)

    def denoise(
        self, denoiser: Any, noisy: Any, timesteps: Any, text: Any, id_tokens: Any, condition: Any, saa: Any
    ) -> Any:
        """The denoiser's training prediction from the noised latents `noisy`, shaped like them (what the
        objective's target is compared with): `text` the text states (B, L, C), `id_tokens` the persons' ID tokens (B or 1, N_id, C),
        `condition` the second value of the conditioner's `text_condition` (SDXL's added_cond_kwargs, None for
        SD 1.5), `saa` the per-call SAA inputs (`SAACall`)."""
        raise NotImplementedError

    def objective(self, scheduler: Any) -> Any:
        """The training objective over the base's training scheduler (`dynamicid.models.objectives`: epsilon,
        v_prediction or flow_matching); a scheduler the objective cannot train with is refused with one line."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        """The DynamicID pipeline class of the family (from `dynamicid.infer.pipeline`)."""
        raise NotImplementedError

    def plain_pipeline(self, components: dict[str, Any]) -> Any:
        """diffusers' own pipeline of the family over `components` (scheduler included), without DynamicID."""
        raise NotImplementedError


def load_part(folder: Path, name: str, cls: Any, without: Collection[str], **options: Any) -> Any:
    """`cls.from_pretrained(folder, subfolder=name)`, or None when `name` is in `without` (never read)."""
    return None if name in without else cls.from_pretrained(folder, subfolder=name, **options)
