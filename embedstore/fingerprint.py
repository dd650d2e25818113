"""One fingerprint for everything that is identified by its inputs: sweep run keys, `embed paper` step stamps,
end-to-end run keys, report variants."""
from __future__ import annotations

import hashlib
import json


def fingerprint(doc) -> str:
    """sha256 hex of `doc` as canonical JSON (sorted keys; tuples as lists; anything else, e.g. a Path, as str)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
