"""The page in a real browser (headless Debian Chromium through selenium): previews, bit-exact images, uploads.

It needs `apt-get install chromium chromium-driver` and `pip install selenium`; without them it FAILS
with a sentence saying so (it never skips). It takes a screenshot of the page mid-denoising; with
MINIDIFFUSION_WRITE_DOCS=1 in the environment it writes it to docs/serve.png, which the README and
docs/serve.md show (otherwise into the test's temporary folder, so a test run leaves the tree clean). To
take that picture at a chosen step the shipped fmnist network is wrapped so that it waits at one call
until the test has its screenshot: the images it makes are the shipped model's, bit for bit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.data.images import float_to_uint8
from minidiffusion.pipelines.image import DiffusionModel
from minidiffusion.pipelines.outputs import load_image
from minidiffusion.pipelines.text_to_image import TextToImage
from minidiffusion.serve.server import BackgroundServer, build_app, model_sources

DOCS = Path(__file__).resolve().parents[1] / "docs"
STEPS, PAUSE_AT, N, SEED = 24, 10, 10, 7


def _browser():
    """Return (selenium's webdriver module, chromium path, chromedriver path), or FAIL naming what to install."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install selenium (it is in the dev extra)", pytrace=False)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if path is None]
    if missing:
        pytest.fail(f"the browser test needs Debian's {' and '.join(missing)}: apt-get install chromium "
                    "chromium-driver (make system-packages installs them)", pytrace=False)
    return webdriver, chromium, driver


class Pausable(torch.nn.Module):
    """A network that, at its `at`-th call, waits until `resume` is set (and sets `paused`): a step to photograph."""

    def __init__(self, net: torch.nn.Module, at: int):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0
        self.paused, self.resume = threading.Event(), threading.Event()

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.paused.set()
            assert self.resume.wait(60), "the test never resumed the network"
        return self.net(*args, **kwargs)


def _wait(cond, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _pixels(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    webdriver, chromium, chromedriver = _browser()
    from selenium.webdriver.chrome.service import Service

    import test_serve

    run = tmp_path_factory.mktemp("browser") / "tiny-t2i"
    test_serve.save_t2i_run(run)
    fmnist = DiffusionModel.from_pretrained("fmnist")
    net = Pausable(fmnist.net, PAUSE_AT)
    fmnist.net = net
    models = {"fmnist": lambda: fmnist, **{k: v for k, v in model_sources([run]).items() if k != "fmnist"}}
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,860", "--hide-scrollbars",
                f"--user-data-dir={tempfile.mkdtemp(prefix='minidiffusion-chromium-')}"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    with BackgroundServer(build_app(models)) as url:
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
        try:
            driver.get(url)
            yield driver, url, net, run
        finally:
            driver.quit()


def _set(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def _state(driver) -> str:
    return driver.execute_script("return document.getElementById('status').dataset.state")


def _finals(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#tiles img.final')].map(i => i.src)")


def test_the_page_streams_previews_then_the_images_sample_makes(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, url, net, _ = page
    _wait(lambda: driver.execute_script("return document.getElementById('model').options.length"), what="models")
    assert driver.title == "minidiffusion"
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url) for r in resources), resources  # no CDN, no external font
    assert Select(driver.find_element(By.ID, "model")).first_selected_option.text == "fmnist"
    labels = [o.text for o in Select(driver.find_element(By.ID, "label")).options]
    assert labels[0] == "all classes (balanced)" and labels[8] == "Sneaker"  # read from /api/models
    assert not driver.find_element(By.ID, "prompt").is_displayed()

    # a bad value: the server's sentence on the page, and the page goes on
    _set(driver, "steps", "0")
    driver.find_element(By.ID, "generate").click()
    _wait(lambda: driver.find_element(By.ID, "error").is_displayed(), what="the error")
    assert driver.find_element(By.ID, "error").text == "steps must be an integer in 1..1000, got 0"

    # class-conditional, one image per class; the network waits at step PAUSE_AT for the screenshot
    for field, value in (("steps", str(STEPS)), ("n", str(N)), ("seed", str(SEED)), ("preview_every", "1")):
        _set(driver, field, value)
    driver.find_element(By.ID, "generate").click()
    assert net.paused.wait(60), "the generation did not reach the paused step"
    _wait(lambda: f"step {PAUSE_AT - 1} of {STEPS}" in driver.find_element(By.ID, "status").text,
          what="the previews before the pause")
    assert _state(driver) == "denoising" and not _finals(driver)
    previews = driver.execute_script("return [...document.querySelectorAll('#tiles img')].map(i => i.src)")
    assert len(previews) == N and all(p.startswith("data:image/png") for p in previews)  # shown before the final
    shot = DOCS / "serve.png" if os.environ.get("MINIDIFFUSION_WRITE_DOCS") == "1" else tmp_path / "serve.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    net.resume.set()
    _wait(lambda: _state(driver) == "done", what="the final images")
    log = driver.execute_script("return window.minidiffusionLog")
    assert log == ["queued", "start", *["preview"] * STEPS, "done"], log

    settings = json.loads(driver.find_element(By.ID, "settings-out").text)
    assert settings["label"] is None and settings["seed"] == SEED and settings["steps"] == STEPS
    x, ids = DiffusionModel.from_pretrained("fmnist").sample(N, sampler=settings["sampler"], steps=STEPS,
                                                             guidance=settings["guidance"], seed=SEED,
                                                             precision=settings["precision"])
    finals = _finals(driver)
    assert len(finals) == N
    for k, src in enumerate(finals):
        assert np.array_equal(_pixels(src), float_to_uint8(x[k])[0].numpy()), k
    captions = driver.execute_script("return [...document.querySelectorAll('#tiles figcaption')]"
                                     ".map(c => c.textContent)")
    assert captions[7] == "Sneaker"
    links = driver.execute_script("return Object.fromEntries([...document.querySelectorAll('#downloads a')]"
                                  ".map(a => [a.download, a.href]))")
    npz = links[f"minidiffusion-fmnist-seed{SEED}.npz"]
    with np.load(io.BytesIO(base64.b64decode(npz.split(",", 1)[1]))) as f:
        assert np.array_equal(f["images"], x.numpy()) and np.array_equal(f["labels"], ids.numpy())
    assert set(links) == {f"minidiffusion-fmnist-seed{SEED}.{ext}" for ext in ("png", "npz", "json")}
    strip = driver.find_elements(By.CSS_SELECTOR, "#filmstrip .strip")
    assert len(strip) == N and len(strip[0].find_elements(By.TAG_NAME, "img")) == 11  # 10 steps + the final


def test_text_to_image_with_an_upload_and_a_random_seed(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, _, _, run = page
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("tiny-t2i")
    assert driver.find_element(By.ID, "prompt").is_displayed()
    assert not driver.find_element(By.ID, "label").is_displayed()
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(init)
    driver.find_element(By.ID, "prompt").send_keys("a red car")
    driver.find_element(By.ID, "init_image").send_keys(str(init))
    driver.execute_script("const s = document.getElementById('strength'); s.value = '0.5';"
                          "s.dispatchEvent(new Event('input'));")
    for field, value in (("steps", "4"), ("n", "2"), ("guidance", "2")):
        _set(driver, field, value)
    driver.find_element(By.ID, "random-seed").click()  # a new seed, shown in the field, and generate
    _wait(lambda: _state(driver) == "done", what="the text-to-image result")
    seed = int(driver.find_element(By.ID, "seed").get_attribute("value"))
    settings = json.loads(driver.find_element(By.ID, "settings-out").text)
    assert settings["seed"] == seed and settings["strength"] == 0.5 and settings["prompt"] == "a red car"
    # 4 steps x strength 0.5: two previews, both before the final images
    assert driver.execute_script("return window.minidiffusionLog") == ["queued", "start", "preview", "preview", "done"]
    strip = driver.find_elements(By.CSS_SELECTOR, "#filmstrip .strip")
    assert len(strip) == 2 and len(strip[0].find_elements(By.TAG_NAME, "img")) == 3  # the 2 previews + the final
    pipe = TextToImage.from_run(run)
    x = pipe("a red car", n=2, guidance=2.0, steps=4, sampler=settings["sampler"], seed=seed,
             init_image=load_image(init, 16), strength=0.5, precision=settings["precision"])
    finals = _finals(driver)
    assert len(finals) == 2
    for k, src in enumerate(finals):
        assert np.array_equal(_pixels(src), float_to_uint8(x[k]).permute(1, 2, 0).numpy()), k


def test_a_sound_model_plays_in_the_page_and_a_schedule_can_be_chosen(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, _, _, _ = page
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("tiny-t2i")
    assert not driver.find_element(By.ID, "schedule").is_displayed()  # text-to-image: the model's own sigmas
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("instruments")
    schedule = Select(driver.find_element(By.ID, "schedule"))
    assert [o.text for o in schedule.options] == ["the model's own", "karras", "exponential", "cosine", "auto"]
    schedule.select_by_visible_text("exponential")
    Select(driver.find_element(By.ID, "label")).select_by_visible_text("piano")
    for field, value in (("steps", "2"), ("n", "1"), ("seed", "4"), ("preview_every", "1")):
        _set(driver, field, value)
    driver.find_element(By.ID, "generate").click()
    _wait(lambda: _state(driver) == "done", what="the sound")
    assert driver.execute_script("return window.minidiffusionLog") == ["queued", "start", "preview", "preview", "done"]
    settings = json.loads(driver.find_element(By.ID, "settings-out").text)
    assert settings["schedule"] == "exponential" and settings["label"] == "piano"
    players = driver.find_elements(By.CSS_SELECTOR, "#tiles audio")
    assert len(players) == 1 and players[0].get_attribute("src").startswith("data:audio/wav;base64,")
    _wait(lambda: driver.execute_script("return document.querySelector('#tiles audio').readyState") >= 1,
          what="the player to read the WAV")
    seconds = driver.execute_script("return document.querySelector('#tiles audio').duration")
    assert 1.0 < seconds < 10.0, seconds  # the browser decoded a clip of a few seconds
    assert "--schedule exponential" in driver.find_element(By.ID, "command").text
    assert "samples.wav" in driver.find_element(By.ID, "command").text


def test_an_upscaler_shows_only_its_controls_and_doubles_the_upload(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, _, _, _ = page
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("photos-sr2")
    for hidden in ("guidance", "steps", "sampler", "n", "seed", "label", "prompt", "strength"):
        assert not driver.find_element(By.ID, hidden).is_displayed(), hidden
    assert driver.find_element(By.ID, "init-image-label").text == "Image to upscale"
    init = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(init)
    driver.find_element(By.ID, "init_image").send_keys(str(init))
    driver.find_element(By.ID, "generate").click()
    _wait(lambda: _state(driver) == "done", what="the upscaled image")
    assert driver.execute_script("return window.minidiffusionLog") == ["queued", "start", "done"]
    finals = _finals(driver)
    assert len(finals) == 1 and _pixels(finals[0]).shape == (60, 80, 3)
    settings = json.loads(driver.find_element(By.ID, "settings-out").text)
    assert settings["model"] == "photos-sr2" and "guidance" not in settings
    assert "minidiffusion upscale init.png" in driver.find_element(By.ID, "command").text
    driver.find_element(By.ID, "clear-init").click()
