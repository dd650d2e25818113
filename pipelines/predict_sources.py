"""What `heads predict` (pipelines/predict.py) reads: the products' CSV, and each feature source a saved model
names, rebuilt from its recorded provenance and checked against it.

A model folder's config.json names the feature sets it was trained on (`inputs`) and their provenance
(`store.feature_sets`): a `pooled` set names its backbone, weights_id and preprocessing; a module set
(`dense` / `classifier`, strategies 1-A/1-B) also names the module folder and its content hash. Each is rebuilt
here and checked against that record before anything runs, because features from other weights or another
preprocessing still give confident predictions - wrong ones, with no error anywhere.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from embedstore.backbones import create_backbone
from embedstore.catalog import open_catalog
from embedstore.catalog_base import Catalog, csv_fields_up_to, refuse_duplicated_columns
from embedstore.catalog_fashion import is_fashion_header
from embedstore.catalog_files import FolderFiles
from embedstore.image_pipeline import backbone_preprocessing, recorded_pipeline
from embedstore.images import ImageStages, image_stages
from embedstore.modules import load_module, module_id
from embedstore.preprocess import resize_mode
from embedstore.store import STATUS_NAMES
from heads.estimator import FusionHead
from heads.strategies import get_strategy


REASONS = {code: name.removeprefix("skipped: ") for code, name in STATUS_NAMES.items() if name.startswith("skipped")}


@dataclass(frozen=True)
class InputColumns:
    """Column names of an input CSV."""

    id: str | None = None   # None: "id" when the CSV has it, else the 1-based row number
    image: str = "image"    # a path relative to the CSV's folder, or absolute
    title: str = "title"


@dataclass(frozen=True)
class PredictSettings:
    top_k: int = 3
    batch_size: int = 64
    device: str | None = None         # None: cuda when present, else cpu
    image_weights: str | None = None  # the image backbone's weights file, when not in its standard places
    text_weights: str | None = None   # the text backbone's Hugging Face folder, likewise
    columns: InputColumns = field(default_factory=InputColumns)
    workers: int = 2                  # DataLoader processes decoding images; 0 decodes in this process

    def __post_init__(self):
        if self.top_k < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"--top-k and --batch-size must be at least 1 and --workers at least 0, got "
                             f"{self.top_k}, {self.batch_size}, {self.workers}")


@dataclass
class PredictSummary:
    out_csv: Path
    rows: int                                         # rows written
    predicted: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    malformed: int = 0                                # catalog rows that are no item (not written: no id)
    seconds: float = 0.0

    def format(self) -> str:
        skipped = ", ".join(f"{reason} {n}" for reason, n in self.skipped.items()) or "none"
        text = (f"predicted {self.predicted} of {self.rows} rows into {self.out_csv} in {self.seconds:.1f} s; "
                f"skipped: {skipped}")
        return text + (f"; {self.malformed} malformed catalog rows left out" if self.malformed else "")


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    ids: list[str]
    images: list[str]       # references for `files.read_image_bytes`
    titles: list[str]
    files: Catalog          # reads image bytes; FileNotFoundError when absent
    malformed: int = 0


def read_inputs(path: str | os.PathLike, columns: InputColumns, modalities: tuple[str, ...]) -> Inputs:
    """A CSV of new products (columns named by `columns`; only those the head needs must exist), or a catalog
    (Fashion Product Images folder/zip/styles.csv) opened with embedstore.catalog."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}; give a CSV with image and title columns or a catalog")
    if path.is_file() and path.suffix.lower() == ".csv":
        header = _header(path)
        wanted = {columns.image, columns.title}
        if not (is_fashion_header(header) and not wanted & set(header)):
            return _csv_inputs(path, header, columns, modalities)
        path = path.parent  # a styles.csv: the Fashion catalog rooted at its folder
    catalog = open_catalog(path, fmt="fashion")
    rows = catalog.read_rows()
    return Inputs([i.id for i in rows.items], [i.image for i in rows.items], [i.title for i in rows.items],
                  catalog, malformed=len(rows.malformed))


def _header(path: Path) -> list[str]:
    return [name.strip() for name in next(csv.reader([_csv_text(path).split("\n", 1)[0]]), [])]


