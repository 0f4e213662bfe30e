"""Command line: dynamicid-eval."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dynamicid.clitools import AtLeast, ToolGroup, quiet_libraries
from dynamicid.faces.backends import BACKEND_CHOICES

EPILOG = """\b
The whole loop:
  dynamicid-eval manifest --dataset curated/ --prompts multi --people 2 --rows 100 --out bench.jsonl
  dynamicid-infer batch --manifest bench.jsonl --out-dir gen_a/ --base-model sd15/ --weights a.safetensors
  dynamicid-eval score gen_a/ --out scores_a/ --clip-model clip-vit-large-patch14/
  dynamicid-eval compare scores_a/ scores_b/
  dynamicid-eval score other_method/ --manifest bench.jsonl --out scores_other/   # images <id>.png / <id>.jpg
"""


@click.group(
    cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EPILOG
)
@click.version_option(package_name="dynamicid", prog_name="dynamicid-eval")
def main() -> None:
    """Score generated images per person (identity, expression, pose, prompt) and compare runs."""


@main.command(epilog=EPILOG)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Score folder to write.")
@click.option("--manifest", type=click.Path(path_type=Path), help="Score FOLDER/<id>.png|jpg against this manifest.")
@click.option("--face-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--insightface-root", type=click.Path(path_type=Path), help="Local insightface model pack folder.")
@click.option(
    "--clip-model", type=click.Path(path_type=Path), help="Local CLIP folder (transformers layout) for CLIP-T."
)
@click.option("--references-dir", type=click.Path(path_type=Path), help="Base folder of relative reference paths.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json on stdout.")
def score(folder, out, manifest, face_backend, insightface_root, clip_model, references_dir, as_json) -> None:
    """Score the images (and sidecars) of FOLDER: FaceSim, ID confusion, Expr, Pose, CLIP-T, per person."""
    quiet_libraries()
    from dynamicid.evaluate import FaceScorer, cases_from_manifest, cases_from_sidecars, measure, write_scores
    from dynamicid.evaluate.clip_t import ClipScorer
    from dynamicid.faces import FaceAnalyzer

    if manifest is not None:
        cases = cases_from_manifest(folder, manifest, references_dir)
    else:
        cases = cases_from_sidecars(folder, references_dir)
    clip = ClipScorer(clip_model) if clip_model is not None else None
    options = {"insightface_root": str(insightface_root)} if insightface_root else {}
    scores = measure(cases, FaceScorer(FaceAnalyzer(face_backend, **options)), clip)
    paths = write_scores(scores, cases, out)
    if as_json:
        click.echo(json.dumps(scores.summary, indent=2))
        return
    for note in scores.summary["notes"]:
        click.echo(f"note: {note}", err=True)
    for group in ("single_id", "multi_id"):
        figures = scores.summary[group]
        if figures["images"]:
            shown = ", ".join(f"{k} {v['mean']:.3f}" for k, v in figures.items() if isinstance(v, dict))
            click.echo(f"{group} ({figures['images']} images): {shown}")
    for path in paths.values():
        click.echo(f"wrote {path}")


@main.command()
@click.argument("scores_a", type=click.Path(path_type=Path))
@click.argument("scores_b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(scores_a, scores_b, as_json) -> None:
    """Each figure of SCORES_A and SCORES_B, B - A and its bootstrap 95% interval."""
    from dynamicid.evaluate.compare import compare_scores, format_table

    comparison = compare_scores(scores_a, scores_b)
    click.echo(json.dumps(comparison, indent=2) if as_json else format_table(comparison))


@main.command()
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="Curated dataset folder.")
@click.option("--prompts", default="single", show_default=True, help="single, multi, or a prompt-list file.")
@click.option("--people", type=AtLeast(1), default=1, show_default=True, help="People per image.")
@click.option("--rows", type=AtLeast(1), default=50, show_default=True, help="Images in the benchmark.")
@click.option("--references", type=AtLeast(1), default=1, show_default=True, help="Reference photos per person.")
@click.option(
    "--held-out", type=AtLeast(0), default=1, show_default=True, help="Held-out photos per person (copy-paste)."
)
@click.option("--targets", default="expression", show_default=True, help="expression, pose, both or none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Manifest to write (.jsonl).")
def manifest(**options) -> None:
    """Build a benchmark manifest from a curated dataset (crops written to <out stem>.references/)."""
    from dynamicid.evaluate.build_manifest import ManifestConfig, build_manifest

    path = build_manifest(ManifestConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in options.items()}))
    click.echo(f"wrote {path}")
