"""``python -m cnnmodels.profile``: per-stage tables and the seed's inception example."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from cnnmodels.profile import inception_example


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m cnnmodels.profile`` in a process of its own: the entry point and the import as run."""
    return subprocess.run([sys.executable, "-m", "cnnmodels.profile", *args], capture_output=True, text=True)


def run_main(capsys, *args: str) -> SimpleNamespace:
    """The same command in this process (each subprocess cost about 2 s of torch's import)."""
    from cnnmodels.profile import main

    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_inception_example_reproduces_the_seed_numbers():
    naive, reduced = inception_example()
    assert naive.macs == 854_196_224
    assert reduced.macs == 271_351_808
    assert [s.macs for s in reduced.stages] == [25_690_112, 99_549_184, 133_267_456, 12_845_056]
    out = run_cli("--inception-example")
    assert out.returncode == 0, out.stderr
    for text in ("854,196,224", "271,351,808", "3.15x", "133,267,456", "481,689,600"):
        assert text in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_profile_cli_prints_a_stage_table(capsys):
    out = run_main(capsys, "resnet18", "--input-size", "1", "32", "32", "--small-input", "--num-classes", "10")
    assert out.returncode == 0, out.stderr
    assert "layer4" in out.stdout and "512x4x4" in out.stdout
    assert "11,172,810" in out.stdout


def test_profile_cli_unknown_model_exits_2(capsys):
    out = run_main(capsys, "resnet17")
    assert out.returncode == 2
    assert "resnet18" in out.stderr


def test_profile_cli_input_below_the_models_minimum_exits_2_without_a_traceback(capsys):
    out = run_main(capsys, "resnet18", "--input-size", "1", "16", "16")
    assert out.returncode == 2
    assert "resnet18 needs inputs of at least 32x32 pixels, got 16x16" in out.stderr
    assert "Traceback" not in out.stderr


def test_profile_cli_negative_input_size_exits_2_without_a_traceback(capsys):
    """A negative size reached torch.zeros before the model's size check: a traceback, exit 1."""
    out = run_main(capsys, "resnet18", "--input-size", "3", "-5", "32")
    assert out.returncode == 2 and "input_size holds a negative size: (3, -5, 32)" in out.stderr
    assert "Traceback" not in out.stderr
