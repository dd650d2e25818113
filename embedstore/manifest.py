"""`embed prepare`: under-sample a catalog and split it, as a deterministic JSON manifest.

The manifest is the identity of an experiment's data: every later step (extraction, stores, heads) records its
sha256, so the same catalog, settings and seed must give the same bytes. Hence: classes sorted by name, ids
sorted in natural order before a seeded shuffle, JSON with sorted keys and no timestamps.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from embedstore.catalog import open_catalog_from_spec
from embedstore.catalog_base import Catalog, CatalogItem
from embedstore.outputs import write_bytes_atomic
from embedstore.preprocess import clean_title

MANIFEST_FORMAT = "embedstore-manifest"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
DROP_REASONS = ("malformed row", "no image", "empty title", "class too small", "not sampled")


@dataclass(frozen=True)
class SplitSettings:
    """How many items each class needs, how many are drawn, and how they are split (the paper's defaults)."""

    min_items: int = 250        # a class is kept when it has at least this many usable items
    items_per_class: int = 250  # drawn from each kept class
    train: int = 175
    val: int = 25
    test: int = 50
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"SplitSettings.{f.name} must be an integer, got {value!r}")
        for name in ("min_items", "items_per_class", "train", "test"):
            if getattr(self, name) < 1:
                raise ValueError(f"SplitSettings.{name} must be at least 1, got {getattr(self, name)}")
        if self.val < 0 or self.seed < 0:
            raise ValueError(f"SplitSettings.val and .seed must be >= 0, got val={self.val}, seed={self.seed}")
        total = self.train + self.val + self.test
        if total != self.items_per_class:
            raise ValueError(f"train + val + test = {self.train} + {self.val} + {self.test} = {total} must equal "
                             f"items_per_class = {self.items_per_class}; change one of them")
        if self.min_items < self.items_per_class:
            raise ValueError(f"min_items = {self.min_items} must be >= items_per_class = {self.items_per_class}, "
                             f"or a kept class could not supply its draw")


@dataclass(frozen=True)
class FractionSettings:
    """Every usable item of every class with >= min_items of them, split per class by fractions (real catalogs).

    `max_per_class` caps a large class (its draw is the first N of the seeded shuffle; the rest count as "not
    sampled"). Each split of a kept class gets at least one item, so min_items must be >= 3.
    """

    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)   # train, val, test
    min_items: int = 20
    max_per_class: int | None = None
    seed: int = 0

    def __post_init__(self):
        try:
            fractions = tuple(float(f) for f in self.fractions)
        except (TypeError, ValueError):
            raise ValueError(f"fractions must be three numbers (train, val, test), got {self.fractions!r}") from None
        if len(fractions) != 3 or any(not 0.0 < f < 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be three numbers in (0, 1) for train, val, test summing to 1, "
                             f"got {self.fractions!r}; e.g. 0.7,0.1,0.2")
        object.__setattr__(self, "fractions", fractions)  # a tuple of floats, also when loaded from JSON lists
        for name in ("min_items", "seed") + (("max_per_class",) if self.max_per_class is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"FractionSettings.{name} must be an integer, got {value!r}")
        if self.min_items < len(SPLITS):
            raise ValueError(f"min_items = {self.min_items} must be at least {len(SPLITS)}: every split of a kept "
                             "class gets at least one item")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_per_class is not None and self.max_per_class < self.min_items:
            raise ValueError(f"max_per_class = {self.max_per_class} must be >= min_items = {self.min_items}")


def settings_from_dict(data: dict) -> "SplitSettings | FractionSettings":
    """Fixed-count settings (every manifest before fractions existed) or fraction settings, by their keys."""
    if "fractions" in data:
        return FractionSettings(**{**data, "fractions": tuple(data["fractions"])})
    return SplitSettings(**data)


