"""`embed paper`'s settings (pipelines/paper.py runs them): what to run, checked once before anything runs.

Manifests: `manifest_seeds` are the tuning manifests (every choice is made on the first one's validation split);
`check_manifest_seeds` run every step the same way but choose nothing: they only score the choices (issue #20's
margin target covers them). `cross_fit` K: the fused pair's modules are also trained cross-fitted (K folds,
embedstore/cross_fit.py) and swept beside the plain ones. `image_resize`: the store's image features and every
image module use "crop" (the protocol's) or "pad" (the photo on a white square).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from embedstore.defaults import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE
from embedstore.manifest import SplitSettings


@dataclass(frozen=True)
class PaperSettings:
    image_backbone: str = DEFAULT_IMAGE_BACKBONE
    text_backbone: str = DEFAULT_TEXT_BACKBONE
    image_weights: str | None = None      # local weights file / Hugging Face folder; default: the standard places
    text_weights: str | None = None
    image_size: int = 224
    seeds: tuple[int, ...] = (0, 1, 2)    # heads, and the modules trained over cached features (S1/S2)
    manifest_seeds: tuple[int, ...] = (0, 1)
    split: SplitSettings = field(default_factory=SplitSettings)  # its seed is replaced by each manifest seed
    catalog_format: str = "auto"
    fusions: tuple[str, ...] | None = None   # None: every registered fusion operator (heads.fusion registry)
    pair: tuple[int, int] = (2, 3)        # (image, text) module strategies whose features 1-A/1-B fuse
    text_s3_epochs: int = 3               # S3 is the slow step: few epochs, one seed by default
    text_s3_seeds: tuple[int, ...] = (0,)
    image_s3: bool | None = None          # None: on with CUDA, off on CPU (~6-8 min per epoch on 2 idle cores, tens of epochs)
    image_s3_epochs: int = 3
    image_s3_seeds: tuple[int, ...] = (0,)
    end_to_end: bool = False              # strategies 3-A/3-B: the whole model trained on the raw catalog
    end_to_end_fusions: tuple[str, ...] = ("concat",)
    end_to_end_epochs: int = 10
    head_epochs: int = 40                 # most epochs of a fusion head (early stopping usually ends sooner)
    module_epochs: int | None = None      # most epochs of S1/S2 modules (default: finetune's 100)
    device: str | None = None             # default: CUDA when present, else CPU
    precision: str = "auto"               # the heads' (heads/train.py); modules use bf16 autocast on CUDA
    workers: int = 2                      # DataLoader processes decoding images
    progress: bool = True
    image_resize: str = "crop"            # "crop" (the protocol's) or "pad": the store's features, every image module
    cross_fit: int | None = None          # K: the fused pair's modules also cross-fitted, with their own sweeps
    check_manifest_seeds: tuple[int, ...] = ()   # manifests that run every step but choose nothing

    def checked(self) -> "PaperSettings":
        """Validated, with image_s3 decided by the device."""
        from embedstore.cross_fit import check_k
        from embedstore.defaults import resolve_device
        from embedstore.preprocess import RESIZE_MODES
        from heads.fusion import list_fusions
        from heads.train import PRECISIONS

        if len(set(self.manifest_seeds)) < 2:
            raise ValueError(f"give at least two manifest seeds (--manifest-seeds 0,1), got {list(self.manifest_seeds)}"
                             ": the report's spread over draws of the catalog needs two")
        check = tuple(self.check_manifest_seeds)
        if len(set(check)) != len(check) or min(check, default=0) < 0 or set(check) & set(self.manifest_seeds):
            raise ValueError(f"--check-manifest-seeds needs distinct non-negative integers that are not tuning "
                             f"manifest seeds ({list(self.manifest_seeds)}), got {list(check)}")
        if self.image_resize not in RESIZE_MODES:
            raise ValueError(f"unknown --image-resize {self.image_resize!r}; use one of {', '.join(RESIZE_MODES)}")
        cross_fit = None if self.cross_fit is None else check_k(self.cross_fit)
        for name in ("seeds", "text_s3_seeds", "image_s3_seeds"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values) or min(values) < 0:
                raise ValueError(f"--{name.replace('_', '-')} needs distinct non-negative integers, got {list(values)}")
        fusions = tuple(list_fusions()) if self.fusions is None else tuple(self.fusions)
        for f in set(fusions) | set(self.end_to_end_fusions):
            if f not in list_fusions():
                raise ValueError(f"unknown fusion operator {f!r}; registered: {', '.join(list_fusions())}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        for name in ("text_s3_epochs", "image_s3_epochs", "end_to_end_epochs", "head_epochs", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        image_s3 = resolve_device(self.device).type == "cuda" if self.image_s3 is None else self.image_s3
        image_pair, text_pair = self.pair
        if image_pair not in (2, 3) or text_pair not in (2, 3):
            raise ValueError(f"--pair {image_pair},{text_pair}: 1-A fuses the modules' 500-d middle layers, which "
                             "S1 modules lack; use strategies 2 or 3, e.g. --pair 2,3")
        if image_pair == 3 and not image_s3:
            raise ValueError("--pair 3,... fuses image S3 modules, but image S3 is off: add --image-s3")
        return replace(self, image_s3=image_s3, seeds=tuple(self.seeds), manifest_seeds=tuple(self.manifest_seeds),
                       fusions=fusions, cross_fit=cross_fit, check_manifest_seeds=check)

    def all_manifest_seeds(self) -> tuple[int, ...]:
        """Every manifest run: the tuning ones (the first chooses), then the check ones."""
        return tuple(self.manifest_seeds) + tuple(self.check_manifest_seeds)

    def module_seeds(self, modality: str, strategy: int) -> tuple[int, ...]:
        if strategy < 3:
            return self.seeds
        if modality == "text":
            return self.text_s3_seeds
        return self.image_s3_seeds if self.image_s3 else ()
