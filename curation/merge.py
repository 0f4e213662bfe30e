"""`merge`: shard outputs (`build --shard I/N` on several machines) -> one dataset folder, as if built at once.

Shards split whole identities, so everything up to `identify` is the same per photo whatever the shard count.
The one rule that crosses identities, identical file bytes in two folders (`exact_dedupe`), and everything
after it (the per-identity near-duplicate groups, quotas and `--min-per-identity`, rejects, identities,
summary, card, report) is decided again here: the shards' scan/detect/describe/identify/size tables are
concatenated into a new work folder, and the pipeline's own `dedupe` ... `write` steps run on them with the
shards' stores.
No face model runs and no photo is read: the crops come from the shards' crop stores (a sharded build crops
every face it aligns and the near-duplicates it drops, which a merge may keep: see `pipeline.crop_for_merge`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dynamicid.curation.captioner import CaptionerError, model_type
from dynamicid.curation.card import write_card
from dynamicid.curation.chain import CHAIN, RERUN, SHARED
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.crop import crop_key, crop_store
from dynamicid.curation.engines import make_engine
from dynamicid.curation.engines.shared import read_candidates
from dynamicid.curation.inputs import TOOL, CurationError, check_out_dir, mark_out_dir, writing
from dynamicid.curation.pipeline import Run, run_stage
from dynamicid.curation.stages import ORDER, BackendInfo
from dynamicid.curation.tables import WorkDir, digest, read_fingerprint
from dynamicid.curation.write import data_bytes, write_summary

SHARED_TABLES = tuple(table for step in CHAIN if step.merge == SHARED for table in step.tables())  # final per shard
SHARED_STORES = (
    "describe-*",
    "align",
    "crops",
    "captions",
)  # what the merged steps read: landmarks, crop quality, crops, captions
MERGED_STEPS = tuple(step.name for step in CHAIN if step.merge == RERUN)
PER_RUN_SETTINGS = ("shard_index", "shard_count", "workers", "engine", "ray_address")  # may differ by shard


def _load_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CurationError(f"{folder} is not a finished dynamicid-curate output ({path}: {error})") from error
    if summary.get("tool") != TOOL:
        raise CurationError(f"{path} was not written by {TOOL}")
    if "backend_info" not in summary:
        raise CurationError(f"{path} was written by an older dynamicid-curate: rebuild that shard")
    return summary


def _shard_work(folder: Path) -> Path:
    work = folder / ".work"
    missing = [t for t in SHARED_TABLES if not (work / f"{t}.parquet").exists()]
    if missing:
        raise CurationError(
            f"{work} lacks {', '.join(f'{t}.parquet' for t in missing)}: merge reads each shard's work folder; "
            f"if that shard was built with --work-dir, copy or link that folder to {work}"
        )
    return work


def _check_shards(summaries: list[dict]) -> None:
    shards = sorted(s["shard"] for s in summaries)
    count = int(shards[0].split("/")[1])
    expected = [f"{i}/{count}" for i in range(count)]
    if shards != expected:
        raise CurationError(
            f"merge needs every shard exactly once: expected {', '.join(expected)}, got {', '.join(shards)}"
        )
    if len({json.dumps(s["backend_info"], sort_keys=True) for s in summaries}) > 1:
        raise CurationError("the shards used different face backends or model files; rebuild them with one")
    first = summaries[0]["config"]
    differing = {
        k
        for s in summaries
        for k in set(first) | set(s["config"])
        if k not in PER_RUN_SETTINGS and s["config"].get(k) != first.get(k)
    }
    if differing:
        raise CurationError(
            f"the shards were built with different settings ({', '.join(sorted(differing))}); rebuild them alike"
        )


def _concatenate(works: list[Path], work: WorkDir) -> None:
    """The shards' tables as one run's (sorted like every stage table)."""
    for name in SHARED_TABLES:
        paths = [w / f"{name}.parquet" for w in works]
        fingerprint = digest("merge", name, *(read_fingerprint(p) or "" for p in paths))
        if not work.is_current(name, fingerprint):
            work.write(name, pa.concat_tables([pq.read_table(p) for p in paths]).sort_by(ORDER), fingerprint)


def _gather_stores(works: list[Path], work: WorkDir) -> None:
    """The shards' store parts, file for file (keys are content digests, so parts of several shards mix)."""
    for index, shard_work in enumerate(works):
        for pattern in SHARED_STORES:
            for folder in (shard_work / "stores").glob(pattern):
                target = work.root / "stores" / folder.name
                target.mkdir(parents=True, exist_ok=True)
                for part in folder.glob("part-*.parquet"):
                    copy = target / f"part-s{index:04d}-{part.name.removeprefix('part-')}"
                    if not copy.exists():
                        shutil.copyfile(part, copy)


