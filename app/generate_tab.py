"""The Generate tab: 1-4 people (reference, expression, pose, landmark image), their boxes, the settings, and the
image, activation maps and sidecar that `dynamicid-infer generate` would write for the same settings."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from dynamicid.app.layout_canvas import CSS_COLORS, layout_editor, layout_value
from dynamicid.app.references import preview_reference
from dynamicid.clitools import INPUT_ERRORS, InputError, one_line
from dynamicid.infer import GenerateRequest, Person
from dynamicid.infer.flags import KEEP
from dynamicid.infer.generate import generate, sampler_defaults
from dynamicid.schemas import EXPRESSIONS
from dynamicid.schemas.labels import POSE_NAMES

MAX_PEOPLE = 4
DEFAULT_PEOPLE = 2
MODELS = "models"  # concurrency group of every event that runs a model: one request at a time
OUT_NAME = "dynamicid-{seed}.png"  # each request writes this, its sidecar and maps into a folder of its own


@dataclass
class PersonInputs:
    """The components of one person's column."""

    column: gr.Column
    reference: gr.File
    faces: gr.Image
    found: gr.Markdown
    expression: gr.Dropdown
    pose: gr.Dropdown
    landmark: gr.File

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.reference, self.expression, self.pose, self.landmark]


class GenerateTab:
    """Holds the loaded pipeline; `build()` lays the tab out inside an open `gr.Blocks`."""

    def __init__(self, pipe: Any, output_dir: Path):
        self.pipe = pipe
        self.output_dir = output_dir
        self.native, self.step = int(pipe.native_size), int(pipe.size_multiple)

    # ---- layout ----

    def build(self) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                count = gr.Radio(
                    list(range(1, MAX_PEOPLE + 1)), value=DEFAULT_PEOPLE, label="People", elem_id="num-people"
                )
                with gr.Row(equal_height=False):
                    people = [self._person_column(k) for k in range(MAX_PEOPLE)]
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    "two friends laughing in a cafe", label="Prompt", lines=2, elem_id="prompt", max_lines=4
                )
                negative = gr.Textbox("", label="Negative prompt", elem_id="negative-prompt")
                size = self._size_sliders()
                layout = layout_editor(
                    layout_value(self.native, self.native, DEFAULT_PEOPLE), label="Layout", elem_id="layout"
                )
                gr.Markdown("Drag a box to move it, a corner to resize it. Reset gives equal vertical strips.")
                reset = gr.Button("Reset boxes", size="sm", elem_id="reset-boxes")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed", minimum=0, maximum=2**31 - 1)
                    random_seed = gr.Checkbox(True, label="Random seed (the seed used is shown)", elem_id="random-seed")
                default_steps, default_guidance = sampler_defaults(self.pipe)
                steps = gr.Slider(1, 150, default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, default_guidance, step=0.5, label="Guidance scale", elem_id="guidance")
                id_scale = gr.Slider(0, 2, 1.0, step=0.05, label="ID scale", elem_id="id-scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=False):
            image = gr.Image(
                label="Image", format="png", interactive=False, height=400, elem_id="result-image", scale=2
            )
            maps = gr.Gallery(
                label="Activation maps (where each identity was injected)",
                columns=2,
                height=400,
                object_fit="contain",
                elem_id="activation-maps",
                scale=2,
            )
            sidecar = gr.File(label="Sidecar JSON", elem_id="sidecar", scale=1)

        cheap = {"concurrency_limit": None, "show_progress": "hidden"}
        count.change(self._show_people, [count, *size], [*(p.column for p in people), layout], **cheap)
        for slider in size:
            slider.change(self._resize, [layout, *size], layout, **cheap)
        reset.click(self._reset, [count, *size], layout, **cheap)
        for k, person in enumerate(people):
            person.reference.change(
                lambda path, k=k: self._preview(path, k),
                person.reference,
                [person.faces, person.found],
                concurrency_id=MODELS,
                concurrency_limit=1,
            )

        def run(*values: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:  # noqa: B008
            return self.generate(*values, on_step=lambda done, total: progress((done, total), unit="steps"))

        button.click(
            run,
            [count, layout, prompt, negative, seed, random_seed, steps, guidance, id_scale, *size]
            + [c for p in people for c in p.inputs],
            [status, image, maps, sidecar, seed],
            concurrency_id=MODELS,
            concurrency_limit=1,
        )

    def _person_column(self, k: int) -> PersonInputs:
        with gr.Column(visible=k < DEFAULT_PEOPLE, min_width=220) as column:
            color = CSS_COLORS[k % len(CSS_COLORS)]  # the colour of the person's box and activation map
            gr.Markdown(f'<span style="color:{color}">&#9632;</span> **Person {k + 1}**')
            reference = gr.File(
                label="Reference photo", file_types=["image"], type="filepath", elem_id=f"person{k + 1}-reference"
            )
            faces = gr.Image(label="Faces found", interactive=False, height=180, elem_id=f"person{k + 1}-faces")
            found = gr.Markdown(elem_id=f"person{k + 1}-found")
            expression = gr.Dropdown(
                [KEEP, *EXPRESSIONS], value=KEEP, label="Expression", elem_id=f"person{k + 1}-expression"
            )
            pose = gr.Dropdown([KEEP, *POSE_NAMES], value=KEEP, label="Pose", elem_id=f"person{k + 1}-pose")
            with gr.Accordion("Landmark image (optional)", open=False):
                landmark = gr.File(
                    label="Target landmarks from this face", file_types=["image"], elem_id=f"person{k + 1}-landmark"
                )
        return PersonInputs(column, reference, faces, found, expression, pose, landmark)

    def _size_sliders(self) -> tuple[gr.Slider, gr.Slider]:
        low, high = max(self.step, self.native // 2), self.native * 2
        with gr.Row():
            width = gr.Slider(low, high, self.native, step=self.step, label="Width", elem_id="width")
            height = gr.Slider(low, high, self.native, step=self.step, label="Height", elem_id="height")
        return width, height

    # ---- cheap handlers (no model) ----

    @staticmethod
    def _show_people(count: int, width: float, height: float) -> list[Any]:
        columns = [gr.Column(visible=k < count) for k in range(MAX_PEOPLE)]
        return [*columns, layout_value(width, height, count)]

    @staticmethod
    def _resize(layout: dict[str, Any], width: float, height: float) -> dict[str, Any]:
        return layout_value(width, height, len(layout["boxes"]), layout["boxes"])

    @staticmethod
    def _reset(count: int, width: float, height: float) -> dict[str, Any]:
        return layout_value(width, height, count)

    # ---- model handlers ----

    def _preview(self, path: str | None, k: int) -> tuple[Any, str]:
        if path is None:
            return None, ""
        preview = preview_reference(self.pipe.reference_analyzer.analyzer, path, f"the reference of person {k + 1}")
        return preview.image, preview.text

    def generate(self, *values: Any, on_step: Callable[[int, int], None] | None = None) -> list[Any]:
        """One request: the people, layout and settings from the page -> status, image, maps, sidecar, seed."""
        count, layout, prompt, negative, seed, random_seed, steps, guidance, id_scale, width, height = values[:11]
        person_values = values[11:]
        run_dir = None
        try:
            people = _people(int(count), layout, person_values)
            seed = secrets.randbelow(2**31) if random_seed or seed is None else int(seed)
            run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.output_dir))
            request = GenerateRequest(
                prompt,
                people,
                negative_prompt=negative or "",
                size=(int(width), int(height)),
                steps=int(steps),
                guidance_scale=float(guidance),
                seed=seed,
                id_scale=float(id_scale),
                activation_maps=True,
            )
            sidecar = generate(self.pipe, request, on_step=on_step).save(run_dir / OUT_NAME.format(seed=seed))
        except (InputError, *INPUT_ERRORS) as error:
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)  # a failed request leaves nothing behind
            message = error.format_message() if isinstance(error, InputError) else str(error)
            return [f"**error:** {one_line(message)}", None, None, None, gr.update()]
        outputs = sidecar["outputs"]
        maps = [(path, f"person {i + 1}") for i, path in enumerate(outputs["activation_maps"])]
        settings = sidecar["settings"]
        lines = [
            f"Done: seed {settings['seed']}, {settings['width']}x{settings['height']}, {settings['steps']} steps, "
            f"{sidecar['timings']['total']:.1f} s. Files in `{Path(outputs['sidecar']).parent}`."
        ]
        lines += [f"**warning:** {message}" for message in sidecar["warnings"]]
        return ["  \n".join(lines), outputs["images"][0], maps, outputs["sidecar"], settings["seed"]]


def _people(count: int, layout: dict[str, Any], values: tuple[Any, ...]) -> list[Person]:
    """The first `count` people of the page, each with the box the layout gives them."""
    boxes = layout["boxes"]
    if len(boxes) != count:
        raise InputError(f"the layout has {len(boxes)} boxes for {count} people; press Reset boxes")
    people = []
    for k in range(count):
        reference, expression, pose, landmark = values[4 * k : 4 * k + 4]
        if not reference:
            raise InputError(f"person {k + 1} has no reference photo: upload one")
        people.append(
            Person(
                reference,
                None if expression in (None, KEEP) else expression,
                None if pose in (None, KEEP) else pose,
                Path(landmark) if landmark else None,
                tuple(float(v) for v in boxes[k]),
            )
        )
    return people
