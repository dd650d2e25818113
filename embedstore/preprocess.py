"""Text and image preprocessing of the reference protocol (DESIGN, "The reference protocol").

Text: remove special characters, stop words and repeated spaces, then an uncased WordPiece tokenizer pads or
truncates to 30 tokens with [CLS]/[SEP] and an attention mask.
Image: resize to 256, center-crop 224, normalise as the backbone's weights expect. One alternative, "pad", is
not the protocol's: the whole photo, its aspect kept and its longer side scaled to 224, pasted centred on a
white 224 x 224 square (nothing is cropped; the catalog's 60x80 photos lose their top and bottom to the crop).
"""
from __future__ import annotations

import re

# NLTK's English stop-word list (nltk.corpus.stopwords.words("english"), 179 words). It is copied here because
# NLTK fetches it from the network at run time. scikit-learn's list was not used: it also removes product words
# such as "top", "bottom", "front", "back" and "full", which are labels' evidence in a fashion catalog.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom
this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before
after above below to from up down in out on off over under again further then once here there when where why
how all any both each few more most other some such no nor not only own same so than too very s t can will
just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn
doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan
shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# Deleted, not replaced by a space, so that "T-shirt" stays one word ("Tshirt") instead of losing a stop word "t".
_SPECIAL_CHARACTERS = re.compile(r"[^0-9a-zA-Z\s]+")


def clean_title(text: str) -> str:
    """Remove special characters, stop words and repeated spaces; case is kept (the tokenizer is uncased).

    >>> clean_title("Puma Men's  Black & White T-shirt!")
    'Puma Mens Black White Tshirt'
    """
    words = _SPECIAL_CHARACTERS.sub("", text or "").split()
    return " ".join(word for word in words if word.lower() not in STOP_WORDS)


RESIZE_MODES = ("crop", "pad")  # "crop" is the protocol's


def resize_size(image_size: int) -> int:
    """The shorter-side resize before the center crop: 256 for 224, keeping the protocol's 256/224 ratio."""
    return round(image_size * 256 / 224)


def image_preprocessing(image_size: int, mean, std, resize: str = "crop") -> dict:
    """What an image backbone records as its preprocessing (part of a feature set's identity).

    "crop": {"resize": <shorter side>, "crop": "center", ...}, exactly as every store before "pad" recorded it.
    "pad": {"resize": "pad", "fill": "white", ...}; `resize_mode` reads either back.
    """
    if resize == "crop":
        geometry = {"image_size": image_size, "resize": resize_size(image_size), "crop": "center"}
    elif resize == "pad":
        geometry = {"image_size": image_size, "resize": "pad", "fill": "white"}
    else:
        raise ValueError(f"unknown image resize {resize!r}; use one of {', '.join(RESIZE_MODES)}")
    return {**geometry, "interpolation": "bilinear", "mean": list(mean), "std": list(std),
            "train_augmentation": "random horizontal flip"}


def resize_mode(preprocessing: dict | None) -> str:
    """"pad" or "crop" from recorded preprocessing; stores written before "pad" existed record a number there
    (or nothing at all), and read as "crop"."""
    return "pad" if (preprocessing or {}).get("resize") == "pad" else "crop"


def shorter_side(preprocessing: dict) -> int | None:
    """The size "crop" resizes an image's shorter side to (the images' too-large check needs it); None for "pad",
    whose resized photo fits in image_size x image_size whatever its shape."""
    return None if resize_mode(preprocessing) == "pad" else int(preprocessing["resize"])


def pad_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """"pad": (new width, new height, left, top) of a width x height photo pasted on a size x size square, its
    longer side scaled to `size`. Both image pipelines place it with this one function, so they agree exactly."""
    longer = max(width, height, 1)
    new_width, new_height = (max(1, round(side * size / longer)) for side in (width, height))
    return new_width, new_height, (size - new_width) // 2, (size - new_height) // 2


class PadToSquare:
    """PIL RGB image -> the image_size x image_size white square with the photo pasted centred (PIL bilinear,
    which antialiases when shrinking, as transforms.Resize does). A class so it pickles into DataLoader workers."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image):
        from PIL import Image

        width, height, left, top = pad_geometry(*image.size, self.size)
        square = Image.new("RGB", (self.size, self.size), (255, 255, 255))
        square.paste(image.resize((width, height), Image.Resampling.BILINEAR), (left, top))
        return square


def build_image_transform(image_size: int, mean, std, *, train: bool = False, resize: str = "crop"):
    """PIL image -> normalised (3, image_size, image_size) float tensor, as the reference protocol prescribes
    (resize="crop"), or with the photo padded to a square instead (resize="pad").

    Training adds a random horizontal flip (DESIGN, S3 image); nothing else, so frozen features and fine-tuning
    see the same distribution apart from the flip.
    """
    from torchvision import transforms  # torchvision is only needed by callers that transform images

    # Catalog photos include grayscale and CMYK JPEGs and RGBA PNGs; the backbones want exactly 3 channels.
    if resize == "crop":
        steps = [transforms.Lambda(_to_rgb), transforms.Resize(resize_size(image_size)),
                 transforms.CenterCrop(image_size)]
    elif resize == "pad":
        steps = [transforms.Lambda(_to_rgb), PadToSquare(image_size)]
    else:
        raise ValueError(f"unknown image resize {resize!r}; use one of {', '.join(RESIZE_MODES)}")
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    return transforms.Compose(steps)


def _to_rgb(image):
    # A module-level function, not a lambda, so the transform pickles into DataLoader workers.
    return image if image.mode == "RGB" else as_viewed_rgb(image)


EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_viewed_rgb(image):
    """A decoded PIL image as a photo viewer shows it, in RGB: the one decoding rule of every image path
    (extraction in both image pipelines, S3 training, `heads predict`; embedstore/images.py).

    - turned upright by its EXIF orientation (a phone photo's pixels are stored sideways);
    - 16-bit grey ("I;16", and "I" as PIL opens some 16-bit files) scaled to 8 bits: PIL's convert clips at 255,
      which turns a mid-grey 16-bit PNG (32768) white;
    - transparency (an alpha channel, a palette's or a PNG's transparent colour) composited over white, where
      convert would drop the alpha and show whatever colour the transparent pixels happen to hold.
    """
    from PIL import Image, ImageOps

    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: a viewer ignores it and shows the pixels, and so do we
        orientation = 1
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        import numpy as np

        values = np.asarray(image, dtype=np.float32)  # (H, W) 0..65535
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")
