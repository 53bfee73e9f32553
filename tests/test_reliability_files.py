"""Files the plugin did not write, and folders it did: cleanup that proves ownership (flock, not pids),
damaged or hostile checkpoint files, an unusable cache directory, private copies' offload folders."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from pytest_llmload import load_model, load_tokenizer
from pytest_llmload import builtin_path
from pytest_llmload.errors import LLMLoadError, ModelLoadError
from pytest_llmload._internal.planning.fit_check import weights_upper_bound
from pytest_llmload._internal.loading.ownership import (
    MARKER,
    SESSION_PREFIX,
    owned_folder,
    remove_owned_folder,
    session_folder,
    sweep_dead_sessions,
    sweep_dead_staging,
)
from pytest_llmload import make_spec

from maps import GPT2_CPU_DISK

# -- helpers -------------------------------------------------------------------------------------------

_HOLDER = """
import os, sys, tempfile
from pytest_llmload._internal.loading.ownership import owned_folder, session_folder
folders = [session_folder(), owned_folder(prefix=".tiny-llama-%d-" % os.getpid(), dir=sys.argv[1])]
print(*folders, sep="\\n", flush=True)
sys.stdin.read()  # alive until the test closes stdin
os._exit(0)  # gone without cleaning up, as a killed process would be
"""


class Holder:
    """Another process that owns a session folder and a staging folder until :meth:`exit`."""

    def __init__(self, tmp, staging_parent):
        env = {**os.environ, "TMPDIR": str(tmp)}
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(staging_parent)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.session, self.staging = (self.proc.stdout.readline().strip() for _ in range(2))

    def exit(self):
        self.proc.stdin.close()
        assert self.proc.wait() == 0


@pytest.fixture
def holders(tmp_path):
    made = []

    def make(staging_parent):
        made.append(Holder(tmp_path / "tmp", staging_parent))
        return made[-1]

    (tmp_path / "tmp").mkdir()
    yield make
    for holder in made:
        if holder.proc.poll() is None:
            holder.exit()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def copy_checkpoint(tmp_path, name="tiny-gpt2"):
    target = tmp_path / name
    shutil.copytree(builtin_path(name), target)
    return target


def write_safetensors(file, header: bytes, data: bytes = b"") -> None:
    file.unlink(missing_ok=True)
    file.write_bytes(struct.pack("<Q", len(header)) + header + data)


class FifoWatch:
    """Records whether anyone opens a FIFO for reading (such a reader would block until a writer comes)."""

    def __init__(self, path):
        self.path, self.opened, self._stop = path, False, threading.Event()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.05):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
            except OSError:
                continue
            try:
                # once the code under test has replaced the FIFO with a regular file, a write-open succeeds
                # without any reader: only an open FIFO counts
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    self.opened = True
            finally:
                os.close(fd)  # the blocked reader gets end-of-file instead of hanging the suite

    def stop(self):
        self._stop.set()
        self._thread.join()


def test_fifo_watch_counts_a_reader_and_not_a_regular_file_put_in_its_place(tmp_path):
    # the watch itself: a reader of the FIFO is seen; the FIFO replaced by a regular file is no reader
    # (CI once saw a rebuild that replaced the FIFO counted as an open)
    seen = FifoWatch(tmp_path / "read")
    try:
        fd = os.open(tmp_path / "read", os.O_RDONLY | os.O_NONBLOCK)
        try:
            deadline = time.monotonic() + 10
            while not seen.opened and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.close(fd)
    finally:
        seen.stop()
    assert seen.opened
    replaced = FifoWatch(tmp_path / "replaced")
    try:
        (tmp_path / "replaced").unlink()
        (tmp_path / "replaced").write_text("{}")
        time.sleep(0.3)  # several rounds of the watch
    finally:
        replaced.stop()
    assert not replaced.opened


# -- 2. cleanup removes only what it can prove is its own --------------------------------------------------


def test_session_folder_carries_the_plugin_marker(isolated_tmp):
    folder = session_folder()
    try:
        assert os.path.basename(folder).startswith(f"{SESSION_PREFIX}{os.getpid()}-")
        with open(os.path.join(folder, MARKER), "rb") as f:
            assert f.read().startswith(b"pytest-llmload owner lock\n")
        assert sweep_dead_sessions(str(isolated_tmp)) == []  # this process holds it
    finally:
        remove_owned_folder(folder)
    assert not os.path.exists(folder)


def test_live_folders_of_another_process_are_kept_though_their_pid_looks_dead(tmp_path, holders):
    staging_parent = tmp_path / "builtin"
    staging_parent.mkdir()
    holder = holders(staging_parent)
    dead = _dead_pid()
    # The names now claim a pid that is gone, as a pid of another PID namespace or host would look.
    session = os.path.join(tmp_path / "tmp", f"{SESSION_PREFIX}{dead}-live")
    staging = os.path.join(staging_parent, f".tiny-llama-{dead}-live")
    os.rename(holder.session, session)
    os.rename(holder.staging, staging)
    assert sweep_dead_sessions(str(tmp_path / "tmp")) == []
    assert sweep_dead_staging(staging_parent) == []
    assert os.path.isdir(session) and os.path.isdir(staging)
    holder.exit()  # the owner dies: its lock goes with it, and now the folders are provably abandoned
    assert sweep_dead_sessions(str(tmp_path / "tmp")) == [os.path.basename(session)]
    assert sweep_dead_staging(staging_parent) == [os.path.basename(staging)]
    assert not os.path.exists(session) and not os.path.exists(staging)


def test_folders_without_the_plugin_marker_are_never_swept(tmp_path):
    dead = _dead_pid()
    mine = tmp_path / f"{SESSION_PREFIX}99999-mydata"
    unmarked_staging = tmp_path / f".tiny-llama-{dead}-abcd"
    foreign_marker = tmp_path / f"{SESSION_PREFIX}{dead}-other"
    fifo_marker = tmp_path / f"{SESSION_PREFIX}{dead}-fifo"
    for folder in (mine, unmarked_staging, foreign_marker, fifo_marker):
        folder.mkdir()
        (folder / "data.csv").write_text("precious\n")
    (foreign_marker / MARKER).write_text("someone else's file\n")
    os.mkfifo(fifo_marker / MARKER)  # opened non-blocking and refused: the sweep does not hang
    assert sweep_dead_sessions(str(tmp_path)) == []
    assert sweep_dead_staging(tmp_path) == []
    for folder in (mine, unmarked_staging, foreign_marker, fifo_marker):
        assert (folder / "data.csv").read_text() == "precious\n"


def test_a_session_leaves_the_users_own_session_named_folder_alone(pytester, isolated_tmp):
    mine = isolated_tmp / f"{SESSION_PREFIX}99999-mydata"
    mine.mkdir()
    (mine / "train.jsonl").write_text("{}\n")
    pytester.makepyfile("def test_x(): pass")
    pytester.runpytest("--llm-model=builtin:tiny-llama").assert_outcomes(passed=1)
    assert (mine / "train.jsonl").read_text() == "{}\n"


def test_without_flock_nothing_is_swept(tmp_path, monkeypatch):
    code = "from pytest_llmload._internal.loading.ownership import session_folder; print(session_folder())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    abandoned = proc.stdout.strip()
    import pytest_llmload._internal.loading.ownership as ownership

    monkeypatch.setattr(ownership, "fcntl", None)  # as on Windows: no proof of death, so no sweep
    assert sweep_dead_sessions(str(tmp_path)) == [] and os.path.isdir(abandoned)
    monkeypatch.undo()
    assert sweep_dead_sessions(str(tmp_path)) == [os.path.basename(abandoned)]


def _unshare_available() -> str | None:
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    proc = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"unshare -p -f --mount-proc cannot run here: {proc.stderr.strip() or proc.returncode}"
    return None


def test_a_run_in_another_pid_namespace_keeps_a_live_sessions_folders(tmp_path, holders, pytester):
    reason = _unshare_available()
    if reason:
        pytest.skip(reason)
    staging_parent = tmp_path / "cache" / "builtin"
    staging_parent.mkdir(parents=True)
    live = holders(staging_parent)
    dead = holders(staging_parent)
    dead.exit()  # a crashed run: its folders must go, which shows the sweep did run over there
    pytester.makepyfile(f"""
        import os
        from pytest_llmload._internal.loading.ownership import sweep_dead_staging

        def test_in_a_fresh_pid_namespace():
            assert os.getpid() < 50  # pid 1 is unshare's child: the holder's pid means nothing here
            assert not os.path.exists("/proc/{live.proc.pid}")
            sweep_dead_staging({str(staging_parent)!r})
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         "--llm-model=builtin:tiny-llama", str(pytester.path)],
        capture_output=True, text=True, env=env, cwd=pytester.path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isdir(live.session) and os.path.isdir(live.staging)  # the live session is untouched
    assert not os.path.exists(dead.session) and not os.path.exists(dead.staging)  # session end + explicit sweep


