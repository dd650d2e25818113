"""Generated catalogs: the built-in demo's data and every test's, in the Fashion Product Images layout.

Two kinds of contents:
- "separable" (the tests' default): images are real JPEGs and class-separable (each class its own colour and
  shape, plus noise); titles mix class-specific words with words every class shares. So a tiny classifier
  trained on either modality separates the classes, and a test can tell a working pipeline from a broken one.
- "fusion" (the demo's): a case where neither modality suffices alone. Classes come in pairs (classes 0-1, 2-3,
  ...). A title names its pair's shared vocabulary and only sometimes a word of its own class, so text alone
  tells the pair but confuses the two classes within it. An image's colour family (warm or cool) tells the
  class within its pair (with some items swapped), its shape only weakly which pair; so image alone confuses
  across pairs. Fusing both resolves most of what either confuses.
With defects=True each catalog also holds the real catalog's problems: a corrupt JPEG, a missing image, a title
with unquoted commas, an empty title and a malformed row.
"""
from __future__ import annotations

import csv
import io
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

from embedstore.catalog import CsvColumns
from embedstore.outputs import partial_file, write_bytes_atomic, write_text_atomic

FASHION_ROOT = "fashion-product-images-small"
CONTENTS = ("separable", "fusion")
FASHION_HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
                  "usage", "productDisplayName"]

_PALETTE = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20), (200, 40, 200), (20, 190, 200),
            (240, 130, 20), (110, 50, 20)]
_SHAPES = ["ellipse", "rectangle", "triangle", "cross"]
_CLASS_WORDS = {
    "Tshirts": ["Tshirt", "Round Neck", "Printed", "Polo"],
    "Watches": ["Watch", "Analog", "Chronograph", "Dial"],
    "Casual Shoes": ["Casual Shoes", "Sneakers", "Canvas", "Loafers"],
}
_BRANDS = ["Puma", "Nike", "Roadster", "Fossil", "Titan", "Adidas"]
_COLOURS = ["Black", "White", "Blue", "Grey", "Navy"]
_GENDERS = ["Men", "Women", "Unisex"]


@dataclass
class CatalogInfo:
    """What a test needs to know about a generated catalog."""

    path: Path                     # what to pass to open_catalog: the folder, the zip or the CSV file
    classes: tuple[str, ...]
    n_rows: int                    # data rows in the table, malformed ones included
    n_items: int                   # rows that parse into items
    usable_per_class: dict[str, int]  # items with an image file present and a non-empty title
    malformed_lines: list[int] = field(default_factory=list)  # 1-based line numbers
    corrupt_image_id: str | None = None   # image file present but not a JPEG (usable for the manifest)
    missing_image_id: str | None = None
    comma_title_id: str | None = None     # title with commas (usable)
    empty_title_id: str | None = None
    columns: CsvColumns | None = None     # generic CSV catalogs only


# ----------------------------------------------------------------------------------------------- contents
def class_words(label: str, index: int) -> list[str]:
    return _CLASS_WORDS.get(label, [label, f"Kind{index}", f"Style{index}"])


