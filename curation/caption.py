"""Stage `caption` (step `write`, after `crop`): a scene caption of every kept face's crop from `--captioner DIR`.

It captions the crop itself, the image the anchoring stage trains on: the caption conditions the denoising of
exactly those pixels, so it should name what they show (hair, clothing, background, lighting inside the FFHQ-style
crop, which holds head, shoulders and some surroundings), and a wider view of the source photo would name things
the trained image does not hold. It also costs nothing to find: the crop is already in the crop store.

Captions live in a content-keyed store (`stores/captions`), keyed by the crop's `crop_key` (the digest of what the
crop is made of: the photo's bytes, its 5 keypoints, the crop size; the crop store holds exactly those PNG bytes
under it, so no crop is read again to look a caption up) and the captioner (`CaptionerSpec.key`: model type,
folder name and files, prompt, generation settings): a rerun reuses them, another captioner or prompt computes new
ones. The model is built in a worker on the first batch that misses the store, so a run whose captions are all
stored loads none. Each row records the captioner in `caption_model`; an empty caption keeps the template.

Without `--captioner` the stage only passes the rows through (no model, no store, no worker): `write` keeps the
`label` stage's template caption and `caption_model` is null.
"""

from __future__ import annotations

import functools
import io
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dynamicid.curation.captioner import Captioner, CaptionerError, CaptionerSpec
from dynamicid.curation.chain import Resources
from dynamicid.curation.crop import crop_store, stored_crops
from dynamicid.curation.stages import COMPUTED, Stage, StageSetupError, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute_many
from dynamicid.curation.tables import digest

CAPTION_STORE_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string())])
CAPTION_SCHEMA = photo_schema(("caption", pa.string()), ("caption_model", pa.string()))
CAPTION_COLUMNS = ["source_path", "caption", "caption_model"]  # what `write` reads of the caption table


def caption_store(work_dir) -> ResultStore:
    return ResultStore(work_dir / "stores" / "captions", CAPTION_STORE_SCHEMA)


class CaptionStage(Stage):
    name = "caption"
    input_columns = ("source_path", "identity", "sha256", "crop_key")

    def __init__(self, context):
        super().__init__(context)
        # A model stage only with a captioner; without one the driver passes the rows through.
        self.uses_models = self.pooled = self.config.captioner is not None

    @property
    def resources(self) -> Resources:
        """The model steps' (a GPU share) with a captioner; without one, no GPU."""
        declared = super().resources
        return declared if self.config.captioner is not None else replace(declared, gpus=0.0)

    @functools.cached_property
    def spec(self) -> CaptionerSpec | None:
        """The captioner, resolved in the driver (its files' digest) and shipped to the workers with the stage."""
        c = self.config
        return None if c.captioner is None else CaptionerSpec.of(c.captioner, c.caption_prompt)

    def output_schema(self) -> pa.Schema:
        return CAPTION_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def fingerprint(self, upstream: str) -> str:
        """Also the captioner's files: a model replaced in the same folder makes the table stale."""
        own = super().fingerprint(upstream)
        return own if self.spec is None else digest(own, self.spec.key)

    def setup(self) -> None:
        if self.spec is not None:
            self.captions, self.crops = caption_store(self.context.work_dir), crop_store(self.context.work_dir)
            self._captioner: Captioner | None = None

    def finish(self) -> None:
        if self.spec is not None:
            caption_store(self.context.work_dir).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.select(["source_path", "identity", "sha256"]).to_pylist()
        if self.spec is None:  # the template's rows: nothing is computed
            return pa.Table.from_pylist([{**p, COMPUTED: False} for p in photos], schema=self.output_schema())
        model = self.spec.model
        crop_keys = batch.column("crop_key").to_pylist()
        keys = [digest(crop, self.spec.key) for crop in crop_keys]
        crop_of = dict(zip(keys, crop_keys, strict=True))
        found, computed = fetch_or_compute_many(self.captions, keys, lambda missing: self._caption(missing, crop_of))
        rows = []
        for photo, key in zip(photos, keys, strict=True):
            text = found[key]["caption"] or None  # an empty caption: the template stays
            rows.append({**photo, "caption": text, "caption_model": model if text else None, COMPUTED: key in computed})
            computed.discard(key)  # a second row of the same crop reused the first one's caption
        return pa.Table.from_pylist(rows, schema=self.output_schema())

    def _caption(self, keys: list[str], crop_of: dict[str, str]) -> list[dict]:
        """Store rows of these caption keys: their crops read from the crop store, captioned in one batch."""
        pngs = stored_crops(self.crops, [crop_of[key] for key in keys])
        images = [Image.open(io.BytesIO(png)) for png in pngs.to_pylist()]
        captions = self._model().caption(images)
        return [{"key": key, "caption": text} for key, text in zip(keys, captions, strict=True)]

    def _model(self) -> Captioner:
        """The captioner, built on first use in this worker (a load error is a setup error: one line)."""
        if self._captioner is None:
            try:
                self._captioner = Captioner(
                    self.spec.folder, device=self.config.device, prompt=self.spec.prompt, batch_size=self.batch_size
                )
            except CaptionerError as error:
                raise StageSetupError(str(error)) from None
        return self._captioner


def with_captions(labels: pa.Table, captions: pa.Table) -> pa.Table:
    """Kept `label` rows with the caption stage's rows of them (same order): its caption where it made one (else
    the template), and `caption_model`."""
    if labels.column("source_path") != captions.column("source_path"):
        raise RuntimeError("caption.parquet does not follow crop.parquet: rerun the build")
    index = labels.schema.get_field_index("caption")
    made = captions.column("caption")
    caption = pc.if_else(pc.is_valid(made), made, labels.column("caption"))
    labels = labels.set_column(index, labels.schema.field(index), caption)
    return labels.append_column("caption_model", captions.column("caption_model"))
