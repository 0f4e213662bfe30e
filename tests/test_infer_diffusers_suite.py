"""diffusers' own pipeline test mixins against DynamicIDPipeline, DynamicIDXLPipeline and DynamicIDFluxPipeline
(issues: they behave as diffusers pipelines), with the plain diffusers pipelines of the three families on the same
tiny parts as controls.

The mixins import from diffusers' test tree, so the vendored suite (../shared/vendor) is unpacked into a temporary
folder, `tests/diffusers_suite/*.py` are placed in it under `tests/pipelines/dynamicid/`, and pytest runs there in
a subprocess; its JUnit report says what passed, failed and was skipped, and why. SD 1.5 / SDXL use the unittest
mixins of `test_pipelines_common.py`; Flux the pytest-style `tests/pipelines/testing_utils` mixins that diffusers'
own Flux tests compose (`dynamicid_flux_mixins.py`, one class per mixin).
"""

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

VENDORED = Path(__file__).resolve().parents[1].parent / "shared" / "vendor" / "diffusers-tests-v0.40.0.tar.gz"
ADAPTERS = {
    "test_dynamicid.py": Path(__file__).parent / "diffusers_suite" / "dynamicid_mixins.py",
    "test_dynamicid_flux.py": Path(__file__).parent / "diffusers_suite" / "dynamicid_flux_mixins.py",
}
# LoRA's classes run too, skipped while the lock's peft is older than diffusers' LoRA loader takes (see there).
FLUX_MIXINS = ("Pipeline", "Memory", "PyramidAttentionBroadcast", "FasterCache", "FirstBlockCache")
FLUX_MIXINS += ("TaylorSeerCache", "MagCache")
PAIRS = {
    "TestDynamicIDPipeline": "TestControlStableDiffusionPipeline",
    "TestDynamicIDXLPipeline": "TestControlStableDiffusionXLPipeline",
} | {f"TestDynamicIDFlux{name}": f"TestControlFlux{name}" for name in FLUX_MIXINS}
# Skips that may differ from nothing: the mixins' own accelerator guards, and the one out-of-tree test.
ALLOWED_SKIPS = ("CUDA", "accelerator", "GPU", "xformers", "XFormers", "out-of-tree", "optional components")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, shared_faces):
    """{class: {test: ("passed" | "failed" | "skipped", message)}} of one run of the suite."""
    if not VENDORED.is_file():
        pytest.fail(f"vendored diffusers tests not found at {VENDORED}")
    root = tmp_path_factory.mktemp("diffusers-suite")
    with tarfile.open(VENDORED) as archive:
        archive.extractall(root, filter="data")
    package = root / "diffusers-tests" / "tests" / "pipelines" / "dynamicid"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, adapter in ADAPTERS.items():
        (package / name).write_text(adapter.read_text())
    report = root / "report.xml"
    env = os.environ | {"DYNAMICID_REFERENCE": str(shared_faces / "identities" / "obama" / "obama.jpg")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(package)],
        cwd=root / "diffusers-tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not report.is_file():
        pytest.fail(f"the suite did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    results: dict[str, dict[str, tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                message = (node.get("message") or "") + "\n" + (node.text or "")[-1500:]
        results.setdefault(case.get("classname").rsplit(".", 1)[-1], {})[case.get("name")] = (outcome, message)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", list(PAIRS))
def test_every_applicable_mixin_test_passes_as_for_the_plain_pipeline(outcomes, pipeline):
    ours, control = outcomes[pipeline], outcomes[PAIRS[pipeline]]
    failed = {name: message for name, (outcome, message) in {**ours, **control}.items() if outcome == "failed"}
    assert not failed, f"{pipeline} / {PAIRS[pipeline]} failures:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items())
    for name, (outcome, message) in ours.items():
        if outcome == "skipped":
            assert any(word in message for word in ALLOWED_SKIPS), f"{name} skipped: {message}"
    # What the plain pipeline passes, ours passes too, or skips for one of those reasons.
    passed_or_skipped = {n for n, (o, _) in ours.items() if o in ("passed", "skipped")}
    assert passed_or_skipped >= {n for n, (o, _) in control.items() if o == "passed"}
    assert len(ours) >= (40 if pipeline in ("TestDynamicIDPipeline", "TestDynamicIDXLPipeline") else 1)  # collected
