"""The pages a new user opens, in headless Chromium against a real stack: /docs without internet, the
leaderboard and a job's page with and without a key, a failed job's page, an sqnr job's sensitivity heatmap, and
the leaderboard's chart and table layout (nice ticks, nothing outside the chart, no sideways scrolling at 1400 px)."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC
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
        fields = {
            "method": method,
            "budget": json.dumps(budget),
            "options": json.dumps(options),
            "data_name": "fashion-mnist",
            **{k: str(v).lower() for k, v in form.items()},
        }
        r = c.post("/jobs", data=fields, files={"model": (Path(model).name, Path(model).read_bytes())})
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def jobs(stack):
    """Two finished searches on ResNet-20 (one public) and one that fails in the worker: a latency budget is
    checked only once the worker has measured the kernels, and no model runs in 1 µs."""
    public = submit(stack, "uniform", {"avg_wbits": 8}, public=True)
    private = submit(stack, "random", {"avg_wbits": 6}, {**SMALL, "params": {"count": 12}})
    failing = submit(stack, "uniform", {"latency_us": 1})
    done = {
        name: stack.wait_job(j["id"], timeout=600)
        for name, j in (("public", public), ("private", private), ("failed", failing))
    }
    assert done["public"]["status"] == done["private"]["status"] == "succeeded", done
    assert done["failed"]["status"] == "failed" and done["failed"]["error"], done["failed"]
    return done


def _browser(width: int = 1400, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        # No internet: every host name but the test server's address fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--lang=en-US",
    ):
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
        "return performance.getEntriesByType('resource').map(e => [e.name, e.transferSize, e.responseStatus])"
    )
    assert any(name.endswith("/openapi.json") for name, *_ in entries)
    outside = [e for e in entries if not e[0].startswith(stack.url + "/")]
    # ReDoc's bundle asks for its logo from a CDN; the page's content security policy must have blocked it.
    blocked = " ".join(m["message"] for m in browser.get_log("browser") if "Content Security Policy" in m["message"])
    assert all(size == status == 0 and name in blocked for name, size, status in outside), (outside, blocked)
    if path == "/docs":
        assert not outside
        text = _css(browser, "#swagger-ui")[0].text
        assert "/jobs/{job_id}" in text and "/api/leaderboard" in text


def test_leaderboard_without_a_key_says_only_public_jobs_are_shown(stack, jobs, browser):
    _fresh(browser, stack.url + "/leaderboard")
    _wait(browser, lambda d: _css(d, "table.board tbody tr"))
    notice = _css(browser, "#public-only")[0].text
    assert "only public jobs are shown" in notice and "API key" in notice and "#key=" in notice
    assert {a.get_attribute("href").rsplit("/", 1)[-1] for a in _css(browser, "table.board td a[href*='/jobs/']")} == {
        jobs["public"]["id"]
    }
    _css(browser, "#public-only button")[0].click()
    assert browser.execute_script("return document.activeElement.id") == "key-input"
    # With a key, the notice goes and the owner's private job appears.
    _fresh(browser, stack.url + "/leaderboard", stack.keys["alice"])
    _wait(browser, lambda d: _css(d, "table.board tbody tr"))
    assert not _css(browser, "#public-only")
    assert {jobs["public"]["id"], jobs["private"]["id"]} <= {
        a.get_attribute("href").rsplit("/", 1)[-1] for a in _css(browser, "table.board td a[href*='/jobs/']")
    }


def test_job_page_without_a_key_asks_for_one(stack, jobs, browser):
    job = jobs["private"]
    _fresh(browser, f"{stack.url}/leaderboard/jobs/{job['id']}")
    _wait(browser, lambda d: _css(d, "#need-key"))
    text = browser.find_element("tag name", "body").text
    assert "not public" in text and "enter your API key" in text and "no job with id" not in text.lower()
    assert browser.execute_script("return document.activeElement.id") == "key-input"
    # Entering the key in the box shows the job.
    _css(browser, "#key-input")[0].send_keys(stack.keys["alice"] + "\n")
    _wait(browser, lambda d: "succeeded" in _css(d, "#status")[0].text)
    assert not _css(browser, "#need-key") and "random" in _css(browser, "#summary")[0].text
    # Another owner's key: the job stays hidden, and the page says why.
    _fresh(browser, f"{stack.url}/leaderboard/jobs/{job['id']}", stack.keys["bob"])
    _wait(browser, lambda d: _css(d, "#not-found"))


@pytest.fixture(scope="module")
def sqnr_job(stack):
    """A finished sqnr search of bob's (private, so the leaderboard tests, run with alice's key, never see it)."""
    options = {**SMALL, "params": {"sweep_points": 0, "relinearize": 0}}
    r = stack.post_job("sqnr", {"avg_wbits": 3}, options, RESNET, owner="bob")
    assert r.status_code == 202, r.text
    with stack.client("bob") as c:
        deadline = time.time() + 600  # (stack.wait_job reads the job with alice's key)
        while (done := c.get(r.headers["Location"]).json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, done
            time.sleep(0.5)
    assert done["status"] == "succeeded", done
    return done


# Each heatmap cell: its layer, kind, width, whether it is marked chosen, its colour and whether it lies inside the
# chart; and whether the page scrolls sideways.
HEATMAP = """
const svg = document.querySelector('#sensitivity-chart'), box = svg.getBoundingClientRect();
const inside = b => b.left >= box.left - 0.5 && b.right <= box.right + 0.5 && b.top >= box.top - 0.5
  && b.bottom <= box.bottom + 0.5;