def _csv_text(path: Path) -> str:
    """The CSV's text, or a one-line ValueError naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8") from None


def _csv_inputs(path: Path, header: list[str], columns: InputColumns, modalities) -> Inputs:
    needed = {"image": columns.image, "text": columns.title}
    roles = [("id", columns.id)] if columns.id else []
    roles += [(m, needed[m]) for m in modalities]
    for role, name in roles:
        if name not in header:
            option = {"image": "--image-column", "text": "--title-column", "id": "--id-column"}[role]
            raise ValueError(f"column {name!r} not in {path} (columns present: {', '.join(header) or 'none'}); "
                             f"name the {role} column with {option}")
    id_column = columns.id or ("id" if "id" in header else None)
    refuse_duplicated_columns(header, [id_column] + [name for _, name in roles], path)
    text = _csv_text(path)
    with csv_fields_up_to(len(text)):  # a title longer than the csv module's default limit is still a title
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            records = list(reader)
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num + 1}: not valid CSV ({error})") from None

    def value(record, name):
        return (record.get(name) or "").strip()  # a short row's missing cells read as empty

    ids = [value(r, id_column) if id_column else str(n) for n, r in enumerate(records, start=1)]
    # relative image paths are relative to the CSV's folder; the catalog's folder reader does exactly that
    return Inputs(ids, [value(r, columns.image) for r in records], [value(r, columns.title) for r in records],
                  Catalog(FolderFiles(str(path.resolve().parent))))


# ----------------------------------------------------------------------------------------------- features


@dataclass
class FeatureSource:
    """One of the head's inputs, computed from raw images or titles as its feature set was."""

    name: str                    # the store feature set, e.g. "image/tiny-resnet-64px/pooled"
    modality: str
    network: torch.nn.Module     # a Backbone or a TransferModule, on the device
    compute: Callable            # images (B, 3, H, W) or tokens {(B, 30)} -> (B, D)
    prepare: Callable | ImageStages  # the image pipeline's stages, as the store ran them, or tokenize
    # the precision the store computed this feature set in ("compute_precision" in its provenance): predict runs
    # the network in it too, on any device, so a store extracted under bf16 on a GPU and heads served on a CPU
    # see features made the same way. None (stores written before it was recorded): this device's default.
    precision: str | None = None


def _normalised(value) -> dict:
    """Provenance as saved to JSON (tuples -> lists), less a local folder's path: moving a folder keeps it."""
    value = json.loads(json.dumps(value))
    return {k: v for k, v in value.items() if k != "folder"}


def _check_identity(name: str, built, recorded: dict, fix: str) -> None:
    if built.weights_id != recorded.get("weights_id"):
        raise ValueError(f"{name}: the head was trained on features of weights {recorded.get('weights_id')}, but "
                         f"they resolve here to {built.weights_id}; {fix}")
    # the image pipeline is not the backbone's: predict runs the recorded one (see image_stages below)
    wanted = backbone_preprocessing(_normalised(recorded.get("preprocessing", {})))
    got = _normalised(built.preprocessing)
    if wanted != got:
        differ = sorted(k for k in wanted.keys() | got.keys() if wanted.get(k) != got.get(k))
        raise ValueError(f"{name}: the head was trained on features with another preprocessing "
                         f"({', '.join(differ)} differ); {fix}")


def _pooled_source(name: str, modality: str, recorded: dict, settings: PredictSettings, device) -> FeatureSource:
    preprocessing = recorded.get("preprocessing", {})
    if modality == "image":
        option, weights = "--image-weights FILE", settings.image_weights
        backbone = create_backbone("image", recorded["backbone"], weights=weights,
                                   image_size=int(preprocessing["image_size"]), image_resize=resize_mode(preprocessing))
    else:
        option, weights, backbone_name = "--text-weights DIR", settings.text_weights, recorded["backbone"]
        if preprocessing.get("folder"):  # a local Hugging Face folder was the backbone's name
            backbone_name, weights = weights or preprocessing["folder"], None
        backbone = create_backbone("text", backbone_name, weights=weights, pooling=preprocessing.get("pooling"))
    _check_identity(name, backbone, recorded, f"pass the weights the store was extracted with as {option}")
    if modality == "image":
        # channels-last, as extraction ran it, so the convolutions round the same way
        backbone = backbone.to(device, memory_format=torch.channels_last).eval()
        return FeatureSource(name, modality, backbone, backbone, _recorded_stages(backbone, recorded, device),
                             recorded.get("compute_precision"))
    backbone = backbone.to(device).eval()
    return FeatureSource(name, modality, backbone, lambda tokens: backbone(**tokens), backbone.tokenize,
                         recorded.get("compute_precision"))


