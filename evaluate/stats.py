"""Means with bootstrap 95% intervals. Images are the resampling unit (the people of one image share its
seed, prompt and layout), so a per-person figure is resampled by whole images."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynamicid.schemas.evaluation import SUMMARY_METRICS

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def image_sums(rows: list[dict[str, Any]], column: str) -> dict[str, tuple[float, int]]:
    """image id -> (sum, count) of a column's non-missing values (booleans count as 0/1)."""
    sums: dict[str, tuple[float, int]] = {}
    for row in rows:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        total, count = sums.get(row["id"], (0.0, 0))
        sums[row["id"]] = (total + float(value), count + 1)
    return sums


def _resampled_means(sums: np.ndarray, counts: np.ndarray, draws: np.ndarray) -> np.ndarray:
    return sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)


def mean_interval(sums: dict[str, tuple[float, int]]) -> dict[str, float | int] | None:
    """{"mean", "low", "high", "n"} over the images in `sums` (None when there is no value)."""
    if not sums:
        return None
    totals, counts = (np.array(v, dtype=np.float64) for v in zip(*sums.values(), strict=True))
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(totals), (BOOTSTRAP_SAMPLES, len(totals)))
    resampled = _resampled_means(totals, counts, draws)
    return {
        "mean": float(totals.sum() / counts.sum()),
        "low": float(np.percentile(resampled, 2.5)),
        "high": float(np.percentile(resampled, 97.5)),
        "n": int(counts.sum()),
    }


def delta_interval(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]]) -> dict[str, Any] | None:
    """mean(b) - mean(a) with a 95% interval: paired over the image ids both have, else two independent draws."""
    if not a or not b:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    common = sorted(set(a) & set(b))
    arrays = []
    for sums, ids in ((a, common or sorted(a)), (b, common or sorted(b))):
        arrays.append(tuple(np.array([sums[i][k] for i in ids], dtype=np.float64) for k in (0, 1)))
    if common:
        draws = rng.integers(0, len(common), (BOOTSTRAP_SAMPLES, len(common)))
        deltas = _resampled_means(*arrays[1], draws) - _resampled_means(*arrays[0], draws)
    else:
        draws_a = rng.integers(0, len(arrays[0][0]), (BOOTSTRAP_SAMPLES, len(arrays[0][0])))
        draws_b = rng.integers(0, len(arrays[1][0]), (BOOTSTRAP_SAMPLES, len(arrays[1][0])))
        deltas = _resampled_means(*arrays[1], draws_b) - _resampled_means(*arrays[0], draws_a)
    mean_a = arrays[0][0].sum() / arrays[0][1].sum()
    mean_b = arrays[1][0].sum() / arrays[1][1].sum()
    return {
        "a": float(mean_a),
        "b": float(mean_b),
        "delta": float(mean_b - mean_a),
        "low": float(np.percentile(deltas, 2.5)),
        "high": float(np.percentile(deltas, 97.5)),
        "paired_images": len(common),
    }


def split_rows(tables: dict[str, list[dict[str, Any]]], people: dict[str, int]) -> dict[str, dict[str, list]]:
    """The tables for all images, single-ID images (one person) and multi-ID images (several), as in the paper."""
    groups = {"all": lambda n: True, "single_id": lambda n: n == 1, "multi_id": lambda n: n > 1}
    return {
        name: {table: [r for r in rows if keep(people[r["id"]])] for table, rows in tables.items()}
        for name, keep in groups.items()
    }


def summarise(tables: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every SUMMARY_METRICS figure with its interval, for all, single-ID and multi-ID images."""
    people = {row["id"]: row["people"] for row in tables["per_image"]}
    result = {}
    for group, group_tables in split_rows(tables, people).items():
        figures = {}
        for metric, (table, column) in SUMMARY_METRICS.items():
            figure = mean_interval(image_sums(group_tables[table], column))
            if figure is not None:
                figures[metric] = figure
        result[group] = {"images": len(group_tables["per_image"]), **figures}
    return result