def split_counts(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """n items -> {split: count}, largest remainder (ties: train, val, test), then every split at least 1
    (taken from the largest split). n >= 3. Depends on n and the fractions only, so it is the same everywhere."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if counts[i] == 0:
            counts[max(range(3), key=lambda j: (counts[j], -j))] -= 1
            counts[i] = 1
    return dict(zip(SPLITS, counts))


PAPER_FRACTIONS = (0.7, 0.1, 0.2)  # the paper's 175 / 25 / 50 of 250 items per class


def scaled_split(items_per_class: int) -> tuple[int, int, int]:
    """(train, val, test) counts of `items_per_class` in the paper's 7:1:2 ratio (`embed prepare --items-per-class N`
    without --train/--val/--test), by the rounding --fractions uses (split_counts): each split gets the floor of
    its share, the items left over go to the largest remainders (ties: train, val, test), and every split gets at
    least one item: 250 -> (175, 25, 50), 40 -> (28, 4, 8), 10 -> (7, 1, 2), 5 -> (3, 1, 1). N >= 3."""
    if isinstance(items_per_class, bool) or not isinstance(items_per_class, (int, np.integer)) or items_per_class < 3:
        raise ValueError(f"{items_per_class!r} items per class cannot be split 7:1:2 with an item in each split; use "
                         "at least 3, or give the counts with --train/--val/--test")
    counts = split_counts(int(items_per_class), PAPER_FRACTIONS)
    return counts["train"], counts["val"], counts["test"]


@dataclass(frozen=True)
class ManifestItem:
    id: str
    label: str
    split: str   # "train" | "val" | "test"
    title: str   # raw title, as in the catalog (cleaning is the tokenizer's job)
    image: str   # image reference in the catalog


@dataclass
class Manifest:
    """The drawn items and their splits, with the catalog, the settings and an account of everything dropped.

    `items` order: classes in `classes` order (sorted by name); within a class train, then val, then test;
    within a split, ids in natural order (numeric ids numerically).
    """

    catalog: dict                          # the catalog's spec(); open_catalog() re-opens it
    settings: SplitSettings | FractionSettings
    classes: list[str]                     # sorted; a label's index is its position here
    items: list[ManifestItem]
    dropped: dict[str, int]                # reason -> number of catalog rows (every reason in DROP_REASONS)
    small_classes: dict[str, int]          # classes dropped as too small -> their usable items
    malformed: list[tuple[int, str]]       # the catalog's malformed rows: (line number, reason)

    # ------------------------------------------------------------------------------------------ convenience
    @property
    def label_index(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.classes)}

    def labels(self) -> np.ndarray:
        """(N,) int64 label indices, in `items` order."""
        index = self.label_index
        return np.array([index[item.label] for item in self.items], dtype=np.int64)

    def split_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SPLITS, 0)
        for item in self.items:
            counts[item.split] += 1
        return counts

    def items_in(self, split: str) -> list[ManifestItem]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [item for item in self.items if item.split == split]

    def open_catalog(self) -> Catalog:
        return open_catalog_from_spec(self.catalog)

    # ---------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "catalog": self.catalog,
            "settings": asdict(self.settings),
            "classes": list(self.classes),
            "items": [asdict(item) for item in self.items],
            "dropped": dict(self.dropped),
            "small_classes": dict(self.small_classes),
            "malformed": [[line, reason] for line, reason in self.malformed],
        }

    def to_bytes(self) -> bytes:
        """The canonical serialisation: sorted keys, no timestamps, one trailing newline."""
        text = json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False)
        return (text + "\n").encode("utf-8")

    @property
    def sha256(self) -> str:
        """Hash of the canonical bytes (= the sha256 of a file written by save): what later steps record."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the canonical bytes to PATH, whole or not at all: a failure (a full disk) keeps the old file."""
        write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest not found: {os.path.abspath(path)}; create it with `embed prepare`")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a manifest (invalid JSON: {error})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> "Manifest":
        """Validate and build; any problem is a one-line ValueError naming `source`."""
        def bad(problem: str) -> ValueError:
            return ValueError(f"{source} is not a valid manifest: {problem}; re-create it with `embed prepare`")

        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise bad(f"'format' is not {MANIFEST_FORMAT!r}")
        if data.get("format_version") != MANIFEST_VERSION:
            raise bad(f"format_version {data.get('format_version')!r} is not {MANIFEST_VERSION}")
        missing = [key for key in ("catalog", "settings", "classes", "items", "dropped", "small_classes",
                                   "malformed") if key not in data]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        try:
            settings = settings_from_dict(data["settings"])
        except (TypeError, ValueError) as error:
            raise bad(f"settings: {error}") from None
        classes = data["classes"]
        if not isinstance(classes, list) or classes != sorted(set(classes)):
            raise bad("'classes' must be a sorted list of distinct names")
        items = [_item_from_dict(raw, set(classes), bad) for raw in data["items"]]
        if len({item.id for item in items}) != len(items):
            raise bad("duplicate item ids")
        return cls(catalog=data["catalog"], settings=settings, classes=classes, items=items,
                   dropped=dict(data["dropped"]), small_classes=dict(data["small_classes"]),
                   malformed=[(int(line), str(reason)) for line, reason in data["malformed"]])


