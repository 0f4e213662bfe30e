"""Face analysis: image loading, detection, landmarks, pose, expression, identity embedding, alignment.

from dynamicid.faces import FaceAnalyzer, load_image
analyzer = FaceAnalyzer("auto")          # insightface if a local pack is configured, else embedded
faces = analyzer.analyze(load_image("photo.jpg"))   # largest first
"""

from dynamicid.faces.align import (
    arcface_align,
    arcface_matrix,
    ffhq_align,
    invert_affine,
    render_landmark_map,
    transform_points,
)
from dynamicid.faces.analyzer import INSIGHTFACE_ROOT_ENV, FaceAnalyzer
from dynamicid.faces.face import Face
from dynamicid.faces.io import ImageLoadError, load_array, load_image

__all__ = [
    "INSIGHTFACE_ROOT_ENV",
    "Face",
    "FaceAnalyzer",
    "ImageLoadError",
    "arcface_align",
    "arcface_matrix",
    "ffhq_align",
    "invert_affine",
    "load_array",
    "load_image",
    "render_landmark_map",
    "transform_points",
]
