"""report.html: one self-contained page (thumbnails as data URIs) to look at a curated dataset in a browser."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from dynamicid.curation.write import read_dataset
from dynamicid.schemas import EXPRESSIONS, POSE_BINS

MAX_REJECT_EXAMPLES = 12  # per identity (and for files outside any identity)

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{margin-top:2em;border-bottom:1px solid #ccc}
.sheet{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:%(t)dpx;font-size:10px;line-height:1.2;overflow-wrap:anywhere}
figure img{width:%(t)dpx;height:%(t)dpx;object-fit:cover;display:block;background:#eee}
figure.reject img{opacity:.55}
table.grid td,table.grid th{border:1px solid #ccc;padding:2px 5px;font-size:11px;text-align:center}
table.grid td.on{background:#9d9}
.muted{color:#777}
"""


def thumbnail_uri(image: Image.Image, size: int) -> str:
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# Files rejected for these reasons are not opened again (they may be pipes, bombs or unreadable).
NO_PREVIEW_REASONS = ("unreadable", "undecodable")


def _source_thumbnail(photos_dir: Path | None, reject: dict, size: int) -> str | None:
    if photos_dir is None or reject["reason"] in NO_PREVIEW_REASONS or reject["stage"] == "scan":
        return None
    from dynamicid.faces import load_image

    path = photos_dir / reject["source_path"]
    try:
        if not path.is_file():
            return None
        return thumbnail_uri(load_image(path), size)
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


def build_report(out_dir: Path) -> Path:
    """Write OUT_DIR/report.html from the dataset folder (and the source photos, for rejected examples)."""
    summary = json.loads((out_dir / "summary.json").read_text())
    size = int(summary["config"].get("thumbnail_size", 96))
    photos_dir = (
        Path(summary["photos_dir"]) if summary.get("photos_dir") and Path(summary["photos_dir"]).is_dir() else None
    )
    rows = read_dataset(out_dir).to_pylist()
    rejects = pq.read_table(out_dir / "rejects.parquet").to_pylist()
    identities = pq.read_table(out_dir / "identities.parquet").to_pylist()
    by_identity: dict[str, list[dict]] = {}
    for row in rows:
        by_identity.setdefault(row["identity"], []).append(row)
    rejects_by_folder: dict[str, list[dict]] = {}
    for r in rejects:
        folder = r["source_path"].split("/", 1)[0] if "/" in r["source_path"] else ""
        rejects_by_folder.setdefault(folder, []).append(r)

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dynamicid-curate report</title>",
        f"<style>{STYLE % {'t': size}}</style></head><body>",
        "<h1>Curated face dataset</h1>",
        f"<p>{summary['kept']} images of {summary['identities']} identities from {summary['scanned']} files "
        f"scanned in <code>{html.escape(str(summary['photos_dir']))}</code>; {summary['rejected']} rejected. "
        f"Backend <code>{html.escape(str(summary['backend']))}</code>, embeddings "
        f"<code>{html.escape(str(summary['embedding_model']))}</code>.</p>",
        "<p>Rejected by reason: "
        + ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(summary["rejected_by_reason"].items()))
        + "</p>",
    ]
    names = sorted({i["identity"] for i in identities} | set(rejects_by_folder) - {""}) + (
        [""] if "" in rejects_by_folder else []
    )
    info = {i["identity"]: i for i in identities}
    for identity in names:
        kept = by_identity.get(identity, [])
        meta = info.get(identity)
        title = html.escape(identity) if identity else "(files outside identity folders)"
        parts.append(f"<h2 id='{html.escape(identity)}'>{title}</h2>")
        if meta:
            parts.append(
                f"<p>{meta['num_images']} kept of {meta['num_scanned']} scanned, {meta['num_rejected']} rejected; "
                f"{meta['grid_cells_covered']} of 35 expression x pose cells covered.</p>"
            )
        if kept:
            parts.append(_grid(Counter((r["expression"], r["pose_bin"]) for r in kept)))
            parts.append("<div class='sheet'>")
            for r in kept:
                uri = thumbnail_uri(Image.open(io.BytesIO(r["image"]["bytes"])), size)
                label = f"{EXPRESSIONS[r['expression']]}, {POSE_BINS[r['pose_bin']].name}"
                parts.append(
                    f"<figure><img src='{uri}' alt=''><figcaption>{html.escape(label)}<br>"
                    f"<span class='muted'>{html.escape(r['source_path'])}</span></figcaption></figure>"
                )
            parts.append("</div>")
        examples = rejects_by_folder.get(identity, [])
        if examples:
            parts.append(f"<h3>Rejected ({len(examples)})</h3><div class='sheet'>")
            for r in examples[:MAX_REJECT_EXAMPLES]:
                uri = _source_thumbnail(photos_dir, r, size)
                img = f"<img src='{uri}' alt=''>" if uri else "<img alt='(no preview)'>"
                parts.append(
                    f"<figure class='reject'>{img}<figcaption><b>{html.escape(r['reason'])}</b> ({r['stage']})<br>"
                    f"<span class='muted'>{html.escape(r['source_path'])}: {html.escape(r['detail'] or '')}</span>"
                    "</figcaption></figure>"
                )
            if len(examples) > MAX_REJECT_EXAMPLES:
                parts.append(
                    f"<p class='muted'>... and {len(examples) - MAX_REJECT_EXAMPLES} more in rejects.parquet</p>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
