"""Catalogs: the fashion layout (folder and zip), generic CSV catalogs, specs, pickling, the real catalog."""
from __future__ import annotations

import io
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog_factory import CSV_COLUMNS, class_words, make_csv_catalog, make_fashion_catalog
from embedstore.catalog import open_catalog, open_catalog_from_spec
from embedstore.catalog_base import CatalogItem
from embedstore.catalog_csv import CsvCatalog, CsvColumns
from embedstore.catalog_fashion import FashionCatalog

REAL_ZIP = Path(__file__).resolve().parents[1].parent / "shared/datasets/fashion-product-images-small.zip"


@pytest.fixture(params=[False, True], ids=["folder", "zip"])
def fashion(request, tmp_path):
    return make_fashion_catalog(tmp_path, as_zip=request.param)


def by_id(rows) -> dict[str, CatalogItem]:
    return {item.id: item for item in rows.items}


# ------------------------------------------------------------------------------------------------ fashion
def test_fashion_rows_none_lost(fashion):
    catalog = open_catalog(fashion.path)
    assert isinstance(catalog, FashionCatalog)
    rows = catalog.read_rows()
    assert rows.n_rows == fashion.n_rows
    assert len(rows.items) == fashion.n_items
    assert [line for line, _ in rows.malformed] == fashion.malformed_lines
    assert "expected 10 fields, found 3" in rows.malformed[0][1]


def test_fashion_item_fields_and_comma_title_kept(fashion):
    items = by_id(open_catalog(fashion.path).read_rows())
    comma = items[fashion.comma_title_id]
    assert comma.title.startswith("Roadster Men, Women") and comma.title.count(",") == 2
    assert comma.label == fashion.classes[2]
    assert comma.image == f"images/{fashion.comma_title_id}.jpg"
    assert items[fashion.empty_title_id].title == ""
    assert {item.label for item in items.values()} == set(fashion.classes)


def test_fashion_images(fashion):
    catalog = open_catalog(fashion.path)
    items = by_id(catalog.read_rows())
    good = next(i for i in items.values() if i.id not in (fashion.corrupt_image_id, fashion.missing_image_id))
    image = Image.open(io.BytesIO(catalog.read_image_bytes(good.image)))
    assert image.format == "JPEG" and image.size == (60, 80)
    assert not catalog.has_image(items[fashion.missing_image_id].image)
    with pytest.raises(FileNotFoundError, match=fashion.missing_image_id):
        catalog.read_image_bytes(items[fashion.missing_image_id].image)
    corrupt = items[fashion.corrupt_image_id].image
    assert catalog.has_image(corrupt)  # present; decoding it is the extractor's problem
    with pytest.raises(Exception):
        Image.open(io.BytesIO(catalog.read_image_bytes(corrupt))).load()


def test_fashion_root_detected_from_parent_folder(tmp_path):
    info = make_fashion_catalog(tmp_path / "download", per_class=2, defects=False)
    catalog = open_catalog(tmp_path / "download")  # the folder above the one holding styles.csv
    assert catalog.root == "fashion-product-images-small"
    assert len(catalog.read_rows().items) == info.n_items


def test_styles_csv_path_opens_fashion(tmp_path):
    info = make_fashion_catalog(tmp_path, per_class=2, defects=False)
    for columns in (None, CsvColumns()):  # the CLI always passes columns; the fashion format ignores them
        catalog = open_catalog(info.path / "styles.csv", columns=columns)
        assert isinstance(catalog, FashionCatalog) and len(catalog.read_rows().items) == info.n_items
        assert isinstance(open_catalog(info.path, columns=columns), FashionCatalog)
    as_csv = open_catalog(info.path / "styles.csv", columns=CsvColumns(image="id", title="productDisplayName",
                                                                      label="articleType"))
    assert isinstance(as_csv, CsvCatalog)  # a CSV that has the named columns is read as generic CSV


