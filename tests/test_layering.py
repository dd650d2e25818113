"""The package layers: `embedstore` (the core) imports neither `heads` nor `pipelines`, so no cycle can form."""
import ast
import json
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
