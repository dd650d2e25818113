"""Issue #19, the embedstore side: files written whole or not at all, store labels checked, hostile CSV headers
and fields, images decoded as a viewer shows them, full disks named, and the smaller messages.

Each test reproduces one finding of the second hostile run (the item number of issue #19 in brackets) and
checks the guarantee that fixes it (docs/guarantees.md)."""
import contextlib
import csv
import errno
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image

import embedstore.catalog_csv as csv_catalog_module  # CsvCatalog reads through its csv_fields_up_to
import embedstore.outputs as outputs  # partial_file and its shorthands
import embedstore.store_writer as store_module  # the writer: create_store, FeatureSetWriter
from cli.common import one_line_errors
from cli.embed import embed
from cli.heads import heads
from embedstore.catalog import open_catalog
from embedstore.catalog_files import FolderFiles
from embedstore.cross_fit import assign_folds
from embedstore.image_pipeline import decode_to_uint8
from embedstore.images import ImageRows
from embedstore.manifest import Manifest, SplitSettings, prepare_manifest
from embedstore.store import STATUS_OK, FeatureStore
from embedstore.store_writer import FeatureSetWriter, create_store
from pipelines.predict_sources import InputColumns, read_inputs
from tests.cli_helpers import invoke as run
from tests.test_hostile import make_store
from tests.test_hostile_outputs import one_line

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FULL = OSError(errno.ENOSPC, "No space left on device")  # as a file object or h5py raises it: no file named


def small_catalog(root, *, title_of_first=None, header=("id", "image", "title", "label")):
    """A generic CSV catalog of two classes x 6 items with real (tiny) images; `title_of_first` replaces the
    first row's title."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / "img" / f"{i}.png")
        rows.append([str(i), f"img/{i}.png", f"plain title {i}", "shirts" if i % 2 else "shoes"])
    if title_of_first is not None:
        rows[0][2] = title_of_first
    with open(root / "catalog.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return root / "catalog.csv"


PREPARE = ["--min-items", 4, "--items-per-class", 4, "--train", 2, "--val", 1, "--test", 1]


# ----------------------------------------------------------------------------------- [2] atomic writes


def test_a_full_disk_while_prepare_rewrites_a_manifest_keeps_the_old_one(tmp_path):
    """A real short write: the child may write at most 1 KiB per file (RLIMIT_FSIZE), and the new manifest is
    larger. Before: the manifest was cut to its first 1 KiB, invalid JSON (the issue's 4 KiB)."""
    catalog = small_catalog(tmp_path)
    manifest = tmp_path / "manifest.json"
    assert run(embed, ["prepare", catalog, "--out", manifest, *PREPARE]).exit_code == 0
    old = manifest.read_bytes()
    assert len(old) > 1024

    def one_kib_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "cli.embed", "prepare", str(catalog), "--out", str(manifest),
                             *map(str, PREPARE), "--seed", "1"], env=env, preexec_fn=one_kib_files,
                            capture_output=True, text=True, timeout=120)
    assert manifest.read_bytes() == old
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: File too large: {manifest}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.csv", "img", "manifest.json"]


