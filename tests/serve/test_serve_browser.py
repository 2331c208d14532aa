"""`proalign serve` driven in a real browser (Debian's headless chromium through chromedriver),
with every host but 127.0.0.1 unresolvable: the page must work with no network.

By default it serves the trained tiny model; `PROALIGN_SERVE_MODEL` (a run folder or model file)
and `PROALIGN_SERVE_IMAGES` (a folder) point it at another, e.g. the demo's run and drawings.
The screenshot goes to the test's folder, or to `PROALIGN_SERVE_SCREENSHOT` when set."""
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server",
                 "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page_server(trained, tmp_path, start_server):
    """(base URL, model, index, folder, labels) of a served model."""
    from proalign.loading import load
    from proalign.search import build_index
    from proalign.serve import ServeSettings
    from proalign.serve.app import SearchService
    folder = tmp_path / "images"
    if os.environ.get("PROALIGN_SERVE_MODEL"):
        model, _, _ = load(os.environ["PROALIGN_SERVE_MODEL"], "cpu")
        shutil.copytree(os.environ["PROALIGN_SERVE_IMAGES"], folder)
        labels = None
    else:
        model = trained["model"]
        shutil.copytree(trained["folder"], folder)
        labels = trained["names"]
    index, _ = build_index(model, folder, progress=False)
    with start_server(SearchService(model, index, ServeSettings(), "the model under test")) as base:
        yield base, model, index, folder, labels


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition)


def _hits(driver, container):
    return [(f.get_attribute("data-path"), float(f.get_attribute("data-score")))
            for f in driver.find_elements("css selector", f"#{container} figure.hit")]


def _text_query(driver, query):
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "search").click()
    _wait(driver, lambda d: query in d.find_element(By.ID, "text-status").text)
    return _hits(driver, "results")


def test_the_page_answers_queries_uploads_and_switches_towers(browser, page_server, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from proalign.search import search
    base, model, index, folder, labels = page_server
    browser.get(base + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")

    # a German and a Chinese query: the same top-5, in the same order, as `proalign search`
    for query in ("ein rotes Herz", "一只猫在桌子上"):
        shown = _text_query(browser, query)
        expected = search(model, index, [query], 5)[0]
        assert [path for path, _ in shown] == [h.path for h in expected]
        assert [score for _, score in shown] == pytest.approx([h.score for h in expected], abs=1e-3)
    loaded = browser.execute_script(
        "return [...document.images].filter(i => i.closest('#results')).map(i => i.naturalWidth)")
    assert len(loaded) == 5 and all(width > 0 for width in loaded)  # the thumbnails arrived

    # the CLIP text tower, where the file has one: the same index, another text tower
    browser.find_element(By.ID, "tower-clip").click()
    shown = _text_query(browser, "a red heart")
    assert "(clip tower)" in browser.find_element(By.ID, "text-status").text
    clip_scores = (model.encode_text_clip(["a red heart"]).float().cpu() @ index.embeddings.T)[0]
    assert shown[0][1] == pytest.approx(float(clip_scores.max()), abs=1e-3)
    browser.find_element(By.ID, "tower-llm").click()

    # an uploaded image: itself first among its neighbours; its own name the best label
    picked = sorted(index.paths)[min(3, len(index.paths) - 1)]
    if labels:
        browser.find_element(By.ID, "labels").send_keys("\n".join(labels))
    browser.find_element(By.ID, "upload").send_keys(str(folder / picked))
    _wait(browser, lambda d: "nearest images" in d.find_element(By.ID, "image-status").text)
    neighbours = _hits(browser, "neighbours")
    assert neighbours[0][0] == picked and neighbours[0][1] == pytest.approx(1.0, abs=1e-3)
    if labels:
        best = browser.find_elements(By.CSS_SELECTOR, "#label-results li.label")[0].get_attribute("data-label")
        assert best == labels[int(Path(picked).stem)]

    # nothing came from anywhere but the server
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {base}

    shot = Path(os.environ.get("PROALIGN_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    browser.find_element(By.ID, "query").clear()
    _text_query(browser, "ein rotes Herz")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nscreenshot: {shot}")


def test_a_name_that_looks_like_html_is_shown_as_text(browser, page_server):
    from selenium.webdriver.common.by import By
    base, model, index, folder, labels = page_server
    browser.get(base + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    payload = "<img src=x onerror=document.title='owned'>"
    browser.find_element(By.ID, "query").send_keys(payload)
    browser.find_element(By.ID, "search").click()
    _wait(browser, lambda d: payload in d.find_element(By.ID, "text-status").text)
    assert browser.title == "proalign search"
    assert not browser.find_elements(By.CSS_SELECTOR, "#text-status img")
