"""The steps in order, the work-folder bookkeeping between them, and `build_dataset`.

`scan` and the dataset folder's tables, card and report are made here in the driver; the stages between them
(`build_stages`, up to `crop`, the first part of the step `write`) run on the engine (`--engine local|ray`), which
reads each stage's input table and writes its output table in the work folder, and so do the calls that write the
dataset's shard files and the report's thumbnails of rejected photos (`Engine.map_calls`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.curation.align import AlignStage
from dynamicid.curation.allocator import large_buffers_given_back
from dynamicid.curation.backend import start_backend
from dynamicid.curation.caption import CAPTION_COLUMNS, CaptionStage, with_captions
from dynamicid.curation.card import write_card
from dynamicid.curation.chain import CHAIN, STEPS, step_named
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.crop import CropStage
from dynamicid.curation.dedupe import resolve_identical_copies
from dynamicid.curation.engines import Call, Engine, start_engine
from dynamicid.curation.engines.shared import READ_ROWS, candidate_batches, count_candidates, read_candidates
from dynamicid.curation.grouping import grouping_summary
from dynamicid.curation.inputs import TOOL, CurationError, check_folders, mark_out_dir, writing
from dynamicid.curation.label import label_schema
from dynamicid.curation.report import build_report
from dynamicid.curation.scan import HASH_STORE_SCHEMA, scan
from dynamicid.curation.shards import write_shard
from dynamicid.curation.stages import BackendInfo, Stage, StageContext, StageSetupError, StageStats
from dynamicid.curation.store import ResultStore
from dynamicid.curation.tables import RowReader, WorkDir, digest, read_fingerprint, table_digest, write_parquet
from dynamicid.curation.write import (
    TALLY_COLUMNS,
    IdentityTally,
    clear_shards,
    data_bytes,
    dataset_table,
    reason_code,
    shard_names,
    write_summary,
)
from dynamicid.schemas import rejects_arrow_schema

STAGES = STEPS  # the steps in order (`curation.chain`)
WRITE_VERSION = "3"  # bump when the dataset folder's layout or content changes for the same tables
REJECT_COLUMNS = ["source_path", "identity", "reason", "detail"]
LAST_STAGE = CHAIN[-1].tables()[-1]  # its table holds the kept rows: `write` reads them


def _package_version() -> str:
    try:
        return version("dynamicid")
    except PackageNotFoundError:
        return "unknown"


def build_stages(context: StageContext) -> list[Stage]:
    """The stages between scan and write, in order (`curation.chain`; see `curation.stages`)."""
    return [entry.load()(context) for step in CHAIN for entry in step.stages]


@dataclass
class Run:
    photos_dir: Path
    out_dir: Path
    work: WorkDir
    config: CurationConfig
    backend: BackendInfo
    engine: Engine
    progress: bool = True
    stats: dict[str, StageStats] = field(default_factory=dict)

    @property
    def context(self) -> StageContext:
        return StageContext(self.photos_dir, self.work.root, self.config, self.backend)

    @property
    def stages(self) -> list[Stage]:
        return build_stages(self.context)

    def step_stats(self, step: str) -> StageStats:
        return self.stats.setdefault(step, StageStats())


def open_run(
    photos_dir: Path,
    out_dir: Path,
    config: CurationConfig,
    *,
    work_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    engine: Engine | None = None,
    backend: Callable[[], BackendInfo] | None = None,
) -> Run:
    """Check the folders and settings, resolve the face backend, and prepare OUT_DIR and the work folder.

    `engine`: the engine `start_engine` made for this config earlier (the caller closes it, also when this
    raises), and `backend` what `backend.start_backend` returned for it, its workers loading the face models
    meanwhile; by default the run starts its own.
    """
    photos_dir, out_dir, work_root = check_folders(photos_dir, out_dir, work_dir)
    engine = engine or start_engine(config, progress=progress)  # checks the settings first
    backend = backend or start_backend(engine, config)
    # Arrow's default allocator (mimalloc) keeps freed Parquet pages (+110 MB of RSS after `write` read 1,130
    # crops); the C library's gives them back. This covers pyarrow's own calls; Arrow's C++ code reads
    # $ARROW_DEFAULT_MEMORY_POOL once, before this runs: `dynamicid-curate` sets it to `system` (set it before
    # importing pyarrow to call `build_dataset` from Python with the same memory).
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        resolved = backend()
    except StageSetupError as error:
        engine.close()
        raise CurationError(str(error)) from error
    mark_out_dir(out_dir)
    if not resume and work_root.exists():
        shutil.rmtree(work_root)
    return Run(photos_dir, out_dir, WorkDir(work_root), config, resolved, engine, progress)


def run_scan(run: Run) -> int:
    c = run.config
    stats = run.step_stats("scan")
    with _Timer(stats):
        hashes = ResultStore(run.work.store_path("hashes"), HASH_STORE_SCHEMA)
        table, hashed = scan(
            run.photos_dir,
            cluster=c.cluster,
            shard_index=c.shard_index,
            shard_count=c.shard_count,
            hash_store=hashes,
            follow_links=c.follow_links,
            fenced=(run.out_dir, run.work.root),
        )
        hashes.compact()
        stats.computed += hashed
        stats.reused += len(table) - hashed
        fingerprint = digest(
            table_digest(table, ("source_path", "identity", "sha256", "reason")),
            c.fingerprint(*step_named("scan").settings),
        )
        if not run.work.is_current("scan", fingerprint):
            run.work.write("scan", table, fingerprint)
    return table.num_rows


def run_stage(run: Run, step: str) -> int:
    """Run one step (its stages, each from its predecessor's table; skipped when its inputs are unchanged).

    Returns the number of rows of the step's last table (for `write`: the rows kept in the dataset).
    """
    if step == "scan":
        return run_scan(run)
    stats = run.step_stats(step)
    ran = False
    previous, previous_step = "scan", "scan"
    for stage in run.stages:
        if stage.step == step:
            ran = run_engine_stage(run, stage, run.work.table_path(previous), previous_step) or ran
        previous, previous_step = stage.name, stage.step
    stats.skipped = not ran
    if step == "write":
        return write_outputs(run)
    if step == "align" and run.config.shard_count > 1:
        crop_for_merge(run)
    last = [s.name for s in run.stages if s.step == step][-1]
    return pq.read_metadata(run.work.table_path(last)).num_rows


def run_engine_stage(
    run: Run, stage: Stage, source: Path, source_step: str, target: Path | None = None, step: str | None = None
) -> bool:
    """One stage on the engine, from the table at `source`, unless its table is current (always when `target`
    is given); counted in the stats of `step` (default: the stage's). True if it ran."""
    if not source.exists():
        raise FileNotFoundError(
            f"{source} not found: run the stage '{source_step}' before '{stage.step}' first "
            "(or `dynamicid-curate build`)"
        )
    stats = run.step_stats(step or stage.step)
    fingerprint = stage.fingerprint(read_fingerprint(source) or "")
    if target is None:
        target = run.work.table_path(stage.name)
        if run.work.is_current(stage.name, fingerprint):
            stats.reused += count_candidates(source)
            return False
    try:
        done = run.engine.run_stage(stage, source, target, fingerprint)
    except StageSetupError as error:
        raise CurationError(str(error)) from error
    stage.finish()
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages for reuse
    stats.computed += done.computed
    stats.reused += done.reused
    stats.seconds += done.seconds
    return True


def crop_for_merge(run: Run) -> None:
    """A shard crops every face it aligned, and the near-duplicates it drops: `merge` decides dedupe and select
    again (identical bytes may sit in two shards' folders, and the copy a shard dropped may be the one kept), and
    must then find every crop it may need in the shards' work folders, without the photos."""
    columns = [*CropStage.input_columns[:4], "matrix"]  # align calls the crop's matrix `matrix`
    aligned = read_candidates(run.work.table_path("align"), columns)
    table = pq.read_table(run.work.table_path("dedupe"))
    dropped = table.filter(pc.is_valid(table.column("reason")))
    if dropped.num_rows:
        reason = dropped.schema.get_field_index("reason")
        dropped = dropped.set_column(reason, dropped.schema.field(reason), pa.nulls(dropped.num_rows, pa.string()))
        write_parquet(dropped, run.work.root / "dropped_duplicates.parquet")
        target = run.work.root / "dropped_duplicates_align.parquet"
        run_engine_stage(run, AlignStage(run.context), run.work.root / "dropped_duplicates.parquet", "dedupe", target)
        dropped = read_candidates(target, columns)
        aligned = pa.concat_tables([aligned, dropped])
    matrix = aligned.schema.get_field_index("matrix")
    aligned = aligned.rename_columns([*aligned.column_names[:matrix], "crop_transform"])
    source = run.work.root / "crop_for_merge.parquet"
    write_parquet(aligned.append_column("reason", pa.nulls(aligned.num_rows, pa.string())), source)
    run_engine_stage(
        run, CropStage(run.context), source, "align", run.work.root / "crop_for_merge_crop.parquet", "align"
    )


def collect_rejects(run: Run) -> pa.Table:
    """Every rejected row of every table (small columns), with its step, sorted by source_path."""
    pieces = []
    for name, step in [("scan", "scan"), *((s.name, s.step) for s in run.stages)]:
        table = pq.read_table(run.work.table_path(name), columns=REJECT_COLUMNS)
        table = table.filter(pc.is_valid(table.column("reason")))
        pieces.append(table.append_column("stage", pa.array([step] * table.num_rows, pa.string())))
    return resolve_identical_copies(pa.concat_tables(pieces)).sort_by("source_path")


def _kept_rows(run: Run) -> Iterator[pa.Table]:
    """The kept rows' labels (with their `crop_key`, and their caption from `caption`), in (identity, source_path)
    order."""
    labels = candidate_batches(run.work.table_path("label"), label_schema().names, READ_ROWS)
    selected = candidate_batches(
        run.work.table_path("select"), ["source_path", "selection"], READ_ROWS, only_candidates=False
    )
    cropped = RowReader(  # one row per selected row
        candidate_batches(run.work.table_path("crop"), ["source_path", "reason"], READ_ROWS, only_candidates=False)
    )
    captioned = RowReader(candidate_batches(run.work.table_path("caption"), CAPTION_COLUMNS, READ_ROWS))
    for label_batch, select_batch in zip(labels, selected, strict=True):
        if label_batch.column("source_path") != select_batch.column("source_path"):
            raise RuntimeError("select.parquet does not follow label.parquet: rerun the build")
        kept = label_batch.filter(pc.is_valid(select_batch.column("selection")))
        if not kept.num_rows:
            continue
        crop_rows = cropped.take(kept.num_rows)
        if kept.column("source_path") != crop_rows.column("source_path"):
            raise RuntimeError("crop.parquet does not follow select.parquet: rerun the build")
        kept = kept.filter(pc.is_null(crop_rows.column("reason")))
        if kept.num_rows:
            yield with_captions(kept, captioned.take(kept.num_rows))


def _shard_calls(run: Run, kept: int, tally: IdentityTally) -> Iterator[Call]:
    """A `write_shard` call per shard file, made as the workers take them; the driver tallies each shard's rows."""
    rows = RowReader(_kept_rows(run))
    for name in shard_names(kept, run.config.rows_per_file):
        labels = rows.take(min(run.config.rows_per_file, kept)) if kept else label_schema().empty_table()
        kept -= labels.num_rows
        table = dataset_table(labels)
        tally.add(table.select(TALLY_COLUMNS).to_pylist())
        crop_keys = labels.column("crop_key").to_pylist()
        yield write_shard, (run.out_dir / name, table, crop_keys, run.work.root, run.config.rows_per_row_group)


def _thumbnails(run: Run) -> Iterator[str]:
    """report.html's thumbnails of the kept rows, made by the `crop` stage, in dataset order."""
    for batch in candidate_batches(run.work.table_path("crop"), ["thumbnail"], READ_ROWS):
        yield from batch.column("thumbnail").to_pylist()


def write_outputs(run: Run) -> int:
    """The `write` step: dataset folder + summary (skipped when OUT_DIR already holds this exact result)."""
    fingerprint = digest(
        "write",
        WRITE_VERSION,
        read_fingerprint(run.work.table_path(LAST_STAGE)) or "",
        run.config.fingerprint(*step_named("write").settings),
    )
    summary_path = run.out_dir / "summary.json"
    if summary_path.exists() and (run.out_dir / "report.html").exists():
        previous = json.loads(summary_path.read_text())
        files_there = all((run.out_dir / name).exists() for name in previous.get("files", []))
        if previous.get("fingerprint") == fingerprint and files_there:
            run.step_stats("write").skipped = True
            write_summary(run.out_dir, {**previous, "stages": stage_stats(run)})
            return previous["kept"]
    stats = run.step_stats("write")
    stats.skipped = False
    with _Timer(stats), large_buffers_given_back():
        kept = count_candidates(run.work.table_path(LAST_STAGE))
        rejects = collect_rejects(run)
        scanned = pq.read_metadata(run.work.table_path("scan")).num_rows
        if kept + rejects.num_rows != scanned:
            raise RuntimeError(f"accounting bug: {kept} kept + {rejects.num_rows} rejected != {scanned} scanned")
        clear_shards(run.out_dir)
        tally = IdentityTally()
        written = sum(run.engine.map_calls(_shard_calls(run, kept, tally), "writing the dataset's shards"))
        if written != kept:
            raise RuntimeError(f"accounting bug: {written} rows written to the shards, {kept} kept")
        tally.finish()
        files = shard_names(kept, run.config.rows_per_file)
        named = rejects.filter(pc.not_equal(rejects.column("identity"), ""))
        rejected_by_identity = Counter(_counts(named, "identity"))
        kept_by_identity = Counter({k: v["num_images"] for k, v in tally.kept.items()})
        scanned_by_identity = rejected_by_identity + kept_by_identity
        write_parquet(
            tally.table(scanned_by_identity, rejected_by_identity, run.backend.embedding_model if kept else ""),
            run.out_dir / "identities.parquet",
        )
        write_parquet(
            rejects.select(rejects_arrow_schema().names).cast(rejects_arrow_schema()), run.out_dir / "rejects.parquet"
        )
        files += ["identities.parquet", "rejects.parquet"]
        summary = make_summary(
            run, rejects, kept, scanned, set(scanned_by_identity), set(tally.kept), files, fingerprint
        )
        write_summary(run.out_dir, summary)
        write_card(run.out_dir, summary, data_bytes(run.out_dir))
        build_report(run.out_dir, _thumbnails(run), run.engine.map_calls)
    write_summary(run.out_dir, {**summary, "stages": stage_stats(run)})
    return kept


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    grouped = table.group_by(column).aggregate([(column, "count")])
    return dict(zip(grouped.column(column).to_pylist(), grouped.column(f"{column}_count").to_pylist(), strict=True))


def stage_stats(run: Run) -> dict:
    return {s: {**asdict(run.stats[s]), "seconds": round(run.stats[s].seconds, 3)} for s in STAGES if s in run.stats}


def make_summary(
    run: Run,
    rejects: pa.Table,
    kept: int,
    scanned: int,
    scanned_identities: set[str],
    kept_identities: set[str],
    files: list[str],
    fingerprint: str,
) -> dict:
    c = run.config
    reasons: Counter = Counter()
    for reason, count in _counts(rejects, "reason").items():
        reasons[reason_code(reason)] += count
    grouping = {"grouping": cluster_grouping(run)} if c.cluster else {}
    return {
        "tool": TOOL,
        "version": _package_version(),
        "photos_dir": str(run.photos_dir),
        "out_dir": str(run.out_dir),
        "shard": f"{c.shard_index}/{c.shard_count}",
        "scanned": scanned,
        "kept": kept,
        "rejected": rejects.num_rows,
        "identities": len(kept_identities),
        "identities_without_images": sorted(scanned_identities - kept_identities),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected_by_stage": dict(sorted(_counts(rejects, "stage").items())),
        "backend": run.backend.name,
        "backend_info": asdict(run.backend),  # what `merge` needs to continue the shards' work without models
        "embedding_model": run.backend.embedding_model if kept else "",
        "caption_model": CaptionStage(run.context).spec.model if c.captioner else None,
        "config": asdict(c),
        "files": files,
        "fingerprint": fingerprint,
        **grouping,
    }


def cluster_grouping(run: Run) -> dict:
    """--cluster: how the identities were formed, with their sizes before dedupe and selection."""
    identify = pq.read_table(run.work.table_path("identify"), columns=["identity", "reason"])
    sizes = _counts(identify.filter(pc.is_null(identify.column("reason"))), "identity")
    return grouping_summary(sizes, run.backend.same_person_threshold)


class _Timer:
    def __init__(self, stats: StageStats):
        self.stats = stats

    def __enter__(self) -> StageStats:
        self._start = time.perf_counter()
        return self.stats

    def __exit__(self, *exc: object) -> None:
        self.stats.seconds += time.perf_counter() - self._start


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
    (e.g. min_face_size). Raises CurationError for a missing PHOTOS_DIR, a foreign OUT_DIR, bad settings
    or face models that cannot start; `dynamicid.locks.FolderInUse` while another run writes OUT_DIR.
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
    _, out, _ = check_folders(Path(photos_dir), Path(out_dir), Path(work_dir) if work_dir else None)
    with writing(out):
        run = open_run(
            Path(photos_dir),
            Path(out_dir),
            config,
            work_dir=Path(work_dir) if work_dir else None,
            resume=resume,
            progress=progress,
        )
        try:
            for step in STAGES:
                run_stage(run, step)
        finally:
            run.engine.close()
    return json.loads((run.out_dir / "summary.json").read_text())
