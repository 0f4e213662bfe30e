"""Scene captions from a local Hugging Face captioner folder (`--captioner DIR`), batched, on CPU or CUDA.

Supported and tested (on tiny random models built from a config and a tokenizer made in code):
- BLIP (`BlipForConditionalGeneration`, model_type "blip"), the captioner PhotoMaker's and InstantID's data used
  through BLIP-2. Its prompt is BLIP's conditional text prefix (e.g. "a photography of"); none by default.
- SmolVLM (`Idefics3ForConditionalGeneration`, model_type "idefics3": SmolVLM-256M/500M/2B-Instruct), an
  instruction-following VLM. Its prompt is an instruction (default `schemas.prompts.CAPTION_INSTRUCTION`: scene,
  clothing, lighting, not the identity), put in the folder's chat template by its processor.
Other folders (SmolVLM2's model_type "smolvlm", whose processor needs num2words and torchvision, Qwen2.5-VL,
Florence-2, ...) are refused with the list of supported types. Nothing is downloaded and no remote code runs: the
folder must hold the model and its processor (`save_pretrained` of both).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dynamicid.batching import HalvingBatches
from dynamicid.schemas.prompts import CAPTION_INSTRUCTION


@dataclass(frozen=True)
class Architecture:
    """How a model_type captions: its transformers class, whether its prompt is an instruction in the processor's
    chat template (else a text prefix, or none), and how many tokens a caption may take."""

    model_class: str
    chat: bool
    max_new_tokens: int


SUPPORTED = {
    "blip": Architecture("BlipForConditionalGeneration", chat=False, max_new_tokens=30),
    "idefics3": Architecture("Idefics3ForConditionalGeneration", chat=True, max_new_tokens=60),
}


class CaptionerError(ValueError):
    """A captioner folder that cannot be used: one line naming the folder and what to do."""


def model_type(folder: Path) -> str:
    """The folder's supported model_type, else CaptionerError."""
    config = folder / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CaptionerError(
            f"captioner folder {folder}: no readable config.json ({type(error).__name__}); pass a folder saved with "
            "save_pretrained (model and processor)"
        ) from None
    if kind not in SUPPORTED:
        raise CaptionerError(
            f"captioner folder {folder}: model_type {kind!r} is not a supported captioner; supported: "
            + ", ".join(f"{k} ({v.model_class})" for k, v in SUPPORTED.items())
        )
    return kind


@dataclass(frozen=True)
class CaptionerSpec:
    """What a captioner folder writes captions with, known without loading it (the curation store keys on it)."""

    folder: Path
    kind: str
    model: str  # type:folder name:digest of its files (names, sizes, mtimes), recorded per dataset row
    prompt: str | None  # the prompt the model gets (the architecture's default when none was asked for)
    max_new_tokens: int

    @classmethod
    def of(cls, folder: str | Path, prompt: str | None = None) -> CaptionerSpec:
        from dynamicid.curation.backend import files_digest

        folder = Path(folder).expanduser().absolute()
        kind = model_type(folder)
        architecture = SUPPORTED[kind]
        if prompt is None and architecture.chat:
            prompt = CAPTION_INSTRUCTION
        files = sorted(p for p in folder.iterdir() if p.is_file())
        model = f"{kind}:{folder.name}:{files_digest(files)}"
        return cls(folder, kind, model, prompt, architecture.max_new_tokens)

    @property
    def key(self) -> str:
        """The model, prompt and generation settings (greedy): a caption depends on these and the image only."""
        from dynamicid.curation.tables import digest

        return digest(self.model, json.dumps(self.prompt), str(self.max_new_tokens), "greedy")


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
    ):
        import torch
        import transformers

        self.spec = CaptionerSpec.of(folder, prompt)
        self.folder, self.model, self.prompt = self.spec.folder, self.spec.model, self.spec.prompt
        self.chat = SUPPORTED[self.spec.kind].chat
        if device == "cuda" and not torch.cuda.is_available():
            raise CaptionerError("device 'cuda' was asked for but torch sees no CUDA GPU: use device 'cpu'")
        self.device = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        self._batches = HalvingBatches(batch_size, "images to caption")
        # The checkpoint's own dtype on a GPU (SmolVLM ships bfloat16); float32 on the CPU, where half types are slow.
        dtype = "auto" if self.device == "cuda" else torch.float32
        try:
            self._processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            model_class = getattr(transformers, SUPPORTED[self.spec.kind].model_class)
            model = model_class.from_pretrained(self.folder, local_files_only=True, dtype=dtype)
            self._model = model.eval().to(self.device)
        except (OSError, ValueError, ImportError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionerError(f"captioner folder {self.folder}: cannot load it ({first})") from None
        if self.chat:
            if not getattr(self._processor, "chat_template", None):
                raise CaptionerError(
                    f"captioner folder {self.folder}: its processor has no chat template (chat_template.jinja); "
                    "save the processor of an instruct model with save_pretrained"
                )
            self._processor.tokenizer.padding_side = "left"  # batched generation continues every row's prompt

    @property
    def batch_size(self) -> int:
        """Images per model call now (smaller after a batch ran out of GPU memory)."""
        return self._batches.size

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image, in order."""
        return self._batches(self._generate, images)

    def _inputs(self, images: list[Image.Image]):
        if not self.chat:
            text = None if self.prompt is None else [self.prompt] * len(images)
            return self._processor(images=images, text=text, return_tensors="pt")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True)
        return self._processor(
            images=[[image] for image in images], text=[prompt] * len(images), return_tensors="pt", padding=True
        )

    def _generate(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        inputs = self._inputs([image.convert("RGB") for image in images]).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        with torch.inference_mode():
            tokens = self._model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, do_sample=False)
        if self.chat:  # a decoder-only model returns the prompt too
            tokens = tokens[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self._processor.batch_decode(tokens, skip_special_tokens=True)]
