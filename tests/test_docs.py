"""The README and the docs site: links that resolve, a strict build, a README a newcomer reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]


def test_every_relative_link_resolves():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in PAGES for target in relative_links(page)
              if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, "\n".join(broken)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


def test_the_docs_site_builds_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                             "--config-file", str(ROOT / "mkdocs.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def section_commands(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(f"## {title}"):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def test_the_readmes_own_data_commands_run_as_written(tmp_path):
    """The section's commands, in a shell, on a fresh home whose offline models are tiny random
    ones under the real names (the real ones are hundreds of MB) and a generated `mydata`."""
    from msa.data.demo import make_demo_dataset, make_tiny_image_weights, make_tiny_text_model

    models = tmp_path / "home" / ".cache" / "msa" / "offline-models"
    make_tiny_text_model(models / "all-MiniLM-L6-v2")
    make_tiny_image_weights(models / "tf_efficientnet_lite0.pth", "timm:tf_efficientnet_lite0")
    make_demo_dataset(tmp_path / "mydata", n_labelled=40, n_test=5)
    commands = section_commands("Your own data")
    assert len([line for line in commands.splitlines() if line.startswith("msa ")]) <= 10
    env = {**os.environ, "HOME": str(tmp_path / "home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "myrun-evaluation.json").read_text())["metrics"]["n"] == 40  # out of fold
    lines = (tmp_path / "predictions.txt").read_text().splitlines()
    assert lines[0] == "guid,tag" and len(lines) == 6
    post = json.loads(result.stdout.strip().splitlines()[-1])
    assert post["label"] in ("positive", "neutral", "negative") and sum(post["probabilities"].values()) == \
        pytest.approx(1, abs=1e-4)
