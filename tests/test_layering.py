"""The package layers (docs/ARCHITECTURE.md: `embedstore` imports no other package of ours, `heads` only
`embedstore`, `pipelines` both), no import cycle between library modules, no private helper imported across
modules, and the installed import names being this checkout's."""
import ast
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import embedstore

ROOT = Path(__file__).resolve().parent.parent


def test_no_embedstore_module_imports_heads_or_pipelines():
    modules = sorted(f"embedstore.{m.name}" for m in pkgutil.iter_modules(embedstore.__path__))
    assert "embedstore.training" in modules and len(modules) > 10  # the walk found the package's modules
    # A fresh interpreter: in this one, other tests have imported heads already.
    # The same interpreter then imports what a sweep's `--jobs` worker runs (heads.dispatch, heads.train): neither
    # may pull in scikit-learn, about 1.3 s of CPU in every worker and rank (embedstore/metrics.py says why).
    code = (f"import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('heads', 'pipelines'))))\n"
            f"import heads.dispatch, heads.train\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    library_side, worker_side = done.stdout.strip().splitlines()[-2:]
    assert json.loads(library_side) == []
    assert json.loads(worker_side) == []


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


LIBRARY = ("embedstore", "heads", "pipelines", "cli")


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports, at the top or inside a function alike (a lazy import
    still ties the two modules together)."""
    modules = {}
    for package in LIBRARY:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_library_modules():
    graph = import_graph()
    assert "heads.strategies" in graph and "embedstore.store" in graph   # the walk found the modules
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]   # and the check finds a cycle
    assert cycles(graph) == []


def test_packages_keep_their_charter():
    """embedstore imports no other package of ours; heads imports only embedstore; pipelines no cli."""
    allowed = {"embedstore": {"embedstore"}, "heads": {"embedstore", "heads"},
               "pipelines": {"embedstore", "heads", "pipelines"}, "cli": set(LIBRARY)}
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
             if d.split(".")[0] not in allowed[m.split(".")[0]]]
    assert wrong == []


def library_string_literals() -> dict[str, set[str]]:
    """{module file: the string constants it holds exactly} over the library packages (docstrings included)."""
    found = {}
    for package in LIBRARY:
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text())
            found[f"{package}/{path.name}"] = {n.value for n in ast.walk(tree)
                                               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return found


def test_each_strategy_name_is_written_in_at_most_two_modules():
    """A strategy is declared once (heads/strategies.py); other modules ask the registry instead of spelling its
    name (one more is allowed: a default, or the paper's claim about 1-A/1-B). The unimodal baselines are named
    after their modality ("image", "text"), a word every layer uses, so they are left out."""
    from heads.strategies import registered

    literals = library_string_literals()
    assert "2A" in literals["heads/strategies.py"]   # the walk reads the registry's own module
    spread = {s.name: sorted(m for m, values in literals.items() if s.name in values) for s in registered()
              if s.name not in s.modalities}
    assert {name: modules for name, modules in spread.items() if len(modules) > 2} == {}


def test_no_library_module_is_over_400_lines():
    lines = {f"{package}/{p.name}": len(p.read_text().splitlines())
             for package in LIBRARY for p in (ROOT / package).glob("*.py")}
    assert len(lines) > 50 and {m: n for m, n in lines.items() if n > 400} == {}


def test_the_architecture_file_map_matches_the_tree():
    """docs/ARCHITECTURE.md's file map names every library module, under its package, and no module that is gone."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = doc.split("```\n", 1)[1].split("```", 1)[0]
    named, package = set(), None
    for line in block.splitlines():
        if line[:1].isalpha():   # "heads/   everything that trains ..." opens a package's part of the map
            package = line.split("/", 1)[0]
        if package in LIBRARY:
            named.update(f"{package}/{name}" for name in re.findall(r"(?<![/\w])(\w+\.py)\b", line))
    tree = {f"{package}/{p.name}" for package in LIBRARY for p in (ROOT / package).glob("*.py")
            if p.name != "__init__.py"}
    assert len(tree) > 50 and sorted(tree - named) == [] and sorted(named - tree) == []


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
