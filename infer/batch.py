"""`dynamicid-infer batch`: every manifest row becomes what `generate` writes (image + sidecar), named by the
row id. A row whose sidecar already records the same settings hash is skipped, so a stopped batch resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamicid.infer.manifest import ManifestRow

# Options of `generate` that do not change what is written (left out of the settings hash).
NOT_HASHED = ("as_json", "device", "offload")
WEIGHT_OPTIONS = ("weights", "saa", "imr", "keypoint_encoder")


@dataclass
class BatchJob:
    """One manifest row to generate: the `generate` options it runs with and where it writes."""

    row: ManifestRow
    options: dict[str, Any]
    settings_hash: str
    done: bool

    @property
    def out(self) -> Path:
        return self.options["out"]

    def sidecar_fields(self) -> dict[str, Any]:
        """What a batch sidecar adds to generate's: the row (all references, held-out photos) and the hash."""
        return {"tool": "dynamicid-infer batch", "row": self.row.to_json(), "settings_hash": self.settings_hash}


def plan_batch(rows: list[ManifestRow], out_dir: Path, options: dict[str, Any], suffix: str = ".png") -> list[BatchJob]:
    """The jobs of a batch; `options` are the batch command's generate options (models and run settings)."""
    context = {k: v for k, v in options.items() if k not in NOT_HASHED}
    for key in WEIGHT_OPTIONS:  # the same path rewritten with new weights is another run
        context[key] = [_file_identity(p) for p in _as_list(options.get(key))]
    jobs = []
    for row in rows:
        row_options = {
            **options,
            **row.settings,
            "prompt": row.prompt,
            "seed": row.seed,
            "num_images": 1,
            "out": out_dir / f"{row.id}{suffix}",
            "as_json": False,
        }
        settings_hash = row.settings_hash(context)
        jobs.append(BatchJob(row, row_options, settings_hash, _is_done(out_dir / f"{row.id}.json", settings_hash)))
    return jobs


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _file_identity(path: Any) -> list[Any]:
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return [str(path), None if stat is None else stat.st_size, None if stat is None else stat.st_mtime_ns]


def _is_done(sidecar: Path, settings_hash: str) -> bool:
    """The row's sidecar records this hash and its images are all there."""
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        images = [sidecar.parent / Path(p).name for p in data["outputs"]["images"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return data.get("settings_hash") == settings_hash and all(p.is_file() for p in images)
