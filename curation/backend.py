"""The face backend of a run, resolved once in the driver: its name, model folder and a digest of its model files.

`auto` and `$DYNAMICID_INSIGHTFACE_ROOT` are looked at here only; workers build exactly the resolved backend,
and every cached result is keyed by `BackendInfo.digest`, so swapping a model file, a new expression calibration
(its version), pointing the variable at another pack, changing `--face-backend` or the backend's detection
settings between runs never reuses results of the other models or settings.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamicid.curation.chain import CPU, MODEL
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.stages import BackendInfo, StageSetupError, digest

if TYPE_CHECKING:
    from dynamicid.curation.engines import Engine

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
    environment: Mapping[str, str] | None = None,
) -> BackendInfo:
    """Resolve `auto`, build the analyzer once here (so a bad model folder fails before any work) and describe it.

    The process that resolves runs the model stages (a worker, or the driver with one worker): `analyzer_for`
    returns the analyzer built here.
    `environment`: whose $DYNAMICID_INSIGHTFACE_ROOT counts (default this process's; a Ray worker resolving for
    the driver gets the driver's, since a cluster's workers have their own environment)."""
    # Imported here: `build` imports this module before its workers start (scipy: half a second).
    from dynamicid.curation.neighbors import cosine_threshold
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


def start_backend(engine: Engine, config: CurationConfig) -> Callable[[], BackendInfo]:
    """Begin `resolve_backend` in each of `engine`'s workers for the model stages (`Engine.prepare`): each keeps
    the analyzer it built, and the driver, which then runs no model, builds none (about 700 MB and 1.4 s less).
    Returns at once where the engine can, so that the driver's own start-up (imports, checks) overlaps the
    workers' model building; the returned function waits for the one backend every worker resolved (workers that
    disagree, e.g. different model folders, stop the run). On a GPU where the models will run there: a worker
    without one would refuse --device cuda."""
    from dynamicid.faces.backends import INSIGHTFACE_ROOT_ENV

    # The driver's setting counts: a cluster's workers have their own environment.
    driver = {INSIGHTFACE_ROOT_ENV: os.environ.get(INSIGHTFACE_ROOT_ENV, "")}
    arguments = (config.face_backend, config.dup_embedding_fraction, config.device, driver)
    pending = engine.prepare((resolve_backend, arguments), CPU if config.device == "cpu" else MODEL)

    def resolved() -> BackendInfo:
        backends = set(pending())
        if len(backends) != 1:
            raise StageSetupError(f"the workers resolved different face backends: {sorted(map(str, backends))}")
        return backends.pop()

    return resolved


def analyzer_for(info: BackendInfo) -> Any:
    """This process's analyzer for the resolved backend (built once per process)."""
    if info not in _ANALYZERS:
        _ANALYZERS[info] = build_analyzer(info.name, info.root, info.device)
    return _ANALYZERS[info]
