"""Faults injected for real: damaged checkpoints, failed loads, interrupted and crashed runs, untrusted
code and pickles, an unreachable hub, concurrency under pytest-xdist."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
import weakref

import pytest
import torch

from pytest_llmload import load_model, load_tokenizer
from pytest_llmload import builtin_path
from pytest_llmload import ModelCache
from pytest_llmload.errors import ModelLoadError
from pytest_llmload._internal.loading.ownership import (
    SESSION_PREFIX,
    owned_folder,
    remove_owned_folder,
    sweep_dead_sessions,
    sweep_dead_staging,
)
from pytest_llmload import make_spec

from maps import GPT2_CPU_DISK


def copy_checkpoint(tmp_path, name="tiny-gpt2"):
    target = tmp_path / name
    shutil.copytree(builtin_path(name), target)
    return target


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. damaged checkpoints ---------------------------------------------------------------------------


def test_truncated_safetensors_is_named(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as info:
        load_model(str(ckpt))
    assert str(info.value) == (f"checkpoint file {weights} is damaged: truncated: 5000 bytes, its header needs "
                               f"{len(builtin_path('tiny-gpt2').joinpath('model.safetensors').read_bytes())}")


def test_garbage_safetensors_header(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match=r"model.safetensors is damaged: its header claims \d+ bytes"):
        load_model(str(ckpt))


def test_config_that_is_not_json(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"cannot read {ckpt}/config.json: "):
        load_model(str(ckpt))


def test_config_with_an_unknown_architecture(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gpt9000"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"cannot read {ckpt}/config.json: .*gpt9000"):
        load_model(str(ckpt))


def test_tokenizer_that_cannot_load(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ModelLoadError, match=rf"tokenizer file {ckpt}/tokenizer.json is damaged: not valid JSON"):
        load_tokenizer(str(ckpt))
    assert type(load_model(str(ckpt))).__name__ == "GPT2LMHeadModel"  # the weights are fine


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"is incomplete: model.safetensors.index.json lists "
                                             r"model-00002-of-00002.safetensors, which are missing"):
        load_model(str(ckpt))


def test_damaged_cells_fail_and_the_rest_of_the_session_passes(pytester, tmp_path):
    truncated = copy_checkpoint(tmp_path / "a")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:3000])
    broken_config = copy_checkpoint(tmp_path / "b", "tiny-llama")
    (broken_config / "config.json").write_text("nonsense")
    pytester.makepyfile("def test_x(llm_model, llm_tokenizer): pass")
    start = time.perf_counter()
    result = pytester.runpytest(f"--llm-model={truncated}", f"--llm-model={broken_config}",
                                "--llm-model=builtin:tiny-llama", "--llm-precision=fp32", "--llm-precision=fp16")
    elapsed = time.perf_counter() - start
    result.assert_outcomes(passed=2, errors=4)
    result.stdout.fnmatch_lines([
        f"*checkpoint file {truncated}/model.safetensors is damaged: *",
        f"*cannot read {broken_config}/config.json:*",
    ])
    assert "Traceback" not in result.stdout.str()
    print(f"4 damaged cells and 2 sound ones in {elapsed:.2f} s")


# -- 2. loads that fail half-way -------------------------------------------------------------------------

BUILT: list = []


def _failing_class():
    from transformers import GPT2LMHeadModel

    class FailsAfterBuilding(GPT2LMHeadModel):
        def post_init(self):
            super().post_init()
            BUILT.append(weakref.ref(self))
            self.half_built = torch.ones(8 * 2**20 // 4)  # 8 MiB that must be released with it
            raise RuntimeError("injected failure inside from_pretrained")

    return FailsAfterBuilding


def test_failed_load_leaves_nothing_in_the_cache_and_frees_memory():
    cache = ModelCache(max_models=2)
    spec = make_spec("builtin:tiny-gpt2", "cpu", "fp32")
    BUILT.clear()
    with pytest.raises(ModelLoadError, match="injected failure inside from_pretrained"):
        cache.get(spec, model_class=_failing_class())
    gc.collect()
    assert BUILT and all(ref() is None for ref in BUILT)  # the half-built model was released
    assert cache.cache_info().size == 0
    with pytest.raises(ModelLoadError, match="injected failure"):  # remembered: not retried per test
        cache.get(spec, model_class=_failing_class())
    assert len(BUILT) == 1
    assert type(cache.get(spec)).__name__ == "GPT2LMHeadModel"  # the next cell loads normally
    cache.close()


def test_budget_too_small_for_memory_spills_to_disk_and_is_cleaned_up(pytester, isolated_tmp):
    """transformers 5 cannot be told "no disk" (a disk budget of 0 is ignored), so a tiny budget loads from
    disk; the session's offload folder goes with the session."""
    pytester.makepyfile("""
        def test_x(llm_model):
            assert set(llm_model.hf_device_map.values()) == {"disk"}
    """)
    pytester.runpytest("--llm-max-memory=cpu=50KiB,disk=0").assert_outcomes(passed=1)
    assert os.listdir(isolated_tmp) == []


# -- 3. interrupted and crashed runs ----------------------------------------------------------------------


