"""The stages in order, the work-folder bookkeeping between them, and `build_dataset`."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa

from dynamicid.curation.align import align
from dynamicid.curation.card import write_card
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.dedupe import dedupe
from dynamicid.curation.detect import detect
from dynamicid.curation.engines import EngineUnavailable, make_engine
from dynamicid.curation.identify import identify
from dynamicid.curation.label import label
from dynamicid.curation.report import build_report
from dynamicid.curation.run import STAGES, Run, StageStats, candidates, rejected
from dynamicid.curation.scan import HASH_CACHE_SCHEMA, scan
from dynamicid.curation.select import select
from dynamicid.curation.tables import WorkDir, digest, read_fingerprint, table_digest
from dynamicid.curation.write import data_bytes, dataset_row, reason_code, sort_key, write_summary, write_tables

MARKER = ".dynamicid-curate"  # written into OUT_DIR first: later runs may overwrite a folder that has it
TOOL = "dynamicid-curate"
WORK_FORMAT = "1"  # bump when a stage table's layout or meaning changes: older work tables are then recomputed

# stage -> (function, the stage whose table it reads, the settings its result depends on)
STAGE_FUNCTIONS: dict[str, tuple[Callable[[Run, pa.Table], pa.Table], str, tuple[str, ...]]] = {
    "detect": (detect, "scan", ("face_backend", "min_face_size", "min_border_margin", "max_faces_per_photo")),
    "identify": (identify, "detect", ("face_backend", "cluster")),
    "dedupe": (dedupe, "identify", ("phash_max_distance", "dup_embedding_fraction")),
    "align": (align, "dedupe", ("crop_size", "min_sharpness", "min_brightness", "max_brightness")),
    "label": (label, "align", ()),
    "select": (select, "label", ("per_identity", "min_per_identity")),
}
REJECTING_STAGES = ("scan", "detect", "identify", "dedupe", "align", "select")
WRITE_SETTINGS = ("rows_per_file", "rows_per_row_group", "thumbnail_size")


class CurationError(Exception):
    """A problem with the inputs the user gave (exit code 2 on the command line)."""


def _package_version() -> str:
    try:
        return version("dynamicid")
    except PackageNotFoundError:
        return "unknown"


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR must be new, empty, or an earlier output of this tool; anything else is refused, never overwritten."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CurationError(f"OUT_DIR {out_dir} exists and is not a folder; choose another path")
    if (out_dir / MARKER).exists() or not any(out_dir.iterdir()):
        return
    raise CurationError(
        f"OUT_DIR {out_dir} already holds files that dynamicid-curate did not write; "
        "choose a new or empty folder (nothing was changed)"
    )


def open_run(
    photos_dir: Path,
    out_dir: Path,
    config: CurationConfig,
    *,
    work_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Run:
    """Check the folders and settings, and prepare OUT_DIR and the work folder (default OUT_DIR/.work)."""
    photos_dir, out_dir = Path(photos_dir).absolute(), Path(out_dir).absolute()
    if not photos_dir.is_dir():
        raise CurationError(f"PHOTOS_DIR {photos_dir} does not exist or is not a folder")
    try:
        config.check()
    except ValueError as error:
        raise CurationError(str(error)) from error
    work_root = Path(work_dir).absolute() if work_dir else out_dir / ".work"
    for name, folder in (("OUT_DIR", out_dir), ("--work-dir", work_root)):
        if folder == photos_dir or photos_dir in folder.parents:
            raise CurationError(
                f"{name} {folder} is inside PHOTOS_DIR {photos_dir}: its files would be scanned as photos"
            )
    try:
        make_engine(config.engine, workers=config.workers, progress=progress).close()
    except EngineUnavailable as error:
        raise CurationError(str(error)) from error
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text(f"{TOOL} output folder; safe for dynamicid-curate to overwrite\n")
    if not resume and work_root.exists():
        shutil.rmtree(work_root)
    return Run(photos_dir=photos_dir, out_dir=out_dir, work=WorkDir(work_root), config=config, progress=progress)


def run_scan(run: Run) -> pa.Table:
    c = run.config
    stats = run.stats.setdefault("scan", StageStats())
    with run.stage_timer("scan"):
        hash_cache = run.work.cache("hashes", HASH_CACHE_SCHEMA, "stat_key")
        table, hashed = scan(
            run.photos_dir,
            cluster=c.cluster,
            shard_index=c.shard_index,
            shard_count=c.shard_count,
            hash_cache=hash_cache,
        )
        stats.computed += hashed
        stats.reused += len(table) - hashed
        fingerprint = digest(
            table_digest(table, ("source_path", "identity", "sha256", "reason")),
            c.fingerprint("cluster", "shard_index", "shard_count"),
        )
        if not run.work.is_current("scan", fingerprint):
            run.work.write("scan", table, fingerprint)
    return table


def run_stage(run: Run, stage: str) -> pa.Table:
    """Run one stage from its predecessor's table in the work folder (skipped when its inputs are unchanged)."""
    if stage == "scan":
        return run_scan(run)
    if stage == "write":
        return write_outputs(run)
    function, previous, settings = STAGE_FUNCTIONS[stage]
    source = run.work.read(previous)
    fingerprint = digest(
        stage, WORK_FORMAT, read_fingerprint(run.work.table_path(previous)) or "", run.config.fingerprint(*settings)
    )
    if run.work.is_current(stage, fingerprint):
        stats = run.stats.setdefault(stage, StageStats())
        stats.skipped = True
        stats.reused += len(candidates(source))
        return run.work.read(stage)
    table = function(run, source)
    run.work.write(stage, table, fingerprint)
    return table


