"""`embed paper`: the whole 14-strategy comparison of Seo, Lee & Jang (2025) on one catalog, in one command.

For each manifest seed m, into OUT/manifest-seed-m/:
  prepare -> manifest.json; extract pooled features -> store.h5; modules (`embed finetune`) image S1/S2 (S3
  optional) and text S1/S2/S3 -> modules/<modality>-s<k>-seed-<s>/; for each head seed s a copy of the store
  with the fused pair's module features (image S2 + text S3 by default) -> module-stores/seed-<s>.h5; heads
  sweeps -> results/pooled (2-A, 2-B, baselines), results/modules-seed-<s> (1-A, 1-B), results/end-to-end
  (3-A, 3-B, when asked). With --cross-fit K the fused pair's modules are trained again cross-fitted
  (modules/<modality>-s<k>-seed-<s>-cross-fit-K/), with their own stores (module-stores/seed-<s>-cross-fit.h5) and
  sweeps (results/modules-cross-fit-seed-<s>). Check manifests (--check-manifest-seeds) run every step too; the
  report chooses nothing on them. Then one report over everything (pipelines/paper_report.py) -> OUT/report/.

Why a copy of the store per module seed: a sweep finds its features by (modality, layer), so a store may hold
one module per modality; the copy keeps the pooled features, so frozen modules need no backbone pass.

Every step writes a JSON stamp of its inputs beside its output (`<output>.stamp.json`) and is skipped when the
stamp matches and says finished. A changed input removes the stale output first, except where the step can
continue from it (S3 given more epochs resumes its checkpoint; a sweep given more seeds or operators keeps its
runs). Extraction, S3 training and sweeps resume inside a step, so an interrupted run loses little.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from embedstore.fingerprint import fingerprint
from embedstore.outputs import partial_file, write_text_atomic
from pipelines.paper_report import PLAN_FILE
from pipelines.paper_settings import PaperSettings
from pipelines.steps import as_json, run_step

# FinetuneSettings fields added after stamps were first written, with their default: a stamp leaves a field out
# while it has that default, so stamps written before the field existed stay current (no module is retrained)
ADDED_LATER = {"cross_fit": None, "image_resize": "crop"}
LOG_FILE = "paper.log"


# ----------------------------------------------------------------------------------------------- the run


def backbone_identity(settings: PaperSettings) -> dict:
    """Each backbone's name, weights_id and preprocessing: what every stamp depends on. Building them here also
    fails at once, before hours of work, when weights are missing."""
    from embedstore.backbones import create_backbone

    identity = {}
    for modality, name, weights in (("image", settings.image_backbone, settings.image_weights),
                                    ("text", settings.text_backbone, settings.text_weights)):
        options = {"image_size": settings.image_size, "image_resize": settings.image_resize} \
            if modality == "image" else {}
        backbone = create_backbone(modality, name, weights=weights, **options)
        identity[modality] = as_json({"backbone": backbone.name, "weights_id": backbone.weights_id,
                                    "preprocessing": backbone.preprocessing, "feature_dim": backbone.feature_dim})
        del backbone
    return identity


def run_paper(catalog: str | Path, out: str | Path, settings: PaperSettings = PaperSettings(),
              log: Callable[[str], None] = print) -> Path:
    """Run (or bring up to date) every step into OUT; returns OUT/report/report.md."""
    from pipelines.paper_report import report_inputs, write_paper_report

    settings = settings.checked()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    catalog = Path(catalog).resolve()
    if not catalog.exists():
        raise FileNotFoundError(f"catalog not found: {catalog}; give the Fashion Product Images folder or zip")

    def say(line: str) -> None:
        log(line)
        with open(out / LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    say(f"embed paper {catalog} -> {out}")
    identity = backbone_identity(settings)
    plan = {"catalog": str(catalog), "settings": as_json(asdict(settings)), "backbones": identity, "manifests": []}
    for m in settings.all_manifest_seeds():
        job = _ManifestJob(catalog, out / f"manifest-seed-{m}", m, settings, identity, say)
        entry = job.run()
        # tuning manifests choose (the first one's validation split) and are scored; check manifests are only scored
        entry["role"] = "check" if m in settings.check_manifest_seeds else "tuning"
        plan["manifests"].append(entry)
    plan["catalog_images"] = _image_sizes(Path(plan["manifests"][0]["manifest"]))
    write_text_atomic(out / PLAN_FILE, json.dumps(plan, indent=1, sort_keys=True) + "\n")
    report_dir = out / "report"
    run_step("report", report_dir, report_inputs(out), lambda: write_paper_report(out, report_dir), say)
    return report_dir / "report.md"


def _image_sizes(manifest_path: Path, sample: int = 20) -> dict:
    """The catalog's photo sizes (width x height) over a sample of the manifest's items, for the report."""
    import io

    from PIL import Image

    from embedstore.manifest import Manifest

    manifest = Manifest.load(manifest_path)
    catalog, sizes = manifest.open_catalog(), {}
    for item in manifest.items[:: max(1, len(manifest.items) // sample)][:sample]:
        try:
            with Image.open(io.BytesIO(catalog.read_image_bytes(item.image))) as image:
                key = f"{image.width}x{image.height}"
        except (OSError, ValueError, SyntaxError):
            continue  # missing or corrupt: the store counts those
        sizes[key] = sizes.get(key, 0) + 1
    return {"sampled": sum(sizes.values()), "sizes": sizes}


class _ManifestJob:
    """Every step of one manifest seed. run() returns its entry of the plan the report reads."""

    def __init__(self, catalog: Path, root: Path, seed: int, settings: PaperSettings, identity: dict, log):
        self.catalog, self.root, self.seed, self.s, self.identity = catalog, root, seed, settings, identity
        self.log = lambda line: log(f"[manifest-seed-{seed}] {line}")
        self.manifest, self.store = root / "manifest.json", root / "store.h5"
        self.entry = {"seed": seed, "manifest": str(self.manifest), "store": str(self.store), "modules": [],
                      "results": [], "pairs": {}}

    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        self._prepare()
        from embedstore.manifest import Manifest

        self.sha = Manifest.load(self.manifest).sha256
        self.entry["manifest_sha256"] = self.sha
        self.store_digest = self._extract()
        modules = self._modules()
        self._sweep_pooled()
        for s in self.s.seeds:
            self._sweep_modules(s, modules)
        if self.s.cross_fit:
            self._cross_fit()
        if self.s.end_to_end:
            self._sweep_end_to_end()
        self._ensemble()
        return self.entry

    def _prepare(self) -> None:
        from embedstore.catalog import open_catalog
        from embedstore.manifest import format_summary, prepare_manifest

        split = replace(self.s.split, seed=self.seed)
        stat = self.catalog.stat()
        inputs = {"catalog": str(self.catalog), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "format": self.s.catalog_format, "split": asdict(split)}

        def work():
            manifest = prepare_manifest(open_catalog(self.catalog, fmt=self.s.catalog_format), split)
            manifest.save(self.manifest)
            self.log(format_summary(manifest).replace("\n", "; "))

        run_step("prepare manifest.json", self.manifest, inputs, work, self.log)

    def _extract(self) -> str:
        from embedstore.extract import extract
        from embedstore.extract_plan import ExtractSettings
        from embedstore.inspect import format_counts

        s = self.s
        settings = ExtractSettings(image_backbone=s.image_backbone, text_backbone=s.text_backbone,
                                   image_weights=s.image_weights, text_weights=s.text_weights,
                                   image_size=s.image_size, image_resize=s.image_resize, workers=s.workers,
                                   device=s.device, progress=s.progress)

        def work():
            for report in extract(self.manifest, self.store, settings):
                if not report.complete:
                    raise ValueError(f"{report.name} in {self.store} is incomplete; rerun to resume extraction")
                self.log(f"extract {report.name}: {report.computed} rows, {format_counts(report.counts)}")

        inputs = {"manifest_sha256": self.sha, "image": self.identity["image"], "text": self.identity["text"]}
        return run_step("extract store.h5", self.store, inputs, work, self.log)

    def _modules(self) -> dict:
        """Train every module; returns {(modality, strategy, seed): (folder, step digest)}."""
        done = {}
        for modality in ("image", "text"):
            for strategy in (1, 2, 3):
                for seed in self.s.module_seeds(modality, strategy):
                    done[modality, strategy, seed] = self._module(modality, strategy, seed)
                    self.entry["modules"].append({"modality": modality, "strategy": strategy, "seed": seed,
                                                  "dir": str(done[modality, strategy, seed][0])})
        return done

    def _module(self, modality: str, strategy: int, seed: int, cross_fit: int | None = None) -> tuple[Path, str]:
        """`embed finetune` of one module (cross-fitted with K folds when `cross_fit`): (folder, step digest)."""
        from embedstore.finetune import FinetuneSettings, finetune

        epochs = {1: self.s.module_epochs, 2: self.s.module_epochs,
                  3: self.s.text_s3_epochs if modality == "text" else self.s.image_s3_epochs}[strategy]
        folder = self.root / "modules" / (f"{modality}-s{strategy}-seed-{seed}"
                                          + (f"-cross-fit-{cross_fit}" if cross_fit else ""))
        settings = FinetuneSettings(
            modality=modality, strategy=strategy, backbone=getattr(self.s, f"{modality}_backbone"),
            weights=getattr(self.s, f"{modality}_weights"), image_size=self.s.image_size,
            image_resize=self.s.image_resize if modality == "image" else "crop", cross_fit=cross_fit,
            max_epochs=epochs, seed=seed, device=self.s.device, workers=self.s.workers,
            progress=self.s.progress).resolved()
        recorded = {k: v for k, v in asdict(settings).items()
                    if k not in ("device", "workers", "progress", "max_epochs", "patience")
                    and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        inputs = {"manifest_sha256": self.sha, "backbone": self.identity[modality], "settings": recorded,
                  "max_epochs": settings.max_epochs, "patience": settings.patience,
                  "store": self.store_digest if strategy < 3 else None}
        store = self.store if strategy < 3 else None
        # S3 given more epochs or patience resumes from its checkpoint (finetune.RESUME_KEYS)
        key = run_step(f"finetune {folder.name}", folder, inputs,
                       lambda: finetune(self.manifest, folder, settings, store_path=store), self.log,
                       resumable=("max_epochs", "patience") if strategy == 3 else ())
        return folder, key

    def _cross_fit(self) -> None:
        """The fused pair's modules (those `_pair_module` picks for each head seed) trained again cross-fitted,
        each head seed's store of their features and its sweep of 1-A, 1-B, LFM beside the plain one."""
        k, plain = self.s.cross_fit, {}
        for seed in self.s.seeds:
            for modality in ("image", "text"):
                strategy = self.s.pair[0 if modality == "image" else 1]
                seeds = self.s.module_seeds(modality, strategy)
                plain[modality, strategy, seed if seed in seeds else seeds[0]] = None
        done = {}
        for modality, strategy, seed in plain:
            done[modality, strategy, seed] = self._module(modality, strategy, seed, cross_fit=k)
            self.entry.setdefault("cross_fit_modules", []).append(
                {"modality": modality, "strategy": strategy, "seed": seed, "k": k,
                 "dir": str(done[modality, strategy, seed][0])})
        for seed in self.s.seeds:
            self._sweep_modules(seed, done, variant=f"cross-fit K={k}")

    def _train_settings(self):
        from heads.train import TrainSettings

        return TrainSettings(max_epochs=self.s.head_epochs, precision=self.s.precision)

    def _sweep(self, label: str, store: Path, results: Path, inputs: dict, settings, variant: str | None = None):
        from heads.sweep import run_sweep

        inputs = {**inputs, "train": asdict(settings.train), "dropout": settings.dropout,
                  "strategies": settings.strategies, "seeds": settings.seeds, "fusions": settings.fusions,
                  "baselines": settings.baselines}

        def work():
            summary = run_sweep(store, results, settings, log=lambda line: None)
            self.log(f"{label}: {summary['trained']} heads trained, {summary['skipped']} already in runs.jsonl")

        # more seeds or operators keep the runs already there (the sweep skips them by run key)
        run_step(label, results, inputs, work, self.log, resumable=("seeds", "fusions", "strategies"))
        self.entry["results"].append({"dir": str(results), "seeds": list(settings.seeds),
                                      "fusions": list(settings.fusions), "strategies": list(settings.strategies),
                                      "baselines": settings.baselines, **({"variant": variant} if variant else {})})

    def _sweep_pooled(self) -> None:
        from heads.sweep import SweepSettings

        from heads.strategies import strategies_reading

        # the fused heads over pooled features (2-A, 2-B) + the decision-level models over them (logistic
        # regressions, late fusion, stacking: heads/decision.py); the unimodal heads come with baselines=True
        strategies = (strategies_reading("pooled", trainer="head", fused=True)
                      + strategies_reading("pooled", trainer="linear"))
        settings = SweepSettings(strategies=strategies, fusions=self.s.fusions,
                                 seeds=self.s.seeds, baselines=True, device=self.s.device, train=self._train_settings(),
                                 progress=self.s.progress)
        self._sweep("sweep results/pooled (2-A, 2-B, baselines, LR, LF, ST)", self.store,
                    self.root / "results" / "pooled", {"store": self.store_digest}, settings)

    def _pair_module(self, modality: str, seed: int, modules: dict) -> tuple[Path, str]:
        """The module of the fused pair for head seed `seed`: the same seed where one was trained, else the
        first seed's (S3 trains fewer seeds; the report says so)."""
        strategy = self.s.pair[0 if modality == "image" else 1]
        seeds = self.s.module_seeds(modality, strategy)
        return modules[modality, strategy, seed if seed in seeds else seeds[0]]

    def _sweep_modules(self, seed: int, modules: dict, variant: str | None = None) -> None:
        """Head seed `seed`'s store of its pair's module features and the sweep over it; `variant` (e.g.
        "cross-fit K=5"): cross-fitted modules, into their own store and results folder."""
        from embedstore.extract import extract
        from embedstore.extract_plan import ExtractSettings
        from embedstore.inspect import format_counts
        from embedstore.modules import module_id
        from heads.strategies import strategies_reading
        from heads.sweep import SweepSettings

        (image_dir, _), (text_dir, _) = (self._pair_module(m, seed, modules) for m in ("image", "text"))
        suffix = "-cross-fit" if variant else ""
        store = self.root / "module-stores" / f"seed-{seed}{suffix}.h5"
        settings = ExtractSettings(image_backbone=None, text_backbone=None, image_module=str(image_dir),
                                   text_module=str(text_dir), workers=self.s.workers, device=self.s.device,
                                   progress=self.s.progress)

        def work():
            if not store.exists():  # a copy of the pooled features: frozen modules then need no backbone pass
                with partial_file(store) as partial:
                    shutil.copyfile(self.store, partial)
            for report in extract(self.manifest, store, settings):
                self.log(f"module features {report.name}: {report.computed} rows, {format_counts(report.counts)}")

        inputs = {"store": self.store_digest, "image_module": module_id(image_dir), "text_module": module_id(text_dir)}
        store_digest = run_step(f"module features module-stores/{store.name}", store, inputs, work, self.log)
        self.entry["pairs"][f"{seed}{suffix}"] = {"image": str(image_dir), "text": str(text_dir), "store": str(store)}
        # the strategies over the modules' outputs: 1-A, 1-B and LFM (late fusion of their own classifier outputs)
        sweep = SweepSettings(strategies=strategies_reading("dense", "classifier"), fusions=self.s.fusions,
                              seeds=(seed,), baselines=False, device=self.s.device, train=self._train_settings(),
                              progress=self.s.progress)
        results = f"modules{suffix}-seed-{seed}"
        self._sweep(f"sweep results/{results} (1-A, 1-B, LFM)", store, self.root / "results" / results,
                    {"store": store_digest}, sweep, variant)

    def _ensemble(self) -> None:
        """`heads ensemble --multimodal-only` over every results folder of this manifest: the top-k saved
        multimodal models by validation accuracy (k chosen on validation), their probabilities averaged; one row in
        results/pooled/ensembles.jsonl. Multimodal only: the report counts the ensemble as a multimodal model, and
        with unimodal members in the pool the top 1 can be the text head alone (it was, on a real manifest)."""
        from heads.ensemble import ENSEMBLES_FILE, ensemble

        dirs = [Path(r["dir"]) for r in self.entry["results"]]
        output = dirs[0] / ENSEMBLES_FILE
        runs = {str(d.relative_to(self.root)): fingerprint((d / "runs.jsonl").read_text())
                for d in dirs if (d / "runs.jsonl").exists()}

        def work():
            row = ensemble(dirs, top_k="auto", multimodal_only=True, log=lambda line: None)
            self.log(f"ensemble: top {row['k']} of {row['pool']} saved models, validation "
                     f"{row['val_accuracy']:.4f}, test {row['test_accuracy']:.4f}")

        run_step("ensemble results/pooled/ensembles.jsonl", output,
                 {"runs": runs, "top_k": "auto", "multimodal_only": True}, work, self.log,
                 resumable=("runs",))  # new runs: a new row beside the old ones (the report reads the newest)
        self.entry["ensembles"] = str(output)

    def _sweep_end_to_end(self) -> None:
        from heads.end_to_end import EndToEndSettings
        from heads.strategies import list_strategies
        from heads.sweep import SweepSettings

        end_to_end = EndToEndSettings(max_epochs=self.s.end_to_end_epochs, image_weights=self.s.image_weights,
                                      text_weights=self.s.text_weights, workers=self.s.workers,
                                      progress=self.s.progress)
        settings = SweepSettings(strategies=list_strategies(trainer="end-to-end"), fusions=self.s.end_to_end_fusions,
                                 seeds=self.s.seeds,
                                 baselines=False, device=self.s.device, train=self._train_settings(),
                                 progress=self.s.progress,
                                 manifest=str(self.manifest), end_to_end=end_to_end)
        recorded = {k: v for k, v in asdict(end_to_end).items() if k not in ("workers", "progress", "device")}
        self._sweep("sweep results/end-to-end (3-A, 3-B)", self.store, self.root / "results" / "end-to-end",
                    {"store": self.store_digest, "end_to_end": recorded}, settings)
