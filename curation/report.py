"""report.html: one self-contained page (thumbnails as data URIs) to look at a curated dataset in a browser.

Written as it is read: one identity's images in memory at a time, the page streamed to disk.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dynamicid.curation.engines import Call
from dynamicid.curation.inspect_dataset import upscale_histogram
from dynamicid.curation.tables import contiguous_groups
from dynamicid.schemas import EXPRESSION_CONFIDENCE_LOW, EXPRESSIONS, POSE_BINS, unsure_expression
from dynamicid.schemas.dataset_folder import dataset_files

MAX_REJECT_EXAMPLES = 12  # per identity (and for files outside any identity)
REJECTS_PER_CALL = 16  # rejected photos' thumbnails made per `map_calls` call
MapCalls = Callable[[Iterable[Call], str], Iterator[Any]]  # `Engine.map_calls`

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{margin-top:2em;border-bottom:1px solid #ccc}
.sheet{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:%(t)dpx;font-size:10px;line-height:1.2;overflow-wrap:anywhere}
figure img{width:%(t)dpx;height:%(t)dpx;object-fit:cover;display:block;background:#eee}
figure.reject img{opacity:.55}
figure.unsure img{outline:3px solid #e90;outline-offset:-3px}
.unsure b{color:#b60}
table.grid td,table.grid th{border:1px solid #ccc;padding:2px 5px;font-size:11px;text-align:center}
table.grid td.on{background:#9d9}
.muted{color:#777}
table.hist td{padding:1px 6px;font-size:11px}
.bar{height:10px;background:#69c}
"""


def counts_line(summary: dict) -> str:
    """The run's counts in the words the CLI, report.html and the app's Dataset tab all use (from summary.json)."""
    return (
        f"{summary['kept']} images of {summary['identities']} identities kept, {summary['rejected']} rejected, "
        f"of {summary['scanned']} files scanned"
    )


def thumbnail_uri(image: Image.Image, size: int) -> str:
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# Files rejected for these reasons are not opened again (they may be pipes, bombs or unreadable).
NO_PREVIEW_REASONS = ("unreadable", "undecodable")


def reject_thumbnails(photos_dir: Path | None, rejects: list[dict], size: int) -> list[str | None]:
    """The thumbnails of rejected photos (None: no preview); a call `build_report` hands to the workers, as
    decoding the photos is most of the report's work."""
    return [_source_thumbnail(photos_dir, reject, size) for reject in rejects]


def _batches(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    rows = iter(rows)
    while batch := list(itertools.islice(rows, size)):
        yield batch


def _in_this_process(calls: Iterable[Call], what: str) -> Iterator[Any]:
    return (function(*arguments) for function, arguments in calls)


def _source_thumbnail(photos_dir: Path | None, reject: dict, size: int) -> str | None:
    if photos_dir is None or reject["reason"] in NO_PREVIEW_REASONS or reject["stage"] == "scan":
        return None
    from dynamicid.faces import load_image

    path = photos_dir / reject["source_path"]
    try:
        if not path.is_file():
            return None
        return thumbnail_uri(load_image(path, at_least=size), size)
    except (ValueError, OSError):
        return None


def _grid(cells: Counter) -> str:
    head = "".join(f"<th>{html.escape(p.name)}</th>" for p in POSE_BINS)
    body = []
    for e_id, expression in enumerate(EXPRESSIONS):
        tds = "".join(
            f'<td class="{"on" if cells[(e_id, p_id)] else ""}">{cells[(e_id, p_id)] or ""}</td>'
            for p_id in range(len(POSE_BINS))
        )
        body.append(f"<tr><th>{expression}</th>{tds}</tr>")
    return f'<table class="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _dataset_by_identity(out_dir: Path, with_images: bool) -> Iterator[tuple[str, list[dict]]]:
    columns = ["identity", "source_path", "expression", "expression_confidence", "pose_bin", "quality"]
    batches = (
        pa.Table.from_batches([b])
        for f in dataset_files(out_dir)
        for b in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns + ["image"] * with_images)
    )
    for group in contiguous_groups(batches, "identity"):
        yield group.column("identity")[0].as_py(), group.to_pylist()