def _module_source(name: str, modality: str, layer: str, recorded: dict, device) -> FeatureSource:
    folder = recorded.get("module_dir")
    if not folder or not Path(folder).is_dir():
        raise FileNotFoundError(f"{name}: the module folder {folder} recorded in the head's provenance is not "
                                "there; put the module (from `embed finetune`) back there")
    if module_id(folder) != recorded.get("module_id"):
        raise ValueError(f"{name}: the module in {folder} is not the one the head was trained over (module id "
                         f"{module_id(folder)}, recorded {recorded.get('module_id')}); restore that module")
    module, _ = load_module(folder, device=device)
    _check_identity(name, module.backbone, recorded, f"restore the backbone weights the module in {folder} used")
    if modality == "image":
        module = module.to(memory_format=torch.channels_last)
        prepare = _recorded_stages(module.backbone, recorded, device)
    else:
        prepare = module.backbone.tokenize
    return FeatureSource(name, modality, module, lambda inputs: module.forward_features(inputs)[layer], prepare,
                         recorded.get("compute_precision"))


def _recorded_stages(backbone, recorded: dict, device) -> ImageStages:
    """The image pipeline the store's feature set was made with ("pil" for stores that record none), on this
    device: the same resize on any device, to one intensity level across the two pipelines."""
    return image_stages(backbone, recorded_pipeline(recorded.get("preprocessing")), device)


def load_sources(head: FusionHead, settings: PredictSettings, device) -> list[FeatureSource]:
    """The head's inputs in its order (image first), each rebuilt and checked against its provenance."""
    config = head.config_
    declared = get_strategy(config.strategy)
    return sources_for(head.metadata_, config.strategy, declared.modalities, declared.layer, settings, device)


def sources_for(doc: dict, strategy: str, modalities: tuple[str, ...], layer: str, settings: PredictSettings,
                device) -> list[FeatureSource]:
    """The feature sources a saved model's config.json (`doc`: 'inputs' + 'store.feature_sets') names, in its
    order, each rebuilt and checked against its provenance; for fusion heads and decision-level models alike."""
    names, provenance = doc.get("inputs"), (doc.get("store") or {}).get("feature_sets")
    if not names or not provenance:
        raise ValueError("the model's config.json records no feature sets ('inputs', 'store.feature_sets'); "
                         "save it again with `heads sweep`")
    found = tuple(name.split("/")[0] for name in names)
    if found != modalities or any(name.rsplit("/", 1)[1] != layer for name in names):
        raise ValueError(f"the model (strategy {strategy}) needs {layer} features of {modalities}, but its "
                         f"config.json names {names}")
    def build(name: str, modality: str, recorded: dict) -> FeatureSource:
        if layer == "pooled":
            return _pooled_source(name, modality, recorded, settings, device)
        return _module_source(name, modality, layer, recorded, device)

    sources = []
    for name, modality in zip(names, modalities):
        recorded = provenance[name]
        sources.append(_joined_source(name, modality, recorded, build, device) if "joined" in recorded
                       else build(name, modality, recorded))
    return sources


def _joined_source(name: str, modality: str, recorded: dict, build, device) -> FeatureSource:
    """A joined source (heads/joined.py): every member rebuilt and checked from its own provenance, their
    features side by side in member order (pipelines/predict_joined.py)."""
    from pipelines.predict_joined import JoinedImageStages, joined_compute, joined_tokenize

    layer = name.rsplit("/", 1)[1]
    members = [build(f"{modality}/{m['source']}/{layer}", modality, m) for m in recorded["joined"]]
    prepare = (JoinedImageStages([m.prepare for m in members]) if modality == "image"
               else joined_tokenize([m.prepare for m in members]))
    return FeatureSource(name, modality, torch.nn.ModuleList([m.network for m in members]),
                         joined_compute(members, device), prepare, None)
