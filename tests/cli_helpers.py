"""What CLI tests share: the tiny random backbones' options and click invocation with a success check."""
from click.testing import CliRunner

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
