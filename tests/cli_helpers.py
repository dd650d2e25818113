"""What CLI tests share: the tiny random backbones' options, click invocation with a success check, and the
module-then-1A-head pipeline that several predict tests start from."""
from pathlib import Path

from click.testing import CliRunner

from cli.embed import embed
from cli.heads import heads

# tiny random backbones (no weights to load), images at 64 px, decoding in the main process
TINY = ["--image-backbone", "tiny-resnet", "--image-size", "64", "--text-backbone", "tiny-bert", "--workers", "0",
        "--no-progress"]


def invoke(group, args):
    """Run a click command group in-process; every argument as a string (paths, numbers)."""
    return CliRunner().invoke(group, [str(a) for a in args])


def ok(group, args) -> str:
    """invoke() that must succeed; its output."""
    result = invoke(group, args)
    assert result.exit_code == 0, result.output
    return result.output


def s2_modules_and_a_1a_head(manifest, store, folder, *finetune_options) -> tuple[dict, Path]:
    """S2 modules of both tiny backbones over `store` (in folder/<modality>-s2, `finetune_options` added), their
    features extracted into it, and a swept 1A-concat head: ({modality: finetune output}, the head's folder)."""
    folder, modules, outputs = Path(folder), {}, {}
    for modality, backbone in (("image", "tiny-resnet"), ("text", "tiny-bert")):
        modules[modality] = folder / f"{modality}-s2"
        outputs[modality] = ok(embed, ["finetune", manifest, "--modality", modality, "--strategy", 2,
                                       "--backbone", backbone, "--image-size", 64, "--store", store,
                                       "--out", modules[modality], "--lr", 0.01, "--no-progress", "--device", "cpu",
                                       *finetune_options])
    ok(embed, ["extract", manifest, "--store", store, "--image-backbone", "none", "--text-backbone", "none",
               "--image-module", modules["image"], "--text-module", modules["text"], "--workers", 0, "--no-progress"])
    results = folder / "results"
    ok(heads, ["sweep", store, "--out", results, "--strategies", "1A", "--fusions", "concat", "--seeds", 0,
               "--no-baselines", "--device", "cpu"])
    return outputs, results / "heads" / "1A-concat"
