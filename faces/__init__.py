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
    name: module
    for module, names in {
        "dynamicid.faces.align": (
            "arcface_align",
            "arcface_matrix",
            "ffhq_align",
            "invert_affine",
            "render_landmark_map",
            "transform_points",
        ),
        "dynamicid.faces.analyzer": ("FaceAnalyzer",),
        "dynamicid.faces.backends": ("INSIGHTFACE_ROOT_ENV",),
        "dynamicid.faces.face": ("Face",),
        "dynamicid.faces.io": (
            "ImageLoadError",
            "load_array",
            "load_image",
        ),
    }.items()
    for name in names
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
