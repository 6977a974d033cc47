"""msa report: one self-contained HTML page, checked as a browser renders it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from msa.core import rundir
from msa.core.config import ReportConfig, SweepConfig, TrainHeadConfig
from msa.data.demo import make_mosi_pickle
from msa.stages import import_features, report, sweep, train_head

FAST = dict(epochs=3, batch_size=16, hidden=32, precision="fp32")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:  # `make test` installs Debian's chromium where it can (apt); elsewhere this test cannot run
        pytest.skip("no headless Chromium on this machine (apt-get install chromium)")
    return found


def rendered(page: Path, screenshot: Path) -> str:
    """The DOM after Chromium loaded the page and ran its script; a screenshot beside it."""
    browser = chromium()
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", "--window-size=1280,2400", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], check=True,
                          capture_output=True, text=True, timeout=120).stdout


def artefact_dir(request, tmp_path) -> Path:
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("artifacts")) if cache else tmp_path


def test_a_sweep_report_renders_every_run_and_every_bad_case_with_its_picture(signal_cache, tmp_path, request):
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, **FAST), out=tmp_path / "sweep",
                      fusions=("concat", "gmu"), seeds=(0, 1))
    table = sweep.run(cfg, show_progress=False)
    page = report.run(ReportConfig(target=cfg.out, worst=5))
    assert page == cfg.out / rundir.REPORT
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # offline: nothing fetched
    screenshot = artefact_dir(request, tmp_path) / "report.png"
    dom = rendered(page, screenshot)
    assert 'data-ready="1"' in dom and "data-script-error" not in dom, dom[:2000]
    images, loaded = (int(re.search(rf'data-{k}="(\d+)"', dom).group(1)) for k in ("images", "images-loaded"))
    assert images == loaded > 0
    assert set(re.findall(r'<tr data-run="([^"]+)"', dom)) == set(table["run"])
    for run in table["run"]:  # each run's section, its bad cases each with a picture
        section = dom[dom.index(f'id="run-{run}"'):]
        section = section[:section.index("</details>")]
        cases = re.findall(r'<tr class="bad-case">(.*?)</tr>', section)
        predictions = pd.read_parquet(cfg.out / run / rundir.VAL_PREDICTIONS)
        assert len(cases) == min(5, int((predictions["prediction"] != predictions["label"]).sum()))
        assert all(case.count('<img class="thumb"') == 1 for case in cases)
    assert screenshot.stat().st_size > 10_000  # kept as the suite's artefact


def test_a_regression_run_report_shows_the_scatter_and_the_field_s_metrics(tmp_path):
    cache = tmp_path / "cache"
    import_features.run(make_mosi_pickle(tmp_path / "mosi.pkl"), cache)
    run = train_head.run(TrainHeadConfig(cache=cache, fusion="seq-concat", out=tmp_path / "run", **FAST),
                         log=lambda *_: None).run_dir
    text = report.run(ReportConfig(target=run, out=tmp_path / "r.html")).read_text()
    assert 'alt="scatter"' in text and all(f">{name}<" in text for name in ("MAE", "Corr", "Acc-2", "Acc-7"))
    assert "Largest errors" in text


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from msa.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output and not (tmp_path / "report.html").exists()
