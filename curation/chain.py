"""The curation chain, declared once: its steps in order, each step's command help, the stage classes it runs
and the settings each depends on, and what `merge` does with it. `pipeline` builds and runs the stages from it,
`dynamicid-curate` makes one command per step and shows on each exactly the options its output depends on, and
`merge` knows which tables it takes from the shards and which steps it runs again.

To add a stage: write its class (`curation.stages.Stage`: name, kind, `process`), add a `StageEntry` (its class,
the `CurationConfig` fields its output depends on, its `Resources`) to its step below, and a test. A new step is a new `Step`.
Only the standard library is imported here: the command line reads the chain without loading the stages.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynamicid.curation.stages import Stage

# What `merge` does with a step of the shards' builds:
SHARED = "shared"  # its results are final in each shard (per photo, or per identity): the tables are concatenated
RERUN = "rerun"  # it crosses shards (identical bytes in two folders, quotas): it runs again on the merged tables


@dataclass(frozen=True)
class Resources:
    """What each worker of a stage asks the engine for, as NeMo Curator's `ProcessingStage` declares it."""

    cpus: float = 1.0
    gpus: float = 0.0  # at most this share of one GPU per worker, only where the cluster has GPUs
    batch_size: int = 16  # rows per MAP batch (also the store's flush unit: a kill loses one batch)


CPU = Resources()
# The face networks: a GPU (shared out over the workers) where the cluster has one; on the CPU nothing changes.
MODEL = Resources(gpus=1.0)


@dataclass(frozen=True)
class StageEntry:
    """A stage class ("module:Class"), the `CurationConfig` fields its output depends on (its fingerprint) and
    the resources each of its workers needs."""

    path: str
    settings: tuple[str, ...] = ()
    resources: Resources = CPU

    def load(self) -> type[Stage]:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Step:
    """A user-facing step: a `dynamicid-curate` command, the `stage` column of rejects, a line of the stats.

    `settings`: what the step's own driver-side work depends on (scan, write), besides its stages'.
    """

    name: str
    help: str
    stages: tuple[StageEntry, ...] = ()
    settings: tuple[str, ...] = ()
    merge: str = RERUN

    def tables(self) -> tuple[str, ...]:
        """The work tables the step writes: its stages' (their `name`), or its own for a driver-only step."""
        return tuple(entry.load().name for entry in self.stages) or (self.name,)

    @property
    def all_settings(self) -> tuple[str, ...]:
        """Every setting the step's output depends on."""
        return tuple(dict.fromkeys([*self.settings, *(s for entry in self.stages for s in entry.settings)]))


CHAIN: tuple[Step, ...] = (
    Step(
        "scan",
        "Stage 1: list and hash every file (work table scan.parquet).",
        settings=("cluster", "follow_links", "shard_index", "shard_count"),
        merge=SHARED,
    ),
    Step(
        "detect",
        "Stage 2: decode photos and find faces (needs scan).",
        (
            StageEntry(
                "dynamicid.curation.detect:DetectStage",
                ("min_face_size", "min_border_margin", "max_faces_per_photo", "max_pixels"),
                MODEL,
            ),
        ),
        merge=SHARED,
    ),
    Step(
        "identify",
        "Stage 3: describe faces, keep the folder's person if large enough for the crop (needs detect).",
        (
            StageEntry("dynamicid.curation.identify:DescribeStage", resources=MODEL),
            StageEntry("dynamicid.curation.identify:IdentifyStage", ("cluster",)),
            StageEntry("dynamicid.curation.size:SizeStage", ("crop_size", "max_upscale")),
        ),
        merge=SHARED,
    ),
    Step(
        "dedupe",
        "Stage 4: drop identical and near-duplicate pictures (needs identify).",
        (
            StageEntry("dynamicid.curation.dedupe:ExactDedupeStage"),
            # The per-identity quota decides which near-duplicates of a small identity may stay.
            StageEntry(
                "dynamicid.curation.dedupe:NearDedupeStage",
                ("phash_max_distance", "dup_embedding_fraction", "per_identity", "min_per_identity"),
            ),
        ),
    ),
    Step(
        "align",
        "Stage 5: FFHQ-style crop transforms (--crop-size) and quality checks (needs dedupe).",
        (
            StageEntry(
                "dynamicid.curation.align:AlignStage",
                ("crop_size", "min_sharpness", "min_brightness", "max_brightness"),
            ),
        ),
        settings=("shard_count",),  # a shard of several also crops every face it aligned, for `merge`
    ),
    Step(
        "label",
        "Stage 6: landmarks, pose, expression, prompts in crop coordinates (needs align).",
        (StageEntry("dynamicid.curation.label:LabelStage"),),
    ),
    Step(
        "select",
        "Stage 7: at most --per-identity images per identity (needs label).",
        (StageEntry("dynamicid.curation.select:SelectStage", ("per_identity", "min_per_identity")),),
    ),
    Step(
        "write",
        "Stage 8: crop the kept faces, caption them (--captioner), write the dataset folder (needs select).",
        # The crop size comes with each row's crop_key (the size align measured).
        (
            StageEntry("dynamicid.curation.crop:CropStage", ("thumbnail_size",)),
            # The captioner's files are in its fingerprint too (`CaptionStage.fingerprint`).
            StageEntry("dynamicid.curation.caption:CaptionStage", ("captioner", "caption_prompt"), MODEL),
        ),
        settings=("rows_per_file", "rows_per_row_group", "thumbnail_size"),
    ),
)
STEPS: tuple[str, ...] = tuple(step.name for step in CHAIN)


def step_named(name: str) -> Step:
    for step in CHAIN:
        if step.name == name:
            return step
    raise LookupError(f"no curation step {name!r}; the steps: {', '.join(STEPS)}")


def entry_of(stage_class: type) -> tuple[Step, StageEntry]:
    """The step and entry that declare `stage_class`."""
    path = f"{stage_class.__module__}:{stage_class.__qualname__}"
    for step in CHAIN:
        for entry in step.stages:
            if entry.path == path:
                return step, entry
    raise LookupError(f"{path} is not in curation.chain.CHAIN: add a StageEntry for it to its step")
