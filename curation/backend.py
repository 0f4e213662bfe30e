"""The face backend of a run, resolved once in the driver: its name, model folder and a digest of its model files.

`auto` and `$DYNAMICID_INSIGHTFACE_ROOT` are looked at here only; workers build exactly the resolved backend,
and every cached result is keyed by `BackendInfo.digest`, so swapping a model file, a new expression calibration
(its version), pointing the variable at another pack, changing `--face-backend` or the backend's detection
settings between runs never reuses results of the other models or settings.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamicid.curation.neighbors import cosine_threshold
from dynamicid.curation.stages import BackendInfo, StageSetupError, digest

_ANALYZERS: dict[BackendInfo, Any] = {}


def files_digest(files: list[Path]) -> str:
    """Names, sizes and modification times (a changed file changes the digest without reading 100 MB)."""
    parts = []
    for path in files:
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return digest(*parts)


def backend_digest(name: str, analyzer: Any, files: list[Path]) -> str:
    """The backend, its settings (detection ones included) and its model files: any change means new results."""
    settings = json.dumps(analyzer.settings, sort_keys=True)
    return digest(name, analyzer.embedding_model, analyzer.expression_model, settings, files_digest(files))


def build_analyzer(name: str, root: str | None, device: str = "auto") -> Any:
    """A FaceAnalyzer for exactly this backend on `device` (auto: CUDA when this process sees it); a missing or
    broken model folder, or device cuda without CUDA, is a StageSetupError."""
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.faces.backends import backend_spec

    try:
        folder = {backend_spec(name).folder_option: root} if root else {}
        analyzer = FaceAnalyzer(backend=name, device=device, **folder)
    except Exception as error:  # the backends raise FileNotFoundError, ValueError, ONNX and dlib errors
        where = f" (model folder {root})" if root else ""
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageSetupError(f"the {name} face backend cannot start{where}: {message}") from error
    # The model libraries leave hundreds of thousands of objects that live as long as the process; every full
    # garbage collection walked them all again (6 % of a build's CPU). Frozen, they are left out of collections.
    gc.freeze()
    return analyzer


def resolve_backend(
    requested: str,
    dup_embedding_fraction: float,
    device: str = "auto",
    *,
    environment: Mapping[str, str] | None = None,
) -> BackendInfo:
    """Resolve `auto`, build the analyzer once here (so a bad model folder fails before any work) and describe it.

    The process that resolves runs the model stages (a worker, or the driver with one worker): `analyzer_for`
    returns the analyzer built here.
    `environment`: whose $DYNAMICID_INSIGHTFACE_ROOT counts (default this process's; a Ray worker resolving for
    the driver gets the driver's, since a cluster's workers have their own environment)."""
    from dynamicid.faces.backends import resolve

    spec = resolve(requested, {}, environment)[0]
    name, root = spec.name, None if spec.model_folder is None else spec.model_folder({}, environment)
    root_text = None if root is None else str(root.absolute())
    analyzer = build_analyzer(name, root_text, device)
    try:
        files = spec.model_files(Path(root_text) if root_text else None)
    except FileNotFoundError as error:
        raise StageSetupError(f"the {name} face backend cannot start: {error}") from error
    info = BackendInfo(
        name=name,
        root=root_text,
        device=device,
        digest=backend_digest(name, analyzer, files),
        embedding_model=str(analyzer.embedding_model),
        same_person_threshold=float(analyzer.same_person_threshold),
        same_person_cos=cosine_threshold(analyzer.distance, analyzer.same_person_threshold, analyzer.embedding_dim),
        duplicate_cos=cosine_threshold(
            analyzer.distance, dup_embedding_fraction * analyzer.same_person_threshold, analyzer.embedding_dim
        ),
    )
    _ANALYZERS[info] = analyzer
    return info


def analyzer_for(info: BackendInfo) -> Any:
    """This process's analyzer for the resolved backend (built once per process)."""
    if info not in _ANALYZERS:
        _ANALYZERS[info] = build_analyzer(info.name, info.root, info.device)
    return _ANALYZERS[info]