def class_image(index: int, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG of class `index`: its own colour and shape at a jittered position and size, plus pixel noise."""
    colour = tuple(int(c) for c in np.clip(np.array(_PALETTE[index % len(_PALETTE)]) + rng.integers(-20, 21, 3),
                                           0, 255))
    return _draw(_SHAPES[(index + index // len(_PALETTE)) % len(_SHAPES)], colour, rng, size)


def class_title(label: str, index: int, rng: random.Random) -> str:
    """Shared words (brand, gender, colour) around one or two class-specific words."""
    words = class_words(label, index)
    return " ".join([rng.choice(_BRANDS), rng.choice(_GENDERS), rng.choice(_COLOURS), rng.choice(words[1:]),
                     words[0]])


# ------------------------------------------------------------------------------ "fusion" contents (the demo)
# Class i is member i % 2 of pair i // 2. Rates chosen so that on the demo's 6 classes a head over pretrained
# features lands near image ~35 % < text ~65 % < fused ~93 % (the best possible: about 38 / 70 / 97 %).
_MEMBER_WORD_RATE = 0.40   # share of titles that carry a word of their own class (text beats chance in a pair)
_COLOUR_SWAP_RATE = 0.05   # share of images in the other member's colour family (image and fused imperfect)
_PAIR_SHAPE_RATE = 0.10    # share of images in their pair's shape; the rest draw any shape (image weak on pairs)
_PAIR_WORDS = [  # both classes of a pair draw from these: a title tells the pair, not the class
    (["Cotton", "Slim Fit", "Washed", "Stretch", "Regular Fit", "Casual"], "Everyday Wear"),
    (["Classic", "Metal", "Steel", "Polarised", "Premium", "Lightweight"], "Accessory"),
    (["Leather", "Buckle", "Textured", "Strap", "Padded", "Suede"], "Leather Goods"),
]
_MEMBER_WORDS = {"Tshirts": ["Crew Neck", "Half Sleeve"], "Jeans": ["Denim", "Mid-Rise"],
                 "Watches": ["Analog", "Chronograph"], "Sunglasses": ["Aviator", "UV Protected"],
                 "Casual Shoes": ["Sneakers", "Lace-Up"], "Handbags": ["Tote", "Shoulder Bag"]}
_NEUTRAL_COLOURS = ["Black", "White", "Grey", "Beige", "Olive"]   # drawn at random: no class in them
_FAMILIES = [[(215, 40, 30), (235, 120, 20), (200, 30, 110)],    # member 0: warm
             [(30, 70, 215), (20, 160, 190), (40, 150, 60)]]    # member 1: cool


def pair_words(index: int) -> tuple[list[str], str]:
    """(adjectives, noun) shared by the pair of class `index`."""
    pair = index // 2
    if pair < len(_PAIR_WORDS):
        return _PAIR_WORDS[pair]
    return [f"Line{pair}", f"Series{pair}", f"Edition{pair}", f"Range{pair}"], f"Collection{pair}"


def fusion_title(label: str, index: int, rng: random.Random) -> str:
    """Brand, gender, neutral colour, two of the pair's words and its noun; a word of the class itself only at
    _MEMBER_WORD_RATE. The class name never appears (unless a class outside _MEMBER_WORDS falls back to it)."""
    adjectives, noun = pair_words(index)
    words = [rng.choice(_BRANDS), rng.choice(_GENDERS), rng.choice(_NEUTRAL_COLOURS)] + rng.sample(adjectives, 2)
    if rng.random() < _MEMBER_WORD_RATE:
        words.append(rng.choice(_MEMBER_WORDS.get(label, [label])))
    return " ".join(words + [noun])


def fusion_image(index: int, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG whose colour family (warm / cool) tells the class within its pair, except at _COLOUR_SWAP_RATE,
    and whose shape is its pair's only at _PAIR_SHAPE_RATE."""
    member = index % 2 if rng.random() >= _COLOUR_SWAP_RATE else 1 - index % 2
    family = _FAMILIES[member]
    colour = np.array(family[rng.integers(len(family))]) + rng.integers(-25, 26, 3)
    shape = _SHAPES[(index // 2) % len(_SHAPES)] if rng.random() < _PAIR_SHAPE_RATE else \
        _SHAPES[rng.integers(len(_SHAPES))]
    return _draw(shape, tuple(int(c) for c in np.clip(colour, 0, 255)), rng, size)


def _draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """`shape` in `colour` at a jittered position and size on a light background, plus pixel noise, as JPEG."""
    width, height = size
    image = Image.new("RGB", size, (235, 235, 230))
    draw = ImageDraw.Draw(image)
    cx, cy = width / 2 + rng.uniform(-4, 4), height / 2 + rng.uniform(-4, 4)
    half = min(width, height) * rng.uniform(0.28, 0.38)
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        bar = half / 3
        draw.rectangle([cx - half, cy - bar, cx + half, cy + bar], fill=colour)
        draw.rectangle([cx - bar, cy - half, cx + bar, cy + half], fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class _Row:
    id: str
    label: str
    title: str
    image: bytes | None   # None: no image file
    malformed: bool = False


def _contents(contents: str):
    """(title(label, index, rng), image(index, np_rng, size), the comma title's class word(label, index))."""
    if contents == "separable":
        return class_title, class_image, lambda label, index: class_words(label, index)[0]
    if contents == "fusion":
        return fusion_title, fusion_image, lambda label, index: pair_words(index)[1]
    raise ValueError(f"unknown catalog contents {contents!r}; expected one of {', '.join(CONTENTS)}")


def _make_rows(classes, per_class, image_px, defects, seed, contents="separable") -> tuple[list[_Row], dict]:
    """Shuffled rows (ids 1..N, so natural and text order differ) and the ids of the defective ones."""
    title, image, comma_word = _contents(contents)
    counts = {label: per_class[label] if isinstance(per_class, Mapping) else per_class for label in classes}
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    rows = []
    for index, label in enumerate(classes):
        for _ in range(counts[label]):
            rows.append(_Row("", label, title(label, index, rng), image(index, np_rng, image_px)))
    special = {}
    if defects:
        first, second, third = classes[0], classes[1 % len(classes)], classes[2 % len(classes)]
        specials = {
            "corrupt_image_id": _Row("", first, title(first, 0, rng), b"this is not a JPEG"),
            "missing_image_id": _Row("", second, title(second, 1 % len(classes), rng), None),
            "comma_title_id": _Row("", third, f"Roadster Men, Women {comma_word(third, 2 % len(classes))}, "
                                              f"Set of 2", image(2 % len(classes), np_rng, image_px)),
            "empty_title_id": _Row("", first, "", image(0, np_rng, image_px)),
            "malformed": _Row("", first, "", None, malformed=True),
        }
        rows.extend(specials.values())
    rng.shuffle(rows)
    for number, row in enumerate(rows, start=1):
        row.id = str(number)
    if defects:
        special = {name: row.id for name, row in specials.items()}
    return rows, special


def _usable(rows: list[_Row], classes) -> dict[str, int]:
    usable = dict.fromkeys(classes, 0)
    for row in rows:
        if not row.malformed and row.image is not None and row.title:
            usable[row.label] += 1
    return usable


# ------------------------------------------------------------------------------------------------ fashion
def make_fashion_catalog(root: str | Path, *, classes=("Tshirts", "Watches", "Casual Shoes"),
                         per_class: int | Mapping[str, int] = 12, as_zip: bool = False,
                         image_px: tuple[int, int] = (60, 80), defects: bool = True, seed: int = 0,
                         contents: str = "separable", name: str = FASHION_ROOT) -> CatalogInfo:
    """A Fashion Product Images catalog under `root`: the folder `root/NAME/` (returned), or `root/NAME.zip` with
    everything under that folder name, as Kaggle ships it (NAME: fashion-product-images-small unless given).
    image_px is (width, height); per_class may map each class to its own count; contents is "separable" or
    "fusion" (the module's docstring)."""
    root = Path(root)
    rows, special = _make_rows(tuple(classes), per_class, image_px, defects, seed, contents)
    lines, malformed_lines = [",".join(FASHION_HEADER)], []
    for row in rows:
        if row.malformed:
            malformed_lines.append(len(lines) + 1)
            lines.append(f"{row.id},Men,Apparel")
        else:
            lines.append(",".join([row.id, "Men", "Apparel", "Topwear", row.label, "Blue", "Summer", "2012",
                                   "Casual", row.title]))
    files = {f"{name}/styles.csv": ("\n".join(lines) + "\n").encode("utf-8")}
    files.update({f"{name}/images/{row.id}.jpg": row.image for row in rows if row.image is not None})
    if as_zip:
        path = root / f"{name}.zip"
        root.mkdir(parents=True, exist_ok=True)
        # whole or not at all: `embed demo` reuses a catalog zip that exists, so a half one must never be there
        with partial_file(path) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{name}/", b"")
            archive.writestr(f"{name}/images/", b"")
            for member in sorted(files):
                archive.writestr(member, files[member])
    else:
        path = root / name
        # images first, styles.csv last and whole: a folder catalog is complete once its table is there
        for member, data in sorted(files.items(), key=lambda pair: pair[0].endswith("styles.csv")):
            target = root / member
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.endswith("styles.csv"):
                write_bytes_atomic(target, data)
            else:
                target.write_bytes(data)  # plain write: a new image in a new folder replaces nothing (no fsync each)
    n_items = sum(not row.malformed for row in rows)
    return CatalogInfo(path=path, classes=tuple(classes), n_rows=len(rows), n_items=n_items,
                       usable_per_class=_usable(rows, classes), malformed_lines=malformed_lines,
                       corrupt_image_id=special.get("corrupt_image_id"),
                       missing_image_id=special.get("missing_image_id"),
                       comma_title_id=special.get("comma_title_id"), empty_title_id=special.get("empty_title_id"))


# ---------------------------------------------------------------------------------------------- generic CSV
CSV_COLUMNS = CsvColumns(id="sku", image="photo", title="name", label="category")


def make_csv_catalog(root: str | Path, *, classes=("Tshirts", "Watches", "Casual Shoes"),
                     per_class: int | Mapping[str, int] = 8, columns: CsvColumns = CSV_COLUMNS,
                     image_px: tuple[int, int] = (60, 80), defects: bool = True, seed: int = 0) -> CatalogInfo:
    """A generic CSV catalog: `root/catalog.csv` (returned) with an extra `price` column, images in
    `root/photos/`, the first image given as an absolute path. Its malformed row has an empty label; its comma
    title is properly quoted, as the csv module writes it."""
    root = Path(root)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    rows, special = _make_rows(tuple(classes), per_class, image_px, defects, seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([columns.id, "price", columns.label, columns.title, columns.image])
    malformed_lines = []
    for number, row in enumerate(rows):
        image = f"photos/{row.id}.jpg"
        if row.image is not None:
            (root / image).write_bytes(row.image)  # plain write: a new image in a new folder replaces nothing
        if number == 0:
            image = str((root / image).resolve())
        if row.malformed:
            malformed_lines.append(number + 2)
        writer.writerow([row.id, "9.99", "" if row.malformed else row.label, row.title, image])
    path = root / "catalog.csv"
    write_text_atomic(path, buffer.getvalue())  # last and whole: the catalog is complete once its table is there
    n_items = sum(not row.malformed for row in rows)
    return CatalogInfo(path=path, classes=tuple(classes), n_rows=len(rows), n_items=n_items,
                       usable_per_class=_usable(rows, classes), malformed_lines=malformed_lines,
                       corrupt_image_id=special.get("corrupt_image_id"),
                       missing_image_id=special.get("missing_image_id"),
                       comma_title_id=special.get("comma_title_id"), empty_title_id=special.get("empty_title_id"),
                       columns=columns)