def _item_from_dict(raw, classes: set[str], bad) -> ManifestItem:
    names = [f.name for f in fields(ManifestItem)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise bad(f"item {raw!r} must have exactly the keys {', '.join(names)}")
    item = ManifestItem(**{name: str(raw[name]) for name in names})
    if item.label not in classes:
        raise bad(f"item {item.id!r} has label {item.label!r}, which is not in 'classes'")
    if item.split not in SPLITS:
        raise bad(f"item {item.id!r} has split {item.split!r}; expected one of {', '.join(SPLITS)}")
    return item


# --------------------------------------------------------------------------------------------- preparation
def natural_key(item_id: str) -> tuple:
    """Numeric ids sort numerically ("9" before "10") and before any non-numeric id."""
    return (0, int(item_id), item_id) if item_id.isdigit() else (1, 0, item_id)


def prepare_manifest(catalog: Catalog, settings: SplitSettings | FractionSettings | None = None) -> Manifest:
    """Keep classes with >= min_items usable items, draw items_per_class from each, split each class.
    With FractionSettings: keep every usable item (up to max_per_class) and split each class by fractions.

    Usable = the image exists in the catalog and the title is non-empty after `clean_title`. An item failing
    both is counted once, as "no image". Each class draws with its own generator, seeded from (seed, class
    name), so adding or removing another class never changes this class's draw. The shuffled ids are dealt
    test first, then val, then train: a smaller `train` keeps the same val and test items.
    """
    settings = settings or SplitSettings()
    rows = catalog.read_rows()
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["malformed row"] = len(rows.malformed)
    by_class: dict[str, list[CatalogItem]] = {}
    for item in rows.items:
        reason = _unusable_reason(catalog, item)
        if reason is None:
            by_class.setdefault(item.label, []).append(item)
        else:
            dropped[reason] += 1

    classes, small_classes, items = [], {}, []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < settings.min_items:
            small_classes[label] = len(members)
            dropped["class too small"] += len(members)
            continue
        classes.append(label)
        drawn = _draw_class(label, members, settings)
        dropped["not sampled"] += len(members) - len(drawn)
        items.extend(drawn)
    if not items:  # a 0-class manifest would make a 0-row store that calls itself complete
        raise ValueError(f"no usable items: {_why_none(catalog, rows.n_rows, dropped, small_classes, settings)}")
    return Manifest(catalog=catalog.spec(), settings=settings, classes=classes, items=items, dropped=dropped,
                    small_classes=small_classes, malformed=list(rows.malformed))


def _why_none(catalog: Catalog, n_rows: int, dropped: dict, small_classes: dict, settings) -> str:
    """Why a catalog gave no item, in one line that says what to change."""
    if not n_rows:
        return f"{catalog.path} has no data rows (a header only?); give a catalog with items"
    counts = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n)
    if small_classes:
        largest = max(small_classes, key=lambda label: (small_classes[label], label))
        fix = ("lower --min-items" if isinstance(settings, FractionSettings) else
               "lower --min-items and --items-per-class (--train/--val/--test adding up to it), or use --fractions")
        return (f"of {n_rows} rows ({counts}), no class has {settings.min_items} usable items (the largest, "
                f"{largest!r}, has {small_classes[largest]}); {fix}")
    return f"none of the {n_rows} rows of {catalog.path} is usable ({counts}); check its images and titles"


def _unusable_reason(catalog: Catalog, item: CatalogItem) -> str | None:
    if not catalog.has_image(item.image):
        return "no image"
    if not clean_title(item.title):
        return "empty title"
    return None


def _draw_class(label: str, members: list[CatalogItem],
                settings: SplitSettings | FractionSettings) -> list[ManifestItem]:
    """The class's drawn items: train, then val, then test, each in natural id order."""
    members = sorted(members, key=lambda item: natural_key(item.id))
    rng = np.random.default_rng([settings.seed, zlib.crc32(label.encode("utf-8"))])
    if isinstance(settings, FractionSettings):
        n = min(len(members), settings.max_per_class or len(members))
        counts = split_counts(n, settings.fractions)
    else:
        n = settings.items_per_class
        counts = {"train": settings.train, "val": settings.val, "test": settings.test}
    order = rng.permutation(len(members))[:n]
    ends = {"test": counts["test"], "val": counts["test"] + counts["val"], "train": n}
    drawn, start = [], 0
    for split in ("test", "val", "train"):
        chosen = sorted((members[i] for i in order[start:ends[split]]), key=lambda item: natural_key(item.id))
        drawn.append([ManifestItem(item.id, item.label, split, item.title, item.image) for item in chosen])
        start = ends[split]
    test, val, train = drawn
    return train + val + test


def format_summary(manifest: Manifest) -> str:
    """A short human summary: kept classes, per-split counts, and each drop reason with its count."""
    counts = manifest.split_counts()
    lines = [f"{len(manifest.classes)} classes kept, {len(manifest.items):,} items: "
             + " / ".join(f"{counts[split]:,} {split}" for split in SPLITS)
             + f" (seed {manifest.settings.seed}"
             + (f", fractions {','.join(f'{f:g}' for f in manifest.settings.fractions)}"
                if isinstance(manifest.settings, FractionSettings) else "") + ")",
             "dropped:"]
    for reason in DROP_REASONS:
        line = f"  {reason}: {manifest.dropped.get(reason, 0):,}"
        if reason == "class too small" and manifest.small_classes:
            largest = max(manifest.small_classes, key=lambda name: (manifest.small_classes[name], name))
            line += (f" items in {len(manifest.small_classes):,} classes (largest: {largest}, "
                     f"{manifest.small_classes[largest]:,} < {manifest.settings.min_items:,})")
        lines.append(line)
    return "\n".join(lines)
