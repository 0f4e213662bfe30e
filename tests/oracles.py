"""Independent references for the oracle tests: METHOD.md's formulas written out with plain numpy / torch / cv2.

Nothing here imports the code under test. Constants come from ../shared/spec/METHOD.md (read at run time) or
from the public definition they name (OpenAI CLIP's normalisation, insightface's ArcFace template).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import cv2
import numpy as np
import torch

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "spec"

# OpenAI CLIP's image normalisation (the ViT-H/14 image encoder's preprocessor_config.json has the same).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# insightface's arcface_dst (112x112): left eye, right eye, nose, left and right mouth corners.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def method_md() -> str:
    path = SPEC / "METHOD.md"
    if not path.is_file():
        raise AssertionError(f"the method description is required: {path}")
    return path.read_text()


def method_quote(before: str) -> str:
    """The first double-quoted text after `before` in METHOD.md (line breaks read as spaces)."""
    text = " ".join(method_md().split())
    match = re.search(re.escape(before) + r'[^"]*"([^"]+)"', text)
    assert match, f"METHOD.md has no quoted text after {before!r}"
    return match.group(1)


def reconfigure_unet_prompt() -> str:
    return method_quote("UNet text: the fixed prompt")


def face_prompt(expression: str, pose: str) -> str:
    return method_quote("Face prompts used in training:").format(expression=expression, pose=pose)


def landmark_map(points: np.ndarray, image_size: int) -> torch.Tensor:
    """METHOD.md "Landmark map": 255 dots at (int(y), int(x)) of the points scaled by 96/size, then (x/255-0.5)/0.5."""
    canvas = np.zeros((96, 96), dtype=np.uint8)
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2) * (96 / image_size):
        if 0 <= x < 96 and 0 <= y < 96:
            canvas[int(y), int(x)] = 255
    return (torch.from_numpy(canvas).float() / 255 - 0.5) / 0.5


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def text_states(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The CLIP text encoder's last hidden states (the UNet's text condition)."""
    return text_encoder(token_ids(tokenizer, prompts)).last_hidden_state


@torch.no_grad()
def pooled_text(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP's pooled text vector by its definition: the final hidden state at the first end-of-text token."""
    ids = token_ids(tokenizer, prompts)
    states = text_encoder(ids).last_hidden_state
    eos = (ids == tokenizer.eos_token_id).int().argmax(-1)
    return states[torch.arange(len(prompts)), eos]


@torch.no_grad()
def clip_penultimate(image_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's layers run one by one, stopping before the last one."""
    vision = image_encoder.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    for layer in vision.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return hidden


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity src -> dst: x' = a x - b y + tx, y' = b x + a y + ty."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float), strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def arcface_crop(image: np.ndarray, kps5: np.ndarray, size: int) -> np.ndarray:
    """The face warped (bilinear, black outside) so its 5 keypoints best fit the ArcFace template at size x size."""
    matrix = similarity_lstsq(kps5, ARCFACE_112 * size / 112)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def clip_input(face: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) CLIP-normalised float32 from an RGB uint8 (H, W, 3) face."""
    pixels = (face.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD 1.5's DDPM schedule (scheduler_config.json: scaled_linear, 0.00085 .. 0.012, 1000 steps), float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def binomial_interval(n: int, p: float, alpha: float = 1e-3) -> tuple[int, int]:
    """[lo, hi]: the central 1 - alpha acceptance region of Binomial(n, p) (exact, from log-pmf sums)."""
    log_pmf = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        for k in range(n + 1)
    ]
    pmf = np.exp(np.array(log_pmf))
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, alpha / 2))  # P(X < lo) <= alpha/2
    hi = int(np.searchsorted(cdf, 1 - alpha / 2))  # P(X > hi) <= alpha/2
    return lo, hi


def official_keys() -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(key -> shape, processor names in index order) from ../shared/spec/official-keys-sd15.tsv."""
    path = SPEC / "official-keys-sd15.tsv"
    if not path.is_file():
        raise AssertionError(f"the official key list is required: {path}")
    shapes, order = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# index"):
            order.append(line.split(" = ")[1])
        elif line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes, order
