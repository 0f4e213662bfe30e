"""Images made during training by `DynamicIDPipeline` with the modules being trained, as diffusers' training
examples call their pipeline in `log_validation`: the sample images (--validation-steps) and the benchmark
manifest (--eval-manifest) go through the conditioning, boxes, boost and IMR path of inference, so they show
what these weights give a user.

References are curated rows (`Reference.from_crop`: the crop, its keypoints, landmarks, ID embedding and face
prompt, no face analysis) and the seed is fixed, so the images of successive steps compare.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from torch import nn

from dynamicid.infer import DynamicIDPipeline, GenerateRequest, Person, pipeline_for
from dynamicid.infer.generate import generate
from dynamicid.infer.references import Reference
from dynamicid.models.base import BaseModel
from dynamicid.schemas import parse_face_prompt
from dynamicid.train.config import TrainConfig
from dynamicid.train.data import decode_image
from dynamicid.train.runner import eval_mode


@contextmanager
def training_pipeline(
    base: BaseModel,
    accelerator: Any,
    face_encoder: nn.Module,
    imr: nn.Module | None = None,
    keypoint_encoder: nn.Module | None = None,
    face_analyzer: Any | None = None,
) -> Iterator[DynamicIDPipeline]:
    """A pipeline over the base and the given modules, in eval mode and the run's mixed precision; afterwards
    the modules' modes are restored."""
    pipe = pipeline_for(base)  # the base family's sibling (DynamicIDPipeline, DynamicIDXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_dynamicid(face_encoder, imr, keypoint_encoder, face_analyzer=face_analyzer)
    # Trained parts are float32, frozen ones in the run's mixed-precision type.
    with eval_mode(face_encoder, imr, keypoint_encoder), torch.no_grad(), accelerator.autocast():
        yield pipe


def row_reference(row: dict[str, Any], index: int) -> Reference:
    """A curated row (undecoded image column) as the pipeline's reference, labelled by its face prompt if any."""
    expression, pose = parse_face_prompt(row["face_prompt"]) if row.get("face_prompt") else (None, None)
    return Reference.from_crop(
        decode_image(row["image"]),
        kps5=row["kps5"],
        embedding=row["embedding"],
        landmarks=row.get("landmarks"),
        expression=expression,
        pose=pose,
        source=f"dataset row {index}",
    )


def sample_image(pipe: DynamicIDPipeline, prompt: str, people: list[Person], config: TrainConfig) -> Image.Image:
    """One square image at the training resolution with the run's validation settings and seed."""
    return generate(pipe, validation_request(config, prompt, people, config.seed)).images[0]


def validation_request(
    config: TrainConfig, prompt: str, people: list[Person], seed: int, **settings: Any
) -> GenerateRequest:
    """A request at the training resolution with the run's validation steps and guidance."""
    size = (config.resolution, config.resolution)
    steps, guidance = config.validation_inference_steps, config.validation_guidance_scale
    return GenerateRequest(prompt, people, size=size, steps=steps, guidance_scale=guidance, seed=seed, **settings)