return {
  cells: [...svg.querySelectorAll('rect.cell')].map(r => [r.dataset.layer, r.dataset.kind, +r.dataset.bits,
    r.classList.contains('chosen'), r.getAttribute('fill'), inside(r.getBoundingClientRect())]),
  textOutside: [...svg.querySelectorAll('text')].filter(t => !inside(t.getBoundingClientRect()))
    .map(t => t.textContent),
  pageScrolls: document.documentElement.scrollWidth > document.documentElement.clientWidth,
};
"""


def _brightness(fill: str) -> int:
    """r + g + b of a cell's fill: "rgb(r,g,b)", or white (a damage of 0, each layer's least)."""
    return 3 * 255 if fill == "#fff" else sum(map(int, fill.removeprefix("rgb(").removesuffix(")").split(",")))


def test_job_page_charts_the_sensitivity_report(stack, jobs, sqnr_job, browser):
    with stack.client("bob") as c:
        report = c.get(f"/jobs/{sqnr_job['id']}/sensitivity").json()
        cands = c.get(f"/jobs/{sqnr_job['id']}/candidates").json()
        recommended = c.get(f"/candidates/{next(x['id'] for x in cands if x['recommended'])}").json()
    _fresh(browser, f"{stack.url}/leaderboard/jobs/{sqnr_job['id']}", stack.keys["bob"])
    _wait(browser, lambda d: _css(d, "#sensitivity-chart rect.cell"))
    assert _css(browser, "#sensitivity-section")[0].is_displayed()
    chart = browser.execute_script(HEATMAP)
    layers = [row["layer"] for row in report["layers"]]
    # One cell per layer and weight width (activations kept at 8 bits: no activation columns), every one drawn
    # inside the chart, and the recommended candidate's width outlined in each row.
    assert sorted((layer, bits) for layer, kind, bits, *_ in chart["cells"]) == sorted(
        (layer, b) for layer in layers for b in range(2, 9)
    )
    assert {kind for _, kind, *_ in chart["cells"]} == {"w"} and all(cell[5] for cell in chart["cells"])
    assert {layer: bits for layer, _, bits, chosen, *_ in chart["cells"] if chosen} == recommended["w_bits"]
    assert chart["textOutside"] == [] and not chart["pageScrolls"]
    # Where the search's time went, and its measurement passes, as the job's timings say.
    (pass_,) = sqnr_job["timings"]["measurement"][:1]
    timings = _css(browser, "#timings")[0].text
    assert "time: " in timings and f"{pass_['computed']} chunk(s) computed here" in timings
    # The colours follow the damage: each layer's narrowest width is drawn darker than its widest.
    brightness = {(layer, bits): _brightness(f) for layer, _, bits, _, f, _ in chart["cells"]}
    assert all(brightness[(layer, 2)] < brightness[(layer, 8)] for layer in layers)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "job-sensitivity.png"))
    # The CSV link fetches the report's CSV with the page's key.
    _css(browser, "#sensitivity-csv")[0].click()
    _wait(browser, lambda d: any(n.endswith("/sensitivity?format=csv") for n in _resources(d)))

    # A method that measures no sensitivity: the page asks once, hears 409, and shows no section.
    _fresh(browser, f"{stack.url}/leaderboard/jobs/{jobs['private']['id']}", stack.keys["alice"])
    _wait(browser, lambda d: any(n.endswith("/sensitivity") for n in _resources(d)) and _css(d, "#candidates table"))
    time.sleep(0.5)  # the answer has arrived; give the page the moment it would take to draw a chart
    assert not _css(browser, "#sensitivity-section")[0].is_displayed() and not _css(browser, "#sensitivity-chart")


def test_failed_job_page_shows_the_failure_not_progress(stack, jobs, browser):
    job = jobs["failed"]
    _fresh(browser, f"{stack.url}/leaderboard/jobs/{job['id']}", stack.keys["alice"])
    _wait(browser, lambda d: _css(d, "#status") and _css(d, "#status")[0].text == "failed")
    assert _css(browser, "#error")[0].text == job["error"] and "infeasible" in job["error"]
    body = browser.find_element("tag name", "body").text
    assert "loading" not in body and "(0/0)" not in body
    assert not _css(browser, "#bar")[0].is_displayed()
    assert "failed before finding any" in _css(browser, "#candidates")[0].text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "job-failed.png"))


def _is_nice(values: list[float]) -> bool:
    steps = [b - a for a, b in zip(values, values[1:])]
    step = steps[0]
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    return (
        all(math.isclose(s, step, rel_tol=1e-6) for s in steps)
        and any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5))
        and all(math.isclose(v / step, round(v / step), abs_tol=1e-6) for v in values)
    )


# Everything in the chart that lies outside it, tick labels that touch a marker, and markers outside the axes.
CHART_PROBLEMS = """
const svg = document.querySelector('svg.chart'), box = svg.getBoundingClientRect();
const inside = (b, o) => b.left >= o.left - 0.5 && b.right <= o.right + 0.5
  && b.top >= o.top - 0.5 && b.bottom <= o.bottom + 0.5;