def test_a_builtin_checkpoint_keeps_no_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(tmp_path))
    path = builtin_path("tiny-gpt2")
    assert sorted(os.listdir(path.parent)) == [path.name]  # the staging folder was renamed into place
    assert not (path / MARKER).exists()
    manifest = json.loads((path / "llmload-manifest.json").read_text())
    assert MARKER not in manifest["files"]


def test_a_builtin_whose_manifest_is_a_fifo_is_rebuilt_without_opening_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(tmp_path))
    path = builtin_path("tiny-gpt2")
    (path / "llmload-manifest.json").unlink()
    watch = FifoWatch(path / "llmload-manifest.json")
    try:
        assert builtin_path("tiny-gpt2") == path
    finally:
        watch.stop()
    assert not watch.opened and (path / "llmload-manifest.json").is_file()


# -- 3. damaged and hostile checkpoint files ------------------------------------------------------------


def _entry_is_a_string(ckpt):
    write_safetensors(ckpt / "model.safetensors", b'{"transformer.wte.weight": "oops"}')
    return "model.safetensors", (r"is damaged: its header entry 'transformer.wte.weight' is a string, "
                                 r"not a tensor description")


def _entry_lacks_offsets(ckpt):
    write_safetensors(ckpt / "model.safetensors", b'{"w": {"dtype": "F32", "shape": [2]}}', b"\0" * 8)
    return "model.safetensors", r"is damaged: its header entry 'w' lacks data_offsets"


