"""A benchmark manifest from a curated dataset: identities drawn per row, reference and held-out photos kept
apart (the aligned crops, written next to the manifest), prompts from a prompt list, targets drawn."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynamicid.schemas import EXPRESSIONS, POSE_BINS
from dynamicid.schemas.dataset_folder import open_dataset
from dynamicid.schemas.prompts import benchmark_prompt, benchmark_prompts, parse_prompt_list

TARGETS = ("expression", "pose", "both", "none")


@dataclass
class ManifestConfig:
    """Settings of `dynamicid-eval manifest` (one flag each)."""

    dataset: str
    out: str
    prompts: str = "single"  # "single", "multi" or a prompt-list file
    people: int = 1
    rows: int = 50
    references: int = 1  # reference photos per person
    held_out: int = 1  # held-out photos per person (copy-paste figure), when the identity has enough
    targets: str = "expression"
    seed: int = 0


def layout_boxes(people: int) -> list[list[float]] | None:
    """One box per person: the release's two-person layout, equal strips with margins for more, none for one."""
    if people == 1:
        return None
    if people == 2:
        return [[0.1, 0.1, 0.5, 0.4], [0.1, 0.6, 0.5, 0.9]]
    return [[0.15, (i + 0.1) / people, 0.85, (i + 0.9) / people] for i in range(people)]


def build_manifest(config: ManifestConfig) -> Path:
    """Write `config.out` (JSONL) and `<out stem>.references/` (PNG crops); returns the manifest path."""
    if config.targets not in TARGETS:
        raise ValueError(f"--targets {config.targets!r}; valid: {', '.join(TARGETS)}")
    if min(config.people, config.rows, config.references) < 1 or config.held_out < 0:
        raise ValueError("--people, --rows and --references must be at least 1, --held-out at least 0")
    templates = _templates(config.prompts)
    table = open_dataset(Path(config.dataset)).select(["identity", "image"])
    identities: dict[str, list[int]] = {}
    for index, name in enumerate(table.column("identity").to_pylist()):
        identities.setdefault(name, []).append(index)
    usable = sorted(name for name, rows in identities.items() if len(rows) >= config.references)
    if len(usable) < config.people:
        raise ValueError(
            f"--dataset {config.dataset}: {len(usable)} identities have {config.references} or more photos, "
            f"fewer than --people {config.people}"
        )
    out = Path(config.out).resolve()
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    crops = out.with_name(out.stem + ".references")
    rng = np.random.default_rng(config.seed)
    boxes = layout_boxes(config.people)
    images = table.column("image")
    lines = []
    for number in range(config.rows):
        people = []
        for slot, name in enumerate(rng.choice(usable, size=config.people, replace=False)):
            order = [identities[name][i] for i in rng.permutation(len(identities[name]))]
            held = order[config.references : config.references + config.held_out]
            person = {
                "identity": str(name),
                "references": [_crop(images, i, crops, name, out.parent) for i in order[: config.references]],
                "held_out": [_crop(images, i, crops, name, out.parent) for i in held],
            }
            if config.targets in ("expression", "both"):
                person["expression"] = str(rng.choice(EXPRESSIONS))
            if config.targets in ("pose", "both"):
                person["pose"] = str(rng.choice([p.name for p in POSE_BINS]))
            if boxes is not None:
                person["box"] = boxes[slot]
            people.append({k: v for k, v in person.items() if v != []})
        prompt = benchmark_prompt(str(rng.choice(templates)), config.people)
        row = {"id": f"r{number:05d}", "prompt": prompt, "seed": int(rng.integers(0, 2**31)), "people": people}
        lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _templates(prompts: str) -> list[str]:
    if Path(prompts).is_file():
        templates = parse_prompt_list(Path(prompts).read_text(encoding="utf-8"))
        if not templates:
            raise ValueError(f"--prompts {prompts}: the file holds no prompt")
        return templates
    try:
        return benchmark_prompts(prompts)
    except ValueError as error:
        raise ValueError(f"--prompts {prompts}: {error}") from None


def _crop(images, index: int, folder: Path, identity: str, root: Path) -> str:
    """The dataset row's aligned crop as a PNG file (written once); the path relative to the manifest."""
    path = folder / identity / f"{index:06d}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images[index].as_py()["bytes"])
    return str(path.relative_to(root))
