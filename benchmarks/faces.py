"""Face-layer timings on the real photos.

    .venv/bin/python benchmarks/faces.py [--photos ../shared/data/faces] [--limit 120]
    .venv/bin/python benchmarks/faces.py --backend insightface --pack PACK_DIR [--providers CUDAExecutionProvider]

`embedded` (default): per-stage CPU milliseconds of the embedded backend on one core. Stages: decode
(load_image), detect (MediaPipe passes + NMS), mesh (478 points on the crop), mirror mesh (the mirrored crop, for
the mirror-averaged pose), pose (solvePnP), chip (dlib's 5 points + 150x150 chip), embed (the ResNet, the photo's faces
as one batch), expression (crop + mini-Xception). The process is pinned to one core and the networks/OpenCV use one
thread; times are process CPU time, so other people's load on a shared machine does not count.

`insightface`: faces per second of the pack's ArcFace recognition model at batch 1, 8 and 32 with the chosen ONNX
Runtime providers (a provider this onnxruntime lacks, such as CUDA on a CPU machine, falls back to
CPUExecutionProvider with a note; it prints the providers in use), on ArcFace-aligned crops of the photos'
faces, plus the detector's images per second; wall-clock, since a GPU's time is not this process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import onnxruntime

from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.faces.mediapipe_face import MESH_POSE_POINTS
from dynamicid.faces.pose import solve_pose

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
EMBEDDED_STAGES = ("decode", "detect", "mesh", "mirror mesh", "pose", "chip", "embed", "expression")


def photo_paths(root: Path, limit: int, folders: tuple[str, ...] = ("identities", "group_photos")) -> list[Path]:
    """Up to `limit` photos spread evenly over `folders` (sorted, so every run times the same ones)."""
    paths = sorted(p for folder in folders for p in (root / folder).rglob("*.*"))
    paths = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


def one_core() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)  # the face networks run on one thread by themselves (faces.threads)


def bench_embedded(paths: list[Path]) -> None:
    one_core()
    analyzer = FaceAnalyzer("embedded")
    backend = analyzer._backend  # the stages are timed one by one, as describe_many() runs them
    mediapipe, embedder = backend._mediapipe, backend._embedder
    totals: dict[str, float] = defaultdict(float)
    images = faces = 0

    def timed(stage: str, func, *args, **kwargs):
        start = time.process_time()
        result = func(*args, **kwargs)
        totals[stage] += time.process_time() - start
        return result

    for path in paths:
        rgb = np.asarray(timed("decode", load_image, path))
        detections = timed("detect", backend.detect, rgb)
        images += 1
        boxes = [np.asarray(face.bbox, dtype=np.float64) for face in detections]
        if boxes:
            chips = np.stack([timed("chip", embedder.chip, rgb, box) for box in boxes])
            timed("embed", embedder.descriptors, chips)
        for face, box in zip(detections, boxes, strict=True):
            mesh = timed("mesh", mediapipe.mesh, rgb, box)
            if mesh is not None:
                timed("pose", solve_pose, mesh[list(MESH_POSE_POINTS), :2], rgb.shape[1::-1])
                mirrored = timed("mirror mesh", mediapipe.mesh, rgb, box, mirrored=True)
                if mirrored is not None:
                    timed("pose", solve_pose, mirrored[list(MESH_POSE_POINTS), :2], rgb.shape[1::-1])
            timed("expression", backend._expression.scores, rgb, face.kps5)
            faces += 1

    print(
        f"machine: {platform.machine()} {os.cpu_count()}-CPU host, pinned to 1 core; networks in "
        f"{embedder.runtime} (onnxruntime {onnxruntime.__version__}); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{images} photos, {faces} faces; process CPU time")
    print(f"{'stage':<14}{'ms/face':>10}{'ms/photo':>10}")
    for stage in EMBEDDED_STAGES:
        print(f"{stage:<14}{1000 * totals[stage] / faces:>10.1f}{1000 * totals[stage] / images:>10.1f}")
    total = sum(totals.values())
    print(f"{'total':<14}{1000 * total / faces:>10.1f}{1000 * total / images:>10.1f}")
    print(f"{images / total:.2f} photos per CPU-second")


def bench_insightface(paths: list[Path], pack: Path, providers: list[str], repeats: int) -> None:
    from dynamicid.faces.align import arcface_align

    analyzer = FaceAnalyzer("insightface", insightface_root=str(pack), providers=providers)
    backend = analyzer._backend
    recognition = backend._recognition
    print(f"pack {backend.folder}; providers in use: {recognition.session.get_providers()}")
    start, crops = time.perf_counter(), []
    for path in paths:
        image = load_image(path)
        crops += [np.asarray(arcface_align(image, face.kps5, 112))[:, :, ::-1] for face in analyzer.detect(image)]
    detect_seconds = time.perf_counter() - start
    print(f"detect: {len(paths) / detect_seconds:.1f} images/s ({len(crops)} faces, decode included)")
    if not crops:
        sys.exit("benchmarks/faces.py: the detector found no face in these photos")
    fixed_batch = recognition.session.get_inputs()[0].shape[0]  # an int when the graph fixes it, else a name
    for batch in (1, 8, 32):
        if isinstance(fixed_batch, int) and batch != fixed_batch:
            print(f"recognition batch {batch:>2}: skipped, the model's input is fixed at batch {fixed_batch}")
            continue
        batches = [[crops[(i + j) % len(crops)] for j in range(batch)] for i in range(0, len(crops), batch)]
        recognition.get_feat(batches[0])  # warm-up: session setup, CUDA kernels
        start = time.perf_counter()
        for _ in range(repeats):
            for images in batches:
                recognition.get_feat(images)
        seconds = time.perf_counter() - start
        print(f"recognition batch {batch:>2}: {repeats * batch * len(batches) / seconds:.1f} faces/s")


def insightface_providers(parser: argparse.ArgumentParser, pack: Path | None, providers: list[str]) -> list[str]:
    """The providers to time: the requested ones this onnxruntime has, else the CPU (with a note on stderr).

    A missing pack is a usage error (exit 2), named in one line."""
    from dynamicid.faces.insightface_backend import find_pack_folder

    if pack is None:
        parser.error(
            "--backend insightface needs --pack PACK_DIR: an unzipped insightface pack such as buffalo_l (or a "
            "folder holding models/buffalo_l); this project never downloads one"
        )
    try:
        find_pack_folder(pack)
    except FileNotFoundError as error:
        parser.error(f"--pack {pack}: {error}")
    available = onnxruntime.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        print(
            f"benchmarks/faces.py: {','.join(missing)} is not in this onnxruntime ({', '.join(available)}): timing "
            "CPUExecutionProvider instead (for CUDAExecutionProvider install onnxruntime-gpu instead of onnxruntime)",
            file=sys.stderr,
        )
        providers = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    return providers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the shared faces folder")
    parser.add_argument("--limit", type=int, default=120, help="photos to time (spread over the folders)")
    parser.add_argument("--backend", choices=("embedded", "insightface"), default="embedded")
    parser.add_argument("--pack", type=Path, help="insightface: the model pack folder (e.g. ~/.insightface)")
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="insightface: comma-separated ONNX Runtime providers, e.g. CUDAExecutionProvider",
    )
    parser.add_argument("--repeats", type=int, default=3, help="insightface: passes over the faces per batch size")
    args = parser.parse_args()
    if not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    providers = args.providers.split(",")
    if args.backend == "insightface":
        providers = insightface_providers(parser, args.pack, providers)
    paths = photo_paths(args.photos, args.limit)
    if args.backend == "embedded":
        bench_embedded(paths)
    else:
        bench_insightface(paths, args.pack, providers, args.repeats)


if __name__ == "__main__":
    main()
