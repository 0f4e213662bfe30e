"""The curated dataset folder as every reader sees it (training, evaluation, the app, `inspect`) and the writer
names it: `data/train-XXXXX-of-YYYYY.parquet` shards (the rows, `dataset.py`'s schema), `identities.parquet`
and `rejects.parquet` beside them. `datasets.load_dataset(folder)` reads the same shards through the card.

pyarrow is imported inside the functions: this package imports only the standard library at import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

DATA_DIR = "data"
SHARD_GLOB = "train-*-of-*.parquet"  # the shards under DATA_DIR
SHARD_COUNT = re.compile(r"train-\d{5}-of-(\d{5})\.parquet")  # a shard's file name -> the count of its set
IDENTITIES_FILE = "identities.parquet"
REJECTS_FILE = "rejects.parquet"


def shard_name(index: int, count: int) -> str:
    """The folder-relative path of shard `index` of `count`."""
    return f"{DATA_DIR}/train-{index:05d}-of-{count:05d}.parquet"


def dataset_files(folder: str | Path) -> list[Path]:
    """The shards of a curated dataset folder, in order. FileNotFoundError naming the folder when it has none;
    ValueError naming the first missing shard when one of a set is gone (a reader would otherwise see fewer rows,
    or `datasets` a NonMatchingSplitsSizesError)."""
    folder = Path(folder)
    files = sorted((folder / DATA_DIR).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{folder} is not a dynamicid-curate output folder: it holds no {DATA_DIR}/{SHARD_GLOB} "
            "(make one with `dynamicid-curate build PHOTOS_DIR OUT_DIR`)"
        )
    names = {f"{DATA_DIR}/{path.name}" for path in files}
    for count in sorted({int(m.group(1)) for path in files if (m := SHARD_COUNT.fullmatch(path.name))}):
        missing = [shard_name(i, count) for i in range(count) if shard_name(i, count) not in names]
        if missing:
            raise ValueError(
                f"{folder}: {missing[0]} is missing ({len(missing)} of {count} files); restore it or curate the "
                "dataset again"
            )
    return files


def open_dataset(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of a curated dataset folder, in shard order (only `columns` when given: leave the images out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path, columns=columns) for path in dataset_files(folder)])
