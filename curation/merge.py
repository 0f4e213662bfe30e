"""`merge`: shard outputs (`build --shard I/N` on several machines) -> one dataset folder, as if built at once.

Shards split whole identities, so everything up to `identify` is the same per photo whatever the shard count.
The one rule that crosses identities, identical file bytes in two folders (`dedupe`), and everything after it
(the per-identity near-duplicate groups, quotas and `--min-per-identity`, rejects, identities, summary, card,
report) is decided again here: the shards' scan/detect/identify tables are concatenated into a new work folder
and the pipeline's own `dedupe` ... `write` stages run on them. No face model runs: the crops come from the
shards' align caches (a sharded build also crops the near-duplicates it drops, which a merge may keep, see
`align`), and only the backend's distance threshold is read from the face analyzer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dynamicid.curation import analysis
from dynamicid.curation.card import write_card
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.pipeline import MARKER, TOOL, CurationError, check_out_dir, run_stage
from dynamicid.curation.run import Run, candidates
from dynamicid.curation.tables import WorkDir, digest, read_fingerprint
from dynamicid.curation.write import data_bytes, write_summary

SHARED_STAGES = ("scan", "detect", "identify")  # per photo or per identity: the shards' tables are final
MERGED_STAGES = ("dedupe", "align", "label", "select", "write")
PER_RUN_SETTINGS = ("shard_index", "shard_count", "workers", "engine")  # the only settings shards may differ in


def _load_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CurationError(f"{folder} is not a finished dynamicid-curate output ({path}: {error})") from error
    if summary.get("tool") != TOOL:
        raise CurationError(f"{path} was not written by {TOOL}")
    return summary


def _shard_work(folder: Path) -> Path:
    work = folder / ".work"
    missing = [s for s in SHARED_STAGES if not (work / f"{s}.parquet").exists()]
    if missing:
        raise CurationError(
            f"{work} lacks {', '.join(f'{s}.parquet' for s in missing)}: merge reads each shard's work folder; "
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
    for key in ("backend", "embedding_model"):
        values = {s[key] for s in summaries if s[key]}
        if len(values) > 1:
            raise CurationError(f"the shards used different {key}s ({', '.join(sorted(values))}); rebuild with one")
    first = summaries[0]["config"]
    differing = sorted(
        k
        for s in summaries
        for k in set(first) | set(s["config"])
        if k not in PER_RUN_SETTINGS and s["config"].get(k) != first.get(k)
    )
    if differing:
        raise CurationError(
            f"the shards were built with different settings ({', '.join(sorted(set(differing)))}); rebuild them alike"
        )


def _concatenate(works: list[Path], work: WorkDir) -> None:
    """The shards' per-photo tables as one run's (rows in source_path order, as a single build writes them)."""
    for stage in SHARED_STAGES:
        paths = [w / f"{stage}.parquet" for w in works]
        fingerprint = digest("merge", stage, *(read_fingerprint(p) or "" for p in paths))
        if not work.is_current(stage, fingerprint):
            table = pa.concat_tables([pq.read_table(p) for p in paths]).sort_by("source_path")
            work.write(stage, table, fingerprint)


def _gather_crops(works: list[Path], work: WorkDir, crop_size: int) -> None:
    """The shards' align caches, file for file, into the merged work folder's cache (keys are content hashes)."""
    name = f"align-{crop_size}"
    target = work.root / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    number = 0
    for shard_work in works:
        for part in sorted((shard_work / name).glob("part-*.parquet")):
            shutil.copyfile(part, target / f"part-{number:05d}.parquet")
            number += 1


def _check_crops(run: Run) -> None:
    """Every face the merged dedupe keeps must have its crop, unless PHOTOS_DIR is readable here to make it."""
    cached: set[str] = set()
    for part in (run.work.root / f"align-{run.config.crop_size}").glob("part-*.parquet"):
        cached.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    needed = [p for p in candidates(run.work.read("dedupe")) if f"{p['sha256']}:{p['face_index']}" not in cached]
    unreadable = [p["source_path"] for p in needed if not (run.photos_dir / p["source_path"]).is_file()]
    if unreadable:
        raise CurationError(
            f"no crop of {len(unreadable)} kept face(s) in the shards' work folders (e.g. {unreadable[0]}) and "
            f"PHOTOS_DIR {run.photos_dir} is not readable here: rebuild the shards with this version, "
            "or merge where the photos are"
        )


def merge_datasets(shard_dirs: list[Path], out_dir: Path) -> dict:
    """Merge the shard output folders into OUT_DIR, equal to a single build; returns the merged summary."""
    shard_dirs = [Path(d).absolute() for d in shard_dirs]
    out_dir = Path(out_dir).absolute()
    if not shard_dirs:
        raise CurationError("merge needs at least one shard output folder")
    if out_dir in shard_dirs:
        raise CurationError(f"OUT_DIR {out_dir} is also one of the shards; merge into a new folder")
    summaries = [_load_summary(d) for d in shard_dirs]
    _check_shards(summaries)
    works = [_shard_work(d) for d in shard_dirs]
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text(f"{TOOL} output folder; safe for dynamicid-curate to overwrite\n")

    first = summaries[0]
    config = CurationConfig(**{**first["config"], "shard_index": 0, "shard_count": 1})
    photos_dirs = sorted({s["photos_dir"] for s in summaries})
    run = Run(photos_dir=Path(photos_dirs[0]), out_dir=out_dir, work=WorkDir(out_dir / ".work"), config=config)
    # The threshold of the backend the shards really used (config may say `auto`, which could differ here).
    run.__dict__["analyzer"] = analysis.analyzer(first["backend"])
    _concatenate(works, run.work)
    _gather_crops(works, run.work, config.crop_size)
    run_stage(run, "dedupe")
    _check_crops(run)
    for stage in MERGED_STAGES[1:]:
        run_stage(run, stage)

    summary = json.loads((out_dir / "summary.json").read_text())
    summary["merged_from"] = [str(d) for d in shard_dirs]
    if len(photos_dirs) > 1:  # shards on machines that mount the photos at different paths
        summary["photos_dir"] = photos_dirs
        write_card(out_dir, summary, data_bytes(out_dir))
    write_summary(out_dir, summary)
    return summary
