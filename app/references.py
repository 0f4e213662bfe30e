"""What the app found in an uploaded reference: every face, numbered largest first, with its labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dynamicid.faces import Face, FaceAnalyzer, load_image

PREVIEW_SIZE = 320  # longest side of the preview shown under an upload


@dataclass
class ReferencePreview:
    """The photo with its faces outlined (the one the pipeline uses in green) and one line per face."""

    image: Image.Image | None
    text: str


def describe_face(face: Face) -> str:
    yaw = "" if face.yaw is None else f", yaw {face.yaw:+.0f}°"
    return f"{face.expression or '?'}, {face.pose_bin or '?'}{yaw}"


def preview_reference(analyzer: FaceAnalyzer, path: str | Path, role: str) -> ReferencePreview:
    """Analyse `path` as the pipeline will (largest face used); a message instead when it cannot be used."""
    try:
        image = load_image(path)
    except (ValueError, OSError) as error:
        return ReferencePreview(None, f"**error:** {role}: {error}")
    faces = analyzer.analyze(image)
    scale = PREVIEW_SIZE / max(image.size)
    preview = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(preview)
    for k, face in reversed(list(enumerate(faces))):  # the used face drawn last, on top
        x0, y0, x1, y1 = (v * scale for v in face.bbox)
        color = (40, 200, 80) if k == 0 else (255, 170, 0)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=3)
        draw.text((x0 + 3, y0 + 2), str(k + 1), fill=color)
    if not faces:
        return ReferencePreview(preview, f"**error:** no face found in {role}; use a photo with one clear face")
    lines = [f"{k + 1}. {describe_face(face)}" for k, face in enumerate(faces)]
    if len(faces) > 1:
        lines.insert(0, f"**warning:** {len(faces)} faces in {role}; face 1 (the largest, green) is used")
    else:
        lines.insert(0, "1 face found")
    return ReferencePreview(preview, "  \n".join(lines))