const meet = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
const texts = [...svg.querySelectorAll('text')], labels = [...svg.querySelectorAll('text.tick')];
const points = [...svg.querySelectorAll('.point')];
const xAxis = svg.querySelector('line.axis.x').getBoundingClientRect();
const yAxis = svg.querySelector('line.axis.y').getBoundingClientRect();
return {
  outside: texts.filter(t => !inside(t.getBoundingClientRect(), box)).map(t => t.textContent),
  touching: points.filter(p => labels.some(l => meet(p.getBoundingClientRect(), l.getBoundingClientRect()))).length,
  offAxes: points.filter(p => {
    const b = p.getBoundingClientRect(); return b.left < yAxis.right || b.bottom > xAxis.top;
  }).length,
};
"""


def test_leaderboard_chart_and_table_fit(stack, jobs):
    driver = _browser(1400, 900)
    try:
        _fresh(driver, stack.url + "/leaderboard", stack.keys["alice"])
        _wait(driver, lambda d: _css(d, "table.board tbody tr") and _css(d, "svg.chart .point"))
        for axis in ("x", "y"):
            values = [float(t.get_attribute("data-value")) for t in _css(driver, f"svg.chart text.tick.{axis}")]
            assert len(values) >= 3 and _is_nice(values), (axis, values)
        assert driver.execute_script(CHART_PROBLEMS) == {"outside": [], "touching": 0, "offAxes": 0}

        # One marker shape per method, a legend naming each, and the front drawn over the rest.
        shapes = driver.execute_script("""const s = {}; for (const p of document.querySelectorAll('svg.chart .point'))
            (s[p.dataset.method] = s[p.dataset.method] || new Set())
                .add(p.getAttribute('d').replace(/[-0-9.\\s]+/g, ''));
            return Object.fromEntries(Object.entries(s).map(([m, v]) => [m, [...v]]));""")
        assert set(shapes) == {"uniform", "random"} and all(len(v) == 1 for v in shapes.values())
        assert shapes["uniform"] != shapes["random"]
        legend = _css(driver, ".legend")[0].text
        assert "uniform" in legend and "random" in legend and "Pareto front" in legend
        front = [p.get_attribute("data-front") == "1" for p in _css(driver, "svg.chart .point")]
        assert any(front) and front == sorted(front)

        # The table fits the window; bold rows are explained; no row claims a validation that will not come.
        assert driver.execute_script(
            "const w = document.querySelector('.table-wrap');"
            "return w.scrollWidth <= w.clientWidth"
            " && document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
        assert "Bold rows: on the accuracy-vs-size Pareto front" in _css(driver, ".table-note")[0].text
        statuses = {td.text for td in _css(driver, "table.board tbody tr td:nth-child(3)")}
        assert statuses == {"not selected for validation"}, statuses
        bits = _css(driver, "button.bits-toggle")[0]
        bits.click()
        _wait(driver, lambda d: _css(d, "table.board tr.bits"))
        assert "layers" in _css(driver, "table.board tr.bits")[0].text
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "leaderboard-1400.png"))

        driver.set_window_size(560, 900)
        _fresh(driver, stack.url + "/leaderboard", stack.keys["alice"])
        _wait(driver, lambda d: _css(d, "svg.chart .point"))
        assert driver.execute_script(CHART_PROBLEMS)["outside"] == []
        # Narrow windows scroll the table in its own box, not the page.
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
        driver.save_screenshot(str(ARTIFACTS / "leaderboard-560.png"))
    finally:
        driver.quit()


def test_validation_states_say_why_a_candidate_has_no_validation():
    from datetime import datetime, timedelta

    from api.routes.leaderboard import QUEUEING_GRACE_S, _validation_states
    from store.models import CandidateRecord, Job, ValidationRecord

    now = datetime.now(UTC)

    def front(top_k, finished_ago_s, records=()):
        job = Job(validate_top_k=top_k, finished_at=now - timedelta(seconds=finished_ago_s))
        cands = [CandidateRecord(id=i, val_top1=acc, val_sqnr_db=None) for i, acc in enumerate((0.9, 0.8, 0.7))]
        for i, status in records:
            cands[i].validation = ValidationRecord(status=status)
        return _validation_states(job, cands, now)

    # The job's two most accurate are about to be queued; the third never will be.
    assert front(2, 5) == {0: "pending", 1: "pending", 2: "not selected"}
    # Once a job's validations are queued, a candidate without one was not chosen.
    assert front(2, 5, [(0, "running"), (1, "queued")]) == {0: "running", 1: "queued", 2: "not selected"}
    assert front(2, 5, [(0, "succeeded")]) == {0: "succeeded", 1: "not selected", 2: "not selected"}
    assert front(0, 5) == {0: "not selected", 1: "not selected", 2: "not selected"}
    # Long after the search, nothing is coming: the workers could not validate.
    assert front(2, QUEUEING_GRACE_S + 1) == {0: "not validated", 1: "not validated", 2: "not selected"}
