"""Command line: dynamicid-curate (build, one stage at a time, merge, report, inspect, demo)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from dynamicid.clitools import AtLeast, InputError, ToolGroup
from dynamicid.curation.chain import CHAIN, STEPS, Step
from dynamicid.curation.config import MIN_CROP_SIZE
from dynamicid.curation.inputs import CurationError, check_folders, writing
from dynamicid.faces.backends import BACKEND_CHOICES, DEVICES

# MediaPipe/TFLite log through glog and absl; keep their start-up chatter off the user's terminal.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Arrow's C++ code reads its default allocator from here once, at first use (pyarrow.set_memory_pool does not
# reach it): the C library's allocator gives freed Parquet buffers back (see `pipeline.open_run`).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

BUILD_EPILOG = """\b
Examples:
  dynamicid-curate build photos/ dataset/
  dynamicid-curate build photos/ dataset/ --per-identity 20 --workers 4 --json
  dynamicid-curate build flat_photos/ dataset/ --cluster
  dynamicid-curate build photos/ part0/ --shard 0/2    (and part1/ --shard 1/2 elsewhere)
  dynamicid-curate merge part0/ part1/ dataset/

\b
PHOTOS_DIR/<identity>/... : one folder per person (nested folders allowed).
Every file ends in the dataset or in rejects.parquet with a reason; a killed run
resumes from the work folder (default OUT_DIR/.work); a second run does no work.
"""

RESUME = "finished work is kept in the work folder; rerun the same command to resume"

MAIN_EPILOG = """\b
Examples:
  dynamicid-curate demo demo_dataset        curate the sample photos that ship with the install
  dynamicid-curate build photos/ dataset/   photos/<identity>/*.jpg -> dataset/ (Parquet + card + report)
  dynamicid-curate inspect dataset/         counts per identity, label histograms
  python -c "import datasets; print(datasets.load_dataset('dataset'))"
"""


def _errors_as_exit_2(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CurationError as error:
            raise InputError(str(error)) from error

    return wrapper


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int]:
    if value is None:
        return (0, 1)
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/4, got {value!r}") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return (index, count)


def _set_insightface_root(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:  # through the environment, so that worker processes see it too
        from dynamicid.faces.backends import INSIGHTFACE_ROOT_ENV

        os.environ[INSIGHTFACE_ROOT_ENV] = str(value.resolve())


def run_options(func):
    """The options shared by `build` and the single-stage commands."""
    shown = functools.partial(click.option, show_default=True)  # an option whose default --help shows
    options = [
        click.argument("photos_dir", type=click.Path(path_type=Path)),
        click.argument("out_dir", type=click.Path(path_type=Path)),
        shown(
            "--per-identity",
            type=AtLeast(1),
            default=35,
            help="At most this many images per identity.",
        ),
        shown(
            "--min-per-identity",
            type=AtLeast(1),
            default=1,
            help="Identities with fewer usable images are rejected.",
        ),
        shown(
            "--face-backend",
            type=click.Choice(BACKEND_CHOICES),
            default="auto",
            help="Face models: embedded (in the wheels), insightface (local pack via $DYNAMICID_INSIGHTFACE_ROOT), auto.",
        ),
        shown(
            "--device",
            type=click.Choice(DEVICES),
            default="auto",
            help="Where the face networks and the captioner run: cuda (a GPU; an error without one), cpu, or auto "
            "(CUDA when present).",
        ),
        click.option(
            "--insightface-root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            callback=_set_insightface_root,
            expose_value=False,
            help="Local insightface model pack folder (sets $DYNAMICID_INSIGHTFACE_ROOT for the run).",
        ),
        shown(
            "--workers",
            type=AtLeast(1),
            default=1,
            help="Processes running the face models and writing the dataset's files (one per core fills the "
            "machine; then each keeps to a core of its own).",
        ),
        shown(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            help="local: this machine, streaming with bounded memory; ray: Ray Data (pip install dynamicid[ray]).",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="With --engine ray: the Ray cluster to join (`auto`: the one `ray start` began on this machine) "
            "[default: $RAY_ADDRESS, else a local Ray on this machine].",
        ),
        click.option(
            "--shard", callback=_parse_shard, metavar="I/N", help="Handle only shard I of N (whole identities)."
        ),
        click.option(
            "--work-dir", type=click.Path(path_type=Path), help="Work folder for stage tables [default: OUT_DIR/.work]."
        ),
        shown("--resume/--no-resume", default=True, help="Reuse finished work in the work folder."),
        click.option(
            "--cluster",
            is_flag=True,
            help="PHOTOS_DIR is a flat folder: group the largest faces into identities (average linkage at the "
            "backend's same-person distance threshold).",
        ),
        click.option(
            "--max-pixels",
            type=AtLeast(1),
            help="Photos declaring more pixels than this are rejected as undecodable before they are decoded "
            "(decompression bombs) [default: 200,000,000: every phone camera's photos].",
        ),
        click.option(
            "--follow-links",
            is_flag=True,
            help="Also read symbolic links whose target is outside PHOTOS_DIR (by default they are rejected as "
            "outside_photos_dir, unread); links into OUT_DIR or the work folder stay rejected.",
        ),
        shown(
            "--min-face-size",
            type=AtLeast(0, float),
            default=40.0,
            help="Smallest face box side kept, in pixels.",
        ),
        shown(
            "--crop-size",
            type=AtLeast(MIN_CROP_SIZE),
            default=512,
            help="Side of the aligned square crops, in pixels: the resolution you train at (SD 1.5: 512).",
        ),
        shown(
            "--max-upscale",
            type=AtLeast(0.01, float),
            default=2.0,
            help="Faces the crop would enlarge more than this (crop pixels per source pixel) are too_small: "
            "enlarged faces teach a model blur. Relative to --crop-size; give a smaller --crop-size for small photos.",
        ),
        click.option(
            "--captioner",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="A local transformers captioner folder (BLIP, or SmolVLM: model_type idefics3): a scene caption of "
            "each kept crop replaces the template caption [default: the template].",
        ),
        click.option(
            "--caption-prompt",
            metavar="TEXT",
            help="The captioner's prompt: an instruction-following VLM's instruction, or BLIP's text prefix "
            "[default: an instruction asking for setting, clothing and lighting, not the identity; none for BLIP].",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
        shown("--progress/--no-progress", default=True, help="Progress bars on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# The options that set `CurationConfig` fields: option -> its fields (`--shard I/N` sets two).
CONFIG_OPTIONS: dict[str, tuple[str, ...]] = {
    **{
        name: (name,)
        for name in (
            "per_identity",
            "min_per_identity",
            "face_backend",
            "device",
            "workers",
            "engine",
            "ray_address",
            "cluster",
            "follow_links",
            "max_pixels",
            "min_face_size",
            "crop_size",
            "max_upscale",
            "captioner",
            "caption_prompt",
        )
    },
    "shard": ("shard_index", "shard_count"),
}


def _config(kwargs: dict):
    from dynamicid.curation.config import CurationConfig

    index, count = kwargs["shard"]
    fields = {name: kwargs[name] for name in CONFIG_OPTIONS if name != "shard"}
    return CurationConfig(**fields, shard_index=index, shard_count=count)


def shown_on(option: str, step: Step) -> bool:
    """Whether a step's command shows `option`: run-wide options always; a setting only when the step's output
    depends on it (`curation.chain`). The others are still accepted, as `build` takes them all."""
    fields = set(CONFIG_OPTIONS.get(option, ()))
    chain_settings = {s for other in CHAIN for s in other.all_settings}
    return not fields & chain_settings or bool(fields & set(step.all_settings))


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from dynamicid.curation.report import counts_line

    click.echo(f"{counts_line(summary)} -> {summary['out_dir']}")
    for reason, count in summary["rejected_by_reason"].items():
        click.echo(f"  rejected {reason}: {count}")
    click.echo(f"see {Path(summary['out_dir']) / 'report.html'} and rejects.parquet")
    if summary["kept"] == 0:
        click.echo(
            "warning: no image was kept, so datasets.load_dataset will find no data; see rejects.parquet", err=True
        )


@click.group(cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=MAIN_EPILOG)
@click.version_option(package_name="dynamicid", prog_name="dynamicid-curate")
def main() -> None:
    """Curate raw photo folders into a DynamicID face dataset."""


@main.command(epilog=BUILD_EPILOG, interrupted=RESUME)
@run_options
@_errors_as_exit_2
def build(**kwargs) -> None:
    """Run every stage: PHOTOS_DIR/<identity>/... -> OUT_DIR (dataset, card, report, summary)."""
    from dynamicid.curation.backend import start_backend
    from dynamicid.curation.engines import start_engine

    config = _config(kwargs)
    _, out_dir, _ = check_folders(kwargs["photos_dir"], kwargs["out_dir"], kwargs["work_dir"])  # before any worker
    with writing(out_dir):
        # The workers start loading the face models now, while this process imports the pipeline (about 2 s).
        engine = start_engine(config, progress=kwargs["progress"])
        try:
            backend = start_backend(engine, config)
            from dynamicid.curation.pipeline import open_run, run_stage

            run = open_run(
                kwargs["photos_dir"],
                kwargs["out_dir"],
                config,
                work_dir=kwargs["work_dir"],
                resume=kwargs["resume"],
                progress=kwargs["progress"],
                engine=engine,
                backend=backend,
            )
            for step in STEPS:
                run_stage(run, step)
        finally:
            engine.close()
    _print_summary(json.loads((run.out_dir / "summary.json").read_text()), kwargs["as_json"])


def _stage_command(step: Step) -> None:
    stage = step.name

    @run_options
    @_errors_as_exit_2
    def command(**kwargs) -> None:
        from dynamicid.curation.pipeline import open_run, run_stage

        _, out_dir, _ = check_folders(kwargs["photos_dir"], kwargs["out_dir"], kwargs["work_dir"])
        with writing(out_dir):
            run = open_run(
                kwargs["photos_dir"],
                kwargs["out_dir"],
                _config(kwargs),
                work_dir=kwargs["work_dir"],
                resume=True,
                progress=kwargs["progress"],
            )
            try:
                rows = run_stage(run, stage)
            except FileNotFoundError as error:
                raise InputError(str(error)) from error
            finally:
                run.engine.close()
        where = run.out_dir if stage == "write" else run.work.table_path(stage)
        result = {"stage": stage, "rows": rows, "written": str(where)}
        result["stats"] = {k: v.__dict__ for k, v in run.stats.items()}
        click.echo(json.dumps(result, indent=2) if kwargs["as_json"] else f"{stage}: {rows} rows -> {where}")

    command.__doc__ = step.help
    for param in command.__click_params__:  # options of other stages stay accepted, but out of this --help
        param.hidden = not shown_on(param.name, step)
    main.command(name=stage, epilog=f"\b\nExample:\n  dynamicid-curate {stage} photos/ dataset/", interrupted=RESUME)(
        command
    )


for _step in CHAIN:
    _stage_command(_step)


@main.command(epilog="\b\nExample:\n  dynamicid-curate merge part0/ part1/ dataset/")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_errors_as_exit_2
def merge(paths: tuple[Path, ...], as_json: bool) -> None:
    """Merge shard outputs SHARD_OUT... into OUT_DIR (the last path)."""
    from dynamicid.curation.merge import merge_datasets

    if len(paths) < 2:
        raise InputError("give the shard output folders, then OUT_DIR")
    _print_summary(merge_datasets(list(paths[:-1]), paths[-1]), as_json)


@main.command(epilog="\b\nExample:\n  dynamicid-curate report dataset/")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(out_dir: Path) -> None:
    """(Re)build OUT_DIR/report.html from a dataset folder."""
    from dynamicid.curation.report import build_report

    try:
        click.echo(build_report(out_dir))
    except FileNotFoundError as error:
        raise InputError(f"{out_dir} is not a dynamicid-curate output folder ({error})") from error


@main.command(name="inspect", epilog="\b\nExample:\n  dynamicid-curate inspect dataset/ --json")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_command(out_dir: Path, as_json: bool) -> None:
    """Counts per identity and label histograms of a dataset folder."""
    from dynamicid.curation.inspect_dataset import format_inspection, inspect_dataset

    try:
        result = inspect_dataset(out_dir)
    except FileNotFoundError as error:
        raise InputError(f"{out_dir} is not a dynamicid-curate output folder ({error})") from error
    click.echo(json.dumps(result, indent=2) if as_json else format_inspection(result))


@main.command(epilog="\b\nExample:\n  dynamicid-curate demo demo_dataset && xdg-open demo_dataset/report.html")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--workers",
    type=AtLeast(1),
    default=1,
    show_default=True,
    help="Processes running the face models and writing the dataset's files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@_errors_as_exit_2
def demo(out_dir: Path, workers: int, as_json: bool, progress: bool) -> None:
    """Curate the sample photos shipped inside the installed packages into OUT_DIR (no download)."""
    from dynamicid.curation.demo import run_demo

    _print_summary(run_demo(out_dir, workers=workers, progress=progress), as_json)


if __name__ == "__main__":
    sys.exit(main())
