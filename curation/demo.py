"""`demo`: curate the real photos that ship inside installed packages (no download), to show the whole path.

The photos are arranged into identity folders in OUT_DIR/.demo-photos: insightface's sample images (Tom Hanks,
a masked face in four colours, a group photo), scikit-image's `astronaut` (Eileen Collins) plus a mirrored,
downsized copy made here (to show duplicate removal), and a few of its photos without faces (to show rejects).
Whatever subset is installed is used; with none, the demo still writes a valid, empty dataset.
The sample faces are small (about 100 px across), so the demo crops at `DEMO_CROP_SIZE`: at the default 512
every one of them would be enlarged about 3x and rejected as too_small (see `--max-upscale`).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from PIL import Image, ImageOps

# (package, file inside its data folder, identity folder in the demo, file name there)
DEMO_PHOTOS: tuple[tuple[str, str, str, str], ...] = (
    ("insightface", "data/images/Tom_Hanks_54745.png", "tom_hanks", "Tom_Hanks_54745.png"),
    ("insightface", "data/images/mask_white.jpg", "masked_woman", "mask_white.jpg"),
    ("insightface", "data/images/mask_blue.jpg", "masked_woman", "mask_blue.jpg"),
    ("insightface", "data/images/mask_black.jpg", "masked_woman", "mask_black.jpg"),
    ("insightface", "data/images/mask_green.jpg", "masked_woman", "mask_green.jpg"),
    ("insightface", "data/images/t1.jpg", "group_photo", "t1.jpg"),
    ("skimage", "data/astronaut.png", "eileen_collins", "astronaut.png"),
    ("skimage", "data/camera.png", "eileen_collins", "camera.png"),  # another person: shows other_person/no_face
    ("skimage", "data/coffee.png", "eileen_collins", "coffee.png"),  # no face
    ("skimage", "data/chelsea.png", "tom_hanks", "chelsea.png"),  # a cat
)

DEMO_CROP_SIZE = 256  # the sample faces' crops stay within the default --max-upscale at this size


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def arrange_demo_photos(target: Path) -> list[str]:
    """Copy the installed sample photos into target/<identity>/; returns the relative paths made."""
    made = []
    for package, inside, identity, name in DEMO_PHOTOS:
        root = package_dir(package)
        if root is None or not (root / inside).is_file():
            continue
        (target / identity).mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / inside, target / identity / name)
        made.append(f"{identity}/{name}")
    astronaut = target / "eileen_collins" / "astronaut.png"
    if astronaut.exists():  # a mirrored, smaller copy: dedupe keeps the original
        with Image.open(astronaut) as image:
            ImageOps.mirror(image.convert("RGB")).resize((384, 384)).save(
                astronaut.with_name("astronaut_mirrored_small.jpg")
            )
        made.append("eileen_collins/astronaut_mirrored_small.jpg")
    return made


def run_demo(out_dir: Path, **build_options) -> dict:
    """Arrange the sample photos in OUT_DIR/.demo-photos (kept, so `report` can show rejects) and build."""
    from dynamicid.curation.inputs import check_out_dir, mark_out_dir
    from dynamicid.curation.pipeline import build_dataset

    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir)
    mark_out_dir(out_dir)
    photos = out_dir / ".demo-photos"
    if photos.exists():
        shutil.rmtree(photos)
    photos.mkdir()
    arrange_demo_photos(photos)
    return build_dataset(photos, out_dir, **{"crop_size": DEMO_CROP_SIZE, **build_options})
