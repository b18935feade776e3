"""The static feature browser in headless Chromium: the index and a feature page load without a
console message (no script error), the index's script fills its table, and its search finds a
feature by layer/index. Skipped, saying so, where no Chromium is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import quote

import pytest
import torch
from test_feature_examples import FakeTokenizer, data, model

from torchtitan_clt.metrics.feature_examples import (
    FeatureExamplesAccumulator,
    decoder_target_norms,
    nearest_features,
)
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
    acc = FeatureExamplesAccumulator(m, n_examples=4, skip_positions=1)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    folder = tmp_path_factory.mktemp("fx") / "features"
    top = torch.randint(0, 50, (3, 12, 5), generator=torch.Generator().manual_seed(0))
    write_feature_examples(
        acc.result(),
        folder,
        [0, 1, 2],
        FakeTokenizer(),
        top,
        top,
        {"name": "tiny <clt>"},
        decoder_target_norms(m),
        nearest_features(m, 4),
    )
    return folder


LINK = r'href="feature.html#L(\d+)/F(\d+)"'


def test_index_runs_searches_and_pages(browser_folder):
    dom, console = load((browser_folder / "index.html").as_uri())
    assert console == []
    n = len(list((browser_folder / "data").glob("*.js")))
    links = re.findall(LINK, dom)
    assert len(links) == min(n, 100) and n > 1  # the script rendered the first page of rows
    layer, index = links[-1]
    dom, console = load((browser_folder / "index.html").as_uri() + f"#L{layer}/F{index}")
    assert console == []
    assert re.findall(LINK, dom) == [(layer, index)]
    # Text search: a token one feature fires on, from its data file.
    rec = json.loads(
        (browser_folder / "data" / f"L{layer}_F{index}.js").read_text()[len("showFeature(") : -3]
    )
    tok = rec["examples"][0]["tokens"][rec["examples"][0]["center"]]
    dom, console = load((browser_folder / "index.html").as_uri() + "#" + quote(tok))
    assert console == [] and (layer, index) in re.findall(LINK, dom)


def test_index_pages_past_its_first_100_rows(tmp_path):
    """Rows past the first page are reachable: 250 rows, the third page holds the last 50."""
    records = [
        {
            "layer": 0,
            "index": i,
            "id": i,
            "density": 1 - i / 1000,
            "act_max": 1.0,
            "label": f'"t{i}"',
            "examples": [],
            "top_logits": [],
        }
        for i in range(250)
    ]
    from torchtitan_clt.metrics.feature_html import write_browser

    summary = {
        "name": "x",
        "fired": 250,
        "features": 250,
        "tokens": 1,
        "layers": [0],
        "features_per_layer": 250,
    }
    index = write_browser(records, tmp_path, summary)
    script = "document.getElementById('next').click(); document.getElementById('next').click();"
    html = index.read_text().replace("filter();\n</script>", "filter();\n" + script + "</script>")
    index.write_text(html)
    dom, console = load(index.as_uri())
    assert console == []
    got = [int(i) for _, i in re.findall(LINK, dom)]
    assert got == list(range(200, 250)) and "page 3 of 3" in dom


def test_feature_page(browser_folder):
    page = sorted((browser_folder / "data").glob("*.js"))[0]
    layer, index = re.match(r"L(\d+)_F(\d+)", page.stem).groups()
    dom, console = load((browser_folder / "feature.html").as_uri() + f"#L{layer}/F{index}")
    assert console == []
    assert "Top " in dom and dom.count('class="ctx"') >= 1 and "rgba(255,140,0," in dom
    assert "Quantile" in dom  # the random-sample bands below the top
    assert "Target layers" in dom and "Nearest features" in dom and "<svg" in dom
    assert "true max" in dom  # the histogram's axis names the true maximum
