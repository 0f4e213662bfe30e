"""The DynamicID nodes (ComfyUI's node API `comfy_api.latest`).

Load DynamicID -> DynamicID Person (one per identity) -> DynamicID Layout (optional) -> Apply DynamicID -> MODEL
for any sampler. Weights live in `models/dynamicid/`, the CLIP image encoder folder (a transformers CLIP vision
folder with config.json) in `models/clip_vision/` or `models/dynamicid/`, an insightface pack (when the
`insightface` face backend is chosen) in `models/insightface/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui
from PIL import ImageDraw

from dynamicid.infer.people import Person
from dynamicid.infer.pipeline import SINGLE_PERSON_BOOST
from dynamicid.models import SAACall
from dynamicid.models.families import family_named
from dynamicid.schemas import EXPRESSIONS, POSE_BINS

from .identity import DynamicIDParts, PersonTokens, load_parts, person_tokens, to_image, to_pil
from .model_patch import Faces, model_family, patch_model

FOLDER = "dynamicid"
NONE = "none"
KEEP = "keep"
MAX_PEOPLE = 4
CATEGORY = "DynamicID"

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))

DynamicIDType = io.Custom("DYNAMICID")
FaceType = io.Custom("DYNAMICID_FACE")
LayoutType = io.Custom("DYNAMICID_LAYOUT")


def _weight_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith((".safetensors", ".bin"))]


def _encoder_folders() -> list[str]:
    """`<models folder>/<path>` of every folder holding a config.json under clip_vision/ and dynamicid/."""
    found = []
    for kind in ("clip_vision", FOLDER):
        found += [
            f"{kind}/{os.path.dirname(f)}" for f in folder_paths.get_filename_list(kind) if f.endswith("config.json")
        ]
    return sorted(set(found))


def _model_file(choice: str) -> Path:
    path = folder_paths.get_full_path(FOLDER, choice)
    if path is None:
        raise ValueError(f"{choice} is not in models/{FOLDER}/")
    return Path(path)


def _schema(node: type[io.ComfyNode], display_name: str, **fields) -> io.Schema:
    """A node's schema: its id is its class name, its category this project's."""
    return io.Schema(node_id=node.__name__, display_name=display_name, category=CATEGORY, **fields)


class LoadDynamicID(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            cls,
            "Load DynamicID",
            description="DynamicID weights (this project's .safetensors, or the release's SAA .bin with its IMR and "
            "keypoint-encoder files), the CLIP image encoder and the face analysis.",
            inputs=[
                io.Combo.Input(
                    "weights", options=_weight_files(), tooltip="our .safetensors, or the release's SAA .bin"
                ),
                io.Combo.Input("imr", options=[NONE, *_weight_files()], tooltip="the release's IMR .bin (edits)"),
                io.Combo.Input(
                    "keypoint_encoder", options=[NONE, *_weight_files()], tooltip="the release's keypoint .bin (edits)"
                ),
                io.Combo.Input("image_encoder", options=_encoder_folders(), tooltip="CLIP vision folder (config.json)"),
                io.Combo.Input(
                    "face_backend",
                    options=["auto", "embedded", "insightface"],
                    tooltip="insightface needs a model pack in models/insightface; embedded needs no download",
                ),
            ],
            outputs=[DynamicIDType.Output(display_name="dynamicid")],
        )

    @classmethod
    def execute(cls, weights, imr, keypoint_encoder, image_encoder, face_backend) -> io.NodeOutput:
        files = [_model_file(weights)] + [_model_file(f) for f in (imr, keypoint_encoder) if f != NONE]
        if files[0].suffix == ".safetensors" and len(files) > 1:
            raise ValueError("imr and keypoint_encoder take the release's .bin files; ours hold every part in one file")
        kind, _, folder = image_encoder.partition("/")
        encoder = folder_paths.get_full_path(kind, f"{folder}/config.json")
        if encoder is None:
            raise ValueError(f"image encoder folder {image_encoder} not found (a CLIP vision folder with config.json)")
        insightface = Path(folder_paths.models_dir) / "insightface"
        root = insightface if face_backend != "embedded" and insightface.is_dir() else None
        return io.NodeOutput(load_parts(files, Path(encoder).parent, face_backend, root))


class DynamicIDPerson(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            cls,
            "DynamicID Person",
            description="One identity: the largest face of the reference image, optionally with another expression "
            "and pose (IMR); shows the face it uses.",
            inputs=[
                DynamicIDType.Input("dynamicid"),
                io.Image.Input("image", tooltip="reference photo; its largest face is used"),
                io.Combo.Input("expression", options=[KEEP, *EXPRESSIONS], default=KEEP),
                io.Combo.Input("pose", options=[KEEP, *POSE_BINS], default=KEEP),
                io.Clip.Input(
                    "clip", optional=True, tooltip="the checkpoint's CLIP: needed for an expression/pose edit"
                ),
                io.Image.Input("landmark_image", optional=True, tooltip="a face whose landmarks (and labels) to take"),
            ],
            outputs=[FaceType.Output(display_name="face"), io.Image.Output(display_name="face_crop")],
        )

    @classmethod
    def execute(cls, dynamicid: DynamicIDParts, image, expression, pose, clip=None, landmark_image=None):
        person = Person(
            to_pil(image),
            expression=None if expression == KEEP else expression,
            pose=None if pose == KEEP else pose,
            landmark_image=None if landmark_image is None else to_pil(landmark_image),
        )
        found = person_tokens(dynamicid, person, clip)
        preview = person.image.copy()
        x0, y0, x1, y1 = found.reference.face.bbox
        ImageDraw.Draw(preview).rectangle((x0, y0, x1, y1), outline=(0, 255, 0), width=max(2, preview.width // 200))
        return io.NodeOutput(found, to_image(found.reference.clip_face), ui=ui.PreviewImage(to_image(preview), cls=cls))


class DynamicIDLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            cls,
            "DynamicID Layout",
            description="Where each person goes: one box per line, y0, x0, y1, x1 as fractions of the image "
            "(person order), or equal vertical strips.",
            inputs=[
                io.Combo.Input("mode", options=["boxes", "strips"], default="boxes"),
                io.String.Input("boxes", multiline=True, default="0.1, 0.1, 0.5, 0.4\n0.1, 0.6, 0.5, 0.9"),
            ],
            outputs=[LayoutType.Output(display_name="layout")],
        )

    @classmethod
    def execute(cls, mode, boxes) -> io.NodeOutput:
        if mode == "strips":
            return io.NodeOutput(None)
        rows = [line.replace(";", ",") for line in boxes.splitlines() if line.strip()]
        try:
            parsed = tuple(tuple(float(v) for v in row.split(",")) for row in rows)
        except ValueError:
            raise ValueError(f"boxes must be lines of 4 numbers 'y0, x0, y1, x1', got {boxes!r}") from None
        if not parsed:
            raise ValueError("no boxes given: one line 'y0, x0, y1, x1' per person, or mode 'strips'")
        SAACall(num_ids=len(parsed), boxes=parsed)  # checks each box: 4 fractions in [0, 1], not empty
        return io.NodeOutput(parsed)


class ApplyDynamicID(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        faces = [FaceType.Input(f"face_{i}", optional=i > 1) for i in range(1, MAX_PEOPLE + 1)]
        return _schema(
            cls,
            "Apply DynamicID",
            description="A MODEL whose attention places each face in its box (SAA; SD 1.5, SDXL, FLUX.1); the "
            "input MODEL is unchanged.",
            inputs=[
                io.Model.Input("model"),
                DynamicIDType.Input("dynamicid"),
                *faces,
                LayoutType.Input("layout", optional=True, tooltip="default: equal vertical strips"),
                io.Float.Input("id_scale", default=1.0, min=0.0, max=5.0, step=0.05),
                io.Boolean.Input("gating", default=True, tooltip="query-level activation gating and box routing"),
                io.Float.Input(
                    "boost",
                    default=-1.0,
                    min=-1.0,
                    max=10.0,
                    step=0.1,
                    tooltip="-1: the family's default (2 with several people, 0 with one)",
                ),
                io.Int.Input(
                    "boost_steps",
                    default=-1,
                    min=-1,
                    max=1000,
                    tooltip="steps the boost lasts; -1: the family's default (SD: 12 of 50, FLUX.1: 7 of 28; 0 with one)",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, dynamicid: DynamicIDParts, face_1, layout=None, id_scale=1.0, gating=True, boost=-1.0,
                boost_steps=-1, **more_faces) -> io.NodeOutput:  # fmt: skip
        """face_2 .. face_4 arrive in `more_faces` when connected."""
        optional = [more_faces.get(f"face_{i}") for i in range(2, MAX_PEOPLE + 1)]
        people: list[PersonTokens] = [face_1, *(face for face in optional if face is not None)]
        if layout is not None and len(layout) != len(people):
            raise ValueError(f"the layout has {len(layout)} boxes for {len(people)} people: give one box per person")
        family = model_family(model)
        several = family_named(family).pipeline_class().multi_person_boost  # as the family's pipeline does
        default_boost, default_steps = several if len(people) > 1 else SINGLE_PERSON_BOOST
        settings = SAACall(num_ids=len(people), id_scale=id_scale, gating=gating, boxes=layout)
        faces = Faces(
            cond=_tokens([p.cond for p in people], dynamicid), uncond=_tokens([p.uncond for p in people], dynamicid)
        )
        processors = dynamicid.processors(model)
        boost = default_boost if boost < 0 else boost
        boost_steps = default_steps if boost_steps < 0 else boost_steps
        return io.NodeOutput(patch_model(model, processors, faces, settings, boost, boost_steps))


def _tokens(per_person: list[torch.Tensor], parts: DynamicIDParts) -> torch.Tensor:
    width = parts.modules.face_encoder.cross_attention_dim
    if any(t.shape[-1] != width for t in per_person):
        raise ValueError("a face was encoded with other DynamicID weights: connect the same Load DynamicID node")
    return torch.cat(per_person)[None]


class DynamicIDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDynamicID, DynamicIDPerson, DynamicIDLayout, ApplyDynamicID]