def test_fashion_without_styles_csv(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no styles.csv"):
        FashionCatalog(tmp_path / "empty")


def test_fashion_header_checked(tmp_path):
    (tmp_path / "styles.csv").write_text("id,title,category\n1,a,b\n")
    with pytest.raises(ValueError, match="articleType"):
        FashionCatalog(tmp_path).read_rows()


def test_fashion_bad_rows_counted_with_reasons(tmp_path):
    info = make_fashion_catalog(tmp_path, per_class=1, defects=False)
    styles = info.path / "styles.csv"
    with styles.open("a") as handle:  # line numbers continue after the generated rows
        handle.write("\n900,Men,Apparel,Topwear,,Blue,Summer,2012,Casual,No label\n"
                     ",Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,No id\n"
                     "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Duplicate\n"
                     '901,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,"Quoted, Title"\n')
    rows = FashionCatalog(info.path).read_rows()
    first = info.n_rows + 3  # header, rows, then the blank line
    assert rows.malformed == [(first, "empty label"), (first + 1, "empty id"),
                              (first + 2, f"duplicate id '1' (first on line {_line_of(styles, '1')})")]
    assert by_id(rows)["901"].title == "Quoted, Title"


def _line_of(styles: Path, item_id: str) -> int:
    lines = styles.read_text().split("\n")
    return next(n for n, line in enumerate(lines, start=1) if line.split(",")[0] == item_id)


# -------------------------------------------------------------------------------------------- generic CSV
def test_csv_catalog_named_columns(tmp_path):
    info = make_csv_catalog(tmp_path)
    catalog = open_catalog(info.path, columns=CSV_COLUMNS)
    assert isinstance(catalog, CsvCatalog)
    rows = catalog.read_rows()
    assert rows.n_rows == info.n_rows and len(rows.items) == info.n_items
    assert rows.malformed == [(info.malformed_lines[0], "empty label")]
    items = by_id(rows)
    assert items[info.comma_title_id].title.startswith("Roadster Men, Women")
    assert not catalog.has_image(items[info.missing_image_id].image)
    absolute = [item for item in rows.items if Path(item.image).is_absolute()]
    assert len(absolute) == 1 and catalog.has_image(absolute[0].image)
    assert catalog.read_image_bytes(absolute[0].image) == Path(absolute[0].image).read_bytes()
    usable = sum(catalog.has_image(i.image) for i in rows.items if i.id != info.empty_title_id)
    assert usable == sum(info.usable_per_class.values())


def test_csv_catalog_bad_column_name(tmp_path):
    info = make_csv_catalog(tmp_path, per_class=1, defects=False)
    with pytest.raises(ValueError, match=r"'title'.*columns present: sku, price, category, name, photo"):
        open_catalog(info.path, columns=CsvColumns(id="sku", image="photo", title="title", label="category"))


def test_csv_catalog_short_row(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,image,title,label\n1,a.jpg,A title,x\n2,b.jpg\n")
    rows = open_catalog(path).read_rows()
    assert [i.id for i in rows.items] == ["1"] and rows.malformed[0][0] == 3


# ------------------------------------------------------------------------------------- opening and specs
def test_open_catalog_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalog not found: .*nowhere"):
        open_catalog(tmp_path / "nowhere")


def test_open_catalog_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown catalog format 'parquet'"):
        open_catalog(tmp_path, fmt="parquet")


def test_spec_round_trip(tmp_path, monkeypatch):
    make_fashion_catalog(tmp_path / "f", per_class=2, as_zip=True)
    make_csv_catalog(tmp_path / "c", per_class=2)
    monkeypatch.chdir(tmp_path)
    for catalog in (open_catalog("f/fashion-product-images-small.zip"),
                    open_catalog("c/catalog.csv", columns=CSV_COLUMNS)):
        spec = catalog.spec()
        assert Path(spec["path"]).is_absolute()
        reopened = open_catalog_from_spec(spec)
        assert reopened.spec() == spec and reopened.read_rows() == catalog.read_rows()
    with pytest.raises(ValueError, match="not a catalog spec"):
        open_catalog_from_spec({"format": "parquet", "path": "x"})


# ---------------------------------------------------------------------------------------------- pickling
def _read_in_child(catalog, ref, queue):
    queue.put(len(catalog.read_image_bytes(ref)))


def test_zip_catalog_pickles_and_reads_in_child(tmp_path):
    info = make_fashion_catalog(tmp_path, per_class=2, as_zip=True, defects=False)
    catalog = open_catalog(info.path)
    ref = catalog.read_rows().items[0].image
    expected = len(catalog.read_image_bytes(ref))  # the parent's handle is open now
    copy = pickle.loads(pickle.dumps(catalog))
    # private: nothing public says whether a zip handle is open (the unpickled copy must not hold the parent's)
    assert copy._files._zip is None and len(pickle.dumps(catalog)) < 1000
    assert len(copy.read_image_bytes(ref)) == expected
    for method in ("fork", "spawn"):  # fork inherits the open handle: it must be reopened in the child
        context = multiprocessing.get_context(method)
        queue = context.Queue()
        child = context.Process(target=_read_in_child, args=(catalog, ref, queue))
        child.start()
        assert queue.get(timeout=30) == expected
        child.join(timeout=30)
        assert child.exitcode == 0


# ----------------------------------------------------------------------------------------- real catalog
@pytest.mark.real
def test_real_catalog_rows():
    if not REAL_ZIP.exists():
        pytest.skip(f"real catalog absent: {REAL_ZIP}")
    catalog = open_catalog(REAL_ZIP)
    rows = catalog.read_rows()
    assert rows.n_rows == 44_446 and rows.malformed == [] and len(rows.items) == 44_446
    assert sum("," in item.title for item in rows.items) == 22
    assert sum(not catalog.has_image(item.image) for item in rows.items) == 374
    assert len({item.label for item in rows.items}) == 143


# ------------------------------------------------------------------------------------------ the factory
def test_factory_catalog_is_class_separable(tmp_path):
    """Mean colour alone classifies the images, and each class's titles hold their own word: other tests can
    expect a tiny classifier over generated catalogs to learn."""
    info = make_fashion_catalog(tmp_path, classes=("Tshirts", "Watches", "Casual Shoes", "Belts", "Ties"),
                                per_class=6, defects=False)
    catalog = open_catalog(info.path)
    items = catalog.read_rows().items
    means = np.array([np.asarray(Image.open(io.BytesIO(catalog.read_image_bytes(i.image)))).mean((0, 1))
                      for i in items])
    labels = np.array([info.classes.index(i.label) for i in items])
    centroids = np.stack([means[labels == c].mean(0) for c in range(len(info.classes))])
    predicted = ((means[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == labels).all()
    for item in items:
        assert item.title.endswith(class_words(item.label, info.classes.index(item.label))[0])
