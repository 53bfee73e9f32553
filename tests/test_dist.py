"""Distributed cells (issue 15): the tp device map, process under a launcher, rank-aware reporting, the
lockstep guard and two simulated nodes.

The pure decisions are unit-tested here in-process (the lockstep protocol over torch's in-process
``HashStore`` with one thread per rank); three runs are launched for real with ``torch.distributed.run``
on the gloo backend, each bounded by a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pytest_llmload
from pytest_llmload._internal.distributed import (
    END,
    NEEDS_LAUNCHER,
    Lockstep,
    World,
    collective_timeout_problem,
    launched_world,
    lockstep_problem,
    merge_exit_status,
    merge_rank_loads,
    missing_problem,
    tp_plan_problem,
    tp_reasons,
    world_size_reasons,
)
from pytest_llmload._internal.session.report import LoadReport
from pytest_llmload._internal.config.specs import parse_device_map

ROOT = Path(pytest_llmload.__file__).resolve().parent.parent
RUN_TIMEOUT = 240  # seconds: no launched run may hang


# -- pure logic ---------------------------------------------------------------------------------------

def test_launched_world_reads_the_launchers_environment():
    assert launched_world({}) == World(0, 1, 0)
    assert not launched_world({"WORLD_SIZE": "1"}).launched
    world = launched_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.local_rank, world.launched) == (3, 4, 1, True)
    assert launched_world({"WORLD_SIZE": "2", "ACCELERATE_LOCAL_PROCESS_INDEX": "1"}).local_rank == 1
    assert launched_world({"WORLD_SIZE": "x", "RANK": "-1"}) == World(0, 1, 0)


def test_reasons_for_tp_cells_and_world_size_markers():
    assert tp_reasons(World(0, 2, 0)) == []
    assert NEEDS_LAUNCHER in tp_reasons(World())[0]
    assert world_size_reasons(World(0, 2, 0), 2) == []
    assert "needs a world size of >= 4" in world_size_reasons(World(0, 2, 0), 4)[0]
    assert "not started by a launcher" in world_size_reasons(World(), 2)[0]


def test_tp_plan_problem_names_models_without_a_plan():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    assert tp_plan_problem("builtin:tiny-llama", LlamaConfig(), LlamaForCausalLM) is None
    problem = tp_plan_problem("builtin:tiny-gpt2", GPT2Config(), GPT2LMHeadModel)
    assert "builtin:tiny-gpt2 (GPT2Config) has none" in problem


def test_loading_tp_without_a_launcher_is_one_clear_error(monkeypatch):
    from pytest_llmload.errors import LLMLoadUsageError
    from pytest_llmload import load_model

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LLMLoadUsageError, match=f"device map tp {NEEDS_LAUNCHER}"):
        load_model("builtin:tiny-llama", device_map="tp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LLMLoadUsageError, match="builtin:tiny-gpt2 .GPT2Config. has none"):
        load_model("builtin:tiny-gpt2", device_map="tp")  # refused before any process group is joined


def test_tp_is_a_device_map_kind():
    spec = parse_device_map("tp")
    assert (spec.kind, spec.as_user_value(), spec.label) == ("tp", "tp", "tp")


def test_lockstep_problem_and_missing_ranks_lines():
    assert lockstep_problem({0: "a::t1", 1: "a::t1"}, 0) is None
    assert lockstep_problem({0: END, 1: "(end of session: stopping after 1 failures)"}, 3) is None
    assert "rank 1 at (end of session: stopping after 1 failures)" in lockstep_problem(
        {0: "a::t2", 1: "(end of session: stopping after 1 failures)"}, 1)
    line = lockstep_problem({0: "a::t2", 1: "a::t3", 2: "a::t2"}, 4)
    assert line == ("llmload: ranks out of lockstep at step 5: ranks 0, 2 at a::t2; rank 1 at a::t3; "
                    "stopping the session on every rank")
    line = missing_problem([1], "a::t2", 3, {1: "a::t1 (call): AssertionError"})
    assert line.startswith("llmload: rank 1 did not reach a::t2 within 3 s")
    assert "rank 1 last failed a::t1 (call): AssertionError" in line


def test_collective_timeout_line_names_the_rank_that_failed():
    others = {1: "a::t1 (call): AssertionError: only rank 1"}
    line = collective_timeout_problem("a::t1", "RuntimeError: Timed out waiting 3000ms for recv", 0, others)
    assert "rank 1 failed a::t1 (call): AssertionError: only rank 1" in line
    assert collective_timeout_problem("a::t1", "AssertionError: 1 != 2", 0, others) is None


def test_exit_status_is_non_zero_if_any_rank_failed():
    assert merge_exit_status({0: 0, 1: 0}) == 0
    assert merge_exit_status({0: 0, 1: 1}) == 1
    assert merge_exit_status({0: 2, 1: 1}) == 2
    assert merge_exit_status({0: 5, 1: 5}) == 5


def test_rank_loads_merge_into_one_cell_with_every_ranks_bytes():
    def payload(rank):
        return {"loads": [{"key": "m tp auto", "kind": "load", "id": "m-tp-auto", "load_seconds": 1.0,
                           "world_size": 2, "bytes_per_device": {f"rank{rank}:cpu": 100 + rank}}],
                "used": ["m tp auto"]}

    report = LoadReport()
    report.add(payload(0), "rank0")
    merge_rank_loads(report, {1: [payload(1)]})
    cell = report.cells["m tp auto"]
    assert cell["bytes_per_device"] == {"rank0:cpu": 100, "rank1:cpu": 101}
    assert (cell["loads"], cell["tests"], cell["workers"]) == (2, 2, ["rank0", "rank1"])


def _ranks_check_in(steps: dict[int, list[str]], timeout: float = 60.0) -> dict[int, list]:
    """Run the lockstep protocol for each rank in a thread over one in-process store."""
    import torch.distributed as dist

    store = dist.HashStore()
    results: dict[int, list] = {r: [] for r in steps}

    def rank(r):
        guard = Lockstep(store, World(r, len(steps), r), timeout, grace=0.0)
        for test in steps[r]:
            line = guard.checkin(test)
            results[r].append(line)
            if line:
                return

    threads = [threading.Thread(target=rank, args=(r,)) for r in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_lockstep_agreeing_ranks_pass_and_disagreeing_ranks_all_stop_with_one_line():
    assert _ranks_check_in({0: ["a::t1", "a::t2", END], 1: ["a::t1", "a::t2", END]}) == \
        {0: [None, None, None], 1: [None, None, None]}
    results = _ranks_check_in({0: ["a::t1", "a::t2"], 1: ["a::t1", "a::t3"]})
    assert results[0][0] is None and results[1][0] is None
    assert results[0][1] == results[1][1] == lockstep_problem({0: "a::t2", 1: "a::t3"}, 1)


def test_lockstep_names_the_rank_that_did_not_arrive_and_stops_it_when_it_does():
    import torch.distributed as dist

    store = dist.HashStore()
    early = Lockstep(store, World(0, 2, 0), 0.2, grace=0.0)
    late = Lockstep(store, World(1, 2, 1), 0.2, grace=0.0)
    late.note_failure("a::t1 (call): AssertionError")
    line = early.checkin("a::t1")
    assert line.startswith("llmload: rank 1 did not reach a::t1 within 0.2 s")
    assert "rank 1 last failed a::t1 (call): AssertionError" in line
    assert late.checkin("a::t1") == line  # the late rank stops with the same line


def test_a_rank_reporting_a_timed_out_collective_is_waited_for_even_with_a_short_timeout():
    # rank 0 sat in a collective for the whole (short) timeout, then spends a moment reporting the failure:
    # rank 1, which checked in at once, must still wait for it instead of blaming rank 0 for not arriving
    import torch.distributed as dist

    store = dist.HashStore()
    waiting = Lockstep(store, World(1, 2, 1), 0.2)
    reporting = Lockstep(store, World(0, 2, 0), 0.2)
    late = threading.Timer(0.2 + 0.6, lambda: reporting.checkin("a::t2"))  # past timeout + min(timeout, 10)
    late.start()
    try:
        assert waiting.checkin("a::t2") is None
    finally:
        late.join(30)


# -- without a launcher (in-process pytester runs) -----------------------------------------------------

def test_without_a_launcher_tp_cells_and_world_size_markers_skip_and_strict_mode_fails(pytester, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_it="""
        import pytest

        @pytest.mark.llm(device_maps="tp")
        def test_tp(llm_model):
            pass

        @pytest.mark.requires_world_size(2)
        def test_two(llm_dist):
            pass

        def test_alone(llm_dist):
            assert (llm_dist.rank, llm_dist.world_size, llm_dist.local_rank, llm_dist.group) == (0, 1, 0, None)
    """)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([f"*device map tp {NEEDS_LAUNCHER}*", "*needs a world size of >= 2*"])
    strict = pytester.runpytest("--llm-require-gpus", "-k", "tp")
    strict.assert_outcomes(errors=1, deselected=2)  # a setup failure, as for other missing hardware
    strict.stdout.fnmatch_lines([f"*{NEEDS_LAUNCHER}*"])


@pytest.mark.parametrize("args, message", [
    (["--llm-dist-timeout=0"], "invalid --llm-dist-timeout value '0': expected a number of seconds > 0*"),
    (["--llm-dist-timeout=soon"], "*invalid --llm-dist-timeout value 'soon'*"),
])
def test_bad_dist_timeout_is_one_line(pytester, args, message):
    pytester.makepyfile(test_it="def test_it():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_bad_requires_world_size_argument_is_one_line(pytester):
    pytester.makepyfile(test_it="""
        import pytest

        @pytest.mark.requires_world_size(0)
        def test_it():
            pass
    """)
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*@pytest.mark.requires_world_size(0): n must be a whole number >= 1, got 0*"])


# -- launched runs -------------------------------------------------------------------------------------

def _free_port() -> int:
    """A free port below the kernel's ephemeral range: the launcher binds it seconds later, and in between
    the kernel hands ephemeral ports to other sockets (gloo's, the other xdist worker's), never this one."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(low // 2, 10000), low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "PYTEST_XDIST_WORKER")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command together (each its own process group) and wait, killing them all on timeout."""
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for c in commands]
    results = []
    try:
        for proc, command in zip(procs, commands):
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
            results.append(subprocess.CompletedProcess(command, proc.returncode, out, None))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _pytest(*args: str) -> list[str]:
    return ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args]


