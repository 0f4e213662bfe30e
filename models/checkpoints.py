"""Weights files: this project's safetensors format, the authors' release `.bin` files, IP-Adapter FaceID-Plus.

Our format: one safetensors file (or one per training stage) with every tensor under its part's prefix
(`dynamicid.schemas.checkpoint.PART_PREFIXES`), SAA keyed by processor name, and a `CheckpointMetadata`
header saying what the weights were made for. Pickled `.bin` files are only read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.families import denoiser_family, family_label, family_named
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.release import (
    RELEASE_PREFIXES,
    from_release,
    load_release_saa,
    release_kwargs_from_state_dict,
    strip_prefix,
)
from dynamicid.models.saa import (
    install_saa,
    load_saa_state_dict,
    processors_state_dict,
    saa_processors,
    saa_state_dict,
)
from dynamicid.models.state_dicts import load_strict
from dynamicid.schemas.checkpoint import PART_FIELDS, PART_PREFIXES, CheckpointMetadata

PARTS = tuple(PART_PREFIXES)
IMR_CONFIG_KEY = "imr_config"  # extra header entry: the IMR's full constructor arguments (JSON)
# Metadata fields that describe a file's history, not what its tensors fit.
_PROVENANCE_FIELDS = ("format_version", "parts", "source")

# SD 1.5's UNet (diffusers `UNet2DConditionModel` arguments; the rest are the class defaults).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# SDXL 1.0 base's UNet: 140 attention layers (640 and 1280 wide), cross_attention_dim 2048, pooled text + size ids.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


class WeightsFileError(ValueError):
    """A weights file that cannot be used: missing, corrupt or truncated, or a pickle that would run code."""

    def __init__(self, path: str | Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: {why}")


_CORRUPT = "is corrupt or truncated; copy or export it again"


def safetensors_header(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """The header metadata and the tensor names of a safetensors file (no tensor is read), or a WeightsFileError."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(path, "file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, list(handle.keys())
    except SafetensorError as error:
        raise _unreadable(path, error) from None


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and (unless `tensors=False`) the tensors of a safetensors file, or a WeightsFileError."""
    header, _ = safetensors_header(path)
    if not tensors:
        return header, {}
    try:
        return header, load_file(str(path))
    except SafetensorError as error:
        raise _unreadable(Path(path), error) from None


def _unreadable(path: Path, error: Exception) -> WeightsFileError:
    return WeightsFileError(path, f"not a readable safetensors file ({error}): it {_CORRUPT}")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write through a temporary file (an interrupted save never leaves a truncated file) with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o666 & ~umask)  # safetensors creates 0600 files; config.yaml beside them follows the umask
    partial.replace(path)
    return path


def _mismatch(field_name: str, file_value: Any, target_value: Any, path: str | Path | None) -> ValueError:
    where = f" in {path}" if path else ""
    return ValueError(
        f"weights{where} were made for {field_name}={file_value!r}, but the target has {field_name}={target_value!r}"
    )


def _part_dims(part: str, module: nn.Module) -> dict[str, Any]:
    """The metadata fields a module determines (for `saa`, the module is the UNet)."""
    if part == "face_encoder":
        return {
            "cross_attention_dim": module.cross_attention_dim,
            "id_embed_dim": module.id_embeddings_dim,
            "clip_embed_dim": module.clip_embeddings_dim,
            "num_tokens": module.num_tokens,
            "face_proj_dim": module.proj_dim,
        }
    if part == "saa":
        processor = next(iter(identity_processors(module).values()))
        return {
            "lora_rank": processor.rank,
            "num_tokens": processor.num_tokens,
            "cross_attention_dim": denoiser_family(module).token_dim(module),
        }
    if part == "imr":
        return {"imr_depth": module.depth, "imr_dim": module.dim, "cross_attention_dim": module.embedding_dim}
    return {"keypoint_dim": module.embedding_dim}


def identity_processors(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The SAA processors of a base family's denoiser: a UNet's attention layers, or a Flux transformer's
    double-stream blocks."""
    if denoiser_family(denoiser).denoiser_name == "unet":
        return saa_processors(denoiser)
    from dynamicid.models.saa_flux import flux_saa_processors  # imports diffusers' Flux model: only when needed

    return flux_saa_processors(denoiser)