@pytest.mark.parametrize("how", ["partial_file", "open_atomic", "write_bytes_atomic"])
def test_a_write_that_fails_half_way_keeps_the_old_file_and_names_it(tmp_path, how, monkeypatch):
    path = tmp_path / "out.csv"
    path.write_text("old,file\n")
    with pytest.raises(OSError) as caught:
        if how == "partial_file":
            with outputs.partial_file(path) as partial:
                partial.write_text("new,ha")  # a writer (safetensors, savefig, h5py) that wrote part, then failed
                raise FULL
        elif how == "open_atomic":
            with outputs.open_atomic(path, "w") as handle:
                handle.write("new,ha")
                handle.flush()
                raise FULL
        else:
            real_open = open

            class HalfWriter:  # the file object writes half of the bytes, then finds the disk full
                def __init__(self, handle):
                    self.handle = handle

                def write(self, data):
                    self.handle.write(data[: len(data) // 2])
                    self.handle.flush()
                    raise FULL

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    self.handle.close()

            monkeypatch.setattr("builtins.open", lambda *a, **k: HalfWriter(real_open(*a, **k)))
            outputs.write_bytes_atomic(path, b"new,file,that,is,longer\n")
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old,file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "report.md"
    with pytest.raises(KeyboardInterrupt):
        with outputs.open_atomic(path, "w") as handle:
            handle.write("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_two_writers_of_one_file_each_write_their_own_temporary_file(tmp_path):
    path = tmp_path / "o.csv"
    with outputs.open_atomic(path, "w") as first, outputs.open_atomic(path, "w") as second:
        first.write("first\n" * 100)
        second.write("second\n")
    assert path.read_text() == "first\n" * 100  # the last rename wins, whole; nothing interleaved
    assert [p.name for p in tmp_path.iterdir()] == ["o.csv"]


# What may write a file other than through embedstore/outputs.py, and why.
WRITE = re.compile(r"""open\([^)]*["'][wx]b?t?\+?["']|\.write_text\(|\.write_bytes\(|savefig\(|save_file\(|"""
                   r"""to_csv\(|json\.dump\(|h5py\.File\([^)]*["']w|copyfile\(|ZipFile\([^)]*["']w""")
ASIDE = re.compile(r"\b(partial|temp|tmp)\b")  # written aside (in a partial_file block or a temporary folder)
NOT_THROUGH_OUTPUTS = {
    ("embedstore/synthetic_catalog.py", "plain write: a new image in a new folder"),
    ("embedstore/part_wheels.py", 'with open(zip_path, "wb")'),  # inside a temporary folder renamed whole
}


def test_every_output_file_is_written_through_one_helper():
    """A file written in place is half a file when the disk fills or the process dies: every writer of a whole
    file writes aside (embedstore/outputs.py: partial_file and its shorthands) and renames."""
    found = []
    for package in ("embedstore", "heads", "pipelines", "cli"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == "embedstore/outputs.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#")[0] if not line.lstrip().startswith("#") else ""
                if WRITE.search(code) and not ASIDE.search(code) and not any(
                        name == where and marker in line for where, marker in NOT_THROUGH_OUTPUTS):
                    found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "written in place:\n" + "\n".join(found)


# ----------------------------------------------------------------------------------- [4] store labels


@pytest.mark.parametrize("damage", ["label 99", "label -1", "classes shortened"])
def test_store_labels_outside_its_classes_are_refused_in_one_line_and_inspect_calls_it_damaged(tmp_path, damage):
    store = make_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:
        if damage == "classes shortened":
            classes = f["classes"][:4]
            del f["classes"]
            f.create_dataset("classes", data=classes, dtype=h5py.string_dtype("utf-8"))
        else:
            labels = f["items/label"][:]
            labels[[3, 7]] = 99 if damage == "label 99" else -1
            f["items/label"][:] = labels
    bad = 80 if damage == "classes shortened" else 2  # labels 4 and 5 of 240 items dealt round-robin over 6
    with pytest.raises(ValueError, match=rf"{re.escape(str(store))}: {bad} item labels lie outside 0\.\.") as caught:
        FeatureStore(store)
    assert "\n" not in str(caught.value)
    line = one_line(run(heads, ["sweep", store, "--out", tmp_path / "r", "--strategies", "2A", "--fusions", "concat",
                                "--seeds", 0, "--max-epochs", 1, "--device", "cpu"]))
    assert f"{bad} item labels lie outside" in line
    result = run(embed, ["inspect", store])
    assert result.exit_code == 0, result.output
    status = [line for line in result.output.splitlines() if line.startswith("status")]
    assert status == [status[0]] and "DAMAGED" in status[0] and f"{bad} item labels" in status[0]


# ----------------------------------------------------------------------------------- [7] duplicated columns


def test_a_duplicated_column_in_a_csv_catalog_is_refused_in_one_line(tmp_path):
    catalog = small_catalog(tmp_path, header=("id", "image", "title", "title"))  # the label column is "title" too
    line = one_line(run(embed, ["prepare", catalog, "--out", tmp_path / "m.json", "--label-column", "title", *PREPARE]))
    assert "'title'" in line and "more than once" in line and str(catalog) in line


def test_a_duplicated_column_in_a_styles_csv_is_refused_in_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "styles.csv").write_text("id,articleType,articleType,productDisplayName\n1,Shirts,Shoes,a title\n")
    line = one_line(run(embed, ["prepare", tmp_path, "--out", tmp_path / "m.json"]))
    assert "'articleType'" in line and "more than once" in line


def test_a_duplicated_column_in_predict_input_is_refused(tmp_path):
    (tmp_path / "in.csv").write_text("id,image,title,title\n1,a.jpg,blue shirt,red shoes\n")
    with pytest.raises(ValueError, match=r"'title' more than once"):
        read_inputs(tmp_path / "in.csv", InputColumns(), ("image", "text"))
    # a duplicated column that is not read is harmless: the last one of the same name is never looked at
    (tmp_path / "ok.csv").write_text("id,image,title,note,note\n1,a.jpg,blue shirt,x,y\n")
    assert read_inputs(tmp_path / "ok.csv", InputColumns(), ("image", "text")).titles == ["blue shirt"]


# ----------------------------------------------------------------------------------- [12] long fields

LONG = " ".join(["long"] * 40_000)  # 199,999 characters: over the csv module's default field limit of 131,072


def test_a_title_over_the_csv_field_limit_is_read_in_every_csv_reader(tmp_path):
    manifest = tmp_path / "m.json"
    result = run(embed, ["prepare", small_catalog(tmp_path / "csv", title_of_first=LONG), "--out", manifest,
                         "--min-items", 6, "--items-per-class", 6, "--train", 4, "--val", 1, "--test", 1])
    assert result.exit_code == 0, result.output
    assert [item.title for item in Manifest.load(manifest).items if item.id == "0"] == [LONG]

    fashion = tmp_path / "fashion"
    (fashion / "images").mkdir(parents=True)
    (fashion / "styles.csv").write_text(f'id,articleType,productDisplayName\n1,Shirts,"{LONG}, with a comma"\n'
                                        "2,Shirts,short\n")
    rows = open_catalog(fashion).read_rows()
    assert [item.title for item in rows.items] == [LONG + ", with a comma", "short"] and not rows.malformed

    (tmp_path / "in.csv").write_text(f"id,image,title\n1,a.jpg,{LONG}\n2,b.jpg,short\n")
    assert read_inputs(tmp_path / "in.csv", InputColumns(), ("image", "text")).titles == [LONG, "short"]
    assert csv.field_size_limit() == 131072  # raised for the read only


def test_a_catalog_row_the_csv_module_refuses_is_counted_not_a_traceback(tmp_path, monkeypatch):
    # with the limit left at its default, the long row is a malformed row with its reason, and the others stay
    monkeypatch.setattr(csv_catalog_module, "csv_fields_up_to", lambda size: contextlib.nullcontext())
    rows = open_catalog(small_catalog(tmp_path, title_of_first=LONG)).read_rows()
    assert len(rows.items) == 11 and len(rows.malformed) == 1
    line_no, reason = rows.malformed[0]
    assert line_no == 2 and "not valid CSV" in reason and "field larger than field limit" in reason


# ----------------------------------------------------------------------------------- [8] image decoding


def decoded(tmp_path, image: Image.Image, fmt: str, **save) -> np.ndarray:
    """The (H, W, 3) uint8 pixels the image paths give a backbone for IMAGE saved as FMT."""
    image.save(tmp_path / f"x.{fmt.lower()}", format=fmt, **save)
    rows = ImageRows(SimpleNamespace(read_image_bytes=FolderFiles(str(tmp_path)).read), [f"x.{fmt.lower()}"],
                     np.array([0]), decode_to_uint8)
    row, pixels, status = rows[0]
    assert status == STATUS_OK
    return pixels.permute(1, 2, 0).numpy()


def test_a_16_bit_grey_png_keeps_its_grey(tmp_path):
    grey = Image.fromarray(np.full((6, 5), 32768, dtype=np.uint16))  # mid-grey; PIL's convert made it 255
    assert np.array_equal(decoded(tmp_path, grey, "PNG"), np.full((6, 5, 3), 128, dtype=np.uint8))


def test_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, but the top half fully transparent
    rgba[2:, :, 3] = 255
    pixels = decoded(tmp_path, Image.fromarray(rgba, "RGBA"), "PNG")
    assert (pixels[:2] == 255).all() and (pixels[2:] == [200, 0, 0]).all()
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 255])
    pixels = decoded(tmp_path, palette, "PNG", transparency=0)  # colour 0 (black) is transparent
    assert pixels[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_an_exif_rotated_jpeg_comes_out_upright(tmp_path):
    sideways = np.zeros((16, 32, 3), dtype=np.uint8)
    sideways[:, 16:] = 255  # stored 32 wide: black left half, white right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    pixels = decoded(tmp_path, Image.fromarray(sideways), "JPEG", exif=exif.tobytes(), quality=95)
    assert pixels.shape == (32, 16, 3)  # upright: 16 wide, 32 high, black on top
    assert pixels[:12].mean() < 10 and pixels[20:].mean() > 245


# ----------------------------------------------------------------------------------- [14] full disk, named


def test_a_full_disk_while_adding_a_feature_set_names_the_store(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    create_store(path, ids=list("ab"), labels=[0, 1], splits=["train", "test"], classes=["x", "y"],
                 manifest_sha256="m")

    def full(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(store_module, "_allocated_dataset", full)
    provenance = {"pooled": {"backbone": "b", "weights_id": "w", "preprocessing": {}}}
    with pytest.raises(OSError) as caught:
        FeatureSetWriter(path, modality="image", source="b", layers={"pooled": 3}, provenance=provenance)
    assert caught.value.filename == str(path) and "No space left on device" in caught.value.strerror
    monkeypatch.undo()
    with FeatureSetWriter(path, modality="image", source="b", layers={"pooled": 3}, provenance=provenance) as writer:
        writer.write(np.arange(2), {"pooled": np.ones((2, 3), np.float32)}, np.full(2, STATUS_OK))
        monkeypatch.setattr(writer._file, "flush", full)
        with pytest.raises(OSError) as caught:
            writer.finish()
    assert caught.value.filename == str(path) and "a rerun resumes" in caught.value.strerror


def test_a_full_disk_while_creating_a_store_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    def full(values):
        raise FULL

    monkeypatch.setattr(store_module, "as_str_array", full)  # inside the file being created
    path = tmp_path / "s.h5"
    with pytest.raises(OSError) as caught:
        create_store(path, ids=["a"], labels=[0], splits=["train"], classes=["x"], manifest_sha256="m")
    assert caught.value.filename == str(path) and "cannot create the store" in caught.value.strerror
    assert list(tmp_path.iterdir()) == []


def shards(tmp_path):
    """Two complete shards of a 4-item extraction, written with the shard writer's own attributes."""
    paths = []
    for index, rows in enumerate(((0, 2), (2, 4))):
        path = tmp_path / f"s.shard-{index}-of-2.h5"
        attrs = {"shard_index": index, "shard_count": 2, "shard_row_start": rows[0], "shard_row_stop": rows[1],
                 "total_items": 4}
        create_store(path, ids=[f"i{r}" for r in range(*rows)], labels=[0, 1], splits=["train", "test"],
                     classes=["x", "y"], manifest_sha256="m", shard=attrs)
        provenance = {"pooled": {"backbone": "b", "weights_id": "w", "preprocessing": {}}}
        with FeatureSetWriter(path, modality="image", source="b", layers={"pooled": 3},
                              provenance=provenance) as writer:
            writer.write(np.arange(2), {"pooled": np.ones((2, 3), np.float32)}, np.full(2, STATUS_OK))
            assert writer.finish()
        paths.append(path)
    return paths


def test_a_full_disk_during_merge_is_one_line_naming_the_merged_store(tmp_path, monkeypatch):
    import embedstore.shards as shards_module

    parts = shards(tmp_path)
    assert run(embed, ["merge", *parts, "--out", tmp_path / "m.h5"]).exit_code == 0

    def full(*args):
        raise FULL

    monkeypatch.setattr(shards_module, "_copy_tables", full)
    line = one_line(run(embed, ["merge", *parts, "--out", tmp_path / "m.h5"]))
    assert "No space left on device" in line and str(tmp_path / "m.h5") in line
    monkeypatch.undo()
    with FeatureStore(tmp_path / "m.h5") as store:  # the earlier merge, untouched
        assert store.complete and len(store.ids) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5", parts[0].name, parts[1].name]


# ----------------------------------------------------------------------------------- [15] refused in one line


def test_merge_into_a_missing_folder_names_the_folder(tmp_path):
    line = one_line(run(embed, ["merge", *shards(tmp_path), "--out", tmp_path / "no" / "m.h5"]))  # was "Error: 2"
    assert line == f"Error: the folder of --out does not exist (create it, or merge beside the shards): {tmp_path / 'no'}"


def test_an_os_error_without_a_file_name_is_its_message_not_its_number():
    @one_line_errors
    def command():
        raise FileNotFoundError(2, "Unable to synchronously create file (unable to open file: name = '/x/m.h5')")

    with pytest.raises(Exception) as caught:
        command()
    assert caught.value.message.startswith("Unable to synchronously create file")


@pytest.mark.parametrize("fmt", ["csv", "fashion"])
def test_a_header_only_catalog_is_refused_by_prepare(tmp_path, fmt):
    if fmt == "csv":
        (tmp_path / "c.csv").write_text("id,image,title,label\n")
        catalog = tmp_path / "c.csv"
    else:
        (tmp_path / "styles.csv").write_text("id,articleType,productDisplayName\n")
        catalog = tmp_path
    line = one_line(run(embed, ["prepare", catalog, "--out", tmp_path / "m.json", "--fractions", "0.6,0.2,0.2"]))
    assert line.startswith("Error: no usable items:") and "no data rows" in line
    assert not (tmp_path / "m.json").exists()


def test_a_catalog_whose_classes_are_all_too_small_is_refused_by_prepare(tmp_path):
    line = one_line(run(embed, ["prepare", small_catalog(tmp_path), "--out", tmp_path / "m.json"]))
    assert "no usable items" in line and "'shoes', has 6" in line and "--min-items" in line


# ----------------------------------------------------------------------------------- [18] messages


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    store = make_store(tmp_path / "s.h5")
    read, write = os.pipe()
    os.close(read)  # `embed inspect S | head -0`: the reader is gone before anything is printed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "cli.embed", "inspect", str(store)], stdout=write,
                            stderr=subprocess.PIPE, env=env, text=True, timeout=120)
    os.close(write)
    assert result.stderr == "" and result.returncode == 1


def test_a_missing_csv_column_names_the_cli_option(tmp_path):
    line = one_line(run(embed, ["prepare", small_catalog(tmp_path), "--out", tmp_path / "m.json",
                                "--id-column", "sku"]))
    assert "--id-column" in line and "'sku'" in line


@pytest.mark.parametrize("per_class, suggestion", [(1, "train without --cross-fit"),
                                                    (3, "choose a K of at least 2 and at most 3")])
def test_the_cross_fit_refusal_suggests_a_k_that_is_accepted(per_class, suggestion):
    train = [SimpleNamespace(id=f"{label}{i}", label=label) for label in "ab" for i in range(per_class + (label == "b"))]
    manifest = SimpleNamespace(items_in=lambda split: train)
    with pytest.raises(ValueError, match=re.escape(suggestion)):
        assign_folds(manifest, 5, seed=0)
    if per_class >= 2:
        assign_folds(manifest, per_class, seed=0)  # the largest K suggested is accepted
