"""The one model-folder convention: round trip, one-line refusals, old folders, atomic and concurrent writes."""
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from embedstore import model_folder
from embedstore.model_folder import FORMAT, load_pretrained, read_config, save_pretrained


def test_round_trip_writes_the_format_keys(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor([1, 2])}
    save_pretrained(tmp_path / "m", tensors, {"width": 3}, kind="fusion-head",
                    extra_files={"metrics.json": "{}\n"})
    loaded, config = load_pretrained(tmp_path / "m", kind="fusion-head")
    assert set(loaded) == {"w", "n"} and torch.equal(loaded["w"], tensors["w"])
    assert config == {"format": FORMAT, "format_version": 1, "kind": "fusion-head", "width": 3}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["kind"] == "fusion-head"
    assert (tmp_path / "m" / "metrics.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left beside it


def test_missing_folder_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs config.json and model.safetensors"):
        load_pretrained(tmp_path / "empty")


def test_wrong_kind_and_newer_version_are_refused(tmp_path):
    save_pretrained(tmp_path / "m", {"w": torch.ones(2)}, {}, kind="module")
    with pytest.raises(ValueError, match="holds a module model, not a fusion-head"):
        load_pretrained(tmp_path / "m", kind="fusion-head")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 2}))
    with pytest.raises(ValueError, match="newer embedstore .*format_version 2"):
        read_config(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_weights_are_a_one_line_error(tmp_path, damage):
    save_pretrained(tmp_path / "m", {"w": torch.ones(100, 100)}, {}, kind="module")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        load_pretrained(tmp_path / "m")
    assert "\n" not in str(error.value)


def test_format_keys_cannot_be_overridden_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="may not set kind"):
        save_pretrained(tmp_path / "m", {}, {"kind": "x"}, kind="module")
    with pytest.raises(ValueError, match="unknown model kind"):
        save_pretrained(tmp_path / "m", {}, {}, kind="pickle")


@pytest.mark.parametrize("doc,kind", [
    ({"config": {"strategy": "2A"}, "seed": 0}, "fusion-head"),                   # `heads sweep` before v1
    ({"format": "embedstore-module", "format_version": 1, "modality": "text"}, "module"),
    ({"format": "embedstore-end-to-end", "settings": {}}, "end-to-end"),
])
def test_folders_written_before_the_convention_still_load(tmp_path, doc, kind):
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(doc))
    tensors, config = load_pretrained(folder, kind=kind)
    assert config["kind"] == kind and config["format"] == FORMAT and "w" in tensors


def test_an_unknown_config_is_refused(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an embedstore model config"):
        read_config(folder)


def test_saving_again_keeps_checkpoints_beside_the_model(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.json").write_text("epoch 3")
    save_pretrained(folder, {"w": torch.ones(1)}, {"v": 1}, kind="end-to-end")
    save_pretrained(folder, {"w": torch.full((1,), 2.0)}, {"v": 2}, kind="end-to-end")
    assert (folder / "checkpoint.json").read_text() == "epoch 3"
    tensors, config = load_pretrained(folder)
    assert config["v"] == 2 and tensors["w"].item() == 2.0


def test_a_failed_write_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    save_pretrained(tmp_path / "m", {"w": torch.ones(1)}, {"v": 1}, kind="module")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(model_folder, "_swap_in", crash)   # private: the failure must hit the swap step itself
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tmp_path / "m", {"w": torch.zeros(1)}, {"v": 2}, kind="module")
    assert read_config(tmp_path / "m")["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["exchange", "rename"])
def test_concurrent_writers_and_a_reader_never_see_a_mixed_folder(tmp_path, monkeypatch, atomic_swap):
    if not atomic_swap:  # the fallback for systems without renameat2
        monkeypatch.setattr(model_folder, "_exchange", lambda a, b: False)   # private: renameat2 refused, as there
    folder = tmp_path / "m"
    save_pretrained(folder, {"w": torch.zeros(1000)}, {"v": 0}, kind="module")
    errors, seen = [], set()

    def write(value):
        try:
            for _ in range(15):
                save_pretrained(folder, {"w": torch.full((1000,), float(value))}, {"v": value}, kind="module")
        except Exception as error:  # reported below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for t in writers:
        t.start()
    while any(t.is_alive() for t in writers):
        try:
            tensors, config = load_pretrained(folder)
        except FileNotFoundError:  # the rename fallback has a moment with no folder: never a mixed one
            assert not atomic_swap
            continue
        assert (tensors["w"] == config["v"]).all()  # config and weights of the same write
        seen.add(config["v"])
    assert not errors
    tensors, config = load_pretrained(folder)
    assert config["v"] in (1, 2) and (tensors["w"] == config["v"]).all()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
