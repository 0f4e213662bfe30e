"""The curated dataset as training inputs: checked at start-up, then decoded, cropped and normalised per sample.

Every label comes from the dataset's columns (never recomputed here): the identity embedding (`embedding`),
the 5 keypoints (`kps5`), the dense landmarks, the caption and the face prompt. Images leave the loader as
uint8 (4x less to copy); they are scaled and normalised on the device (`dynamicid.models.conditioning`).

The CLIP image encoder sees `arcface_align(crop, kps5, size=224)`: the 512 crop's face aligned by its 5 keypoints
onto the ArcFace template at 224x224, then CLIP's mean/std normalisation with no further resize or crop. Inference
does the same from the reference photo and its detected keypoints.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dynamicid.faces.align import arcface_align, render_landmark_map
from dynamicid.models.base import CLIP_IMAGE_SIZE
from dynamicid.schemas.dataset_folder import dataset_files

ANCHOR_COLUMNS = ("image", "kps5", "embedding", "embedding_model", "caption")
TOKEN_CACHE_COLUMNS = ("identity", "source_sha256", "image", "kps5", "embedding", "embedding_model")
# kps5 and embedding: the sample images go through the pipeline, which encodes the source face itself.
RECONFIGURE_COLUMNS = ("identity", "source_sha256", "image", "kps5", "embedding", "landmarks", "face_prompt")


def load_curated(path: str | Path, columns: tuple[str, ...]) -> Any:
    """`datasets.load_dataset(path)` (offline, train split) restricted to `columns`; errors name what is wrong."""
    import datasets
    import pyarrow.parquet as pq

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist (make it with `dynamicid-curate build`)")
    try:
        shards = dataset_files(folder)
    except (FileNotFoundError, ValueError) as error:  # no shards, or one of them missing
        raise ValueError(f"--dataset {error}") from None
    if sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards) == 0:
        raise ValueError(f"dataset {folder} is empty: no rows in its shards (did curation keep any photo?)")
    dataset = datasets.load_dataset(str(folder), split="train")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset {folder} has no column(s) {', '.join(missing)} needed for training; "
            f"its columns are: {', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns(list(columns))
    if "image" in columns:  # decoded here with OpenCV, faster than PIL for the PNG crops
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def embedding_info(dataset: Any, folder: str | Path) -> tuple[str, int]:
    """(embedding model, width) of the dataset; all rows must agree."""
    models = set(dataset["embedding_model"])
    if len(models) != 1:
        raise ValueError(f"dataset {folder} mixes identity-embedding models {sorted(models)}; curate it with one")
    width = len(dataset[0]["embedding"])
    return models.pop(), width


def dataset_fingerprint(dataset: Any) -> str:
    """Identifies the rows and their order (identity + source hash of each row)."""
    digest = hashlib.sha256()
    for identity, sha in zip(dataset["identity"], dataset["source_sha256"], strict=True):
        digest.update(f"{identity}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


def decode_image(value: dict[str, Any]) -> np.ndarray:
    """RGB uint8 (H, W, 3) from the dataset's undecoded image value (PNG bytes, or a path)."""
    data = value.get("bytes")
    if data is None:
        data = Path(value["path"]).read_bytes()
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)  # no BGR->RGB pass: ~1 ms at 512 px
    if rgb is None:
        raise ValueError(f"a dataset image could not be decoded ({value.get('path') or 'embedded bytes'})")
    return rgb


def image_tensor(image: np.ndarray, resolution: int) -> torch.Tensor:
    """(3, R, R) uint8 from the square RGB crop (area-resized when smaller)."""
    if image.shape[0] != resolution:
        interpolation = cv2.INTER_AREA if image.shape[0] > resolution else cv2.INTER_CUBIC
        image = cv2.resize(image, (resolution, resolution), interpolation=interpolation)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def clip_tensor(image: np.ndarray, kps5: Any) -> torch.Tensor:
    """(3, 224, 224) uint8 CLIP input: the face aligned by its keypoints (see the module docstring)."""
    face = np.asarray(arcface_align(image, np.asarray(kps5, dtype=np.float32), size=CLIP_IMAGE_SIZE))
    return torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1)))


