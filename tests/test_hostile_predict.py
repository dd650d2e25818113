"""Issue #19: `heads predict` and `heads ensemble` under a hostile tester. Two predicts into one output, a predict
stopped by SIGTERM or Ctrl-C, non-finite or overflowing numbers in decision-level models and ensemble members,
damaged `linear` model folders, results folders named twice or from different manifests, and the results
folder lock's refusal naming the command that holds it."""
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.heads import heads
from embedstore.model_folder import save_pretrained
from embedstore.store_writer import write_store_from_arrays
from heads.decision import LinearSettings, extreme_rows, fit_linear
from heads.decision_model import DecisionModel
from heads.ensemble import ENSEMBLES_FILE, ensemble
from heads.members import MEMBER_LOADERS, Member
from heads.results import ResultsLock, read_runs
from tests.cli_helpers import invoke as run
from store_factory import IMAGE, TEXT, make_features
from tests.test_ensemble import C, copy_of, disagree, quiet, sweep  # noqa: F401 (disagree)
from tests.test_hostile_outputs import one_line, world, write_csv  # noqa: F401 (world: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# `heads predict` in a process of its own that, once it has written its first batch (so it holds the output's
# lock and its .partial exists), makes the file READY and waits for the file GO: a run paused mid-write on a
# condition the test controls, not on a timing guess
PAUSED_PREDICT = """
import os, signal, sys, time
import pipelines.predict as predict

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises even where the test runner ignores it
original = predict._write_rows

def write_rows(*args, **kwargs):
    original(*args, **kwargs)
    if not os.path.exists(os.environ["READY"]):
        open(os.environ["READY"], "w").close()
        deadline = time.monotonic() + 120  # never hang a test run for good
        while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
            time.sleep(0.02)

predict._write_rows = write_rows
from cli.heads import main
sys.argv = ["heads", *sys.argv[1:]]
main()
"""


def environment(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "READY": str(tmp_path / "ready"),
            "GO": str(tmp_path / "go")}


def predict_args(world, inputs, out):
    return ["predict", str(world["head"]), str(inputs), "--out", str(out), "--workers", "0", "--batch-size", "1",
            "--device", "cpu"]


def start_paused(world, tmp_path, inputs, out) -> subprocess.Popen:
    """A predict paused after its first row; returns once it is there (or fails with its output)."""
    script = tmp_path / "paused_predict.py"
    script.write_text(PAUSED_PREDICT)
    process = subprocess.Popen([sys.executable, str(script), *predict_args(world, inputs, out)],
                               env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the paused predict ended before its first batch: {process.communicate()}")
        time.sleep(0.05)
    return process


def ids_in(path) -> list[str]:
    with open(path, newline="") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def many_and_few(world, tmp_path):
    """The world's products under many ids (the first run) and one product under another id (the second)."""
    many = tmp_path / "many.csv"
    write_csv(many, [{**world["rows"][i % 2], "id": f"m{i}"} for i in range(6)])
    few = tmp_path / "few.csv"
    write_csv(few, [{**world["rows"][0], "id": "f0"}])
    return many, few


# ----------------------------------------------------------------------------------------------- predict


def test_a_second_predict_into_the_same_output_is_refused_while_the_first_writes(world, tmp_path):
    many, few = many_and_few(world, tmp_path)
    out_dir = tmp_path / "out"
    out = out_dir / "o.csv"
    first = start_paused(world, tmp_path, many, out)   # another process holds the output
    try:
        second = run(heads, predict_args(world, few, out))   # this one (in-process: no second torch import)
    finally:
        (tmp_path / "go").touch()
        first_output = first.communicate(timeout=180)
    assert first.returncode == 0, first_output
    assert second.exit_code == 2 and "Traceback" not in second.stderr, (second.stdout, second.stderr)
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another `heads predict`" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0] and str(out) in lines[0] and "--out" in lines[0]
    assert "predicted" not in second.stdout  # no claim of rows it never wrote
    assert ids_in(out) == [f"m{i}" for i in range(6)]  # the first run's rows, whole
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.csv"]  # no lock file or .partial left behind
    # the lock went with the first run: now the second one writes
    result = run(heads, predict_args(world, few, out))
    assert result.exit_code == 0 and "predicted 1 of 1 rows" in result.output, result.output
    assert ids_in(out) == ["f0"]


@pytest.mark.parametrize("stop, code, line", [(signal.SIGTERM, 128 + signal.SIGTERM, "Error: stopped by SIGTERM"),
                                              (signal.SIGINT, 1, "Aborted!")])
def test_a_predict_stopped_mid_write_leaves_no_partial_file(world, tmp_path, stop, code, line):
    many, _ = many_and_few(world, tmp_path)
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "o.csv").write_text("id\nan earlier run\n")
    process = start_paused(world, tmp_path, many, out_dir / "o.csv")
    assert list(out_dir.glob("o.csv.*partial"))  # it was mid-write (beside its output: embedstore/outputs.py)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.csv"]  # no .partial, no lock file
    assert (out_dir / "o.csv").read_text() == "id\nan earlier run\n"  # the earlier output untouched


