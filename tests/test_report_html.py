"""`snakemake --report` on the tiny workflow's results, opened in a real headless chromium.

`make test` installs Debian's chromium (Makefile target `browser`); without it these tests fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import snakemake

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
WINDOW = (1400, 2400)
RUNS = ("full", "lora", "qlora4", "qlora8")


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    executable = shutil.which("chromium")
    assert executable, "chromium is missing: `make test` installs it (apt-get install chromium)"
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh one per start
    command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               "--virtual-time-budget=10000", *args]  # virtual time lets the report's scripts finish rendering
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def html_report(tiny_workflow):
    workdir, config, _ = tiny_workflow
    result = snakemake(workdir, "--configfile", str(config), "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "results" / "report.html"


def embedded_results(page: str) -> dict:
    """The report's own index of its results (path -> name, caption, labels, data, ...)."""
    return json.loads(re.search(r"var results = (\{.*?\});\n", page, flags=re.DOTALL).group(1))


def test_report_is_self_contained_with_captions_and_labels(html_report, tiny_workflow):
    workdir, _, _ = tiny_workflow
    page = html_report.read_text()
    # Every result is embedded: nothing points at the results folder or the local disk.
    assert not re.search(r'(src|href)=\\?"(results/|file:)', page)
    results = embedded_results(page)
    written = {str(path.relative_to(workdir)) for path in (workdir / "results/tiny--tiny/report").rglob("*")
               if path.is_file() and not path.name.startswith(".")}
    assert set(results) == written
    assert {f"results/tiny--tiny/report/runs/{run}.html" for run in RUNS} <= written
    for path, result in results.items():
        assert len(result["caption"]) > 40, path
        assert result["labels"], path
        assert result["data_uri"].startswith("data:"), path
    assert results["results/tiny--tiny/report/runs/qlora4.html"]["labels"] == {"run": "qlora4"}
    assert "The first 4 held-out questions" in results["results/tiny--tiny/report/samples.html"]["caption"]


def test_report_renders_table_and_plots_in_chromium(html_report, tmp_path):
    url = html_report.as_uri()
    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The React app has run: its menu lists the report's categories.
    for category in ("1. Comparison", "2. Training", "3. Answers", "4. Runs"):
        assert category in html
    # The landing page shows the memory comparison table with one row per run, the quality table
    # with the base model too ...
    table = html[html.index("<th>training memory (GB)</th>"):]
    table = table[: table.index("</table>")]
    assert [row for row in ("base", *RUNS) if f"<td>{row}</td>" in table] == list(RUNS)
    quality = html[html.index("<th>held-out loss</th>"):]
    quality = quality[: quality.index("</table>")]
    assert [row for row in ("base", *RUNS) if f"<td>{row}</td>" in quality] == ["base", *RUNS]
    # ... and the plots, embedded as images.
    assert re.search(r'<img alt="memory.png" src="data:image/png;base64,', html)
    assert re.search(r'<img alt="quality_vs_memory.png" src="data:image/png;base64,', html)

    screenshot = tmp_path / "report.png"
    shot = chromium(tmp_path, f"--screenshot={screenshot}", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    pixels = (imread(screenshot)[..., :3] * 255).round()
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])

    def painted(rgb) -> int:
        return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 3).sum())

    # The browser painted the plots: the memory plot's stacked bars (activations in blue, temporaries
    # in cyan, the tiny model's thin weights in orange) and the Pareto front in red (matplotlib's
    # tab:blue, tab:cyan, tab:orange and tab:red; the report's own page uses none of them).
    assert painted((31, 119, 180)) > 2000
    assert painted((23, 190, 207)) > 2000
    assert painted((255, 127, 14)) > 300
    assert painted((214, 39, 40)) > 5
