"""bin/gpu-check without a GPU: its options, its step runner, its no-CUDA message."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bin" / "gpu-check"


@pytest.fixture(scope="module")
def gpu_check():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_defaults_run_every_step_in_eight_minutes(gpu_check):
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_check.STEPS)
    assert args.budget == 480
    assert args.vectors == 1_000_000
    assert args.device == "cuda"


def test_quick_scales_down(gpu_check):
    args = gpu_check.parse_args(["--quick"])
    assert args.budget <= 180
    assert args.vectors == 100_000
    assert args.embed_args and args.search_args


def test_only_and_skip_choose_steps_and_env_always_runs(gpu_check):
    assert gpu_check.parse_args(["--only", "gpuflat"]).steps == ["env", "gpuflat"]
    args = gpu_check.parse_args(["--skip", "embed", "search", "env"])
    assert args.steps == ["env", "gpuflat", "e2e"]
    assert gpu_check.parse_args(["--search-args", "--vectors 5"]).search_args == "--vectors 5"


@pytest.mark.parametrize(
    "argv", [["--budget", "0"], ["--only", "nonsense"], ["--vectors", "10"], ["--bogus"]]
)
def test_bad_options_exit_with_usage(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as caught:
        gpu_check.parse_args(argv)
    assert caught.value.code == 2
    assert "usage: gpu-check" in capsys.readouterr().err


def test_a_step_that_hangs_is_stopped_and_reported(gpu_check):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    result = gpu_check.run_step("slow", command, timeout=1.5)
    assert result.status == "timeout"
    assert "--budget" in result.note


def test_failed_and_passing_steps(gpu_check):
    failed = gpu_check.run_step("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    assert (failed.status, failed.returncode) == ("failed", 3)
    ok = gpu_check.run_step(
        "good", [sys.executable, "-c", "print('embedding: 812 images/s'); print('noise')"], 30
    )
    assert ok.status == "ok"
    assert ok.figures == ["embedding: 812 images/s"]


def test_later_steps_run_after_a_failure(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        gpu_check, "ENV_PROBE", 'print(\'{"cuda_available": true, "torch": "fake"}\')'
    )
    monkeypatch.setattr(gpu_check, "GPU_FLAT", "import sys; sys.exit(4)")
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)  # no bench scripts there
    code = gpu_check.main(["--skip", "e2e", "--budget", "60"])
    out = capsys.readouterr()
    assert code == 1
    assert "=== embed: missing" in out.out
    assert "=== search: missing" in out.out
    assert "=== gpuflat: failed" in out.out
    assert "steps that did not pass: embed, search, gpuflat" in out.err


def test_without_cuda_it_says_so_and_exits_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a GPU machine
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu-check: no CUDA device" in done.stderr
    assert "nothing else was run" in done.stderr
    assert "=== embed" not in done.stdout
