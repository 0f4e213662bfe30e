"""CLIP-T: the cosine between an image's and its prompt's CLIP embeddings, from a local CLIP folder
(transformers layout: config.json + weights, tokenizer files, preprocessor_config.json), e.g. a ViT-L/14."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


class ClipScorer:
    """Loads a CLIPModel, its tokenizer and image processor from `folder`; nothing is downloaded."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPTokenizer

        try:  # transformers 5 names the PIL-based processor apart (the default one needs torchvision)
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        self.folder = Path(folder)
        missing = [n for n in ("config.json", "preprocessor_config.json") if not (self.folder / n).is_file()]
        if not self.folder.is_dir() or missing:
            raise FileNotFoundError(
                f"--clip-model {self.folder}: not a CLIP folder in transformers layout (missing "
                f"{', '.join(missing) or 'the folder'}); save one with CLIPModel/CLIPProcessor.save_pretrained"
            )
        self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True).eval()
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.folder, model_max_length=self.max_length)
        self.processor = CLIPImageProcessor.from_pretrained(self.folder)

    @property
    def model_name(self) -> str:
        """How the summary names the model: the folder and the architecture it holds."""
        vision = self.model.config.vision_config
        return f"{self.folder.name} (CLIP, {vision.hidden_size}-d vision, patch {vision.patch_size})"

    @torch.no_grad()
    def score(self, image: Image.Image, prompt: str) -> float:
        text = self.tokenizer(
            [prompt], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values
        out = self.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        return float((out.image_embeds * out.text_embeds).sum(-1)[0])  # both embeddings come L2-normalised
