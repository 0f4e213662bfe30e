"""What to score: one `Case` per image, from the sidecars `dynamicid-infer generate|batch` wrote, or from a
manifest and images named `<id>.png` / `<id>.jpg` (images made by other methods)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamicid.infer.manifest import ManifestError, ManifestPerson, ManifestRow, parse_row, read_manifest
from dynamicid.infer.outputs import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Case:
    """One image and the people it was asked to show."""

    id: str
    image: Path
    prompt: str
    people: tuple[ManifestPerson, ...]


def cases_from_sidecars(folder: str | Path, references_dir: str | Path | None = None) -> list[Case]:
    """Every image listed by the generate/batch sidecars (`*.json`) of `folder`, sorted by id.

    A batch sidecar carries its manifest row (all references, held-out photos); a generate sidecar gives one
    reference per person. Images are looked up next to their sidecar; the boxes are those the pipeline used.
    Relative reference paths resolve against `references_dir` (default: the current folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: folder not found")
    base = Path(references_dir) if references_dir is not None else Path.cwd()
    cases = []
    for path in sorted(folder.glob("*.json")):
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(
                f"{path}: not readable JSON ({error}); a sidecar cut short? generate the image again, or move the "
                "file out of the folder"
            ) from None
        if not isinstance(sidecar, dict) or not str(sidecar.get("tool", "")).startswith("dynamicid-infer"):
            continue  # not a sidecar (e.g. a summary written next to the images)
        try:
            cases += _sidecar_cases(sidecar, path, base)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # fields missing or of the wrong type
            raise ManifestError(
                f"{path}: not a valid dynamicid-infer sidecar ({type(error).__name__}: {error}); generate the image "
                "again"
            ) from None
    if not cases:
        raise ManifestError(
            f"{folder} holds no dynamicid-infer sidecars; for images made elsewhere give --manifest M "
            "with images named <id>.png / <id>.jpg"
        )
    return sorted(cases, key=lambda c: c.id)


def _sidecar_cases(sidecar: dict[str, Any], path: Path, base: Path) -> list[Case]:
    row = parse_row(sidecar.get("row") or _row_of_generate(sidecar, path), base, str(path))
    people = tuple(
        ManifestPerson(p.references, p.held_out, p.identity, p.expression, p.pose, tuple(used["box"]), p.landmark_image)
        for p, used in zip(row.people, sidecar["people"], strict=True)
    )
    cases = []
    for image in sidecar["outputs"]["images"]:
        image_path = path.parent / Path(image).name
        if not image_path.is_file():
            raise ManifestError(f"{path}: image {image_path} listed in the sidecar is missing")
        cases.append(Case(image_path.stem, image_path, row.prompt, people))
    return cases


def _row_of_generate(sidecar: dict[str, Any], path: Path) -> dict[str, Any]:
    """The manifest-row form of a `generate` sidecar (one reference per person, no held-out photos)."""
    people = []
    for person in sidecar["people"]:
        requested = {k: v for k, v in person["requested"].items() if v is not None and k != "box"}
        people.append({"references": [person["reference"]["source"]], **requested})
    return {"id": path.stem, "prompt": sidecar["settings"]["prompt"], "people": people}


def cases_from_manifest(
    folder: str | Path, manifest: str | Path, references_dir: str | Path | None = None
) -> list[Case]:
    """One case per manifest row, the image being `folder/<id>.<png|jpg|jpeg|webp>`."""
    rows: list[ManifestRow] = read_manifest(manifest, references_dir)
    cases = []
    for row in rows:
        found = [Path(folder) / f"{row.id}{suffix}" for suffix in IMAGE_SUFFIXES]
        image = next((p for p in found if p.is_file()), None)
        if image is None:
            raise ManifestError(f"{manifest} (id {row.id!r}): no image {Path(folder) / row.id}.png/.jpg/.jpeg/.webp")
        cases.append(Case(row.id, image, row.prompt, row.people))
    return cases
