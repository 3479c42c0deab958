"""The playground page (GET /) and Swagger UI (GET /docs) in a real browser: Playwright driving the system Chromium
(Debian's `chromium`; .ci/run installs it) against the real BentoML server on loopback, holding two classifiers.

FVGPT_PLAYGROUND_SCREENSHOT=PATH saves the page after a classification there (docs/images/playground.png is made so).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fvgpt.photos import photo_paths
from serving_support import Server, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs the system Chromium: apt-get install -y chromium (.ci/run does)")
TIMEOUT_MS = 60_000
KEY = "playground-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def server(tiny_explain_bundle, tiny_zero_shot_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    shutil.copytree(tiny_explain_bundle, root / "repo" / "shapes" / "1")
    shutil.copytree(tiny_zero_shot_bundle, root / "repo" / "pets" / "1")
    s = Server(root / "repo", root / "server.log", repository=True, FVGPT_POLL_S="0", FVGPT_API_KEY=KEY)
    with running(s):
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server.url, "data:", "blob:"))
            else None)
    yield page
    page.close()
    assert not outside, f"the page fetched from other hosts: {outside}"  # it must work offline


def open_page(page, server) -> None:
    """The playground, its key given when it asks for it (the server has one), the classifiers listed."""
    page.goto(server.url + "/")
    page.wait_for_selector("#keybox:not([hidden])")  # GET /models answered 401: the page asks for the key
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_selector("#models input")


def classify_in_page(page, files: list[Path]) -> None:
    page.set_input_files("#files", [str(f) for f in files])
    page.click("#go")
    page.wait_for_function("document.querySelector('.image') || !document.querySelector('#error').hidden")


def test_the_page_classifies_an_image_and_draws_its_heatmap(page, server):
    open_page(page, server)
    refs = page.eval_on_selector_all("#models input", "els => els.map(e => e.value)")
    assert refs == ["pets", "shapes"] and page.is_checked("#models input[value=pets]")  # the first is ticked
    page.uncheck("#models input[value=pets]")
    page.check("#models input[value=shapes]")
    photo = photo_paths()[1]
    classify_in_page(page, [photo])
    first = "shapes"
    direct = server.post("/classify", files=[("images", (photo.name, photo.read_bytes()))],
                         data={"model": first}, headers=AUTH).json()["results"][0]
    shown = page.eval_on_selector_all(".image .bar .name", "els => els.map(e => e.textContent)")
    assert shown == [p["label"] for p in direct["predictions"]]
    assert page.inner_text(".classifier h3").startswith(f"{first}@1")
    heat = page.wait_for_selector("img.heatmap")
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", heat)
    caption = page.inner_text(".image figcaption")
    assert first in caption and direct["predictions"][0]["label"] in caption
    if target := os.environ.get("FVGPT_PLAYGROUND_SCREENSHOT"):
        page.screenshot(path=target, full_page=True)


def test_a_classifier_picked_from_the_list_is_used(page, server):
    open_page(page, server)
    page.check("#models input[value=pets]")
    page.uncheck("#models input[value=shapes]")
    classify_in_page(page, [photo_paths()[0]])
    assert page.inner_text(".classifier h3").startswith("pets@1")
    assert sorted(page.eval_on_selector_all(".image .bar .name", "els => els.map(e => e.textContent)")) == \
        ["cat", "dog", "rocket"]
    assert "no heatmap" in page.inner_text(".image figcaption")  # pets has no explain graph: the page says so
    assert "fvgpt export --explain" in page.inner_text(".image figcaption")


def test_a_non_image_shows_the_servers_error(page, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not an image at all")
    expected = server.post("/classify", files=[("images", ("notes.txt", text.read_bytes()))],
                           data={"model": "shapes"}, headers=AUTH).json()["error"]
    open_page(page, server)
    page.uncheck("#models input[value=pets]")
    page.check("#models input[value=shapes]")
    classify_in_page(page, [text])
    assert page.is_visible("#error") and page.inner_text("#error") == expected
    assert "is not an image" in expected


@pytest.mark.parametrize("content_type", ["multipart/form-data", "application/json"])
def test_swagger_try_it_out_works_with_its_defaults(page, server, content_type):
    """Swagger UI at /docs, POST /classify, Try it out, only a file attached (multipart) or the example body as it
    is (JSON), Execute: a 200 with results (no "null" strings sent for the fields left alone)."""
    page.goto(server.url + "/docs")
    page.click("button.authorize")  # the server has a key: Swagger UI's Authorize, the X-API-Key scheme
    scheme = page.locator(".auth-container").filter(has_text="X-API-Key")
    scheme.locator("input").fill(KEY)
    scheme.locator("button.authorize").click()
    page.click("button.btn-done")
    op = page.locator("#operations-Service_APIs-post_classify")
    op.locator(".opblock-summary").click()
    op.locator("button.try-out__btn").click()
    op.locator("select.content-type").first.select_option(content_type)
    if content_type == "multipart/form-data":  # every other field as Swagger UI fills it: "Send empty value" ticked
        op.locator("tr[data-property-name=images] button.json-schema-form-item-add").click()
        op.locator("tr[data-property-name=images] input[type=file]").set_input_files(str(photo_paths()[0]))
        op.locator("tr[data-property-name=model] input[type=text]").fill("shapes")  # a repository needs one named
    else:
        body = op.locator("textarea.body-param__text")
        body.fill(body.input_value().rstrip().rstrip("}") + ', "model": "shapes"}')
    op.locator("button.execute").click()
    status = op.locator(".live-responses-table .response .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "200", op.locator(".live-responses-table").inner_text()
    answer = op.locator(".live-responses-table .highlight-code").first.inner_text()
    assert '"results"' in answer and '"null"' not in answer  # no field left alone was sent as the string "null"
