"""A checkpoint's config.json (or the model path itself) that is no regular file: a FIFO, a symlink loop, a
symlink to a device, a symlink to nothing. One line saying what it is, from the CLI and the pytest plugin,
and nothing hangs on a FIFO (every run here has a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, cwd, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def _fifo(config):
    os.mkfifo(config)
    return "a FIFO"


def _symlink_loop(config):
    os.symlink("config.json", config)
    return "a symlink loop"


def _dev_zero(config):
    os.symlink("/dev/zero", config)
    return "a character device"


def _dangling(config):
    os.symlink("../blobs/9c1e", config)
    return "a dangling symlink (to ../blobs/9c1e)"


def _directory(config):
    config.mkdir()
    return "a directory"


CONFIGS = {f.__name__.strip("_"): f for f in (_fifo, _symlink_loop, _dev_zero, _dangling, _directory)}


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_config_json_that_is_no_regular_file_says_what_it_is(tmp_path, kind):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    what = CONFIGS[kind](folder / "config.json")
    line = f"checkpoint file ckpt/config.json is {what}, not a regular file"
    for command in ("plan", "estimate"):
        result = run(["-m", "pytest_llmload", command, "ckpt"], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"llmload {command}: {line}\n"
    if kind != "directory":  # the config.json given itself (a directory of that name is no config file)
        result = run(["-m", "pytest_llmload", "plan", "ckpt/config.json"], cwd=tmp_path)
        assert result.stderr == f"llmload plan: {line}\n"


@pytest.mark.parametrize("kind", ["fifo", "symlink_loop", "dev_zero"])
def test_the_plugin_says_what_a_config_json_is(tmp_path, kind):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    what = CONFIGS[kind](folder / "config.json")
    (tmp_path / "test_x.py").write_text("def test_a(llm_model): pass\n")
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--llm-model=ckpt", "test_x.py"], cwd=tmp_path,
                 timeout=120)
    assert result.returncode != 0
    assert f"ERROR: checkpoint file {folder}/config.json is {what}, not a regular file" in result.stderr.splitlines(), (
        result.stdout + result.stderr)
    assert "Traceback" not in result.stdout + result.stderr


def test_a_model_path_that_does_not_resolve_is_no_hub_id(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    os.symlink("gone", tmp_path / "dangling")
    for model in ("loop", "./loop"):
        result = run(["-m", "pytest_llmload", "plan", model], cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == f"llmload plan: model path {model!r} is a symlink loop: expected a checkpoint directory\n"
    result = run(["-m", "pytest_llmload", "estimate", "dangling"], cwd=tmp_path)
    assert result.stderr == ("llmload estimate: model path 'dangling' is a dangling symlink (to gone): expected a "
                             "checkpoint directory\n")
    (tmp_path / "test_x.py").write_text("def test_a(llm_model): pass\n")
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--llm-model=loop", "test_x.py"], cwd=tmp_path,
                 timeout=120)
    assert "ERROR: model path 'loop' is a symlink loop: expected a checkpoint directory" in result.stderr.splitlines()


def test_a_model_path_that_is_a_fifo_says_so(tmp_path):
    os.mkfifo(tmp_path / "weights")
    result = run(["-m", "pytest_llmload", "plan", "./weights"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("llmload plan: model path './weights' is a FIFO, not a directory: expected a checkpoint "
                             "directory with config.json\n")