def _deeply_nested_header(ckpt):
    write_safetensors(ckpt / "model.safetensors", b"[" * 200_000)
    return "model.safetensors", r"is damaged: its header is nested 200000 levels deep \(at most 64 accepted\)"


def _weight_map_is_a_list(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return "model.safetensors.index.json", (r"is damaged: a weight_map that is a list, expected an object "
                                            r"of tensor names to shard files")


def _weight_map_maps_to_a_number(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 3}}))
    return "model.safetensors.index.json", r"is damaged: its weight_map maps 'lm_head.weight' to a number, not a shard"


def _shard_outside_the_folder(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../../../../etc/passwd"}}))
    return "model.safetensors.index.json", (r"names shard '../../../../etc/passwd', which is outside the "
                                            r"checkpoint folder .*; shards must be files inside it")


def _dangling_symlink(ckpt):
    (ckpt / "model.safetensors").unlink()
    os.symlink("../../blobs/4e1f0a", ckpt / "model.safetensors")  # a pruned Hugging Face cache snapshot
    return "model.safetensors", r"is a dangling symlink \(to ../../blobs/4e1f0a\), not a regular file"


def _weights_are_a_directory(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    return "model.safetensors", r"is a directory, not a regular file"


DAMAGE = {f.__name__.strip("_"): f for f in (
    _entry_is_a_string, _entry_lacks_offsets, _deeply_nested_header, _weight_map_is_a_list,
    _weight_map_maps_to_a_number, _shard_outside_the_folder, _dangling_symlink, _weights_are_a_directory)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    ckpt = copy_checkpoint(tmp_path)
    name, message = DAMAGE[damage](ckpt)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(ckpt))
    text = str(info.value)
    assert "\n" not in text
    import re

    assert re.fullmatch(rf"checkpoint file {re.escape(str(ckpt / name))} {message}.*", text), text
    bound = weights_upper_bound(make_spec(str(ckpt), "cpu", "fp32"))  # the fit check reads the same headers
    assert bound is None or damage.startswith(("weight_map", "shard"))


def test_fifo_weights_are_refused_without_being_opened(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    watch = FifoWatch(ckpt / "model.safetensors")
    try:
        assert weights_upper_bound(make_spec(str(ckpt), "cpu", "fp32")) is None
        with pytest.raises(ModelLoadError) as info:
            load_model(str(ckpt))
    finally:
        watch.stop()
    assert str(info.value) == f"checkpoint file {ckpt / 'model.safetensors'} is a FIFO, not a regular file"
    assert not watch.opened


def test_fifo_config_is_refused_without_being_opened(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "config.json").unlink()
    watch = FifoWatch(ckpt / "config.json")
    try:
        with pytest.raises(LLMLoadError) as info:
            load_model(str(ckpt))
    finally:
        watch.stop()
    assert "\n" not in str(info.value) and f"{ckpt}" in str(info.value)
    assert not watch.opened


def test_deeply_nested_config_json(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "config.json").write_text('{"a": ' + "[" * 200_000)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(ckpt))
    assert str(info.value) == (f"checkpoint file {ckpt / 'config.json'} is damaged: nested 200001 levels deep "
                               "(at most 64 accepted)")


def test_deeply_nested_tokenizer_json(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "tokenizer.json").write_text("[" * 100_000)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(str(ckpt))
    assert str(info.value) == (f"tokenizer file {ckpt / 'tokenizer.json'} is damaged: nested 100000 levels deep "
                               "(at most 64 accepted)")


def test_a_dangling_tokenizer_symlink_fails_the_tokenizer_only(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "tokenizer.json").unlink()
    os.symlink("../../blobs/77aa", ckpt / "tokenizer.json")
    assert type(load_model(str(ckpt))).__name__ == "GPT2LMHeadModel"  # the model does not need it
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(str(ckpt))
    assert str(info.value) == (f"tokenizer file {ckpt / 'tokenizer.json'} is a dangling symlink "
                               "(to ../../blobs/77aa), not a regular file")


def test_damaged_cells_fail_each_test_with_one_remembered_line(pytester, tmp_path, monkeypatch):
    import collections

    import pytest_llmload._internal.loading.safety as safety

    checks = collections.Counter()
    for name in ("check_checkpoint_files", "check_tokenizer_files"):
        def counting(directory, _real=getattr(safety, name), _name=name):
            checks[_name, str(directory)] += 1
            return _real(directory)

        monkeypatch.setattr(safety, name, counting)
    fifo = copy_checkpoint(tmp_path / "fifo")
    (fifo / "model.safetensors").unlink()
    watch = FifoWatch(fifo / "model.safetensors")
    deep = copy_checkpoint(tmp_path / "deep")
    write_safetensors(deep / "model.safetensors", b"[" * 200_000)
    escape = copy_checkpoint(tmp_path / "escape")
    _shard_outside_the_folder(escape)
    tokenizer = copy_checkpoint(tmp_path / "tokenizer")
    (tokenizer / "tokenizer.json").write_text("[" * 100_000)
    pytester.makepyfile("""
        def test_a(llm_model, llm_tokenizer): pass
        def test_b(llm_model, llm_tokenizer): pass
    """)
    try:
        result = pytester.runpytest(*(f"--llm-model={c}" for c in (fifo, deep, escape, tokenizer)))
    finally:
        watch.stop()
    result.assert_outcomes(errors=8)
    messages = sorted(str(r.longrepr) for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed)
    expected = [f"checkpoint file {fifo}/model.safetensors is a FIFO, not a regular file",
                f"checkpoint file {deep}/model.safetensors is damaged: its header is nested 200000 levels deep "
                "(at most 64 accepted)",
                f"checkpoint file {escape}/model.safetensors.index.json names shard '../../../../etc/passwd', "
                f"which is outside the checkpoint folder {escape}; shards must be files inside it",
                f"tokenizer file {tokenizer}/tokenizer.json is damaged: nested 100000 levels deep "
                "(at most 64 accepted)"]
    assert messages == sorted(expected * 2)  # each of the cell's two tests, one line each
    for kind, folder in [("check_checkpoint_files", c) for c in (fifo, deep, escape)] + [
            ("check_tokenizer_files", tokenizer)]:
        assert checks[kind, str(folder)] == 1, checks  # remembered: the second test is not checked again
    out = result.stdout.str()
    assert "Traceback" not in out and "pytest_llmload/" not in out
    assert not watch.opened


# -- 7. an unusable cache directory ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "/dev/null", "/proc"])
def test_unusable_cache_dir_is_one_line_naming_the_variable(tmp_path, monkeypatch, kind):
    if kind == "file":
        path = tmp_path / "cache"
        path.write_text("not a folder")
        why = f"{path} is a file, not a directory"
    elif kind == "/dev/null":
        path, why = "/dev/null", "/dev/null is a character device, not a directory"
    else:
        path, why = "/proc/llmload-cache", "cannot create /proc/llmload-cache/builtin: No such file or directory"
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", str(path))
    with pytest.raises(ModelLoadError) as info:
        load_model("builtin:tiny-llama")
    assert str(info.value) == (f"LLMLOAD_CACHE_DIR={path} cannot hold the built-in checkpoints: {why}; "
                               "point LLMLOAD_CACHE_DIR at a writable directory")


def test_unusable_default_cache_dir_says_how_to_choose_another(monkeypatch):
    monkeypatch.delenv("LLMLOAD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null")
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer("builtin:tiny-gpt2")
    assert str(info.value) == ("the built-in checkpoint cache /dev/null/pytest-llmload cannot hold the built-in "
                               "checkpoints: /dev/null is a character device, not a directory; "
                               "set LLMLOAD_CACHE_DIR to a writable directory")


def test_read_only_cache_mount(tmp_path):
    """Root ignores chmod 555, so the read-only folder is a read-only bind mount in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("the unshare command is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m cannot run here: {probe.stderr.strip()}")
    mount = tmp_path / "ro"
    empty, full = mount / "empty", mount / "full"
    empty.mkdir(parents=True)
    built = builtin_path("tiny-llama")  # a cache that already holds the built-in needs no writing
    shutil.copytree(built, full / "builtin" / built.name)
    code = ("import os, sys\n"
            "from pytest_llmload import load_model\n"
            "from pytest_llmload.errors import ModelLoadError\n"
            "for cache in sys.argv[1:]:\n"
            "    os.environ['LLMLOAD_CACHE_DIR'] = cache\n"
            "    try:\n        print(type(load_model('builtin:tiny-llama')).__name__)\n"
            "    except ModelLoadError as exc:\n        print(exc)\n")
    script = f'mount --bind {mount} {mount} && mount -o remount,bind,ro {mount} && {sys.executable} -c "$0" "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, code, str(empty), str(full)],
                          capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr and proc.returncode:
        pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
    assert proc.stdout.splitlines() == [
        f"LLMLOAD_CACHE_DIR={empty} cannot hold the built-in checkpoints: cannot create {empty}/builtin: "
        "Read-only file system; point LLMLOAD_CACHE_DIR at a writable directory",
        "LlamaForCausalLM",
    ], proc.stdout + proc.stderr[-3000:]


def test_unusable_cache_dir_in_a_session(pytester, monkeypatch):
    monkeypatch.setenv("LLMLOAD_CACHE_DIR", "/dev/null")
    pytester.makepyfile("""
        def test_a(llm_model): pass
        def test_b(llm_tokenizer): pass
    """)
    result = pytester.runpytest("--llm-model=builtin:tiny-llama")
    result.assert_outcomes(errors=2)
    messages = [str(r.longrepr) for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert messages == ["LLMLOAD_CACHE_DIR=/dev/null cannot hold the built-in checkpoints: /dev/null is a character "
                        "device, not a directory; point LLMLOAD_CACHE_DIR at a writable directory"] * 2
    out = result.stdout.str()
    assert "Traceback" not in out and "pytest_llmload/" not in out


# -- 9. private copies' offload folders --------------------------------------------------------------------


def test_private_copies_remove_their_offload_folders_at_teardown(pytester, isolated_tmp):
    pattern = os.path.join(str(isolated_tmp), f"{SESSION_PREFIX}*", "offload-*")
    pytester.makepyfile(f"""
        import glob
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_mutates(llm_private_model, i):
            assert set(llm_private_model.hf_device_map.values()) == {{"cpu", "disk"}}
            assert len(glob.glob({pattern!r})) == 1  # this copy's own; the earlier ones are gone
    """)
    result = pytester.runpytest("--llm-model=builtin:tiny-gpt2", f"--llm-device-map={json.dumps(GPT2_CPU_DISK)}")
    result.assert_outcomes(passed=4)
    assert glob.glob(pattern) == [] and os.listdir(isolated_tmp) == []


def test_private_load_removes_its_offload_folder_when_collected(isolated_tmp):
    import gc

    from pytest_llmload import ModelCache

    cache = ModelCache(max_models=1)
    spec = make_spec("builtin:tiny-gpt2", GPT2_CPU_DISK, "fp32")
    pattern = os.path.join(str(isolated_tmp), f"{SESSION_PREFIX}*", "offload-*")
    for _ in range(3):
        model = cache.load_private(spec)
        assert len(glob.glob(pattern)) == 1
        del model
        gc.collect()
    assert glob.glob(pattern) == []
    cache.close()
    assert os.listdir(isolated_tmp) == []


def test_owned_folder_is_made_inside_the_given_parent(tmp_path):
    folder = owned_folder(prefix="x-", dir=tmp_path)
    assert os.path.dirname(folder) == str(tmp_path) and os.listdir(folder) == [MARKER]
    remove_owned_folder(folder)
    assert os.listdir(tmp_path) == []