def test_folders_of_dead_processes_are_swept(tmp_path):
    # Only folders with the plugin's marker whose owner lock is free are swept (see test_reliability_files.py).
    code = "from pytest_llmload._internal.loading.ownership import session_folder; print(session_folder())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)}).stdout.strip()
    alive = owned_folder(prefix=f"{SESSION_PREFIX}{os.getpid()}-", dir=tmp_path)
    assert sweep_dead_sessions(str(tmp_path)) == [os.path.basename(dead)]
    assert os.path.exists(alive) and not os.path.exists(dead)
    remove_owned_folder(alive)


def test_crashed_xdist_worker_leaves_no_offload_folder(pytester, isolated_tmp):
    mapping = GPT2_CPU_DISK
    pytester.makepyfile("""
        import os

        def test_crash(llm_model):
            os._exit(1)  # the worker dies: no finalizer, no atexit

        def test_fine():
            pass
    """)
    env_tmp = str(isolated_tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "--llm-model=builtin:tiny-gpt2",
         f"--llm-device-map={json.dumps(mapping)}", str(pytester.path)],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": env_tmp}, cwd=pytester.path, timeout=300,
    )
    assert "crashed" in proc.stdout or "worker" in proc.stdout.lower(), proc.stdout[-2000:]
    assert [e for e in os.listdir(env_tmp) if e.startswith(SESSION_PREFIX)] == []


def test_half_written_builtin_is_never_loaded(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    code = (
        "import os, pytest_llmload._internal.loading.builtins as b\n"
        "real = b._write_checkpoint\n"
        "def dies(model, directory):\n"
        "    real(model, directory)\n"
        "    (directory / 'model.safetensors').write_bytes(b'partial')\n"
        "    os._exit(9)\n"
        "b._write_checkpoint = dies\n"
        "b.builtin_path('tiny-llama')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLMLOAD_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 9
    leftovers = os.listdir(cache_dir / "builtin")
    assert len(leftovers) == 1 and leftovers[0].startswith(".tiny-llama-")  # only the staging folder
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(cache_dir))
    path = builtin_path("tiny-llama")
    assert os.listdir(cache_dir / "builtin") == [path.name]  # rebuilt, and the dead staging swept
    assert type(load_model("builtin:tiny-llama")).__name__ == "LlamaForCausalLM"


def test_staging_of_a_live_process_is_kept(tmp_path):
    live = tmp_path / f".tiny-llama-{os.getpid()}-abcd"
    live.mkdir()
    assert sweep_dead_staging(tmp_path) == [] and live.exists()


# -- 4. untrusted code, pickles and the network -------------------------------------------------------------


def test_local_and_builtin_loads_never_touch_the_network(monkeypatch, tmp_path):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_model("builtin:tiny-t5")
    load_tokenizer("builtin:tiny-t5")
    load_model(str(copy_checkpoint(tmp_path)))


def test_pickle_only_checkpoint_is_refused_in_a_session(pytester, tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    torch.save(load_model(str(ckpt)).state_dict(), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest(f"--llm-model={ckpt}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*has only pickle weights (pytorch_model.bin), and unpickling can run code; "
                                 "pass --llm-allow-pickle*"])
    pytester.runpytest(f"--llm-model={ckpt}", "--llm-allow-pickle").assert_outcomes(passed=1)


def test_remote_code_is_refused_in_a_session(pytester, tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (ckpt / "config.json").write_text(json.dumps(config))
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest(f"--llm-model={ckpt}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs code from the checkpoint (auto_map in config.json); pass "
                                 "--llm-trust-remote-code*"])


# -- 5. an unreachable hub ------------------------------------------------------------------------------


def test_unreachable_hub_fails_once_and_fast(pytester, monkeypatch):
    """No network here: one quick probe instead of huggingface_hub's five retries with backoff."""
    from pytest_llmload._internal.loading import safety

    monkeypatch.setattr(safety, "_hub_state", {})
    pytester.makepyfile("""
        def test_a(llm_model): pass
        def test_b(llm_model): pass
    """)
    start = time.perf_counter()
    result = pytester.runpytest("--llm-model=someorg/not-cached", "--llm-precision=fp32", "--llm-precision=fp16")
    elapsed = time.perf_counter() - start
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*the hub is not reachable (* unreachable after * s: *) and it is not in the "
                                 "local cache*"])
    assert len(safety._hub_state) == 1
    print(f"4 cells of an unreachable hub id failed in {elapsed:.2f} s")


# -- 6. concurrency ------------------------------------------------------------------------------------


def _cells(report_path):
    data = json.loads(report_path.read_text())
    return {c["id"]: (c["footprint_bytes"], c["bytes_per_device"], c["device_hops"], c["tests"])
            for c in data["cells"]}


def test_xdist_runs_give_the_same_results_and_report(pytester):
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.parametrize("i", range(2))
        def test_logits(llm_model, llm_tokenizer, i):
            ids = llm_tokenizer("same answer everywhere", return_tensors="pt").input_ids
            with torch.no_grad():
                logits = llm_model(ids).logits
            assert torch.isfinite(logits.float()).all()
    """)
    matrix = ["--llm-model=builtin:tiny-llama", "--llm-model=builtin:tiny-gpt2", "--llm-precision=fp32",
              "--llm-precision=bf16"]
    reports = {}
    for workers in ("0", "2", "4"):
        path = pytester.path / f"report-{workers}.json"
        result = pytester.runpytest_subprocess("-n", workers, *matrix, f"--llm-report={path}")
        result.assert_outcomes(passed=8)
        reports[workers] = _cells(path)
    assert reports["0"] == reports["2"] == reports["4"]
