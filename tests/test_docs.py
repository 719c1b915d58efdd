"""The documentation site builds strictly and its configuration reference is the code's (issue #27).

`mkdocs build --strict` turns every warning into a failure: a link to a missing page or anchor, a
page outside the navigation, a navigation entry without its page. The configuration reference is
generated from the config dataclasses and RANGES, and the committed page must equal what the code
generates now, so a new key, a changed default or a changed range cannot go undocumented.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
REFERENCE = ROOT / "docs" / "reference" / "configuration.md"


def build(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, env=env, timeout=300)


def test_site_builds_strictly(tmp_path):
    r = build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    page = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert "train.dist.interface" in page and "model=autoregressive" in page


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the faults](reference/faults.md).\n")
    r = build(copy, tmp_path / "site")
    assert r.returncode != 0
    assert "reference/faults.md" in r.stdout + r.stderr


def test_a_page_outside_the_navigation_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    r = build(copy, tmp_path / "site")
    assert r.returncode != 0
    assert "orphan.md" in r.stdout + r.stderr


def test_configuration_reference_is_generated_from_the_code():
    from pipeline.config.reference import page
    assert REFERENCE.read_text() == page(), (
        "docs/reference/configuration.md differs from the code; regenerate it: "
        ".venv/bin/python -m pipeline.config.reference > docs/reference/configuration.md")


def test_reference_names_every_range_and_comment():
    from pipeline.config import RANGES
    from pipeline.config.reference import page
    text = page()
    for key, rng in RANGES.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} has no row"
        assert rng.expected() in row, row
    # the field's own comment, and the block written above a field
    assert "| `train.lr` |" in text
    assert "a new run, refused where output_dir holds one" in text
    assert [line for line in text.splitlines() if line.startswith("| `train.dist.interface` |")
            ][0].endswith("open nothing on the network. |")


def test_readme_is_a_front_page_whose_links_resolve():
    """The README stays a front page (issue #27: under about 200 lines; the reference is docs/),
    and every relative link in it points at a file of the checkout."""
    import re
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, "README.md grew past 200 lines: move reference to docs/"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the front page links to the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