SUITE = '''
import pytest
import torch
import torch.distributed as dist

IDS = torch.tensor([[1, 5, 9, 17, 33, 65]])


def gather(llm_dist, value):
    out = [None] * llm_dist.world_size
    dist.all_gather_object(out, value, group=llm_dist.group)
    return out


@pytest.mark.llm(models="builtin:tiny-llama", device_maps="tp")
def test_tp_cell(llm_model, llm_load, llm_dist):
    from torch.distributed.tensor import DTensor

    weight = dict(llm_model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(weight, DTensor)
    assert weight.to_local().shape[0] * llm_dist.world_size == weight.shape[0]
    reference = llm_load("builtin:tiny-llama", device_map="cpu")  # one whole copy in this process
    assert not any(isinstance(p, DTensor) for p in reference.parameters())
    with torch.no_grad():
        logits, expected = llm_model(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    tokens = llm_model.generate(IDS, max_new_tokens=6, do_sample=False).tolist()
    assert tokens == reference.generate(IDS, max_new_tokens=6, do_sample=False).tolist()
    assert len(set(map(str, gather(llm_dist, tokens)))) == 1


@pytest.mark.llm(models="builtin:tiny-llama", device_maps="process")
def test_process_cell(llm_model, llm_dist):
    total = sum(p.numel() for p in llm_model.parameters())
    assert all(p.device.type == "cpu" and type(p).__name__ != "DTensor" for p in llm_model.parameters())
    assert gather(llm_dist, total) == [total] * llm_dist.world_size  # a whole copy on every rank


@pytest.mark.requires_world_size(2)
def test_llm_dist(llm_dist):
    assert llm_dist.group is not None
    assert sorted(gather(llm_dist, llm_dist.rank)) == list(range(llm_dist.world_size))


@pytest.mark.requires_world_size(8)
def test_eight(llm_dist):
    pass


@pytest.mark.llm(models="builtin:tiny-gpt2", device_maps="tp")
def test_no_plan(llm_model):
    pass
'''