def collect_rejects(run: Run) -> list[dict]:
    rejects = []
    for stage in REJECTING_STAGES:
        for row in rejected(run.work.read(stage)):
            rejects.append(
                {
                    "source_path": row["source_path"],
                    "stage": stage,
                    "reason": row["reason"],
                    "detail": row["detail"] or "",
                }
            )
    return rejects


def identity_of_files(run: Run) -> dict[str, str]:
    """source_path -> identity as last decided (folder name, or the cluster from `identify`)."""
    names = {r["source_path"]: r["identity"] for r in run.work.read("scan").to_pylist()}
    if run.work.table_path("identify").exists():
        names.update(
            {
                r["source_path"]: r["identity"]
                for r in run.work.read("identify").select(["source_path", "identity"]).to_pylist()
            }
        )
    return names


def write_outputs(run: Run) -> pa.Table:
    """The `write` stage: dataset folder + summary (skipped when OUT_DIR already holds this exact result)."""
    fingerprint = digest(
        "write", read_fingerprint(run.work.table_path("select")) or "", run.config.fingerprint(*WRITE_SETTINGS)
    )
    summary_path = run.out_dir / "summary.json"
    if summary_path.exists() and (run.out_dir / "report.html").exists():
        previous = json.loads(summary_path.read_text())
        files_there = all((run.out_dir / name).exists() for name in previous.get("files", []))
        if previous.get("fingerprint") == fingerprint and files_there:
            run.stats.setdefault("write", StageStats()).skipped = True
            write_summary(run.out_dir, {**previous, "stages": stage_stats(run)})
            return run.work.read("select")
    with run.stage_timer("write") as stats:
        selected = {r["source_path"] for r in candidates(run.work.read("select"))}
        labelled = [r for r in candidates(run.work.read("label")) if r["source_path"] in selected]
        kept = sorted((dataset_row(r) for r in labelled), key=sort_key)
        rejects = collect_rejects(run)
        scanned = len(run.work.read("scan"))
        if len(kept) + len(rejects) != scanned:
            raise RuntimeError(f"accounting bug: {len(kept)} kept + {len(rejects)} rejected != {scanned} scanned")
        identity = identity_of_files(run)
        scanned_by_identity = Counter(v for v in identity.values() if v)
        rejected_by_identity = Counter(identity[r["source_path"]] for r in rejects if identity[r["source_path"]])
        embedding_model = kept[0]["embedding_model"] if kept else ""
        files = write_tables(
            run.out_dir, kept, rejects, scanned_by_identity, rejected_by_identity, embedding_model, run.config
        )
        summary = make_summary(run, kept, rejects, scanned, scanned_by_identity, embedding_model, files, fingerprint)
        write_summary(run.out_dir, summary)
        write_card(run.out_dir, summary, data_bytes(run.out_dir))
        build_report(run.out_dir)
        stats.computed += len(kept)
    write_summary(run.out_dir, {**summary, "stages": stage_stats(run)})
    return run.work.read("select")


def stage_stats(run: Run) -> dict:
    return {s: {**asdict(run.stats[s]), "seconds": round(run.stats[s].seconds, 3)} for s in STAGES if s in run.stats}


def make_summary(
    run: Run,
    kept: list[dict],
    rejects: list[dict],
    scanned: int,
    scanned_by_identity: Counter,
    embedding_model: str,
    files: list[str],
    fingerprint: str,
) -> dict:
    kept_identities = {r["identity"] for r in kept}
    c = run.config
    backend = _backend_name(run)
    return {
        "tool": TOOL,
        "version": _package_version(),
        "photos_dir": str(run.photos_dir),
        "out_dir": str(run.out_dir),
        "shard": f"{c.shard_index}/{c.shard_count}",
        "scanned": scanned,
        "kept": len(kept),
        "rejected": len(rejects),
        "identities": len(kept_identities),
        "identities_without_images": sorted(set(scanned_by_identity) - kept_identities),
        "rejected_by_reason": dict(sorted(Counter(reason_code(r["reason"]) for r in rejects).items())),
        "rejected_by_stage": dict(sorted(Counter(r["stage"] for r in rejects).items())),
        "backend": backend,
        "embedding_model": embedding_model,
        "config": asdict(c),
        "files": files,
        "fingerprint": fingerprint,
    }


def _backend_name(run: Run) -> str:
    face = run.work.read("dedupe").column("face").to_pylist()
    return face[0]["backend"] if face else run.config.face_backend


def build_dataset(
    photos_dir: str | Path,
    out_dir: str | Path,
    *,
    per_identity: int = 35,
    min_per_identity: int = 1,
    face_backend: str = "auto",
    workers: int = 1,
    engine: str = "local",
    work_dir: str | Path | None = None,
    resume: bool = True,
    cluster: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    **settings,
) -> dict:
    """Curate PHOTOS_DIR/<identity>/... (or a flat folder with cluster=True) into a dataset folder OUT_DIR.

    Returns the content of OUT_DIR/summary.json. `settings` are further `CurationConfig` fields
    (e.g. min_face_size). Raises CurationError for a missing PHOTOS_DIR, a foreign OUT_DIR or bad settings.
    """
    config = CurationConfig(
        per_identity=per_identity,
        min_per_identity=min_per_identity,
        face_backend=face_backend,
        workers=workers,
        engine=engine,
        cluster=cluster,
        shard_index=shard[0],
        shard_count=shard[1],
        **settings,
    )
    run = open_run(
        Path(photos_dir),
        Path(out_dir),
        config,
        work_dir=Path(work_dir) if work_dir else None,
        resume=resume,
        progress=progress,
    )
    for stage in STAGES:
        run_stage(run, stage)
    return json.loads((run.out_dir / "summary.json").read_text())
