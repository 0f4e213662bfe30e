"""Settings of a curation run (one dataclass; the CLI and `build_dataset` fill it)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dynamicid.faces.backends import DEVICES

MIN_CROP_SIZE = 64  # the smallest training resolution in use (the tiny-random smoke runs)


@dataclass
class CurationConfig:
    """Knobs of `build_dataset`; thresholds that depend on the face model come from the analyzer itself."""

    per_identity: int = 35  # at most this many images per identity
    min_per_identity: int = 1  # identities with fewer kept images are rejected (too_few_images)
    face_backend: str = "auto"  # dynamicid.faces.FaceAnalyzer backend
    device: str = "auto"  # where the networks run: cpu, cuda, or auto (CUDA where a worker sees it); not in keys
    workers: int = 1  # processes running the face models
    engine: str = "local"  # curation.engines: local (streaming, this machine) or ray (Ray Data)
    ray_address: str | None = None  # --engine ray: the cluster to join (else $RAY_ADDRESS, else a local Ray)
    cluster: bool = False  # PHOTOS_DIR is a flat folder: group faces into identities by embedding
    follow_links: bool = False  # scan: read links whose target is outside PHOTOS_DIR (never into OUT_DIR)
    shard_index: int = 0  # this run handles the identities whose shard is shard_index ...
    shard_count: int = 1  # ... out of shard_count (see scan.shard_of)
    crop_size: int = 512  # FFHQ-style aligned crop, pixels: the training resolution (SD 1.5: 512)
    # Largest source -> crop enlargement kept (crop pixels per source pixel); more -> too_small: an enlarged face
    # teaches the model blur at the training resolution. On the test photos (BENCHMARKS.md) 2.0 keeps the web and
    # press photos enlarged 1..2x (113 kept of 205 files; 1.0 keeps 86) and drops the 92x112 face-database photos,
    # 150x150 crops and faces in group shots (2.2x..4x; no limit kept 180). Relative to crop_size: a 1024 dataset
    # asks for larger faces by itself, and a smaller --crop-size keeps small photos instead.
    max_upscale: float = 2.0
    max_pixels: int | None = None  # photos declaring more pixels are undecodable (None: faces.io.MAX_PIXELS, 200 M)
    min_face_size: float = 40.0  # faces whose box short side is below this (source pixels) are too_small
    # Keypoints nearer a side border than this many eye distances: the face is cut off. A half face at a photo's
    # edge measured 0.29; tight portrait crops (ORL, LFW) 0.42 and up.
    min_border_margin: float = 0.35
    max_faces_per_photo: int = 12  # only the largest faces of a crowd photo are described
    # Variance of the Laplacian of the 512 grey crop; below -> low_quality. Upscaled small photos (LFW's
    # 350 px crops) score 3..5 and are still usable; only crops that are truly smeared fall under 1.
    min_sharpness: float = 1.0
    min_brightness: float = 0.06  # mean grey of the crop, 0..1; outside [min, max] -> low_quality
    max_brightness: float = 0.96
    # Near-duplicates: hash AND embedding (curation/dedupe.py), measured on ../shared/data/faces with the embedded
    # backend by tests/test_curation_near_duplicates.py (figures in BENCHMARKS.md). Copies of one picture
    # (near_duplicates/ plus a 96 px aligned crop, a greyscale and a letterboxed copy of each original) differ
    # by <= 16 of the 256 hash bits; different photos of one person in identities/ (two ORL shots of one sitting
    # are the nearest) by >= 28: the limit sits in the middle of that gap. Mirrored, downscaled copies scatter
    # more (the face mesh is not mirror-equivariant): 36 of 42 caught, all 29 with faces >= 100 px. The embedding
    # alone has no gap (copies up to 0.18 apart, as a grey copy vs a 96 px crop; two ORL shots 0.07), so it only
    # confirms the hash.
    phash_max_distance: int = 22  # Hamming distance (of 256 bits) at or below which faces may be the same picture
    dup_embedding_fraction: float = 0.5  # ... and embedding distance < fraction x same_person_threshold (0.22)
    rows_per_file: int = 1000  # rows per train-XXXXX-of-YYYYY.parquet
    rows_per_row_group: int = 64  # small row groups keep streaming readers' memory low (512 px PNGs)
    thumbnail_size: int = 96  # report.html thumbnails
    captioner: str | None = None  # a local transformers captioner folder (curation.captioner); None: template captions
    caption_prompt: str | None = None  # its prompt (None: the architecture's default, schemas.prompts)

    def __post_init__(self) -> None:
        if self.captioner is not None:  # an absolute path: the same setting from any working folder
            self.captioner = str(Path(self.captioner).expanduser().absolute())

    def fingerprint(self, *fields: str) -> str:
        """A short hash of the named settings: a stage's cached results are valid while it is unchanged."""
        values = asdict(self)
        chosen = {f: values[f] for f in fields}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def check(self) -> None:
        if self.per_identity < 1:
            raise ValueError(f"--per-identity must be >= 1, got {self.per_identity}")
        if self.min_per_identity < 1:
            raise ValueError(f"--min-per-identity must be >= 1, got {self.min_per_identity}")
        if self.min_per_identity > self.per_identity:
            raise ValueError(
                f"--min-per-identity {self.min_per_identity} is larger than --per-identity {self.per_identity}"
            )
        if not (0 < self.max_upscale < math.inf):
            raise ValueError(f"--max-upscale must be a finite number > 0, got {self.max_upscale}")
        if self.crop_size < MIN_CROP_SIZE:
            raise ValueError(f"--crop-size must be >= {MIN_CROP_SIZE}, got {self.crop_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"--engine must be local or ray, got {self.engine!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"--shard must be I/N with 0 <= I < N, got {self.shard_index}/{self.shard_count}")
        if self.captioner is not None:
            from dynamicid.curation.captioner import model_type

            model_type(Path(self.captioner))  # a CaptionerError (a ValueError) before any work
        if self.cluster and self.shard_count > 1:
            raise ValueError("--cluster groups faces across the whole folder, so it cannot run in shards")
