"""Strategies 3-A and 3-B: the whole multimodal model trained end to end from pretrained backbones on the raw
catalog (DESIGN.md, "The six multimodal fine-tuning strategies"). This is the slow baseline the store exists
to avoid; `benchmarks/bench_end_to_end.py` measures how much slower it is than a head over the store.

Model: each modality is an S3 module (embedstore/modules.py: backbone -> pooled (D) -> dense D->500 -> ReLU ->
Dropout [-> classifier 500->C for 3-B]); the two branches are fused by an operator of heads/fusion.py's registry
(at the 500-d layers for 3-A, at the classifier outputs for 3-B), then fused -> 250 -> ReLU -> Dropout -> C.
Training is the shared loop (embedstore/training.py, `fit`): AdamW, gradient clipping at 1.0, random horizontal flip, early stopping
on validation accuracy, a checkpoint per epoch (safetensors + JSON) with resume, DistributedDataParallel under
torchrun, bf16 autocast and pinned memory on CUDA only. Saved with the model-folder convention
(embedstore/model_folder.py, kind "end-to-end": model.safetensors + config.json, plus metrics.json);
`load_end_to_end` rebuilds the model from such a folder, and `heads predict` runs it on new products.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from embedstore.backbones import create_backbone
from embedstore.finetune import ImageItems
from embedstore.manifest import Manifest
from embedstore.metrics import classification_metrics
from embedstore.model_folder import load_pretrained, save_pretrained
from embedstore.defaults import (DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE, FUSION_DIM, MIDDLE_DIM, PRECISIONS,
                                 resolve_precision)
from embedstore.modules import build_module
from embedstore.training import check_training_numbers, fit, predict, training_processes
from heads.fusion import create_fusion, list_fusions
from heads.rows import result_row, run_key
from heads.strategies import get_strategy, list_strategies

KIND = "end-to-end"


@dataclass
class EndToEndSettings:
    strategy: str = "3A"                 # "3A": fused at the 500-d layers; "3B": at the classifier outputs
    fusion: str = "concat"               # any operator of heads/fusion.py
    image_backbone: str = DEFAULT_IMAGE_BACKBONE
    text_backbone: str = DEFAULT_TEXT_BACKBONE
    image_weights: str | None = None     # local weights file / Hugging Face folder; default: the standard places
    text_weights: str | None = None
    image_size: int = 224
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32                 # per process under torchrun
    max_epochs: int = 10
    patience: int = 3                    # epochs without a better validation accuracy
    dropout: float = 0.3
    flip: bool = True                    # random horizontal flip of training images
    freeze_batchnorm: bool = False       # keep the backbones' batch-norm statistics (small per-process batches)
    seed: int = 0
    device: str | None = None            # default: CUDA when present, else CPU
    precision: str = "auto"              # autocast: "auto" is bf16 on CUDA, fp32 on a CPU (embedstore/defaults.py)
    max_steps_per_epoch: int | None = None  # measured partial epochs; the full epoch is extrapolated
    workers: int = 2                     # DataLoader processes decoding JPEGs
    progress: bool = True

    def check(self) -> "EndToEndSettings":
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        known = list_strategies(trainer="end-to-end")
        if self.strategy not in known:
            raise ValueError(f"unknown end-to-end strategy {self.strategy!r}; use one of {', '.join(known)}")
        if self.fusion not in list_fusions():
            raise ValueError(f"unknown fusion operator {self.fusion!r}; registered: {', '.join(list_fusions())}")
        return check_training_numbers(self)


# What may change between a run and its resumption: how long it goes on, and where and how verbosely it runs.
RESUME_KEYS = tuple(k for k in EndToEndSettings.__dataclass_fields__
                    if k not in ("max_epochs", "patience", "device", "precision", "workers", "progress"))


class EndToEndModel(nn.Module):
    """images (B, 3, H, W) + tokens (B, 30) -> logits (B, C), every weight trainable."""

    def __init__(self, image_backbone, text_backbone, n_classes: int, *, strategy: str = "3A",
                 fusion: str = "concat", dropout: float = 0.3, freeze_batchnorm: bool = False):
        super().__init__()
        self.strategy, self.freeze_batchnorm = strategy, freeze_batchnorm
        # the strategy's branch: ("middle",) fuses the 500-d layers (3-A: no module classifier), ("middle",
        # "classifier") the modules' classifier outputs (3-B)
        self.at_classifier = get_strategy(strategy).branch[-1] == "classifier"
        classes = n_classes if self.at_classifier else None
        self.image = build_module("image", 3, classes, backbone=image_backbone, dropout=dropout)
        self.text = build_module("text", 3, classes, backbone=text_backbone, dropout=dropout)
        self.fusion = create_fusion(fusion, n_classes if self.at_classifier else MIDDLE_DIM)
        # The registry's operators run stacks of G heads on (G, ...) weights; this model is G = 1.
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        self.fusion_params = nn.ParameterDict({
            name: nn.Parameter(self.fusion.init_param(name, shape, generator).unsqueeze(0))  # (1, ...)
            for name, shape in self.fusion.param_shapes().items()})
        self.fusion_layer = nn.Linear(self.fusion.output_dim, FUSION_DIM)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(FUSION_DIM, n_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_batchnorm:  # normalise with the pretrained running statistics, and keep them
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _branch(self, module, inputs) -> torch.Tensor:
        features = module.forward_features(inputs)
        if not self.at_classifier:
            return module.head.dropout(features["dense"])  # (B, 500), as 2-A's middle layer
        return features["classifier"]  # (B, C) = classifier(dropout(dense))

    def forward(self, inputs: dict) -> torch.Tensor:
        images = inputs["images"].contiguous(memory_format=torch.channels_last)
        a = self._branch(self.image, images)  # (B, d): the operators' image side
        b = self._branch(self.text, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
        fused = self.fusion.forward(dict(self.fusion_params), a.unsqueeze(0), b.unsqueeze(0))[0]  # (B, fused_dim)
        return self.classifier(self.dropout(torch.relu(self.fusion_layer(fused))))  # (B, C)

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": total, "non_trainable": 0, "total": total}


class PairItems(ImageItems):
    """Images decoded in DataLoader workers (finetune.ImageItems: flips, bad images skipped and counted) with
    their titles tokenized per batch in the main process."""

    def __init__(self, manifest: Manifest, image_backbone, text_backbone, settings: EndToEndSettings, device):
        super().__init__(manifest, image_backbone, settings, device)
        if not settings.flip:
            self.transforms[True] = self.transforms[False]
        self.titles, self.tokenize = [item.title for item in manifest.items], text_backbone.tokenize

    def _with_labels(self, batches):
        for rows, images in batches:
            tokens = self.tokenize([self.titles[row] for row in rows])  # (n, 30) each
            yield {"images": images, **tokens}, torch.from_numpy(self.labels[rows])


@dataclass
class EndToEndResult:
    out_dir: Path
    metrics: dict = field(default_factory=dict)


def create_backbones(settings: EndToEndSettings):
    image = create_backbone("image", settings.image_backbone, weights=settings.image_weights,
                            image_size=settings.image_size)
    return image, create_backbone("text", settings.text_backbone, weights=settings.text_weights)


def train_end_to_end(manifest_path: str | Path, out_dir: str | Path, settings: EndToEndSettings, *,
                     backbones=None) -> EndToEndResult:
    """Train 3-A / 3-B on the manifest's items; `backbones`: an (image, text) pair already built (tests).
    Re-running into the same `out_dir` resumes after its last finished epoch."""
    settings.check()
    manifest, out_dir = Manifest.load(manifest_path), Path(out_dir)
    with training_processes(settings.device) as (device, ranks):
        torch.manual_seed(settings.seed)  # the new layers' initial weights
        image, text = backbones or create_backbones(settings)
        model = EndToEndModel(image, text, len(manifest.classes), strategy=settings.strategy, fusion=settings.fusion,
                              dropout=settings.dropout, freeze_batchnorm=settings.freeze_batchnorm)
        model = model.to(memory_format=torch.channels_last)  # faster convolutions (extract.py measured it)
        data = PairItems(manifest, image, text, settings, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        out_dir.mkdir(parents=True, exist_ok=True)
        precision = resolve_precision(settings.precision, device)
        summary = fit(model, data, settings, device, optimizer=optimizer, clip=1.0, checkpoint_dir=out_dir,
                      resume_keys=RESUME_KEYS, ranks=ranks, precision=precision)
        best = summary.pop("best_state")
        model.load_state_dict(best)
        labels, predictions = predict(model, data.batches("test"), device, precision=precision)
        counts = model.parameter_counts()
        scores = classification_metrics(labels, predictions, n_classes=len(manifest.classes))
        metrics = {
            "strategy": settings.strategy, "fusion": settings.fusion, "manifest_sha256": manifest.sha256,
            "backbones": {m.modality: {"name": m.name, "weights_id": m.weights_id} for m in (image, text)},
            "device": str(device), "processes": ranks.world, "precision": precision,
            "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
            "trainable_parameters": counts["trainable"], "non_trainable_parameters": counts["non_trainable"],
            "items": data.counts(), **summary,
        }
        if ranks.rank == 0:  # only rank 0 writes
            config = {"settings": asdict(settings), "classes": manifest.classes,
                      "preprocessing": {m.modality: m.preprocessing for m in (image, text)},
                      "metrics": {k: v for k, v in metrics.items() if k != "history"}}
            save_pretrained(out_dir, {k: v.float() if v.is_floating_point() else v for k, v in best.items()},
                            json.loads(json.dumps(config, default=list)), kind=KIND,
                            extra_files={"metrics.json": json.dumps(metrics, indent=1, sort_keys=True) + "\n"})
    return EndToEndResult(out_dir, metrics)


def load_end_to_end(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[EndToEndModel, dict]:
    """A trained 3-A / 3-B model (eval mode) and its config.json, from a folder `train_end_to_end` wrote.
    Every weight is in the file; the backbones are rebuilt as architectures (and the text tokenizer) only."""
    tensors, config = load_pretrained(folder, kind=KIND)
    known = EndToEndSettings.__dataclass_fields__
    settings = EndToEndSettings(**{k: v for k, v in config["settings"].items() if k in known})
    text_weights = settings.text_weights
    if text_weights and not os.path.isdir(text_weights):
        raise FileNotFoundError(f"{folder}: the text model folder {text_weights} it was trained from (its "
                                "tokenizer) is not there; put it back")
    image = create_backbone("image", settings.image_backbone, pretrained=False, image_size=settings.image_size)
    text = create_backbone("text", settings.text_backbone, weights=text_weights, pretrained=False)
    for backbone in (image, text):  # the tokenizer and image transform must be the ones it was trained with
        recorded = (config.get("preprocessing") or {}).get(backbone.modality)
        built = json.loads(json.dumps(backbone.preprocessing, default=list))
        recorded, built = ({k: v for k, v in d.items() if k != "folder"} for d in (recorded or {}, built))
        if recorded and recorded != built:  # a moved local folder is the same model
            differ = sorted(k for k in recorded.keys() | built.keys() if recorded.get(k) != built.get(k))
            raise ValueError(f"{folder}: {backbone.name}'s preprocessing here differs from training "
                             f"({', '.join(differ)}); restore the backbone it was trained with")
    model = EndToEndModel(image, text, len(config["classes"]), strategy=settings.strategy, fusion=settings.fusion,
                          dropout=settings.dropout, freeze_batchnorm=settings.freeze_batchnorm)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise ValueError(f"{folder}/model.safetensors does not fit its config ({str(error).splitlines()[0]}); "
                         "train it again") from None
    return model.to(device, memory_format=torch.channels_last).eval(), config


# ----------------------------------------------------------------------------------------------- heads sweep


def backbones_of_store(store, base: EndToEndSettings) -> tuple[EndToEndSettings, dict]:
    """The settings with the backbones that made the store's pooled features, and their provenance."""
    provenance = {m: store.feature_sets[store.find(m, "pooled")].provenance for m in ("image", "text")}
    image, text = provenance["image"], provenance["text"]
    settings = EndToEndSettings(**{**asdict(base), "image_backbone": image["backbone"],
                                   "image_size": int(image["preprocessing"]["image_size"]),
                                   "text_backbone": text["backbone"],
                                   "text_weights": base.text_weights or text["preprocessing"].get("folder")})
    return settings, provenance


