"""report.html of a score folder: every image with each person's box and matched face drawn, worst first."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dynamicid.infer.outputs import PERSON_COLORS

THUMBNAIL = 384
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 6px;font-size:12px;vertical-align:top}
td img{max-width:THUMBNAILpx;display:block}.bad{color:#b00}.muted{color:#777}
""".replace("THUMBNAIL", str(THUMBNAIL))


def annotated(image: Image.Image, people: list[dict[str, Any]], boxes: list[Any]) -> Image.Image:
    """The image with each person's box (thin) and matched face (thick, with its similarity) in the person's colour."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    width, height = image.size
    line = max(2, round(max(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(max(width, height) / 30)))
    for person, box in zip(people, boxes, strict=True):
        color = PERSON_COLORS[person["person"] % len(PERSON_COLORS)]
        if box is not None:
            y0, x0, y1, x1 = box
            box_pixels = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
            draw.rectangle(box_pixels, outline=color, width=max(1, line // 2))
        if person.get("face_bbox") is not None:
            x0, y0, x1, y1 = person["face_bbox"]
            draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
            label = f"P{person['person'] + 1} {person['face_sim']:.2f}"
            draw.rectangle(draw.textbbox((x0, y1), label, font=font), fill=color)
            draw.text((x0, y1), label, fill=(255, 255, 255), font=font)
    return image


def embedded_jpeg(image: Image.Image, longest_side: int) -> str:
    """A data: URI of the image shrunk to `longest_side`, so report.html is one self-contained file."""
    scale = longest_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    encoded = io.BytesIO()
    image.convert("RGB").save(encoded, "JPEG", quality=85)
    return f"data:image/jpeg;base64,{base64.b64encode(encoded.getvalue()).decode('ascii')}"


def _flag(value: Any, good: bool = True) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    ok = bool(value) == good
    return f'<span class="{"" if ok else "bad"}">{"yes" if value else "no"}</span>'


def _person_cell(person: dict[str, Any]) -> str:
    name = html.escape(person.get("identity") or f"person {person['person'] + 1}")
    if not person["face_found"]:
        return f'P{person["person"] + 1} {name}: <span class="bad">no face</span>'
    parts = [
        f"P{person['person'] + 1} {name}: FaceSim {person['face_sim']:.3f}",
        f"in box {_flag(person.get('in_box'))}",
        f"confused {_flag(person.get('id_confused'), good=False)}",
    ]
    if person.get("expression_requested"):
        parts.append(
            f"expr {html.escape(person['expression_requested'])} -> "
            f"{html.escape(str(person.get('expression_found')))} {_flag(person.get('expression_ok'))}"
        )
    if person.get("pose_requested"):
        parts.append(f"pose {html.escape(person['pose_requested'])} {_flag(person.get('pose_ok'))}")
    return "; ".join(parts)


def write_report(
    path: Path,
    per_image: list[dict[str, Any]],
    per_person: list[dict[str, Any]],
    boxes: dict[str, list[Any]],
    images: dict[str, Path],
    summary: dict[str, Any],
) -> Path:
    """`boxes` / `images`: per image id, the people's boxes and the image file."""
    by_image: dict[str, list[dict[str, Any]]] = {}
    for person in per_person:
        by_image.setdefault(person["id"], []).append(person)
    worst_first = sorted(per_image, key=lambda r: (r["face_sim_min"], r["id"]))
    rows = []
    for record in worst_first:
        people = by_image[record["id"]]
        picture = annotated(Image.open(images[record["id"]]), people, boxes[record["id"]])
        clip = "" if record.get("clip_t") is None else f"<br>CLIP-T {record['clip_t']:.4f}"
        rows.append(
            f'<tr><td><img src="{embedded_jpeg(picture, THUMBNAIL)}"></td>'
            f"<td><b>{html.escape(record['id'])}</b><br>{html.escape(record['prompt'])}<br>"
            f"faces {record['faces_found']} / people {record['people']}{clip}</td>"
            f"<td>{'<br>'.join(_person_cell(p) for p in people)}</td></tr>"
        )
    figures = [
        f"<tr><td>{group}</td><td>{name}</td><td>{f['mean']:.4f}</td><td>[{f['low']:.4f}, {f['high']:.4f}]</td>"
        f"<td>{f['n']}</td></tr>"
        for group in ("single_id", "multi_id", "all")
        for name, f in summary[group].items()
        if isinstance(f, dict)
    ]
    models = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in summary["models"].items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"])
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>dynamicid-eval</title><style>{STYLE}</style>"
        f"</head><body><h1>Scores: {len(per_image)} images</h1><ul>{models}</ul><ul>{notes}</ul>"
        "<table><tr><th>images</th><th>figure</th><th>mean</th><th>95% interval</th><th>n</th></tr>"
        f"{''.join(figures)}</table><h2>Images, worst FaceSim first</h2>"
        "<p class='muted'>thin outline: the person's box; thick: the face matched to that person</p>"
        f"<table>{''.join(rows)}</table></body></html>\n",
        encoding="utf-8",
    )
    return path