# ----------------------------------------------------------------------------------------------- decision models


def separable_store(path, *, manifest="test-manifest", huge_row=False):
    """Separable features of 4 classes, 120 train / 60 val / 60 test rows (tests/store_factory.py). `huge_row`:
    train row 0's image features are all 3e38, finite in a float32 store, so the store keeps the row."""
    data = make_features(classes=C)
    if huge_row:
        data.features[IMAGE][0] = 3e38
    return write_store_from_arrays(path, ids=data.ids, labels=data.labels, splits=data.splits, classes=data.classes,
                                   manifest_sha256=manifest,
                                   features={name: (data.features[name].astype(np.float32), {})
                                             for name in (IMAGE, TEXT)})


def test_one_huge_train_row_is_left_out_of_the_decision_fits_in_one_warning(tmp_path):
    store = separable_store(tmp_path / "store.h5", huge_row=True)
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", "--strategies", "LR-image,LF", "--seeds", 0,
                         "--no-baselines", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warned) == 1 and "1 of 120 train rows left out" in warned[0], result.output
    rows = {row["strategy"]: row for row in read_runs(tmp_path / "r")}
    # the row at 3e38 made every other row's standardised image features one value: LR-image at chance (0.25)
    assert rows["LR-image"]["test_accuracy"] > 0.9 and rows["LR-image"]["train_rows_left_out"] == 1
    model = DecisionModel.from_pretrained(tmp_path / "r" / "heads" / "LR-image")
    assert np.abs(model.linears["image"].mean).max() < 100  # statistics of the ordinary rows


def test_extreme_rows_spares_ordinary_heavy_tailed_rows():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_t(3, size=(500, 32)), 0)  # ReLU-like, heavy-tailed: all of it ordinary
    assert not extreme_rows(x).any()
    x[7, 3], x[9] = 1e9, np.nan
    assert np.flatnonzero(extreme_rows(x)).tolist() == [7, 9]


def test_standardising_features_that_overflow_float64_is_one_line():
    x = np.full((6, 2), 1e200)
    x[::2] = -1e200  # the variance, 1e400, overflows
    with pytest.raises(ValueError, match="too large to standardise"):
        fit_linear((x, np.arange(6) % 2), (x, np.arange(6) % 2), 2, LinearSettings())


# ----------------------------------------------------------------------------------------------- ensemble members


def set_tensor(folder, name, value):
    """Overwrite a tensor of a saved model folder in place (a damaged or hand-edited folder)."""
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = value(tensors[name]) if callable(value) else value
    save_file(tensors, folder / "model.safetensors")


