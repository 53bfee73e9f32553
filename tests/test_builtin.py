"""Built-in checkpoints: deterministic, written atomically, rebuilt when damaged."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import pytest

from pytest_llmload import BUILTIN_MODELS, builtin_path
from pytest_llmload._internal.loading.builtins import MANIFEST


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_are_deterministic(fresh_cache, monkeypatch, tmp_path):
    first = builtin_path("tiny-llama")
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(tmp_path / "other"))
    second = builtin_path("tiny-llama")
    assert first != second
    assert _digest(first) == _digest(second)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_builtin_is_a_real_checkpoint_with_a_tokenizer(name):
    from transformers import AutoConfig, AutoTokenizer

    path = builtin_path(name)
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= set(os.listdir(path))
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [BUILTIN_MODELS[name].model_class]
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers")
    assert layers >= 3  # enough blocks for a device map to split
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Grüße, world! 123"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert max(tokenizer(text).input_ids) < config.vocab_size


def test_damaged_checkpoint_is_rebuilt(fresh_cache):
    path = builtin_path("tiny-gpt2")
    good = _digest(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after it was written
    assert builtin_path("tiny-gpt2") == path
    assert _digest(path) == good


def test_no_staging_folders_are_left(fresh_cache):
    builtin_path("tiny-bert")
    assert [p.name for p in (fresh_cache / "builtin").iterdir() if p.name.startswith(".")] == []


def _build(cache_dir):
    os.environ["LLMLOAD_CACHE_DIR"] = cache_dir
    from pytest_llmload import builtin_path

    return str(builtin_path("tiny-gpt2"))


def test_concurrent_builds_end_with_one_sound_copy(fresh_cache):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build, [str(fresh_cache)] * 2)
    assert paths[0] == paths[1]
    entries = os.listdir(fresh_cache / "builtin")
    assert entries == [os.path.basename(paths[0])]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(paths[0])


def test_start_up_knows_every_built_in_by_name():
    from pytest_llmload import BUILTIN_MODELS
    from pytest_llmload._internal.config.specs import BUILTIN_NAMES

    assert tuple(BUILTIN_MODELS) == BUILTIN_NAMES


def test_a_copy_another_process_renamed_into_place_meanwhile_is_not_deleted(fresh_cache, monkeypatch):
    # The interleaving: this process finds the copy missing, then another renames its finished copy into
    # place and loads it. This process used to delete that copy (under the other's feet) and build again.
    from pytest_llmload._internal.loading import builtins as builtin

    path = builtin_path("tiny-gpt2")
    real, checks = builtin._is_complete, []

    def missing_at_first_look(p):
        checks.append(p)
        return False if len(checks) == 1 else real(p)

    monkeypatch.setattr(builtin, "_is_complete", missing_at_first_look)
    with open(path / "model.safetensors", "rb") as held:  # the other process, loading its copy
        assert builtin_path("tiny-gpt2") == path
        assert os.fstat(held.fileno()).st_nlink == 1  # still the file at that path: not deleted
    assert os.listdir(path.parent) == [path.name]


def test_a_builder_waits_for_another_building_into_the_same_cache(fresh_cache, monkeypatch):
    import fcntl
    import threading

    from pytest_llmload._internal.loading import builtins as builtin

    folder = fresh_cache / "builtin"
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held as another process building there would
    done = []
    worker = threading.Thread(target=lambda: done.append(builtin_path("tiny-gpt2")))
    try:
        worker.start()
        worker.join(1.0)
        assert not done and not any(folder.iterdir())  # waiting, writing nothing
    finally:
        os.close(fd)
    worker.join(120)
    assert done and builtin._is_complete(done[0])
    monkeypatch.setattr(builtin, "BUILD_LOCK_TIMEOUT", 0.2)
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        (done[0] / MANIFEST).unlink()
        with pytest.raises(builtin.ModelLoadError) as caught:
            builtin_path("tiny-gpt2")
    finally:
        os.close(fd)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message and "over 0.2 s" in message
