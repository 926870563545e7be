"""The pages a new user opens, in headless Chromium against a real stack: /docs without internet, the
leaderboard and a job's page with and without a key, a failed job's page, and the leaderboard's chart and table
layout (nice ticks, nothing outside the chart, no sideways scrolling at 1400 px)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.stack import ROOT, Stack

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
ARTIFACTS = ROOT / "test-artifacts"
SMALL = {"calib_size": 128, "val_samples": 200, "validate_top_k": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("pages"), backend="postgres", max_model_bytes=4 * 2**20)
    s.start(workers=1)
    yield s
    s.stop()


def submit(stack, method, budget, options=SMALL, model=RESNET, **form):
    with stack.client() as c:
        fields = {"method": method, "budget": json.dumps(budget), "options": json.dumps(options),
                  "data_name": "fashion-mnist", **{k: str(v).lower() for k, v in form.items()}}
        r = c.post("/jobs", data=fields, files={"model": (Path(model).name, Path(model).read_bytes())})
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def jobs(stack, tiny_model_path):
    """Two finished searches on ResNet-20 (one public) and a job on the tiny model that fails in the worker:
    a latency budget is checked only once the worker has measured the kernels, and no model runs in 1 µs."""
    public = submit(stack, "uniform", {"avg_wbits": 8}, public=True)
    private = submit(stack, "random", {"avg_wbits": 6}, {**SMALL, "params": {"count": 12}})
    failing = submit(stack, "uniform", {"latency_us": 1}, model=tiny_model_path)
    done = {name: stack.wait_job(j["id"], timeout=600)
            for name, j in (("public", public), ("private", private), ("failed", failing))}
    assert done["public"]["status"] == done["private"]["status"] == "succeeded", done
    assert done["failed"]["status"] == "failed" and done["failed"]["error"], done["failed"]
    return done


def _browser(width: int = 1400, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}",
                # No internet: every host name but the test server's address fails to resolve.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_window_size(width, height)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _wait(driver, predicate, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(predicate)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _fresh(driver, url: str, key: str | None = None) -> None:
    """Open `url` with the given key (or none) remembered in the browser."""
    driver.get(url.split("#")[0].rsplit("/", 1)[0] + "/health")
    driver.execute_script("localStorage.clear()")
    driver.get(url + (f"#key={key}" if key else ""))


def _resources(driver) -> list[str]:
    return driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")


@pytest.mark.parametrize("path, rendered", [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_without_internet(stack, browser, path, rendered):
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(stack.url + path)
    _wait(browser, lambda d: len(_css(d, rendered)) >= 5)
    entries = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.transferSize, e.responseStatus])")
    assert any(name.endswith("/openapi.json") for name, *_ in entries)
    outside = [e for e in entries if not e[0].startswith(stack.url + "/")]
    # ReDoc's bundle asks for its logo from a CDN; the page's content security policy must have blocked it.
    blocked = " ".join(m["message"] for m in browser.get_log("browser") if "Content Security Policy" in m["message"])
    assert all(size == status == 0 and name in blocked for name, size, status in outside), (outside, blocked)
    if path == "/docs":
        assert not outside
        text = _css(browser, "#swagger-ui")[0].text
        assert "/jobs/{job_id}" in text and "/api/leaderboard" in text