def _rejects_by_folder(out_dir: Path) -> tuple[pa.Table, dict[str, tuple[int, int]]]:
    """Rejects sorted by (top folder, path), and each folder's (first row, count) in that order."""
    rejects = pq.read_table(out_dir / "rejects.parquet")
    parts = pc.split_pattern(rejects.column("source_path"), "/", max_splits=1)
    folder = pc.if_else(pc.greater(pc.list_value_length(parts), 1), pc.list_element(parts, 0), "")
    rejects = rejects.append_column("folder", folder).sort_by([("folder", "ascending"), ("source_path", "ascending")])
    spans: dict[str, tuple[int, int]] = {}
    for index, name in enumerate(rejects.column("folder").to_pylist()):
        first, count = spans.get(name, (index, 0))
        spans[name] = (first, count + 1)
    return rejects, spans


def _expression_label(row: dict) -> tuple[bool, str]:
    """(unsure, caption text): the expression with its confidence, flagged under EXPRESSION_CONFIDENCE_LOW."""
    unsure = unsure_expression(row["expression_confidence"])
    text = f"{EXPRESSIONS[row['expression']]} {row['expression_confidence']:.2f}"
    return unsure, html.escape(text) + (" <b>unsure</b>" if unsure else "")


def _upscale_note(quality: dict) -> str:
    upscale = quality.get("upscale")
    return "" if upscale is None else f", {upscale:.2f}x"


def _upscale_table(histogram: dict[str, int], limit: float | None) -> str:
    """The kept crops' source -> crop enlargement as a bar chart (one table row per bin)."""
    top = max(histogram.values(), default=0) or 1
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{n}</td><td><div class='bar' style='width:{round(200 * n / top)}px'>"
        "</div></td></tr>"
        for label, n in histogram.items()
    )
    bound = f" (limit: --max-upscale {limit:g})" if limit is not None else ""
    return (
        f"<h3>Upscale of the kept crops{bound}</h3><p class='muted'>crop pixels per source pixel; above 1x the "
        f"face was enlarged</p><table class='hist'>{rows}</table>"
    )


def _kept_section(kept: list[dict], size: int, thumbnails: Iterator[str] | None) -> Iterator[str]:
    yield _grid(Counter((r["expression"], r["pose_bin"]) for r in kept))
    unsure = sum(unsure_expression(r["expression_confidence"]) for r in kept)
    if unsure:
        yield (
            f"<p class='unsure'><b>{unsure} unsure expression label(s)</b> (confidence under "
            f"{EXPRESSION_CONFIDENCE_LOW}, outlined): check them on the sheet.</p>"
        )
    yield "<div class='sheet'>"
    for r in kept:
        uri = next(thumbnails) if thumbnails else thumbnail_uri(Image.open(io.BytesIO(r["image"]["bytes"])), size)
        flagged, expression = _expression_label(r)
        figure = '<figure class="unsure">' if flagged else "<figure>"
        yield (
            f"{figure}<img src='{uri}' alt=''><figcaption>"
            f"{expression}, {html.escape(POSE_BINS[r['pose_bin']].name + _upscale_note(r['quality']))}<br>"
            f"<span class='muted'>{html.escape(r['source_path'])}</span></figcaption></figure>"
        )
    yield "</div>"


def _reject_section(examples: list[dict], count: int, uris: Iterator[str | None]) -> Iterator[str]:
    yield f"<h3>Rejected ({count})</h3><div class='sheet'>"
    for r in examples:
        uri = next(uris)
        img = f"<img src='{uri}' alt=''>" if uri else "<img alt='(no preview)'>"
        yield (
            f"<figure class='reject'>{img}<figcaption><b>{html.escape(r['reason'])}</b> ({r['stage']})<br>"
            f"<span class='muted'>{html.escape(r['source_path'])}: {html.escape(r['detail'] or '')}</span>"
            "</figcaption></figure>"
        )
    if count > MAX_REJECT_EXAMPLES:
        yield f"<p class='muted'>... and {count - MAX_REJECT_EXAMPLES} more in rejects.parquet</p>"
    yield "</div>"


