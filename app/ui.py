"""The app's page: a Generate tab and, with a dataset, a Dataset tab; served one request at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from dynamicid.app.generate_tab import GenerateTab

TITLE = "DynamicID"
# System fonts only: the page loads nothing from outside the machine.
THEME = gr.themes.Default(
    font=[gr.themes.Font("system-ui"), "sans-serif"], font_mono=[gr.themes.Font("monospace"), "monospace"]
)
# Small images (tiny-random, previews) are shown enlarged, with crisp pixels.
CSS = """
.gradio-container { max-width: 1400px !important; }
#result-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#activation-maps img { image-rendering: pixelated; }
"""


def build_app(pipe: Any, output_dir: Path, dataset: Any = None) -> gr.Blocks:
    """The page over a pipeline from `dynamicid.infer.load_pipeline`."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}: several people in one picture, each with an expression\n"
            f"Base model `{pipe.model_options.base_model}`. Upload a reference photo per person, choose their "
            "expression and pose, place their boxes, then Generate."
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate-tab"):
                GenerateTab(pipe, output_dir).build()
            if dataset is not None:
                with gr.Tab("Dataset", id="dataset-tab"):
                    dataset.build()
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, share: bool, output_dir: Path, max_upload_mb: int) -> None:
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(output_dir)],
        max_file_size=f"{max_upload_mb}mb",
        theme=THEME,
        css=CSS,
        ssr_mode=False,
        footer_links=[],
    )
