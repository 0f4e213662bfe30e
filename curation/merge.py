"""`merge`: shard outputs (`build --shard I/N` on several machines) -> one dataset folder, as if run at once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dynamicid.curation.card import write_card
from dynamicid.curation.pipeline import MARKER, TOOL, CurationError, check_out_dir
from dynamicid.curation.report import build_report
from dynamicid.curation.tables import digest, write_parquet
from dynamicid.curation.write import data_bytes, read_dataset, write_shards, write_summary


def _load_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CurationError(f"{folder} is not a finished dynamicid-curate output ({path}: {error})") from error
    if summary.get("tool") != TOOL:
        raise CurationError(f"{path} was not written by {TOOL}")
    return summary


def merge_datasets(shard_dirs: list[Path], out_dir: Path) -> dict:
    """Concatenate and re-sort the shards' rows, identities and rejects; returns the merged summary."""
    shard_dirs = [Path(d).absolute() for d in shard_dirs]
    out_dir = Path(out_dir).absolute()
    if not shard_dirs:
        raise CurationError("merge needs at least one shard output folder")
    if out_dir in shard_dirs:
        raise CurationError(f"OUT_DIR {out_dir} is also one of the shards; merge into a new folder")
    summaries = [_load_summary(d) for d in shard_dirs]
    shards = sorted(s["shard"] for s in summaries)
    count = int(shards[0].split("/")[1])
    expected = [f"{i}/{count}" for i in range(count)]
    if shards != expected:
        raise CurationError(
            f"merge needs every shard exactly once: expected {', '.join(expected)}, got {', '.join(shards)}"
        )
    models = {s["embedding_model"] for s in summaries if s["embedding_model"]}
    if len(models) > 1:
        raise CurationError(
            f"the shards used different embedding models ({', '.join(sorted(models))}); rebuild with one backend"
        )
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text(f"{TOOL} output folder; safe for dynamicid-curate to overwrite\n")

    rows = pa.concat_tables([read_dataset(d) for d in shard_dirs])
    rows = rows.sort_by([("identity", "ascending"), ("source_path", "ascending")])
    first = summaries[0]
    config = {**first["config"], "shard_index": 0, "shard_count": 1, "workers": first["config"]["workers"]}
    files = write_shards(out_dir, rows.to_pylist(), config["rows_per_file"], config["rows_per_row_group"])
    identities = pa.concat_tables([pq.read_table(d / "identities.parquet") for d in shard_dirs]).sort_by("identity")
    rejects = pa.concat_tables([pq.read_table(d / "rejects.parquet") for d in shard_dirs]).sort_by("source_path")
    write_parquet(identities, out_dir / "identities.parquet")
    write_parquet(rejects, out_dir / "rejects.parquet")

    def total(key: str) -> int:
        return sum(s[key] for s in summaries)

    def added(key: str) -> dict:
        counts: Counter = Counter()
        for s in summaries:
            counts.update(s[key])
        return dict(sorted(counts.items()))

    photos_dirs = {s["photos_dir"] for s in summaries}
    summary = {
        **first,
        "photos_dir": photos_dirs.pop() if len(photos_dirs) == 1 else sorted(photos_dirs),
        "out_dir": str(out_dir),
        "shard": "0/1",
        "merged_from": [str(d) for d in shard_dirs],
        "scanned": total("scanned"),
        "kept": total("kept"),
        "rejected": total("rejected"),
        "identities": total("identities"),
        "identities_without_images": sorted(i for s in summaries for i in s["identities_without_images"]),
        "rejected_by_reason": added("rejected_by_reason"),
        "rejected_by_stage": added("rejected_by_stage"),
        "config": config,
        "files": [*files, "identities.parquet", "rejects.parquet"],
        "fingerprint": digest("merge", *sorted(s["fingerprint"] for s in summaries)),
        "stages": {},
    }
    write_summary(out_dir, summary)
    write_card(out_dir, summary, data_bytes(out_dir))
    build_report(out_dir)
    return summary