def test_tp_and_process_cells_under_torchrun_with_one_merged_report(pytester):
    pytester.makepyfile(test_suite=SUITE)
    report = pytester.path / "report.json"
    [run] = _launch([_torchrun("--standalone", "--nproc-per-node", "2",
                               *_pytest(f"--llm-report={report}", "test_suite.py"))], pytester.path)
    output = run.stdout
    assert run.returncode == 0, output[-6000:]
    assert "3 passed, 2 skipped" in output
    assert "needs a world size of >= 8" in output and "builtin:tiny-gpt2 (GPT2Config) has none" in output
    assert output.count("llmload: load report") == 1 and output.count("passed") == 1  # rank 0 only
    data = json.loads(report.read_text())
    cells = {c["device_map"]: c for c in data["cells"] if c["device_map"] in ("tp", "process")}
    loaded = [c for c in data["cells"] if c["status"] == "loaded"]  # besides the skipped tiny-gpt2 tp cell
    assert len(loaded) == 3  # and the one-process reference copy of the tp test
    assert set(cells["tp"]["workers"]) == set(cells["process"]["workers"]) == {"rank0", "rank1"}
    tp_bytes, process_bytes = cells["tp"]["bytes_per_device"], cells["process"]["bytes_per_device"]
    assert set(tp_bytes) == set(process_bytes) == {"rank0:cpu", "rank1:cpu"}
    assert cells["tp"]["world_size"] == 2
    whole = cells["process"]["footprint_bytes"]
    assert process_bytes == {"rank0:cpu": whole, "rank1:cpu": whole}
    assert all(whole / 2 <= b < 0.6 * whole for b in tp_bytes.values())  # a shard each (norms replicated)


