"""Stage `crop` (step `write`): the PNG crop of every kept face, and its report.html thumbnail.

Only the faces `select` keeps are cropped and encoded (`align` measured every candidate's crop and stored only
those of identities that fit their quota; the others are made here), so the work folder holds about one crop per
dataset row. Crops go into the content-keyed crop store (key: `crop_key`), where `write` reads them in dataset
order; a run killed here keeps the crops already made. Each crop's report.html thumbnail is made with its PNG,
from the crop in memory (`stored_crop`, in `align` or here, in the workers), and stored beside it: neither this
stage nor the report decodes a crop again.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
from PIL import Image

from dynamicid.curation.analysis import crop_face, load_error, png_bytes
from dynamicid.curation.report import thumbnail_uri
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore
from dynamicid.curation.tables import digest

CROP_STORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("png", pa.binary()),
        # report.html's thumbnail, made with the PNG from the crop in memory (decoding the PNG again to make it cost
        # more than encoding it), and the --thumbnail-size it was made at.
        ("thumbnail", pa.string()),
        ("thumbnail_size", pa.int32()),
    ]
)
CROP_ROW_GROUP = 4  # crops per Parquet row group: reading one crop back reads at most 4
CROP_SCHEMA = photo_schema(("thumbnail", pa.string()))  # a data: URI, for report.html
CROP_INPUTS = ("source_path", "identity", "sha256", "crop_key", "crop_transform")


def crop_key(sha256: str, kps5: list[float], size: int) -> str:
    """The crop and align stores' key: the photo's bytes, the 5 keypoints the crop is aligned on, the crop size. It starts
    with the size (`<size>-<digest>`), so the `crop` stage makes the crop at the size `align` measured it."""
    return f"{size}-{digest(sha256, json.dumps(kps5), str(size))}"


def crop_size_of(key: str) -> int:
    return int(key.split("-", 1)[0])


def crop_store(work_dir) -> ResultStore:
    return ResultStore(work_dir / "stores" / "crops", CROP_STORE_SCHEMA, row_group_rows=CROP_ROW_GROUP)


def stored_crop(key: str, crop: Image.Image, thumbnail_size: int) -> dict:
    """A crop store row."""
    thumbnail = thumbnail_uri(crop, thumbnail_size)
    return {"key": key, "png": png_bytes(crop), "thumbnail": thumbnail, "thumbnail_size": thumbnail_size}


class CropStage(Stage):
    name = "crop"
    step = "write"
    settings = ("thumbnail_size",)  # the crop size comes with each row's crop_key (the size align measured)
    input_columns = CROP_INPUTS
    pooled = True

    def output_schema(self) -> pa.Schema:
        return CROP_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.store = crop_store(self.context.work_dir)

    def finish(self) -> None:
        crop_store(self.context.work_dir).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        size = self.config.thumbnail_size
        keys = list(dict.fromkeys(p["crop_key"] for p in photos))
        _, stored = self.store.get(keys)
        made: dict[str, str | tuple[str, str]] = {}  # crop_key -> its thumbnail, or (reason, detail)
        for row in stored.to_pylist():
            same_size = row["thumbnail_size"] == size
            made[row["key"]] = (
                row["thumbnail"] if same_size else thumbnail_uri(Image.open(io.BytesIO(row["png"])), size)
            )
        new = []
        for photo in photos:
            key = photo["crop_key"]
            if key in made:
                continue
            try:
                crop = crop_face(self.source(photo["source_path"]), photo["crop_transform"], crop_size_of(key))
            except Exception as error:  # the photo changed or vanished since `align` measured this crop
                reason, detail = load_error(error)
                made[key] = (reason, f"the photo changed or vanished since it was aligned: {detail}")
                continue
            new.append(stored_crop(key, crop, size))
            made[key] = new[-1]["thumbnail"]
        self.store.put(pa.Table.from_pylist(new, schema=CROP_STORE_SCHEMA))
        computed = {row["key"] for row in new}
        rows = []
        for photo in photos:
            thumbnail = made[photo["crop_key"]]
            failed = isinstance(thumbnail, tuple)
            rows.append(
                {
                    **{k: photo[k] for k in ("source_path", "identity", "sha256")},
                    "reason": thumbnail[0] if failed else None,
                    "detail": thumbnail[1] if failed else None,
                    "thumbnail": None if failed else thumbnail,
                    COMPUTED: photo["crop_key"] in computed,
                }
            )
            computed.discard(photo["crop_key"])
        return pa.Table.from_pylist(rows, schema=self.output_schema())