def sweep_cell(store, store_path, manifest_path, out_dir: Path, strategy: str, fusion: str, seeds, base:
               EndToEndSettings, done: set[str], log=print) -> tuple[list[dict], int]:
    """`heads sweep --strategies 3A,3B`: one end-to-end run per missing seed; result rows like the cached
    strategies' (heads/sweep.py). Runs live in OUT/end_to_end/<cell>/seed-<seed>/ and resume there."""
    manifest = Manifest.load(manifest_path)
    if manifest.sha256 != store.manifest_sha256:
        raise ValueError(f"{manifest_path} is not the manifest {store_path} was extracted from; pass that one "
                         "with --manifest")
    settings, provenance = backbones_of_store(store, base)
    backbones = create_backbones(settings)
    for backbone, modality in zip(backbones, ("image", "text")):
        if backbone.weights_id != provenance[modality]["weights_id"]:
            raise ValueError(f"the store's {modality} features come from weights {provenance[modality]['weights_id']}"
                             f", but {backbone.name} now resolves to {backbone.weights_id}; pass the original "
                             f"weights (--{modality}-weights PATH)")
    cell, rows, skipped = f"{strategy}-{fusion}", [], 0
    for seed in seeds:
        run = EndToEndSettings(**{**asdict(settings), "strategy": strategy, "fusion": fusion, "seed": seed})
        identity = {k: v for k, v in asdict(run).items() if k in RESUME_KEYS + ("max_epochs", "patience")}
        if run.precision != "auto":   # "auto" is what every run did before --precision reached 3-A/3-B: same keys
            identity["precision"] = run.precision
        key = run_key(train=identity, manifest_sha256=manifest.sha256,
                      backbones={m: provenance[m]["weights_id"] for m in provenance})
        if key in done:
            skipped += 1
            continue
        start = time.perf_counter()
        # each run builds its backbones afresh: the previous run fine-tuned the ones it was given
        m = train_end_to_end(manifest_path, out_dir / "end_to_end" / cell / f"seed-{seed}", run,
                             backbones=backbones if seed == seeds[0] else None).metrics
        log(f"{cell} seed {seed}: test accuracy {m['test_accuracy']:.4f} (best epoch {m['best_epoch']}, "
            f"{m['training_seconds']:.1f} s of training)")
        names = {"cell": cell, "cell_base": cell, "pair": f"{run.image_backbone}+{run.text_backbone}",
                 "image_source": run.image_backbone, "text_source": run.text_backbone, "strategy": strategy,
                 "fusion": fusion}
        rows.append(result_row(
            run_key=key, names=names, seed=seed,
            config={"strategy": strategy, "fusion": fusion, "num_classes": len(manifest.classes),
                    "middle_dim": MIDDLE_DIM, "fusion_dim": FUSION_DIM, "dropout": run.dropout,
                    "image_backbone": run.image_backbone, "text_backbone": run.text_backbone},
            train_settings=asdict(run),
            store={"path": os.path.relpath(store_path, out_dir), "manifest_sha256": manifest.sha256,
                   "manifest": os.path.relpath(manifest_path, out_dir),
                   "feature_sets": {}, "backbones": provenance, "split_rows": m["items"]},
            test_accuracy=m["test_accuracy"], test_macro_f1=m["test_macro_f1"],
            best_val_accuracy=m["best_val_accuracy"], best_epoch=m["best_epoch"], epochs_run=m["epochs"],
            diverged=False, train_seconds=m["training_seconds"], group_seconds=time.perf_counter() - start,
            group_size=1, batched=False, device=m["device"], precision=m["precision"], train_flops=None,
            trainable_parameters=m["trainable_parameters"], non_trainable_parameters=0,
            processes=m["processes"], estimated_full_epoch_seconds=m.get("estimated_full_epoch_seconds")))
    return rows, skipped


def is_rank_zero() -> bool:
    """Under torchrun only rank 0 writes result rows."""
    return int(os.environ.get("RANK", "0")) == 0
