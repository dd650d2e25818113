"""Text and image preprocessing of the reference protocol (DESIGN, "The reference protocol").

Text: remove special characters, stop words and repeated spaces, then an uncased WordPiece tokenizer pads or
truncates to 30 tokens with [CLS]/[SEP] and an attention mask.
Image: resize to 256, center-crop 224, normalise as the backbone's weights expect.
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


def resize_size(image_size: int) -> int:
    """The shorter-side resize before the center crop: 256 for 224, keeping the protocol's 256/224 ratio."""
    return round(image_size * 256 / 224)


def build_image_transform(image_size: int, mean, std, *, train: bool = False):
    """PIL image -> normalised (3, image_size, image_size) float tensor, as the reference protocol prescribes.

    Training adds a random horizontal flip (DESIGN, S3 image); nothing else, so frozen features and fine-tuning
    see the same distribution apart from the flip.
    """
    from torchvision import transforms  # torchvision is only needed by callers that transform images

    # Catalog photos include grayscale and CMYK JPEGs and RGBA PNGs; the backbones want exactly 3 channels.
    steps = [transforms.Lambda(_to_rgb), transforms.Resize(resize_size(image_size)), transforms.CenterCrop(image_size)]
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
