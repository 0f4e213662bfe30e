"""DynamicID weights for inference: this project's safetensors files or the release's `.bin` files."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynamicid.models import IMR, FaceEncoder, KeypointEncoder
from dynamicid.models.checkpoints import check_base_family, load_dynamicid, load_release_checkpoint
from dynamicid.models.families import denoiser_family


@dataclass
class ReleaseFiles:
    """The authors' release: the SAA file (SAA_module + proj_module), and optionally the IMR and keypoint files."""

    saa: str | Path
    imr: str | Path | None = None
    keypoint_encoder: str | Path | None = None

    def paths(self) -> dict[str, Path]:
        named = {"saa": self.saa, "imr": self.imr, "keypoint_encoder": self.keypoint_encoder}
        return {role: Path(p) for role, p in named.items() if p is not None}


WeightsSource = str | Path | Sequence[str | Path] | ReleaseFiles | Mapping[str, str | Path]


@dataclass
class DynamicIDModules:
    """What the pipeline runs besides the base model (SAA lives inside the UNet's processors)."""

    face_encoder: FaceEncoder
    imr: IMR | None
    keypoint_encoder: KeypointEncoder | None
    id_embed_model: str
    files: dict[str, Path] = field(default_factory=dict)  # role -> file
    format: str = "dynamicid"  # "release", or "memory" (modules handed over by `set_dynamicid`)

    @property
    def num_tokens(self) -> int:
        return self.face_encoder.num_tokens

    @property
    def can_edit(self) -> bool:
        return self.imr is not None and self.keypoint_encoder is not None

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        for module in (self.face_encoder, self.imr, self.keypoint_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)

    def file_hashes(self) -> dict[str, str]:
        return {role: sha256_file(path) for role, path in self.files.items()}


def load_modules(weights: WeightsSource, unet: nn.Module) -> DynamicIDModules:
    """Load the face encoder, IMR and keypoint encoder, and the SAA weights into `unet` (installing SAA; a Flux
    transformer too, with our files). The token width is checked against the denoiser's by `load_saa_into`.

    `weights`: our safetensors file(s), or the release's files as `ReleaseFiles` / a dict with keys
    saa, imr, keypoint_encoder. A part the pipeline needs (face encoder, SAA) that is absent is an error
    saying what was found; IMR and keypoint encoder are only needed for expression/pose edits.
    """
    if isinstance(weights, Mapping):
        unknown = set(weights) - {"saa", "imr", "keypoint_encoder"}
        if unknown:
            raise ValueError(f"unknown release file role(s) {sorted(unknown)}; valid: saa, imr, keypoint_encoder")
        weights = ReleaseFiles(**weights)
    if isinstance(weights, ReleaseFiles):
        return _load_release(weights, unet)
    return _load_ours(weights, unet)


def _load_ours(paths: str | Path | Sequence[str | Path], unet: nn.Module) -> DynamicIDModules:
    loaded = load_dynamicid(paths)
    where = ", ".join(map(str, loaded.paths))
    family = denoiser_family(unet)
    check_base_family(loaded.metadata.base_family, family.name, where)
    if family.denoiser_name == "unet":  # a Flux transformer takes any token width until SAA is installed
        loaded.check(cross_attention_dim=family.token_dim(unet))
    missing = [p for p in ("face_encoder", "saa") if p not in loaded.state_dicts]
    if missing:
        raise ValueError(
            f"{where} hold(s) no {' and no '.join(missing)} (parts found: {', '.join(sorted(loaded.state_dicts))}); "
            "inference needs the anchoring stage's weights (face_encoder + saa)"
        )
    face_encoder = loaded.build_face_encoder()
    loaded.load_saa_into(unet)
    imr = loaded.build_imr() if "imr" in loaded.state_dicts else None
    keypoint_encoder = loaded.build_keypoint_encoder() if "keypoint_encoder" in loaded.state_dicts else None
    files = (
        {"weights": loaded.paths[0]}
        if len(loaded.paths) == 1
        else {f"weights[{i}]": p for i, p in enumerate(loaded.paths)}
    )
    return DynamicIDModules(
        face_encoder.eval(), _eval(imr), _eval(keypoint_encoder), loaded.metadata.id_embed_model, files, "dynamicid"
    )


def _load_release(files: ReleaseFiles, unet: nn.Module) -> DynamicIDModules:
    paths = files.paths()
    release = load_release_checkpoint(paths.get("saa"), paths.get("imr"), paths.get("keypoint_encoder"))
    missing = [p for p in ("face_encoder", "saa") if p not in release.state_dicts]
    if missing:
        raise ValueError(f"the release files lack {', '.join(missing)}: {release.report()}")
    face_encoder = release.build_face_encoder()
    unet_dim = int(unet.config.cross_attention_dim)
    if face_encoder.cross_attention_dim != unet_dim:
        raise ValueError(
            f"weights in {paths['saa']} were made for cross_attention_dim={face_encoder.cross_attention_dim}, "
            f"but the base model has cross_attention_dim={unet_dim}"
        )
    release.load_saa_into(unet)
    imr = release.build_imr() if "imr" in release.state_dicts else None
    keypoint_encoder = release.build_keypoint_encoder() if "keypoint_encoder" in release.state_dicts else None
    return DynamicIDModules(
        face_encoder.eval(), _eval(imr), _eval(keypoint_encoder), "arcface-buffalo_l", paths, "release"
    )


def _eval(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else module.eval()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes; remembered per (path, size, mtime) so `batch` hashes a base model's GBs once."""
    stat = Path(path).stat()
    return _sha256_file(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=512)
def _sha256_file(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".json", ".txt", ".model")


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every model file (weights, configs, vocabularies) under a model folder, by relative path."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES
    }
