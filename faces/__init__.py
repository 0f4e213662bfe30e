"""Face analysis: image loading, detection, landmarks, pose, expression, identity embedding, alignment.

from dynamicid.faces import FaceAnalyzer, load_image
analyzer = FaceAnalyzer("auto")          # insightface if a local pack is configured, else embedded
faces = analyzer.analyze(load_image("photo.jpg"))   # largest first

A new face backend is a class implementing `analyzer.FaceBackend` (batched detect / describe / embed) and one
`BackendSpec` line in `backends.BACKENDS` (name, builder, options, model files, `auto`'s order); `FaceAnalyzer`,
every `--face-backend` and curation's caches read that table. The names are imported on first use, so a
command line can read `backends` without loading the image libraries.
"""

from dynamicid import lazy_exports

_EXPORTS = {
    "arcface_align": "dynamicid.faces.align",
    "arcface_matrix": "dynamicid.faces.align",
    "ffhq_align": "dynamicid.faces.align",
    "invert_affine": "dynamicid.faces.align",
    "render_landmark_map": "dynamicid.faces.align",
    "transform_points": "dynamicid.faces.align",
    "FaceAnalyzer": "dynamicid.faces.analyzer",
    "INSIGHTFACE_ROOT_ENV": "dynamicid.faces.backends",
    "Face": "dynamicid.faces.face",
    "ImageLoadError": "dynamicid.faces.io",
    "load_array": "dynamicid.faces.io",
    "load_image": "dynamicid.faces.io",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