LOCKSTEP = '''
import torch
import torch.distributed as dist


def test_fails_on_rank_1_only(llm_dist):
    assert llm_dist.rank != 1, "only rank 1 fails"
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes


def test_with_a_collective(llm_dist):
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == llm_dist.world_size
'''


def test_a_test_failing_on_one_rank_ends_the_run_in_bounded_time_naming_the_rank(pytester):
    pytester.makepyfile(test_lockstep=LOCKSTEP)
    [run] = _launch([_torchrun("--standalone", "--nproc-per-node", "2",
                               *_pytest("--llm-dist-timeout=6", "test_lockstep.py"))], pytester.path)
    output = run.stdout
    assert run.returncode != 0
    assert "[rank 1] FAILED test_lockstep.py::test_fails_on_rank_1_only - AssertionError: only rank 1 fails" \
        in output
    assert ("llmload: a collective timed out on rank 0 in test_lockstep.py::test_fails_on_rank_1_only "
            "(rank 1 failed test_lockstep.py::test_fails_on_rank_1_only (call)") in output
    assert "stopping the session on every rank" in output
    assert "test_with_a_collective" not in output  # the broken group ran no further test


def test_two_simulated_nodes_on_loopback(pytester):
    pytester.makepyfile(test_suite=SUITE)
    port = _free_port()
    reports = [pytester.path / f"report-{node}.json" for node in (0, 1)]
    runs = _launch([_torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llm",
                              *_pytest(f"--llm-report={reports[node]}", "-k", "process or llm_dist",
                                       "test_suite.py"))
                    for node in (0, 1)], pytester.path)
    for run in runs:
        assert run.returncode == 0, run.stdout[-6000:]
    assert sum("2 passed" in run.stdout for run in runs) == 1  # the node that got rank 0 reports
    [written] = [r for r in reports if r.exists()]  # c10d assigns ranks at rendezvous, not by node rank
    [cell] = json.loads(written.read_text())["cells"]
    assert set(cell["bytes_per_device"]) == {"rank0:cpu", "rank1:cpu"}