def _check_crops(run: Run) -> None:
    """Every face the merged dedupe keeps needs its crop in the shards' stores, or PHOTOS_DIR readable here."""
    kept = read_candidates(run.work.table_path("dedupe"), ["source_path", "sha256", "face"])
    keys = [crop_key(p["sha256"], p["face"]["kps5"], run.config.crop_size) for p in kept.to_pylist()]
    missing = kept.filter(pa.array(crop_store(run.work.root).locate(keys)[:, 0] < 0, pa.bool_()))
    paths = missing.column("source_path").to_pylist()
    unreadable = [p for p in paths if not (run.photos_dir / p).is_file()]
    if unreadable:
        raise CurationError(
            f"no crop of {len(unreadable)} kept face(s) in the shards' work folders (e.g. {unreadable[0]}) and "
            f"PHOTOS_DIR {run.photos_dir} is not readable here: rebuild the shards with this version, "
            "or merge where the photos are"
        )


def merge_datasets(shard_dirs: list[Path], out_dir: Path, *, progress: bool = True) -> dict:
    """Merge the shard output folders into OUT_DIR, equal to a single build; returns the merged summary."""
    out_dir = Path(out_dir).absolute()
    with writing(out_dir):
        return _merge(shard_dirs, out_dir, progress)


def _merge(shard_dirs: list[Path], out_dir: Path, progress: bool) -> dict:
    shard_dirs = [Path(d).absolute() for d in shard_dirs]
    if not shard_dirs:
        raise CurationError("merge needs at least one shard output folder")
    if out_dir in shard_dirs:
        raise CurationError(f"OUT_DIR {out_dir} is also one of the shards; merge into a new folder")
    summaries = [_load_summary(d) for d in shard_dirs]
    _check_shards(summaries)
    works = [_shard_work(d) for d in shard_dirs]
    check_out_dir(out_dir)
    mark_out_dir(out_dir)

    first = summaries[0]
    config = CurationConfig(**{**first["config"], "shard_index": 0, "shard_count": 1})
    if config.captioner is not None:  # the shards' stored captions are keyed by the captioner's files
        try:
            model_type(Path(config.captioner))
        except CaptionerError as error:
            raise CurationError(f"{error} (the shards were captioned with it; merge needs it at that path)") from None
    photos_dirs = sorted({s["photos_dir"] for s in summaries})
    work = WorkDir(out_dir / ".work")
    _concatenate(works, work)
    _gather_stores(works, work)
    # The shards' resolved backend, not this machine's: the same store names and fingerprints, no model loaded.
    backend = BackendInfo(**first["backend_info"])
    engine = make_engine("local", workers=config.workers, progress=progress)
    run = Run(Path(photos_dirs[0]), out_dir, work, config, backend, engine, progress)
    try:
        for step in MERGED_STEPS:
            run_stage(run, step)
            if step == "dedupe":  # the faces it keeps need their crops from the shards' stores
                _check_crops(run)
    finally:
        engine.close()

    summary = json.loads((out_dir / "summary.json").read_text())
    summary["merged_from"] = [str(d) for d in shard_dirs]
    if len(photos_dirs) > 1:  # shards on machines that mount the photos at different paths
        summary["photos_dir"] = photos_dirs
        write_card(out_dir, summary, data_bytes(out_dir))
    write_summary(out_dir, summary)
    return summary
