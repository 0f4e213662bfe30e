"""The curation chain is declared once (`curation.chain`): each step command shows exactly the options its
output depends on, and the pipeline and `merge` follow the same declaration."""

import click
import pytest

from dynamicid.curation.chain import CHAIN, RERUN, SHARED, STEPS
from dynamicid.curation.cli import main
from dynamicid.curation.config import CurationConfig

# Options that do not change any step's output: shown on every step command. What each remaining option sets,
# written out here (not read from the CLI module) so the test checks the CLI against the stage classes.
RUN_WIDE = {
    "photos_dir",
    "out_dir",
    "face_backend",
    "device",
    "insightface_root",
    "workers",
    "engine",
    "ray_address",
    "work_dir",
    "resume",
    "as_json",
    "progress",
    "verbose",
}
SETS = {
    "per_identity": {"per_identity"},
    "min_per_identity": {"min_per_identity"},
    "cluster": {"cluster"},
    "follow_links": {"follow_links"},
    "shard": {"shard_index", "shard_count"},
    "min_face_size": {"min_face_size"},
    "max_pixels": {"max_pixels"},
    "crop_size": {"crop_size"},
    "max_upscale": {"max_upscale"},
    "captioner": {"captioner"},
    "caption_prompt": {"caption_prompt"},
}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The pipeline's stage objects, as a run builds them."""
    from dynamicid.curation.pipeline import build_stages
    from dynamicid.curation.stages import BackendInfo, StageContext

    folder = tmp_path_factory.mktemp("chain")
    backend = BackendInfo("embedded", None, "d", "m", 0.6, 0.5, 0.8)
    return build_stages(StageContext(folder, folder, CurationConfig(), backend))


def visible(step_name):
    command = main.get_command(click.Context(main), step_name)
    return {p.name for p in command.params if not getattr(p, "hidden", False)}


@pytest.mark.parametrize("step", CHAIN, ids=STEPS)
def test_each_step_command_shows_exactly_the_options_its_output_depends_on(step, stages):
    """A stage's `settings` make its fingerprint (a cached table is reused while they are unchanged), so they
    are what its output depends on; scan and write add their driver-side work's own."""
    depends = {s for stage in stages if stage.step == step.name for s in stage.settings} | set(step.settings)
    expected = RUN_WIDE | {option for option, fields in SETS.items() if fields & depends}
    assert visible(step.name) == expected


def test_the_issue_case_dedupe_shows_per_identity():
    """dedupe's output depends on --per-identity (a small identity keeps its near-duplicates), so it is shown."""
    assert {"per_identity", "min_per_identity"} <= visible("dedupe")
    assert "per_identity" not in visible("detect") and "min_face_size" not in visible("dedupe")


def test_every_declared_setting_is_a_curation_setting_and_every_option_maps_to_one():
    fields = set(CurationConfig.__dataclass_fields__)
    assert {s for step in CHAIN for s in step.all_settings} <= fields
    options = {p.name for p in main.get_command(click.Context(main), "build").params}
    assert options == RUN_WIDE | set(SETS)


def test_pipeline_and_merge_follow_the_chain(stages):
    from dynamicid.curation.merge import MERGED_STEPS, SHARED_TABLES
    from dynamicid.curation.pipeline import STAGES

    assert STAGES == ("scan", "detect", "identify", "dedupe", "align", "label", "select", "write")
    assert [(s.name, s.step) for s in stages] == [
        ("detect", "detect"),
        ("describe", "identify"),
        ("identify", "identify"),
        ("size", "identify"),
        ("exact_dedupe", "dedupe"),
        ("dedupe", "dedupe"),
        ("align", "align"),
        ("label", "label"),
        ("select", "select"),
        ("crop", "write"),
        ("caption", "write"),
    ]
    # What merge concatenates from the shards, and what it runs again (identical bytes cross shards from dedupe on).
    assert SHARED_TABLES == ("scan", "detect", "describe", "identify", "size")
    assert MERGED_STEPS == ("dedupe", "align", "label", "select", "write")
    assert {s.merge for s in CHAIN} == {SHARED, RERUN}
