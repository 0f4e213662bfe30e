"""Stage `crop` (step `write`): the PNG crop of every kept face, and its report.html thumbnail.

Only the faces `select` keeps are cropped and encoded (`align` measured every candidate's crop and stored only
those of identities that fit their quota; the others are made here), so the work folder holds about one crop per
dataset row. Crops go into the content-keyed crop store (key: `crop_key`), where `write` reads them in dataset
order; a run killed here keeps the crops already made. Each crop's report.html thumbnail is made with its PNG,
from the crop in memory (`CropStores`, in `align` or here, in the workers), into a store of its own: neither this
stage nor the report decodes a crop again.
"""

from __future__ import annotations

import io
import itertools
import json

import pyarrow as pa
from PIL import Image

from dynamicid.curation.analysis import crop_face, load_error, png_bytes
from dynamicid.curation.report import thumbnail_uri
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore
from dynamicid.curation.tables import digest

CROP_STORE_SCHEMA = pa.schema([("key", pa.string()), ("png", pa.binary())])
THUMBNAIL_STORE_SCHEMA = pa.schema([("key", pa.string()), ("thumbnail", pa.string())])  # key: <crop_key>-<size>
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


def stored_crops(store: ResultStore, keys: list[str]) -> pa.ChunkedArray:
    """The PNG bytes of these crops, in order; every one must be in `store` (the crop stage put them there)."""
    found, pngs = store.get(keys)
    if not found.all():
        missing = keys[found.tolist().index(False)]
        raise RuntimeError(f"the crop {missing} is missing from {store.folder}: rerun the build with --no-resume")
    return pngs.column("png")


class CropStores:
    """The crop store (each crop's PNG) and the thumbnail store (its report.html thumbnail at one --thumbnail-size).

    Both are made from the crop in memory: decoding a stored PNG again to make its thumbnail cost more than
    encoding it. Only the crop stage reads thumbnails, so it never reads the PNGs of crops `align` stored.
    """

    def __init__(self, work_dir, thumbnail_size: int):
        self.crops = crop_store(work_dir)
        self.thumbnails = ResultStore(work_dir / "stores" / "thumbnails", THUMBNAIL_STORE_SCHEMA)
        self.thumbnail_size = thumbnail_size

    def _thumbnail_key(self, key: str) -> str:
        return f"{key}-{self.thumbnail_size}"

    def put(self, crops: dict[str, Image.Image]) -> dict[str, str]:
        """Store these crops (key: crop_key) and their thumbnails; returns the thumbnails."""
        self.crops.put(
            pa.Table.from_pylist([{"key": k, "png": png_bytes(c)} for k, c in crops.items()], schema=CROP_STORE_SCHEMA)
        )
        return self._put_thumbnails(crops)

    def _put_thumbnails(self, crops: dict[str, Image.Image]) -> dict[str, str]:
        made = {key: thumbnail_uri(crop, self.thumbnail_size) for key, crop in crops.items()}
        rows = [{"key": self._thumbnail_key(k), "thumbnail": t} for k, t in made.items()]
        self.thumbnails.put(pa.Table.from_pylist(rows, schema=THUMBNAIL_STORE_SCHEMA))
        return made

    def stored_thumbnails(self, keys: list[str]) -> dict[str, str]:
        """The thumbnails of those of `keys` whose crop is stored (made from its PNG if only that is there)."""
        keys = [k for k, (part, _) in zip(keys, self.crops.locate(keys).tolist(), strict=True) if part >= 0]
        found, table = self.thumbnails.get([self._thumbnail_key(k) for k in keys])
        thumbnails = dict(zip(itertools.compress(keys, found), table.column("thumbnail").to_pylist(), strict=True))
        missing = [k for k in keys if k not in thumbnails]
        if missing:  # stored at another --thumbnail-size
            _, pngs = self.crops.get(missing)
            pairs = zip(pngs.column("key").to_pylist(), map(_decode_png, pngs.column("png").to_pylist()), strict=True)
            decoded = dict(pairs)
            thumbnails.update(self._put_thumbnails(decoded))
        return thumbnails

    def compact(self) -> None:
        self.crops.compact()
        self.thumbnails.compact()


def _decode_png(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


class CropStage(Stage):
    name = "crop"
    version = "2"  # carries crop_key, for `caption`
    input_columns = CROP_INPUTS
    carry_columns = ("crop_key",)
    pooled = True

    def output_schema(self) -> pa.Schema:
        return CROP_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.stores = CropStores(self.context.work_dir, self.config.thumbnail_size)

    def finish(self) -> None:
        CropStores(self.context.work_dir, self.config.thumbnail_size).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        keys = list(dict.fromkeys(p["crop_key"] for p in photos))
        made: dict[str, str | tuple[str, str]] = dict(self.stores.stored_thumbnails(keys))  # or (reason, detail)
        new: dict[str, Image.Image] = {}
        for photo in photos:
            key = photo["crop_key"]
            if key in made or key in new:
                continue
            try:
                path = self.source(photo["source_path"])
                new[key] = crop_face(path, photo["crop_transform"], crop_size_of(key), self.config.max_pixels)
            except Exception as error:  # the photo changed or vanished since `align` measured this crop
                reason, detail = load_error(error)
                made[key] = (reason, f"the photo changed or vanished since it was aligned: {detail}")
        made.update(self.stores.put(new))
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
                    COMPUTED: photo["crop_key"] in new,
                }
            )
            new.pop(photo["crop_key"], None)
        return pa.Table.from_pylist(rows, schema=self.output_schema())
