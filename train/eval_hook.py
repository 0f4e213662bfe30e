"""`--eval-manifest M`: at each evaluation, the manifest's images are generated with the modules in training
through `DynamicIDPipeline.set_dynamicid` and scored by `dynamicid.evaluate`; the figures are logged
(`bench/<all|single_id|multi_id>/<figure>`) and the images and scores kept in `RUN/eval/step-<N>/`.

The anchoring stage has no IMR yet: its rows are generated without their expression / pose / landmark targets
(those figures are then left out).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamicid.evaluate import Case, FaceScorer, measure, write_scores
from dynamicid.faces import FaceAnalyzer
from dynamicid.infer import DynamicIDPipeline
from dynamicid.infer.generate import generate
from dynamicid.infer.manifest import ManifestRow, read_manifest
from dynamicid.models.base import BaseModel
from dynamicid.train.config import TrainConfig
from dynamicid.train.validation import training_pipeline, validation_request

GROUPS = ("all", "single_id", "multi_id")


class ManifestEvaluation:
    """Generates and scores a benchmark manifest on the main process; the others get no figures."""

    def __init__(self, config: TrainConfig, base: BaseModel, accelerator: Any):
        self.rows: list[ManifestRow] = read_manifest(config.eval_manifest)
        self.config, self.base, self.accelerator = config, base, accelerator
        self.analyzer = FaceAnalyzer("auto") if accelerator.is_main_process else None

    @torch.no_grad()
    def __call__(
        self,
        step: int,
        face_encoder: nn.Module,
        imr: nn.Module | None = None,
        keypoint_encoder: nn.Module | None = None,
    ) -> dict[str, float]:
        if self.analyzer is None:
            return {}
        folder = Path(self.config.output_dir) / "eval" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        modules = (face_encoder, imr, keypoint_encoder)
        with training_pipeline(self.base, self.accelerator, *modules, face_analyzer=self.analyzer) as pipe:
            cases = [self._generate(pipe, row, folder, can_edit=imr is not None) for row in self.rows]
        scores = measure(cases, FaceScorer(self.analyzer))
        write_scores(scores, cases, folder)
        return {
            f"bench/{group}/{name}": figure["mean"]
            for group in GROUPS
            for name, figure in scores.summary[group].items()
            if isinstance(figure, dict)
        }

    def _generate(self, pipe: DynamicIDPipeline, row: ManifestRow, folder: Path, can_edit: bool) -> Case:
        people = row.people
        if not can_edit:
            people = tuple(dataclasses.replace(p, expression=None, pose=None, landmark_image=None) for p in people)
        request = validation_request(
            self.config,
            row.prompt,
            [p.to_person() for p in people],
            row.seed if row.seed is not None else self.config.seed,
            negative_prompt=row.settings.get("negative_prompt", ""),
            id_scale=row.settings.get("id_scale", 1.0),
        )
        generated = generate(pipe, request)
        path = folder / f"{row.id}.png"
        generated.images[0].save(path)
        reports = generated.sidecar["people"]
        used = tuple(dataclasses.replace(p, box=tuple(r["box"])) for p, r in zip(people, reports, strict=True))
        return Case(row.id, path, row.prompt, used)
