"""README.md's "In a notebook" lines, run exactly as written on a small generated store (the README cannot drift)."""
import contextlib
import io
import re
from pathlib import Path

import pytest

from heads import FusionHead
from store_factory import make_feature_store

README = Path(__file__).resolve().parent.parent / "README.md"


def notebook_lines() -> list[str]:
    section = README.read_text().split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_the_notebook_path_is_at_most_six_lines():
    lines = notebook_lines()
    assert 0 < len(lines) <= 6 and "FusionHead" in "".join(lines)


@pytest.mark.usefixtures("one_thread")
def test_the_readme_lines_run(tmp_path, monkeypatch):
    classes = ["bag", "shirt", "watch"]
    make_feature_store(tmp_path / "runs" / "real" / "store.h5", classes=classes, per_split=(160, 40, 40),
                       manifest_sha256="readme")   # separable 24-d image and 16-d text features
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec("\n".join(notebook_lines()), {})
    score = float(printed.getvalue().split()[0])
    assert score > 0.8  # chance is 1/3
    head = FusionHead.from_pretrained(tmp_path / "runs" / "real" / "my-head")
    assert list(head.classes_) == classes and head.config_.cell == "2A-concat"
