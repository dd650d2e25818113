"""The package layers (`embedstore` imports neither `heads` nor `pipelines`), no private helper imported across
modules, split modules importing in any order, and the installed import names being this checkout's."""
import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import embedstore

ROOT = Path(__file__).resolve().parent.parent


def test_no_embedstore_module_imports_heads_or_pipelines():
    modules = sorted(f"embedstore.{m.name}" for m in pkgutil.iter_modules(embedstore.__path__))
    assert "embedstore.training" in modules and len(modules) > 10  # the walk found the package's modules
    # A fresh interpreter: in this one, other tests have imported heads already.
    code = (f"import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('heads', 'pipelines'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_private_name_is_imported_across_modules():
    """`from pkg.module import _name` in library code means a helper that should be public (tests may)."""
    found = []
    for package in ("embedstore", "heads", "cli", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                              for alias in node.names if alias.name.startswith("_")
                              and node.module.split(".")[0] in ("embedstore", "heads", "cli", "pipelines")]
    assert len(list((ROOT / "heads").rglob("*.py"))) > 5  # the walk saw the packages
    assert found == []


SPLIT_MODULES = {"embedstore.store": "embedstore.store_writer",   # old module -> a module split out of it
                 "embedstore.backbones": "embedstore.backbones_image"}


def test_split_modules_import_in_any_order():
    # Each new module first, in a fresh interpreter: the split modules import each other lazily, never in a cycle.
    for old, new in SPLIT_MODULES.items():
        code = (f"import {new}, {old}\n"
                "from embedstore.backbones import list_backbones\n"
                "assert 'tiny-resnet' in list_backbones('image') and 'tiny-bert' in list_backbones('text')\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


def test_the_installed_import_names_are_this_checkouts(tmp_path):
    check = [sys.executable, str(ROOT / "scripts" / "check_import_names.py")]
    done = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # another distribution's `heads` earlier on the path: the check names it
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and f"heads -> {tmp_path.resolve()}" in done.stderr
    assert "embedstore ->" not in done.stderr and done.stderr.count("\n") <= 1  # one line, naming only that one
