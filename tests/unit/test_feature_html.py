"""The static feature browser in headless Chromium: the index and a feature page load without a
console message (no script error), the index's script fills its table, and its search finds a
feature by layer/index. Skipped, saying so, where no Chromium is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from test_feature_examples import FakeTokenizer, data, model

from torchtitan_clt.metrics.feature_examples import FeatureExamplesAccumulator
from torchtitan_clt.metrics.feature_files import write_feature_examples

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium installed (apt-get install -y chromium): HTML not checked"
)


def load(url: str) -> tuple[str, list[str]]:
    """(the DOM after the page's scripts ran, its console messages)."""
    out = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    return out.stdout, console


@pytest.fixture(scope="module")
def browser_folder(tmp_path_factory):
    m = model()
    toks, xs = data()
    acc = FeatureExamplesAccumulator(m, n_examples=4)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    folder = tmp_path_factory.mktemp("fx") / "features"
    top = torch.randint(0, 50, (3, 12, 5), generator=torch.Generator().manual_seed(0))
    write_feature_examples(acc.result(), folder, [0, 1, 2], FakeTokenizer(), top, top, {"name": "tiny <clt>"})
    return folder


def test_index_runs_and_searches(browser_folder):
    dom, console = load((browser_folder / "index.html").as_uri())
    assert console == []
    n_pages = len(list((browser_folder / "pages").glob("*.html")))
    links = re.findall(r'href="pages/L(\d+)_F(\d+)\.html"', dom)
    assert len(links) == n_pages > 1  # the script rendered one row per feature that fired
    layer, index = links[-1]
    dom, console = load((browser_folder / "index.html").as_uri() + f"#L{layer}/F{index}")
    assert console == []
    assert re.findall(r'href="pages/L(\d+)_F(\d+)\.html"', dom) == [(layer, index)]


def test_feature_page(browser_folder):
    page = sorted((browser_folder / "pages").glob("*.html"))[0]
    dom, console = load(page.as_uri())
    assert console == []
    assert "Top " in dom and dom.count('class="ctx"') >= 1 and "rgba(255,140,0," in dom
