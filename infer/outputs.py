"""What `dynamicid.infer.generate` writes: images, activation-map overlays and the JSON sidecar, all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# One colour per person for the overlays (cycled beyond six people).
PERSON_COLORS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 32), (200, 96, 255), (32, 220, 220))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The largest width or height generated: twice the largest native size of the supported bases (Flux, 2048). A
# larger size is a typo that would only run until memory is gone (a 100000x100000 latent is 2.5 GB per channel).
MAX_IMAGE_SIDE = 4096


def overlay_activation(
    image: Image.Image, activation: np.ndarray, color: tuple[int, int, int], box: tuple[float, ...] | None = None
) -> Image.Image:
    """The image with `activation` (H, W) in [0, 1] tinted in `color`, and the person's box outlined."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = 0.7 * np.clip(activation, 0.0, 1.0)[..., None]
    tinted = pixels * (1.0 - weight) + np.asarray(color, dtype=np.float32) * weight
    result = Image.fromarray(tinted.round().astype(np.uint8))
    if box is not None:
        y0, x0, y1, x1 = box
        w, h = result.size
        ImageDraw.Draw(result).rectangle((x0 * w, y0 * h, x1 * w - 1, y1 * h - 1), outline=color, width=1)
    return result


def check_output_path(out: Path, name: str = "out") -> Path:
    """An image path in an existing folder (`name`: the argument or flag named in the error)."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{name} {out}: the file name must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if not out.parent.resolve().is_dir():
        raise ValueError(f"{name} {out}: folder {out.parent} does not exist")
    return out


def output_names(out: Path, num_images: int, num_people: int, activation_maps: bool) -> dict[str, Any]:
    """File names for one run: `out` itself for a single image, `stem-k.suffix` for several."""
    stems = [out.stem] if num_images == 1 else [f"{out.stem}-{k}" for k in range(num_images)]
    images = [out.with_name(stem + out.suffix) for stem in stems]
    maps = [
        [out.with_name(f"{stem}.person{i + 1}.saa.png") for i in range(num_people)] if activation_maps else []
        for stem in stems
    ]
    return {"images": images, "activation_maps": maps, "sidecar": out.with_suffix(".json")}


class Staging:
    """All-or-nothing output: files are written into a hidden temporary folder inside `folder` and moved into
    place only when the `open()` block ends without error; otherwise nothing is moved and the folder removed."""

    def __init__(self, folder: Path):
        self.folder = folder

    @contextmanager
    def open(self) -> Iterator[Staging]:
        staging = Path(tempfile.mkdtemp(prefix=".dynamicid-infer-", dir=self.folder))
        self._staging, self._files = staging, {}
        try:
            yield self
            for final, temporary in self._files.items():
                os.replace(temporary, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def path(self, final: Path) -> Path:
        self._files[final] = self._staging / final.name
        return self._files[final]

    def write_json(self, final: Path, data: dict[str, Any]) -> None:
        self.path(final).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
