"""The package layers: `embedstore` (the core) imports neither `heads` nor `pipelines`, so no cycle can form."""
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