def test_builtin_checkpoints_written_on_a_rank_other_than_0_are_whole(tmp_path, monkeypatch):
    """transformers writes config and weights on rank 0 only once torch.distributed is initialized; every
    rank builds its own staging copy of a built-in checkpoint, so each must write all of it."""
    import transformers.distributed.mixin as mixin

    from pytest_llmload import BUILTIN_MODELS
    from pytest_llmload._internal.loading.builtins import MANIFEST, _is_complete, _write_checkpoint

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    _write_checkpoint(BUILTIN_MODELS["tiny-gpt2"], tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert _is_complete(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["files"]["config.json"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert not _is_complete(tmp_path)  # a copy without its model is never taken as complete


@pytest.mark.parametrize("argv, message", [
    (["estimate", "builtin:tiny-llama", "--device-map", "tp"], "--device-map tp shards the weights"),
    (["validate", "builtin:tiny-llama", "tp"], "'tp' is decided at load time"),
])
def test_cli_refuses_tp_with_the_way_out(capsys, argv, message):
    from pytest_llmload.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err and len(err.strip().splitlines()) == 1


GOLDENS = '''
import pytest
import torch

from pytest_llmload import assert_matches_golden


@pytest.mark.llm(models="builtin:tiny-llama", device_maps="process", precisions="fp32")
def test_generation(llm_model):
    ids = llm_model.generate(torch.tensor([[1, 5, 9, 17]]), max_new_tokens=4, do_sample=False)
    assert_matches_golden("ids", ids)


def test_who_records(llm_dist):
    assert_matches_golden(f"recorded by rank {llm_dist.rank}", "x")  # a merge would keep every rank's name
'''


def test_goldens_under_torchrun_are_written_once_by_rank_0_and_checked_on_every_rank(pytester):
    pytester.makepyfile(test_golden_dist=GOLDENS)
    golden = pytester.path / "goldens" / "test_golden_dist.json"
    [record] = _launch([_torchrun("--standalone", "--nproc-per-node", "2",
                                  *_pytest("--llm-update-goldens", "test_golden_dist.py"))], pytester.path)
    assert record.returncode == 0, record.stdout[-6000:]
    goldens = json.loads(golden.read_text())["goldens"]
    assert goldens["test_who_records"] == {"recorded by rank 0": {"cpu": {"kind": "text", "text": "x"}}}, goldens
    [cell] = [key for key in goldens if key.startswith("test_generation[")]
    assert list(goldens[cell]["ids"]) == ["cpu"] and goldens[cell]["ids"]["cpu"]["kind"] == "ids"
    assert sorted(p.name for p in golden.parent.iterdir()) == [golden.name]  # no rank's temporary file left
    written = golden.read_bytes()
    [check] = _launch([_torchrun("--standalone", "--nproc-per-node", "2",
                                 *_pytest("-k", "generation", "test_golden_dist.py"))], pytester.path)
    assert check.returncode == 0, check.stdout[-6000:]
    assert "1 passed, 1 deselected" in check.stdout
    assert golden.read_bytes() == written  # a check run writes nothing