def landmark_map(landmarks: Any, crop_size: int) -> torch.Tensor:
    """(1, 96, 96) map in [-1, 1] from the dataset's landmarks (crop pixels)."""
    points = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    return torch.from_numpy(render_landmark_map(points, image_size=crop_size, map_size=96))[None]


class Tokenize:
    """Caption -> padded token ids of the base family (`Conditioner.token_ids`), memoised for the `max_entries`
    most recent captions: template captions repeat, but a VLM's are one per row, so the memo must stay bounded."""

    def __init__(self, token_ids: Callable[[list[str]], torch.Tensor], max_entries: int = 4096):
        self.token_ids = token_ids
        self.max_entries = max_entries
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, text: str) -> torch.Tensor:
        if text in self.memo:
            self.memo.move_to_end(text)
        else:
            self.memo[text] = self.token_ids([text])[0].long()
            if len(self.memo) > self.max_entries:
                self.memo.popitem(last=False)
        return self.memo[text]


class AnchorSamples(torch.utils.data.Dataset):
    """One curated row -> the anchoring stage's tensors."""

    def __init__(
        self, dataset: Any, token_ids: Callable[[list[str]], torch.Tensor], resolution: int, prompts: Any = None
    ):
        """`token_ids`: the base family's tokenization, `Conditioner.from_parts(base).token_ids`; `prompts`: a
        `PromptCache`, whose embeddings of the caption a sample then carries (`prompt`) instead of its tokens."""
        self.dataset = dataset
        self.tokenize = Tokenize(token_ids)
        self.resolution = resolution
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        image = decode_image(row["image"])
        caption = row["caption"]
        text = (
            {"input_ids": self.tokenize(caption)}
            if self.prompts is None
            else {"prompt": self.prompts.embeddings(caption)}
        )
        return {
            "index": torch.tensor(index),
            "pixel_values": image_tensor(image, self.resolution),
            "clip_pixel_values": clip_tensor(image, row["kps5"]),
            "id_embeds": torch.tensor(row["embedding"], dtype=torch.float32),
            **text,
        }


def rows_by_identity(dataset: Any) -> list[list[int]]:
    """Row indices of each identity, identities in first-seen order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, identity in enumerate(dataset["identity"]):
        groups[identity].append(index)
    return list(groups.values())


class IdentitySamples(torch.utils.data.Dataset):
    """One identity -> a source row and K target rows (reconfiguration), with their images and landmark maps.

    The draw depends only on (seed, epoch, identity), so resumed and distributed runs see the same samples.
    """

    def __init__(self, dataset: Any, tokens: torch.Tensor, resolution: int, targets: int, seed: int):
        self.dataset = dataset
        self.tokens = tokens
        self.groups = rows_by_identity(dataset)
        self.resolution = resolution
        self.targets = targets
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.groups)

    def draw(self, index: int) -> tuple[int, list[int]]:
        rows = self.groups[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        source = int(rng.choice(rows))
        return source, [int(r) for r in rng.choice(rows, size=self.targets, replace=True)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, targets = self.draw(int(index))
        maps, prompts, pixels = [], [], []
        for i, row_index in enumerate([source, *targets]):
            row = self.dataset[row_index]
            image = decode_image(row["image"])
            maps.append(landmark_map(row["landmarks"], image.shape[1]))
            prompts.append(row["face_prompt"])
            if i > 0:
                pixels.append(image_tensor(image, self.resolution))
        rows = torch.tensor([source, *targets])
        return {
            "rows": rows,
            "tokens": self.tokens[rows],  # (1 + K, num_tokens, C): source first
            "landmark_maps": torch.stack(maps),  # (1 + K, 1, 96, 96)
            "face_prompts": prompts,
            "pixel_values": torch.stack(pixels),  # (K, 3, R, R): the targets
        }


def collate_identities(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Identities keep their own tensors (IMR rewrites one source at a time)."""
    return items
