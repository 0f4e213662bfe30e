"""Base families: one object per family (`BaseFamily`) and one registry, `FAMILIES` (name -> family).

A family knows how to recognise its diffusers folder, single-file checkpoint and loaded denoiser, load its
parts, build its tiny-random FAKE, encode text for DynamicID (its `Conditioner`), install the identity attention
(SAA) in its denoiser, and which DynamicID pipeline class runs it. Every place that used to branch on the family
asks the registry instead:

    family = detect_family("models/sdxl")       # a tiny-random name, a diffusers folder or a .safetensors file
    family = denoiser_family(base.denoiser)     # a loaded UNet / transformer
    family = family_named(metadata.base_family) # a name recorded in weights

Adding a family: a module here with a `BaseFamily` subclass and its instance, and one line in `FAMILIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynamicid.models.families.family import BaseFamily, FolderLayout
from dynamicid.models.families.flux import FLUX
from dynamicid.models.families.sd15 import SD15
from dynamicid.models.families.sdxl import SDXL

FAMILIES: dict[str, BaseFamily] = {family.name: family for family in (SD15, SDXL, FLUX)}
# A folder no family claims (no model_index.json, no telling subfolders) is taken as SD 1.5, whose loader then
# names the subfolders it lacks.
DEFAULT_FAMILY = SD15


def family_named(name: str) -> BaseFamily:
    """The family recorded as `name` (e.g. a weights file's `base_family`)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown base family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_label(name: str) -> str:
    """e.g. "SDXL (base_family 'sdxl')"; a name no family has is shown as it is."""
    family = FAMILIES.get(name)
    return family.describe() if family is not None else f"{name} (base_family {name!r})"


def tiny_names() -> tuple[str, ...]:
    """The `--base-model` names of the tiny-random FAKEs, one per family."""
    return tuple(family.tiny_name for family in FAMILIES.values())


def denoiser_family(denoiser: Any) -> BaseFamily:
    """The family of a loaded denoiser (a UNet, a transformer)."""
    for family in FAMILIES.values():
        if family.recognises_denoiser(denoiser):
            return family
    raise ValueError(f"{type(denoiser).__name__} is the denoiser of no known base family ({', '.join(FAMILIES)})")


def parts_family(parts: Any) -> BaseFamily:
    """The family of anything that holds a base's parts as attributes (a `BaseModel`, a pipeline)."""
    for name in dict.fromkeys(family.denoiser_name for family in FAMILIES.values()):
        denoiser = getattr(parts, name, None)
        if denoiser is not None:
            return denoiser_family(denoiser)
    raise ValueError(f"{type(parts).__name__} holds no denoiser of a known base family")


def folder_family(folder: Path) -> BaseFamily:
    """A diffusers folder's family: the one its model_index.json `_class_name` names, else the one whose
    telling components (SDXL: a UNet and a second text encoder) it has most of, else SD 1.5."""
    layout = FolderLayout.read(folder)
    for family in FAMILIES.values():
        if layout.class_name in family.pipeline_classes:
            return family
    claiming = [family for family in FAMILIES.values() if family.markers <= layout.components]
    return max(claiming, key=lambda family: len(family.markers), default=DEFAULT_FAMILY)


def checkpoint_family(path: Path) -> BaseFamily:
    """A single-file checkpoint's family, from its tensor names (the safetensors header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    for family in FAMILIES.values():
        if any(key in keys for key in family.checkpoint_keys):
            return family
    raise ValueError(f"{path}: not a single-file checkpoint of a known base family ({', '.join(FAMILIES)})")


def detect_family(source: str | Path) -> BaseFamily:
    """The family of a `--base-model` value, without loading it: a tiny-random name, a diffusers folder, or a
    single-file `.safetensors` checkpoint."""
    for family in FAMILIES.values():
        if str(source) == family.tiny_name:
            return family
    path = Path(source)
    if path.is_file():
        return checkpoint_family(path)
    if not path.is_dir():
        labels = " or ".join(family.label for family in FAMILIES.values())
        raise FileNotFoundError(
            f"base model folder {path} does not exist (expected {labels} in diffusers layout, or "
            f"{' / '.join(repr(name) for name in tiny_names())} for a CPU smoke run)"
        )
    return folder_family(path)


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "BaseFamily",
    "FolderLayout",
    "checkpoint_family",
    "denoiser_family",
    "detect_family",
    "family_label",
    "family_named",
    "folder_family",
    "parts_family",
    "tiny_names",
]