def load_identity_state_dict(denoiser: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `processors_state_dict`-keyed SAA weights strictly into a denoiser's installed SAA processors."""
    if denoiser_family(denoiser).denoiser_name == "unet":
        load_saa_state_dict(denoiser, state_dict)
        return
    from dynamicid.models.saa_flux import load_flux_saa_state_dict  # imports diffusers' Flux model: only when needed

    load_flux_saa_state_dict(denoiser, state_dict)


def _write(path: str | Path, metadata: CheckpointMetadata, parts: dict[str, dict[str, torch.Tensor]], **extra: str):
    tensors = {
        PART_PREFIXES[part] + key: tensor.detach().to("cpu").contiguous()
        for part, state_dict in parts.items()
        for key, tensor in state_dict.items()
    }
    metadata = dataclasses.replace(metadata, parts=[p for p in PARTS if p in parts])
    return write_safetensors(tensors, path, {**metadata.to_header(), **extra})


def save_dynamicid(
    path: str | Path,
    *,
    metadata: CheckpointMetadata,
    face_encoder: FaceEncoder | None = None,
    unet: nn.Module | None = None,
    imr: IMR | None = None,
    keypoint_encoder: KeypointEncoder | None = None,
) -> Path:
    """Write the given parts to one safetensors file (SAA is taken from `unet`'s processors, or a Flux
    transformer's).

    The metadata must agree with the modules (rank, token count, dims); a disagreement names the field.
    `metadata.parts` is filled in from the parts given.
    """
    modules = {"face_encoder": face_encoder, "saa": unet, "imr": imr, "keypoint_encoder": keypoint_encoder}
    modules = {part: m for part, m in modules.items() if m is not None}
    if not modules:
        raise ValueError(f"save_dynamicid({path}): no part given (face_encoder, unet, imr, keypoint_encoder)")
    parts = {}
    for part, module in modules.items():
        for name, value in _part_dims(part, module).items():
            if getattr(metadata, name) != value:
                raise ValueError(
                    f"save_dynamicid({path}): metadata says {name}={getattr(metadata, name)!r} "
                    f"but the {part} has {name}={value!r}"
                )
        parts[part] = processors_state_dict(identity_processors(module)) if part == "saa" else module.state_dict()
    extra = {IMR_CONFIG_KEY: json.dumps(imr.config)} if imr is not None else {}
    return _write(path, metadata, parts, **extra)


@dataclass
class DynamicIDWeights:
    """The parts of one or more of our weights files, with the metadata they were made for.

    The `build_*` methods return modules in eval mode (as `from_release` does); call `.train()` to train them.
    """

    metadata: CheckpointMetadata
    state_dicts: dict[str, dict[str, torch.Tensor]]
    imr_config: dict[str, int] | None = None
    paths: list[Path] = field(default_factory=list)

    def _part(self, part: str) -> dict[str, torch.Tensor]:
        if part not in self.state_dicts:
            raise ValueError(
                f"{', '.join(map(str, self.paths)) or 'these weights'} hold no {part} "
                f"(parts: {sorted(self.state_dicts)}); load the file of the stage that trains it"
            )
        return self.state_dicts[part]

    def check(self, **expected: Any) -> None:
        """Compare metadata fields with the target's values; a difference raises naming the field."""
        for name, value in expected.items():
            if not hasattr(self.metadata, name):
                raise ValueError(f"unknown checkpoint metadata field {name!r}")
            if getattr(self.metadata, name) != value:
                raise _mismatch(name, getattr(self.metadata, name), value, ", ".join(map(str, self.paths)))

    def build_face_encoder(self) -> FaceEncoder:
        md = self.metadata
        encoder = FaceEncoder(
            cross_attention_dim=md.cross_attention_dim,
            id_embeddings_dim=md.id_embed_dim,
            clip_embeddings_dim=md.clip_embed_dim,
            num_tokens=md.num_tokens,
            proj_dim=md.face_proj_dim,
        )
        load_strict(encoder, self._part("face_encoder"), what="face_encoder weights")
        return encoder.eval()

    def build_imr(self) -> IMR:
        state_dict = self._part("imr")
        config = self.imr_config or release_kwargs_from_state_dict("imr", state_dict)
        imr = IMR(**config)
        load_strict(imr, state_dict, what="imr weights")
        return imr.eval()

    def build_keypoint_encoder(self) -> KeypointEncoder:
        state_dict = self._part("keypoint_encoder")
        encoder = KeypointEncoder(**release_kwargs_from_state_dict("keypoint_encoder", state_dict))
        load_strict(encoder, state_dict, what="keypoint_encoder weights")
        return encoder.eval()

    def load_into(
        self,
        *,
        face_encoder: nn.Module | None = None,
        unet: nn.Module | None = None,
        imr: nn.Module | None = None,
        keypoint_encoder: nn.Module | None = None,
    ) -> None:
        """Load the parts strictly into existing modules (SAA into `unet`'s installed processors), e.g. on resume."""
        modules = {"face_encoder": face_encoder, "saa": unet, "imr": imr, "keypoint_encoder": keypoint_encoder}
        for part, module in modules.items():
            if module is None:
                continue
            if part == "saa":
                load_identity_state_dict(module, self._part(part))
            else:
                load_strict(module, self._part(part), what=f"{part} weights")

    def load_saa_into(self, unet: nn.Module) -> None:
        """Install SAA on `unet` (or a Flux transformer) if needed (with the file's rank and token count) and load
        the weights."""
        state_dict = self._part("saa")
        _check_unet(unet, self.metadata, ", ".join(map(str, self.paths)))
        md, family = self.metadata, denoiser_family(unet)
        family.install_identity_attention(
            unet, rank=md.lora_rank, num_tokens=md.num_tokens, token_dim=md.cross_attention_dim
        )
        load_identity_state_dict(unet, state_dict)


def check_base_family(file_family: str, base_family: str, where: str) -> None:
    """One line naming the file and both families when weights were made for another base family."""
    if file_family != base_family:
        raise ValueError(
            f"{where} holds weights made for {family_label(file_family)} but the base model is "
            f"{family_label(base_family)}; use weights trained on {family_named(base_family).label}"
        )


def _check_unet(unet: nn.Module, metadata: CheckpointMetadata, where: str) -> None:
    family = denoiser_family(unet)
    check_base_family(metadata.base_family, family.name, where)
    try:
        installed = list(identity_processors(unet).values())
    except ValueError:  # not (fully) installed yet: the install that follows decides
        installed = []
    token_dim = family.token_dim(unet)
    # A UNet's token width is its cross-attention width; a Flux transformer takes any until SAA is installed.
    if token_dim != metadata.cross_attention_dim and (installed or family.denoiser_name == "unet"):
        raise _mismatch("cross_attention_dim", metadata.cross_attention_dim, token_dim, where)
    if installed:
        if installed[0].rank != metadata.lora_rank:
            raise _mismatch("lora_rank", metadata.lora_rank, installed[0].rank, where)
        if installed[0].num_tokens != metadata.num_tokens:
            raise _mismatch("num_tokens", metadata.num_tokens, installed[0].num_tokens, where)


def load_dynamicid(path: str | Path | Sequence[str | Path], **expected: Any) -> DynamicIDWeights:
    """Read our weights file (or the files of several stages, merged) and check `expected` metadata fields.

    e.g. `load_dynamicid("anchor.safetensors", lora_rank=128, cross_attention_dim=768)`.
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    weights: DynamicIDWeights | None = None
    for file in paths:
        header, tensors = read_safetensors(file)
        try:
            metadata = CheckpointMetadata.from_header(header)
        except ValueError as error:
            raise WeightsFileError(file, str(error)) from None
        state_dicts = {
            part: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            for part, prefix in PART_PREFIXES.items()
            if part in metadata.parts
        }
        imr_config = json.loads(header[IMR_CONFIG_KEY]) if IMR_CONFIG_KEY in header else None
        if weights is None:
            weights = DynamicIDWeights(metadata, state_dicts, imr_config, [file])
            continue
        overlap = sorted(set(state_dicts) & set(weights.state_dicts))
        if overlap:
            raise ValueError(f"{file} and {weights.paths} both hold {overlap}: give each part once")
        for f in dataclasses.fields(CheckpointMetadata):
            if f.name in _PROVENANCE_FIELDS:
                continue
            owners = {part for part, names in PART_FIELDS.items() if f.name in names}
            in_new, in_merged = bool(owners & set(state_dicts)), bool(owners & set(weights.state_dicts))
            if owners and not (in_new and in_merged):  # only one side holds a part this field describes
                if in_new:
                    setattr(weights.metadata, f.name, getattr(metadata, f.name))
                continue
            if getattr(metadata, f.name) != getattr(weights.metadata, f.name):
                raise ValueError(
                    f"{file} was made for {f.name}={getattr(metadata, f.name)!r} but {weights.paths[0]} "
                    f"for {f.name}={getattr(weights.metadata, f.name)!r}; they do not belong together"
                )
        weights.state_dicts.update(state_dicts)
        weights.metadata.parts = [p for p in PARTS if p in weights.state_dicts]
        weights.imr_config = weights.imr_config or imr_config
        weights.paths.append(file)
    if weights is None:
        raise ValueError("load_dynamicid: no path given")
    weights.check(**expected)
    return weights


# ---- the release's and IP-Adapter's pickled files ----


def read_weights_only(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only; a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(path, "file not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise WeightsFileError(path, f"not a readable torch checkpoint: it {_CORRUPT}") from None
        raise WeightsFileError(
            path,
            "holds pickled objects other than tensors, which could run code when loaded, so it was refused; "
            "only plain state dicts are accepted (torch.load weights_only)",
        ) from None
    except (RuntimeError, EOFError, OSError) as error:  # torch reports truncation in any of these
        raise WeightsFileError(
            path, f"not a readable torch checkpoint ({error.__class__.__name__}): it {_CORRUPT}"
        ) from None
    if not isinstance(loaded, dict):
        raise WeightsFileError(path, f"holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


# How an unprefixed state dict shows which module it belongs to.
_SIGNATURE_KEYS = {
    "imr": "feature_fusion.0.weight",
    "keypoint_encoder": "blocks.0.0.conv_block.0.weight",
    "face_encoder": "perceiver_resampler.proj_in.weight",
}


@dataclass
class ReleaseCheckpoint:
    """Parts found in release / IP-Adapter files: module-relative state dicts (SAA index-keyed)."""

    state_dicts: dict[str, dict[str, torch.Tensor]]
    sources: dict[str, Path]
    unrecognised: list[str] = field(default_factory=list)
    num_tokens: int = 4

    @property
    def present(self) -> list[str]:
        return [p for p in PARTS if p in self.state_dicts]

    @property
    def missing(self) -> list[str]:
        return [p for p in PARTS if p not in self.state_dicts]

    def report(self) -> str:
        """One line per part: where it was found, or that it is missing (and under which release name)."""
        release_names = {"face_encoder": "proj_module / image_proj", "saa": "SAA_module / ip_adapter"}
        release_names |= {"imr": "IMR", "keypoint_encoder": "key_point_encoder"}
        lines = []
        for part in PARTS:
            if part in self.state_dicts:
                lines.append(f"{part}: present ({len(self.state_dicts[part])} tensors, from {self.sources[part]})")
            else:
                lines.append(f"{part}: missing (no {release_names[part]} tensors in the files given)")
        if self.unrecognised:
            lines.append(f"unrecognised: {len(self.unrecognised)} tensors, e.g. {self.unrecognised[0]}")
        return "\n".join(lines)

    def _part(self, part: str) -> dict[str, torch.Tensor]:
        if part not in self.state_dicts:
            raise ValueError(f"no {part} in the release files given:\n{self.report()}")
        return self.state_dicts[part]

    @property
    def lora_rank(self) -> int:
        saa = self._part("saa")
        return next(v.shape[0] for k, v in saa.items() if k.endswith("to_q_lora.down.weight"))

    def build_face_encoder(self) -> FaceEncoder:
        return from_release("face_encoder", self._part("face_encoder"), num_tokens=self.num_tokens)

    def build_imr(self, **release_kwargs: Any) -> IMR:
        return from_release("imr", self._part("imr"), **release_kwargs)

    def build_keypoint_encoder(self) -> KeypointEncoder:
        return from_release("keypoint_encoder", self._part("keypoint_encoder"))

    def load_saa_into(self, unet: nn.Module) -> None:
        """Install SAA if needed (rank read off the file) and load the index-keyed processors strictly."""
        install_saa(unet, rank=self.lora_rank, num_tokens=self.num_tokens)
        load_release_saa(unet, self._part("saa"))


def _split_parts(tensors: dict[str, torch.Tensor], source: Path, found: ReleaseCheckpoint) -> None:
    unclaimed = dict(tensors)
    for part, prefixes in RELEASE_PREFIXES.items():
        for prefix in prefixes:
            keys = [k for k in unclaimed if k.startswith(prefix)]
            if keys:
                found.state_dicts[part] = {k[len(prefix) :]: unclaimed.pop(k) for k in keys}
                found.sources[part] = source
                break
    for part, signature in _SIGNATURE_KEYS.items():
        if part not in found.state_dicts and signature in unclaimed and all(k[0].isalpha() for k in unclaimed):
            found.state_dicts[part] = unclaimed
            found.sources[part] = source
            return
    if "saa" not in found.state_dicts and unclaimed and all(k.split(".")[0].isdigit() for k in unclaimed):
        found.state_dicts["saa"], found.sources["saa"] = unclaimed, source  # an unprefixed index-keyed ModuleList
        return
    found.unrecognised += [f"{source}: {k}" for k in unclaimed]


def load_release_checkpoint(
    saa_bin: str | Path | None = None,
    imr_bin: str | Path | None = None,
    keypoint_encoder_bin: str | Path | None = None,
    *,
    num_tokens: int = 4,
) -> ReleaseCheckpoint:
    """Read the release's `.bin` files (weights only) and sort their tensors into parts.

    Each file may hold nested dicts (`{"SAA_module": {...}, "proj_module": {...}}`) or flat prefixed keys;
    a file of one unprefixed module is recognised by its keys. `report()` says what is present or missing
    (a released SAA file, for one, has no `proj_module`).
    """
    files = [Path(p) for p in (saa_bin, imr_bin, keypoint_encoder_bin) if p is not None]
    if not files:
        raise ValueError("load_release_checkpoint: give at least one of saa_bin, imr_bin, keypoint_encoder_bin")
    found = ReleaseCheckpoint({}, {}, num_tokens=num_tokens)
    for file in files:
        _split_parts(_flatten(read_weights_only(file)), file, found)
    return found


def load_ip_adapter_faceid(path: str | Path, *, num_tokens: int = 4) -> ReleaseCheckpoint:
    """IP-Adapter FaceID-Plus / PlusV2 weights (`image_proj` + `ip_adapter`, .bin or .safetensors).

    Their projection model and LoRA + IP processors have this project's names, so `build_face_encoder()`
    and `load_saa_into(unet)` give a working single-person model (PlusV2 is meant to run the face encoder
    with `shortcut=True`).
    """
    path = Path(path)
    tensors = read_safetensors(path)[1] if path.suffix == ".safetensors" else _flatten(read_weights_only(path))
    found = ReleaseCheckpoint({}, {}, num_tokens=num_tokens)
    for part, prefix in (("face_encoder", "image_proj."), ("saa", "ip_adapter.")):
        part_tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not part_tensors:
            raise ValueError(f"{path} has no '{prefix[:-1]}' tensors: not an IP-Adapter FaceID checkpoint")
        found.state_dicts[part], found.sources[part] = part_tensors, path
    found.unrecognised = [k for k in tensors if not k.startswith(("image_proj.", "ip_adapter."))]
    return found


def convert_release(
    saa_bin: str | Path,
    imr_bin: str | Path | None = None,
    keypoint_encoder_bin: str | Path | None = None,
    *,
    out: str | Path,
    num_tokens: int = 4,
    unet_config: Mapping[str, Any] | None = None,
    imr_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Rewrite the release's `.bin` files as one of our safetensors files (SAA keyed by processor name).

    The processor names come from a UNet built on the meta device from `unet_config` (SD 1.5's by default);
    every part is checked strictly against the module it will load into. Returns `out`.
    """
    from diffusers import UNet2DConditionModel

    release = load_release_checkpoint(saa_bin, imr_bin, keypoint_encoder_bin, num_tokens=num_tokens)
    if "saa" not in release.state_dicts:
        raise ValueError(f"{saa_bin} holds no SAA_module:\n{release.report()}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(unet_config or SD15_UNET_CONFIG))
    install_saa(unet, rank=release.lora_rank, num_tokens=num_tokens)
    index_keyed = strip_prefix(release.state_dicts["saa"], RELEASE_PREFIXES["saa"])
    names = list(saa_processors(unet))
    try:
        saa = {f"{names[int(k.split('.', 1)[0])]}.{k.split('.', 1)[1]}": v for k, v in index_keyed.items()}
    except (IndexError, ValueError):
        raise ValueError(f"{saa_bin}: its SAA_module indices do not fit a UNet with {len(names)} layers") from None
    expected = {k: tuple(v.shape) for k, v in saa_state_dict(unet).items()}
    if {k: tuple(v.shape) for k, v in saa.items()} != expected:
        missing = sorted(set(expected) - set(saa))
        raise ValueError(f"{saa_bin}: SAA_module does not fit this UNet (e.g. missing {missing[:2]}, or shapes)")

    parts: dict[str, dict[str, torch.Tensor]] = {"saa": saa}
    metadata = CheckpointMetadata(
        base_family=denoiser_family(unet).name,
        cross_attention_dim=int(unet.config.cross_attention_dim),
        lora_rank=release.lora_rank,
        num_tokens=num_tokens,
        source="release",
    )
    extra = {}
    if "face_encoder" in release.state_dicts:
        encoder = release.build_face_encoder()
        parts["face_encoder"] = encoder.state_dict()
        metadata.id_embed_dim, metadata.clip_embed_dim = encoder.id_embeddings_dim, encoder.clip_embeddings_dim
    if "imr" in release.state_dicts:
        imr = release.build_imr(**(imr_kwargs or {}))
        parts["imr"] = imr.state_dict()
        metadata.imr_depth, metadata.imr_dim = imr.depth, imr.dim
        extra[IMR_CONFIG_KEY] = json.dumps(imr.config)
    if "keypoint_encoder" in release.state_dicts:
        keypoint_encoder = release.build_keypoint_encoder()
        parts["keypoint_encoder"] = keypoint_encoder.state_dict()
        metadata.keypoint_dim = keypoint_encoder.embedding_dim
    return _write(out, metadata, parts, **extra)
