"""Benchmark manifests: one JSON object per line, each an image to generate (`dynamicid-infer batch`) and score
(`dynamicid-eval score`).

    {"id": "r0001", "prompt": "two friends in a cafe", "seed": 7,
     "people": [{"references": ["a/1.png", "a/2.png"], "held_out": ["a/3.png"], "identity": "a",
                 "expression": "happy", "pose": "front view", "box": [0.1, 0.05, 0.9, 0.45]},
                {"references": ["b/1.png"], "landmark_image": "b/4.png", "box": [0.1, 0.55, 0.9, 0.95]}],
     "steps": 30, "guidance_scale": 5.0, "id_scale": 1.0, "size": "768x512", "negative_prompt": ""}

Relative file paths are resolved against a base folder (the manifest's own folder unless told otherwise).
Generation uses each person's first reference; scoring uses all of them (their mean embedding) and the
held-out photos for the copy-paste figure. Every problem is reported as one line naming the row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamicid.infer.outputs import MAX_IMAGE_SIDE
from dynamicid.infer.people import Box, Person, check_box, check_person_labels

ROW_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "negative_prompt": str,
    "steps": int,
    "guidance_scale": (int, float),
    "id_scale": (int, float),
    "size": str,
}
ROW_KEYS = ("id", "prompt", "seed", "people", *ROW_SETTINGS)
PERSON_KEYS = ("references", "held_out", "identity", "expression", "pose", "box", "landmark_image")
SIZE = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ids become file names


class ManifestError(ValueError):
    """A manifest problem, on one line that names the file and the row."""


@dataclass(frozen=True)
class ManifestPerson:
    """One person of a row: reference photos (the first one is used to generate), optional targets."""

    references: tuple[Path, ...]
    held_out: tuple[Path, ...] = ()
    identity: str | None = None
    expression: str | None = None
    pose: str | None = None
    box: Box | None = None
    landmark_image: Path | None = None

    def to_person(self) -> Person:
        """The `Person` the pipeline generates (first reference)."""
        return Person(self.references[0], self.expression, self.pose, self.landmark_image, self.box)

    def to_json(self) -> dict[str, Any]:
        data = {
            "references": [str(p) for p in self.references],
            "held_out": [str(p) for p in self.held_out],
            "identity": self.identity,
            "expression": self.expression,
            "pose": self.pose,
            "box": None if self.box is None else list(self.box),
            "landmark_image": None if self.landmark_image is None else str(self.landmark_image),
        }
        return {k: v for k, v in data.items() if v not in (None, [])}


@dataclass(frozen=True)
class ManifestRow:
    """One image to generate and score."""

    id: str
    prompt: str
    people: tuple[ManifestPerson, ...]
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # generate settings of this row (ROW_SETTINGS)

    def to_json(self) -> dict[str, Any]:
        """The row with resolved paths (what a sidecar records; `parse_row` reads it back)."""
        data: dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.seed is not None:
            data["seed"] = self.seed
        return {**data, "people": [p.to_json() for p in self.people], **self.settings}

    def settings_hash(self, context: dict[str, Any]) -> str:
        """sha256 of the row and the run-wide settings: a finished row with the same hash is not redone."""
        text = json.dumps({"row": self.to_json(), "context": context}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: str | Path, base_dir: str | Path | None = None) -> list[ManifestRow]:
    """Every row of a JSONL manifest, checked (files exist, labels known, boxes in [0, 1], ids unique)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    base = Path(base_dir) if base_dir is not None else path.parent
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{where}: not valid JSON ({error.msg})") from None
        row = parse_row(data, base, where)
        if row.id in seen:
            raise ManifestError(f"{where}: id {row.id!r} already used on line {seen[row.id]}; ids must be unique")
        seen[row.id] = number
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def parse_row(data: Any, base: Path, where: str) -> ManifestRow:
    """One checked row; `where` prefixes every message (file and line)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    row_id = data.get("id")
    if not isinstance(row_id, str) or not SAFE_ID.match(row_id):
        raise ManifestError(f"{where}: 'id' must be a string of letters, digits, '.', '_' or '-' (it names files)")
    where = f"{where} (id {row_id!r})"
    unknown = sorted(set(data) - set(ROW_KEYS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(ROW_KEYS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError(f"{where}: 'prompt' must be a non-empty string")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ManifestError(f"{where}: 'seed' must be a non-negative integer")
    settings = {}
    for key, kind in ROW_SETTINGS.items():
        if key in data:
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise ManifestError(f"{where}: {key!r} must be of type {_type_name(kind)}")
            settings[key] = data[key]
    if "steps" in settings and settings["steps"] < 1:
        raise ManifestError(f"{where}: 'steps' must be at least 1")
    for key in ("guidance_scale", "id_scale"):
        if key in settings and not 0 <= settings[key] < math.inf:  # json reads NaN and Infinity
            raise ManifestError(f"{where}: {key!r} must be a finite number >= 0, got {settings[key]}")
    size = settings.get("size")
    if size is not None and not (
        SIZE.match(size) and all(8 <= int(v) <= MAX_IMAGE_SIDE and int(v) % 8 == 0 for v in size.split("x"))
    ):
        raise ManifestError(
            f"{where}: 'size' {size!r} must be WIDTHxHEIGHT in multiples of 8 up to {MAX_IMAGE_SIDE}, e.g. 768x512"
        )
    people = data.get("people")
    if not isinstance(people, list) or not people:
        raise ManifestError(f"{where}: 'people' must be a non-empty list of objects")
    parsed = tuple(_parse_person(person, base, where, i) for i, person in enumerate(people))
    if len({p.box is None for p in parsed}) > 1:
        raise ManifestError(f"{where}: give a 'box' to every person or to none (none: equal vertical strips)")
    return ManifestRow(row_id, prompt, parsed, seed, settings)


def _parse_person(data: Any, base: Path, row_where: str, index: int) -> ManifestPerson:
    where = f"{row_where}: person {index + 1}"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    unknown = sorted(set(data) - set(PERSON_KEYS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(PERSON_KEYS)}")
    references = _files(data.get("references"), base, f"{where}: 'references'", required=True)
    held_out = _files(data.get("held_out", []), base, f"{where}: 'held_out'", required=False)
    landmark = data.get("landmark_image")
    landmark_image = None if landmark is None else _files([landmark], base, f"{where}: 'landmark_image'", True)[0]
    identity = data.get("identity")
    if identity is not None and not isinstance(identity, str):
        raise ManifestError(f"{where}: 'identity' must be a string")
    box = data.get("box")
    person = ManifestPerson(
        references, held_out, identity, data.get("expression"), data.get("pose"), None, landmark_image
    )
    try:
        check_person_labels(person.to_person(), index)
        if box is not None:
            box = check_box(box, index)
    except ValueError as error:  # the message names the person already
        raise ManifestError(f"{row_where}: {error}") from None
    return ManifestPerson(references, held_out, identity, person.expression, person.pose, box, landmark_image)


def _files(values: Any, base: Path, where: str, required: bool) -> tuple[Path, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ManifestError(f"{where} must be a list of file paths")
    if required and not values:
        raise ManifestError(f"{where} is empty: give at least one photo")
    paths = tuple(p if p.is_absolute() else base / p for p in map(Path, values))
    for path in paths:
        if not path.is_file():
            raise ManifestError(f"{where}: file not found: {path}")
    return paths


def _type_name(kind: type | tuple[type, ...]) -> str:
    return "number" if isinstance(kind, tuple) else {str: "string", int: "integer"}[kind]
