"""`dynamicid-app` in a real headless Chromium (Debian's, driven by Playwright): tiny-random FAKE base, random FAKE
weights, real reference photos. The app runs as its own process on a free localhost port."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.cli import main as infer_main
from dynamicid.models.base import load_base_model
from dynamicid.testing import random_parts, save_random_weights

CHROMIUM = os.environ.get("DYNAMICID_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 240  # imports and model loading on a busy 2-core machine
RUN_TIMEOUT_MS = 120_000
MARKDOWN = "[data-testid=markdown]"  # a Markdown's text, without the "processing" line shown while it waits
APP_ENV = {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}  # one torch thread, as the CLI run below

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    parts = random_parts(load_base_model("tiny-random"), FaceAnalyzer("embedded"))
    return save_random_weights(parts, tmp_path_factory.mktemp("app-weights") / "dynamicid.safetensors")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(weights, folder) -> tuple[subprocess.Popen, str]:
    """`dynamicid-app` on a free port, its log in folder/app.log, uploads under folder/gradio; once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "dynamicid.app", "--base-model", "tiny-random", "--weights", str(weights)]
    command += ["--face-backend", "embedded", "--port", str(port), "--output-dir", str(folder / "outputs")]
    env = {**os.environ, **APP_ENV, "GRADIO_TEMP_DIR": str(folder / "gradio")}  # uploads stay in the test's folder
    (folder / "gradio").mkdir(exist_ok=True)
    with (folder / "app.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"dynamicid-app exited with {process.returncode}:\n{(folder / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"dynamicid-app did not answer on {url} in {START_TIMEOUT_S} s")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def app_url(weights, tmp_path_factory):
    process, url = start_app(weights, tmp_path_factory.mktemp("app"))
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        except Exception as error:  # a missing browser is a failure, never a skip
            pytest.fail(f"Chromium could not start from {CHROMIUM} (apt-get install chromium): {error}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#generate")
    yield page
    context.close()


def upload(page: Page, person: int, path) -> None:
    """Put `path` in person's reference field (clearing it first) and wait for the faces found in it."""
    field = f"#person{person}-reference"
    if page.locator(f"{field} button[aria-label='Clear']").count():
        page.locator(f"{field} button[aria-label='Clear']").click()
        wait_for_text(page, f"#person{person}-found", "")
    page.locator(f"{field} input[type=file]").set_input_files(str(path))
    wait_for_text(page, f"#person{person}-found", re.compile(r"\S"))


def wait_for_text(page: Page, elem: str, text: str | re.Pattern) -> str:
    """Wait until the Markdown `elem` shows `text` (a missing or hidden Markdown shows "")."""
    script = f"() => document.querySelector('{elem} {MARKDOWN}')?.innerText.trim() ?? ''"
    condition = text.search if isinstance(text, re.Pattern) else text.__eq__
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while not condition(shown := page.evaluate(script)):
        assert time.monotonic() < deadline, f"{elem} shows {shown!r}, not {text!r}"
        page.wait_for_timeout(100)
    return shown


def choose(page: Page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} [role=option][aria-label='{value}']").click()


def set_number(page: Page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def drag(page: Page, selector: str, dx: float, dy: float) -> None:
    box = page.locator(selector).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y + dy / 2)
    page.mouse.move(x + dx, y + dy)
    page.mouse.up()


def generate(page: Page) -> str:
    """Click Generate and wait for a new status line (each run's line names its own output folder)."""
    before = wait_for_text(page, "#status", re.compile(""))
    page.locator("#generate").click()
    return wait_for_text(page, "#status", re.compile(rf"^(?!{re.escape(before)}$)[\s\S]+$"))


def fetch(page: Page, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, url
    return response.body()


def test_two_people_in_drawn_boxes_match_the_cli(page, shared_faces, weights, tmp_path):
    obama = shared_faces / "identities" / "obama" / "obama.jpg"
    biden = shared_faces / "identities" / "biden" / "biden.jpg"
    upload(page, 1, obama)
    upload(page, 2, biden)
    assert "1 face found" in page.inner_text(f"#person1-found {MARKDOWN}")
    choose(page, "person1-expression", "happy")
    choose(page, "person2-expression", "surprised")
    set_number(page, "width", 96)
    set_number(page, "steps", 2)
    page.locator("#random-seed input").uncheck()
    page.locator("#seed input").fill("2025")
    page.wait_for_selector("#layout .layout-stage[style*='96 / 64']")
    drag(page, '#layout .layout-handle.tl[data-index="0"]', 30, 40)  # person 1: top-left corner in
    drag(page, '#layout .layout-handle.br[data-index="1"]', -30, -40)  # person 2: bottom-right corner in

    status = generate(page)
    assert status.startswith("Done: seed 2025, 96x64, 2 steps"), status
    page.screenshot(path=str(tmp_path / "generate-tab.png"), full_page=True)

    sidecar = json.loads(fetch(page, page.locator("#sidecar a").first.get_attribute("href")))
    boxes = sidecar["settings"]["saa"]["boxes"]
    first, second = boxes
    assert first[0] > 0 and first[1] > 0 and first[2:] == [1.0, 0.5], boxes  # moved corners only
    assert second[:2] == [0.0, 0.5] and second[2] < 1 and second[3] < 1, boxes
    legend = page.inner_text("#layout .layout-legend")
    assert all(f"{v:.2f}" in legend for box in boxes for v in box), legend
    assert [p["target_expression"] for p in sidecar["people"]] == ["happy", "surprised"]
    assert [p["reference"]["faces_found"] for p in sidecar["people"]] == [1, 1]
    assert sidecar["settings"]["seed"] == 2025 and sidecar["settings"]["activation_maps"]

    shown = np.asarray(Image.open(BytesIO(fetch(page, page.locator("#result-image img").get_attribute("src")))))
    assert shown.shape == (64, 96, 3)
    maps = page.locator("#activation-maps img")
    assert maps.count() == 2
    for k in range(2):
        assert Image.open(BytesIO(fetch(page, maps.nth(k).get_attribute("src")))).size == (96, 64)
    assert "person 1" in page.inner_text("#activation-maps") and "person 2" in page.inner_text("#activation-maps")

    # The same settings through `dynamicid-infer generate` give the same pixels
    args = ["generate", "--base-model", "tiny-random", "--weights", str(weights), "--face-backend", "embedded"]
    args += ["--prompt", sidecar["settings"]["prompt"], "--seed", "2025", "--steps", "2", "--size", "96x64"]
    for path, person in zip((obama, biden), sidecar["people"], strict=True):
        box = ",".join(repr(v) for v in person["requested"]["box"])
        args += ["--person", str(path), "--expression", person["requested"]["expression"], "--box", box]
    args += ["--activation-maps", "--out", str(tmp_path / "cli.png")]
    result = CliRunner().invoke(infer_main, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "cli.png")))


def test_no_face_shows_the_error_and_the_next_request_works(page, shared_faces):
    page.locator("#num-people label:has-text('1')").click()
    page.wait_for_selector("#person2-reference", state="hidden")
    set_number(page, "steps", 2)
    upload(page, 1, shared_faces / "broken" / "text_file_named.png")
    assert "cannot load image" in page.inner_text(f"#person1-found {MARKDOWN}")
    status = generate(page)
    assert "error" in status and "cannot load image" in status and "text_file_named.png" in status, status

    upload(page, 1, shared_faces / "no_face" / "dog.jpg")
    assert "no face found" in page.inner_text(f"#person1-found {MARKDOWN}")
    status = generate(page)
    assert "error" in status and "no face found in reference of person 1" in status, status
    assert "dog.jpg" in status

    upload(page, 1, shared_faces / "identities" / "obama" / "obama.jpg")
    status = generate(page)
    assert status.startswith("Done: seed "), status
    seed = int(status.removeprefix("Done: seed ").split(",")[0])
    assert page.locator("#seed input").input_value() == str(seed)  # the random seed used is shown
    assert page.locator("#result-image img").count() == 1 and page.locator("#activation-maps img").count() == 1


def post_upload(url: str, size: int) -> list[str]:
    """Upload `size` bytes as Gradio's file fields do; the paths the app stored them at."""
    boundary = "dynamicid-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + b"\0" * size
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}/gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow  # starts its own app (imports, models: about a minute on a busy 2-core machine)
def test_uploads_are_limited_kept_in_the_apps_folder_and_removed_when_it_stops(weights, tmp_path):
    process, url = start_app(weights, tmp_path)
    try:
        stored = post_upload(url, 1000)
        with pytest.raises(urllib.error.HTTPError) as refused:
            post_upload(url, 65 << 20)  # over the default --max-upload-mb 64
        assert refused.value.code == 413
        uploads = [p for p in (tmp_path / "gradio").iterdir() if p.name.startswith("dynamicid-app-uploads-")]
        assert len(uploads) == 1 and Path(stored[0]).is_relative_to(uploads[0]) and Path(stored[0]).is_file()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert list((tmp_path / "gradio").iterdir()) == []  # the upload and its folder removed
    finally:
        process.kill()
        process.wait()