def _page(out_dir: Path, thumbnails: Iterator[str] | None, map_calls: MapCalls) -> Iterator[str]:
    summary = json.loads((out_dir / "summary.json").read_text())
    size = int(summary["config"].get("thumbnail_size", 96))
    photos_dir = (
        Path(summary["photos_dir"]) if summary.get("photos_dir") and Path(summary["photos_dir"]).is_dir() else None
    )
    identities = pq.read_table(out_dir / "identities.parquet").to_pylist()  # one row per identity
    rejects, spans = _rejects_by_folder(out_dir)
    groups = _dataset_by_identity(out_dir, with_images=thumbnails is None)
    yield from (
        "<!doctype html><html><head><meta charset='utf-8'><title>dynamicid-curate report</title>",
        f"<style>{STYLE % {'t': size}}</style></head><body>",
        "<h1>Curated face dataset</h1>",
        f"<p>{html.escape(counts_line(summary))} in <code>{html.escape(str(summary['photos_dir']))}</code>. "
        f"Backend <code>{html.escape(str(summary['backend']))}</code>, embeddings "
        f"<code>{html.escape(str(summary['embedding_model']))}</code>.</p>",
        "<p>Rejected by reason: "
        + ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(summary["rejected_by_reason"].items()))
        + "</p>",
    )
    histogram = upscale_histogram(out_dir)
    if histogram:
        yield _upscale_table(histogram, summary["config"].get("max_upscale"))
    names = sorted({i["identity"] for i in identities} | set(spans) - {""}) + ([""] if "" in spans else [])
    info = {i["identity"]: i for i in identities}

    def examples_of(name: str) -> list[dict]:
        first, count = spans[name]
        return rejects.slice(first, min(count, MAX_REJECT_EXAMPLES)).to_pylist()

    shown = (row for name in names if name in spans for row in examples_of(name))  # in page order, as needed
    calls = ((reject_thumbnails, (photos_dir, batch, size)) for batch in _batches(shown, REJECTS_PER_CALL))
    uris = itertools.chain.from_iterable(map_calls(calls, "making report.html's thumbnails of rejected photos"))
    group = next(groups, None)
    for identity in names:
        kept: list[dict] = []
        if group is not None and group[0] == identity:
            kept = group[1]
            group = next(groups, None)
        meta = info.get(identity)
        title = html.escape(identity) if identity else "(files outside identity folders)"
        yield f"<h2 id='{html.escape(identity)}'>{title}</h2>"
        if meta:
            yield (
                f"<p>{meta['num_images']} kept of {meta['num_scanned']} scanned, {meta['num_rejected']} rejected; "
                f"{meta['grid_cells_covered']} of 35 expression x pose cells covered.</p>"
            )
        if kept:
            yield from _kept_section(kept, size, thumbnails)
        if identity in spans:
            yield from _reject_section(examples_of(identity), spans[identity][1], uris)
    yield "</body></html>"


def build_report(
    out_dir: Path, thumbnails: Iterator[str] | None = None, map_calls: MapCalls = _in_this_process
) -> Path:
    """Write OUT_DIR/report.html from the dataset folder (and the source photos, for rejected examples).

    `thumbnails`: the kept rows' thumbnails in dataset order, when they are made already (`build`'s crop stage);
    else each is made from the row's image. `map_calls`: where the rejected photos' thumbnails are made (`build`
    passes its engine's `map_calls`; by default in this process)."""
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for part in _page(out_dir, thumbnails, map_calls):
            f.write(part)
            f.write("\n")
    tmp.replace(path)
    return path
