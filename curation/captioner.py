"""Scene captions from a local Hugging Face image-to-text folder (`--captioner DIR`), batched, on CPU or CUDA.

Supported and tested: BLIP (`BlipForConditionalGeneration`, model_type "blip": the captioner PhotoMaker's and
InstantID's data used through BLIP-2). `prompt` is BLIP's conditional text prefix (e.g. "a photography of"); none by
default. Instruction VLMs (SmolVLM, Florence-2, Qwen2.5-VL) are not supported yet: their folders are refused with the
list of supported types. Nothing is downloaded: the folder must hold the model and its processor
(`save_pretrained` of both).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from dynamicid.batching import HalvingBatches

# model_type of config.json -> the transformers class that captions with it
SUPPORTED = {"blip": "BlipForConditionalGeneration"}
LOG = logging.getLogger(__name__)


class CaptionerError(ValueError):
    """A captioner folder that cannot be used: one line naming the folder and what to do."""


def model_type(folder: Path) -> str:
    """The folder's supported model_type, else CaptionerError."""
    config = folder / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise CaptionerError(
            f"captioner folder {folder}: no readable config.json ({type(error).__name__}); pass a folder saved with "
            "save_pretrained (model and processor)"
        ) from None
    if kind not in SUPPORTED:
        raise CaptionerError(
            f"captioner folder {folder}: model_type {kind!r} is not a supported captioner; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        )
    return kind


class Captioner:
    """A local captioning model: `caption(images)` in batches of `batch_size` (halved on a CUDA out-of-memory
    error, said once in the log); `model` names it (type, folder name, digest of its files) for every row."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str = "cpu",
        prompt: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 30,
    ):
        import torch
        import transformers

        from dynamicid.curation.backend import files_digest

        self.folder = Path(folder).expanduser().absolute()
        kind = model_type(self.folder)
        if device == "cuda" and not torch.cuda.is_available():
            raise CaptionerError("device 'cuda' was asked for but torch sees no CUDA GPU: use device 'cpu'")
        self.device = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self._batches = HalvingBatches(batch_size, "images to caption")
        try:
            self._processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            model_class = getattr(transformers, SUPPORTED[kind])
            self._model = model_class.from_pretrained(self.folder, local_files_only=True).eval().to(self.device)
        except (OSError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CaptionerError(f"captioner folder {self.folder}: cannot load it ({first})") from None
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        self.model = f"{kind}:{self.folder.name}:{files_digest(files)}"

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image, in order."""
        return self._batches(self._generate, images)

    def _generate(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        rgb = [image.convert("RGB") for image in images]
        text = None if self.prompt is None else [self.prompt] * len(rgb)
        inputs = self._processor(images=rgb, text=text, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            tokens = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self._processor.batch_decode(tokens, skip_special_tokens=True)]