def test_members_with_nan_weights_are_skipped_in_one_line_naming_their_folder(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    sweep(tmp_path / "store.h5", results, ("LR-text",))
    set_tensor(results / "heads" / "LR-text", "text.coef", lambda t: torch.full_like(t, float("nan")))
    head = results / "heads" / "image"  # a fusion head (the image baseline): its first weight matrix NaN
    first = sorted(k for k, t in load_file(head / "model.safetensors").items() if t.ndim == 2)[0]
    set_tensor(head, first, lambda t: torch.full_like(t, float("nan")))
    lines = []
    row = ensemble(results, top_k="auto", log=lines.append)
    assert "heads/image" not in row["members"] and "heads/LR-text" not in row["members"]
    assert row["pool"] == 2 and row["skipped_folders"] == 2 and row["val_accuracy"] > 0.5
    said = "\n".join(lines)
    assert "heads/LR-text: skipped (heads/LR-text/model.safetensors: text.coef holds NaN or inf" in said, said
    assert "heads/image: skipped (its probabilities are not finite (NaN or inf) on all 60 val items" in said, said


def test_items_a_member_scores_non_finite_are_left_out_and_counted(disagree, tmp_path, monkeypatch):
    results = copy_of(disagree, tmp_path)
    save_pretrained(results / "heads" / "a-odd", {"w": torch.zeros(1)}, {"classes": []}, kind="module")

    def odd(folder, config):  # says "class 2", but NaN for the first item of each split; ranks first by name
        def proba(xs):
            out = np.eye(C)[np.full(len(xs[0]), 2)]
            out[0] = np.nan
            return out
        return Member(folder, config["kind"], 1.0, disagree[0], ("text/tiny-txt/pooled",),
                      tuple(f"class{i}" for i in range(C)), False, "odd-v1", proba)

    monkeypatch.setitem(MEMBER_LOADERS, "module", odd)
    row = ensemble(results, top_k=1, log=quiet)
    assert row["members"] == ["heads/a-odd"]
    assert row["items"] == {"val": {"scored": 59, "left_out": 1}, "test": {"scored": 59, "left_out": 1}}
    assert row["non_finite_left_out"] == {"heads/a-odd": {"val": 1, "test": 1}}


def test_a_results_folder_named_again_counts_once(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    (tmp_path / "x").mkdir()
    lines = []
    row = ensemble([results, results, tmp_path / "x" / ".." / "results"], top_k="auto", log=lines.append)
    assert row["pool"] == 3 and row["results_dirs"] == ["."]  # 2A-concat, image, text: once each
    assert [line for line in lines if "named 3 times" in line] == [
        f"{results} named 3 times ({results}, {results}, {tmp_path / 'x' / '..' / 'results'}): its models count once"]


def test_results_of_different_manifests_are_refused_in_one_line_naming_both(tmp_path):
    first, second = (sweep(separable_store(tmp_path / name / "store.h5", manifest=f"manifest-{name}"),
                           tmp_path / name / "results", ("text",)) for name in ("a", "b"))
    with pytest.raises(ValueError) as refused:
        ensemble([first, second], log=quiet)
    message = str(refused.value)
    assert f"{first} and {second} hold models of different manifests" in message and "\n" not in message
    assert "manifest-a" in message and "manifest-b" in message
    assert not (first / ENSEMBLES_FILE).exists()
    result = run(heads, ["ensemble", first, second])
    assert one_line(result).startswith(f"Error: {first} and {second} hold models of different manifests")


# ----------------------------------------------------------------------------------------------- the folder lock


def test_the_results_lock_refusal_names_the_command_holding_it_and_the_asking_commands_options(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    with ResultsLock(results):  # a sweep writes the folder
        line = one_line(run(heads, ["ensemble", results]))
    assert f"`heads sweep` (pid {os.getpid()}) is writing to {results}, so this `heads ensemble` cannot" in line
    assert "--out" not in line  # ensemble has no --out
    with ResultsLock(results, command="heads ensemble"):  # an ensemble appends its row
        line = one_line(run(heads, ["sweep", tmp_path / "store.h5", "--out", results, "--strategies", "text"]))
    assert f"`heads ensemble` (pid {os.getpid()}) is writing to {results}, so this `heads sweep` cannot" in line
    assert "use another --out" in line
    with ResultsLock(results, command="heads ensemble"):
        line = one_line(run(heads, ["ensemble", results]))
    assert line.startswith(f"Error: another `heads ensemble` (pid {os.getpid()}) is writing to {results};")


# ----------------------------------------------------------------------------------------------- linear folders


@pytest.fixture(scope="module")
def linear_models(tmp_path_factory):
    """Saved LF, ST and LR-concat models (kind "linear") over a store of separable features."""
    root = tmp_path_factory.mktemp("linear")
    store = separable_store(root / "store.h5")
    return sweep(store, root / "results", ("LF", "ST", "LR-concat")) / "heads"


def edit_config(folder, change):
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def drop_tensor(folder, name):
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")


DAMAGE = {  # what a hostile or careless edit did -> (the model, the edit, what the one-line error names)
    "parts is text": ("LF", lambda f: edit_config(f, lambda d: d.update(parts="x")), "config.json: parts"),
    "weight is text": ("LF", lambda f: edit_config(f, lambda d: d.update(weight="abc")), "config.json: weight"),
    "weight out of range": ("LF", lambda f: edit_config(f, lambda d: d.update(weight=1.5)), "config.json: weight"),
    "classes is text": ("LF", lambda f: edit_config(f, lambda d: d.update(classes="x")), "config.json: classes"),
    "unknown strategy": ("LF", lambda f: edit_config(f, lambda d: d.update(strategy="LR-foo")),
                         "config.json: strategy"),
    "C is text": ("LF", lambda f: edit_config(f, lambda d: d["parts"]["image"].update(C="x")),
                  "config.json: parts.image"),
    "one input too few": ("LF", lambda f: edit_config(f, lambda d: d.update(inputs=d["inputs"][:1])),
                          "config.json: inputs"),
    "input widths": ("LR-concat", lambda f: edit_config(f, lambda d: d["config"].update(input_dims=[3, 4])),
                     "config.json: config.input_dims"),
    "coef shape": ("LF", lambda f: set_tensor(f, "image.coef", lambda t: t[:, :-1].contiguous()),
                   "model.safetensors: image.coef has shape"),
    "float16 weights": ("LF", lambda f: set_tensor(f, "image.coef", lambda t: t.half()),
                        "model.safetensors: image.coef is float16"),
    "bfloat16 weights": ("ST", lambda f: set_tensor(f, "stacker.coef", lambda t: t.bfloat16()),
                         "model.safetensors: stacker.coef is bfloat16"),
    "a tensor missing": ("ST", lambda f: drop_tensor(f, "stacker.mean"), "has no tensor 'stacker.mean'"),
    "zero scale": ("LR-concat", lambda f: set_tensor(f, "concat.scale", torch.zeros_like),
                   "model.safetensors: concat.scale has values <= 0"),
    "NaN intercept": ("LF", lambda f: set_tensor(f, "text.intercept", lambda t: torch.full_like(t, float("nan"))),
                      "model.safetensors: text.intercept holds NaN"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_linear_folder_is_refused_in_one_line_naming_the_folder_and_field(linear_models, tmp_path, damage):
    cell, edit, named = DAMAGE[damage]
    folder = shutil.copytree(linear_models / cell, tmp_path / cell)
    edit(folder)
    with pytest.raises(ValueError) as refused:
        DecisionModel.from_pretrained(folder)
    message = str(refused.value)
    assert f"{folder}/{named}" in message or (str(folder) in message and named in message), message
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["parts is text", "float16 weights", "coef shape"])
def test_predict_and_ensemble_refuse_a_damaged_linear_folder_in_one_line(world, tmp_path, damage):
    results = tmp_path / "results"
    ok_run = run(heads, ["sweep", world["store"], "--out", results, "--strategies", "LF", "--seeds", 0,
                         "--no-baselines", "--device", "cpu"])
    assert ok_run.exit_code == 0, ok_run.output
    _, edit, named = DAMAGE[damage]
    edit(results / "heads" / "LF")
    line = one_line(run(heads, ["predict", results / "heads" / "LF", world["csv"], "--out", tmp_path / "o.csv",
                                "--workers", 0]))
    assert str(results / "heads" / "LF") in line and named.split(": ")[-1] in line, line
    result = run(heads, ["ensemble", results])  # its only member refused: nothing to ensemble, in one line
    assert "heads/LF: skipped (" in one_line(result) and named.split(": ")[-1] in result.output


def test_a_weights_file_that_is_a_device_or_a_pipe_is_refused_before_reading(disagree, tmp_path):
    """model.safetensors linked to /dev/zero was read until the OOM killer came; a named pipe would wait for a
    writer forever. Run under a 3 GiB data limit, so that a regression fails here rather than take the machine."""
    results = copy_of(disagree, tmp_path)
    sweep(tmp_path / "store.h5", results, ("LR-text", "LF"))
    (results / "heads" / "LR-text" / "model.safetensors").unlink()
    (results / "heads" / "LR-text" / "model.safetensors").symlink_to("/dev/zero")
    (results / "heads" / "LF" / "model.safetensors").unlink()
    os.mkfifo(results / "heads" / "LF" / "model.safetensors")

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))

    done = subprocess.run([sys.executable, "-m", "cli.heads", "ensemble", str(results)], env=environment(tmp_path),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_memory)
    assert done.returncode == 0, done
    for name in ("LR-text", "LF"):
        assert (f"heads/{name}: skipped (heads/{name}/model.safetensors is not a regular file (a device, pipe"
                in done.stdout), done.stdout
    assert "Ensemble of the top" in done.stdout
