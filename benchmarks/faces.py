"""Per-stage milliseconds of the embedded face backend on the real photos, on one CPU core.

    .venv/bin/python benchmarks/faces.py [--photos ../shared/data/faces] [--limit 120]

Stages: decode (load_image), detect (MediaPipe passes + NMS), mesh (478 points on the crop and on its
mirror, as describe() runs it), pose (solvePnP), embed (dlib shape predictor + chip + ResNet), expression
(crop + mini-Xception). The process is pinned to one core and torch/OpenCV use one thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.faces.mediapipe_face import MESH_POSE_POINTS
from dynamicid.faces.pose import solve_pose

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


def photo_paths(root: Path, limit: int) -> list[Path]:
    paths = sorted(p for folder in ("identities", "group_photos") for p in (root / folder).rglob("*.*"))
    paths = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the shared faces folder")
    parser.add_argument("--limit", type=int, default=120, help="photos to time (spread over the folders)")
    args = parser.parse_args()

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    analyzer = FaceAnalyzer("embedded")
    backend = analyzer._backend  # the stages are timed one by one
    paths = photo_paths(args.photos, args.limit)
    totals: dict[str, float] = defaultdict(float)
    images = faces = 0
    for path in paths:
        start = time.perf_counter()
        rgb = np.asarray(load_image(path))
        totals["decode"] += time.perf_counter() - start
        start = time.perf_counter()
        detections = backend.detect(rgb)
        totals["detect"] += time.perf_counter() - start
        images += 1
        for face in detections:
            box = np.asarray(face.bbox)
            start = time.perf_counter()
            mesh = backend._mediapipe.mesh(rgb, box)
            mirrored = backend._mediapipe.mesh(rgb, box, mirrored=True)
            totals["mesh"] += time.perf_counter() - start
            if mesh is not None and mirrored is not None:
                start = time.perf_counter()
                solve_pose(mesh[list(MESH_POSE_POINTS), :2], rgb.shape[1::-1])
                solve_pose(mirrored[list(MESH_POSE_POINTS), :2], rgb.shape[1::-1])
                totals["pose"] += time.perf_counter() - start
            start = time.perf_counter()
            backend._embedder.embed(rgb, box)
            totals["embed"] += time.perf_counter() - start
            start = time.perf_counter()
            backend._expression.scores(rgb, face.kps5)
            totals["expression"] += time.perf_counter() - start
            faces += 1

    print(f"machine: {platform.machine()} {os.cpu_count()}-CPU host, pinned to 1 core; torch {torch.__version__}")
    print(f"{images} photos, {faces} faces from {args.photos}")
    print(f"{'stage':<12}{'ms/face':>10}{'ms/photo':>10}")
    for stage in ("decode", "detect", "mesh", "pose", "embed", "expression"):
        print(f"{stage:<12}{1000 * totals[stage] / faces:>10.1f}{1000 * totals[stage] / images:>10.1f}")
    total = sum(totals.values())
    print(f"{'total':<12}{1000 * total / faces:>10.1f}{1000 * total / images:>10.1f}")


if __name__ == "__main__":
    main()
