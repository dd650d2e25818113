"""Whether the top-level names this distribution installs (embedstore, heads, pipelines, cli) import from this
checkout. `heads`, `pipelines` and `cli` are generic names: pip lets another distribution install a folder of the
same name (it overwrites files), and an editable install's finder comes after site-packages, so a foreign `heads`
would silently shadow ours. Exit 0, or 1 with one line naming each foreign package (docs/ARCHITECTURE.md,
"Installed names"). Run as a script, so the working folder is not on the path: `python scripts/check_import_names.py`."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("embedstore", "heads", "pipelines", "cli")


def foreign_packages(names=NAMES) -> list[str]:
    """'name -> path' for each name that is missing or imports from outside this checkout."""
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        origin = os.path.realpath(spec.origin) if spec and spec.origin else None
        if origin is None or not origin.startswith(os.path.realpath(ROOT) + os.sep):
            found.append(f"{name} -> {origin or 'not installed'}")
    return found


if __name__ == "__main__":
    if bad := foreign_packages():
        sys.exit(f"these import names do not come from {ROOT}: {'; '.join(bad)} (one missing: reinstall with "
                 "`pip install -e .`; one elsewhere: another distribution ships a package of that name: uninstall it, "
                 "or use a separate virtual environment)")
