"""Golden outputs: the plugin object that compares a test's values with the goldens recorded for its device
class, and records them under ``--llm-update-goldens``.

Under pytest-xdist each worker sends the keys it recorded to the controller (``config.workeroutput``), which
merges them into one file per module; under torchrun only rank 0 records. The values, device classes,
tolerances and failure texts are ``checks/golden.py``; the files are ``session/golden_files.py``.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from typing import Any

import pytest

from pytest_llmload.errors import GoldenDeviceClassWarning, LLMLoadUsageError

WIRE_KEY = "llmload_goldens"  # in an xdist worker's workeroutput
# Options that decide which cells (test ids) a run has: a record command keeps them.
_VALUE_OPTIONS = ("--llm-model", "--llm-device-map", "--llm-precision", "--llm-max-memory", "--llm-virtual-gpus",
                  "--llm-emulate-gpu")
_FLAG_OPTIONS = ("--llm-trust-remote-code", "--llm-allow-pickle", "--llm-hub-kernels")
# The tests running now, innermost last, with the plugin of their session (pytester runs sessions in sessions).
_RUNNING: list[tuple["Goldens", Any]] = []


class Goldens:
    def __init__(self, config, options):
        self.config = config
        self.options = options
        self.update = bool(options.update_goldens)
        self.is_worker = hasattr(config, "workerinput")
        self._files: dict[str, Any] = {}  # path -> GoldenFile, read once
        # path -> {(test, name, device class): (entry, large tensors)}: what this run recorded
        self.recorded: dict[str, dict[tuple[str, str, str], tuple[dict, dict]]] = {}
        self.written: list[str] = []
        self._checked: dict[str, set[tuple[str, str]]] = {}  # test id -> (name, device class) checked in it

    # -- the running test --------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        _RUNNING.append((self, item))
        try:
            return (yield)
        finally:
            _RUNNING.remove((self, item))
            self._checked.pop(item.nodeid, None)

    def check(self, item, name: Any, value: Any, *, atol: Any = None, rtol: Any = None, topk: Any = None,
              tokenizer: Any = None, where: str = "assert_matches_golden") -> None:
        """Compare ``value`` with the golden of (``item``, ``name``, device class), or record it."""
        __tracebackhide__ = True
        from pytest_llmload._internal.checks import golden
        from pytest_llmload._internal.session.golden_files import GoldenEntryError

        try:
            atol, rtol, topk = golden.check_arguments(where, name, atol, rtol, topk)
            observed = golden.observe(f"{where}({name!r}, ...)", value, topk)
            device_class = golden.device_class(observed.device if observed.device is not None
                                               else self._cell_device(item))
            checked = self._checked.setdefault(item.nodeid, set())
            if (name, device_class) in checked:  # recording would keep only the last value
                raise golden.usage(f"{where}({name!r}, ...)", f"{name!r} was already checked in this test on device "
                                   f"class {device_class}; give each check of a test its own name")
            checked.add((name, device_class))
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        test = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name
        path = self._path(item)
        if self.update:
            self._record(path, test, name, device_class, observed)
            return
        file = self._file(path)
        shown = self._shown(path)
        if file.error:
            raise pytest.fail.Exception(file.error, pytrace=False)
        try:
            classes = file.classes(test, name)
            if not classes:
                raise pytest.fail.Exception(
                    f"no golden {name!r} for {test} on device class {device_class} in {shown}; record it with:\n"
                    f"  {self.record_command(item)}", pytrace=False)
            used = device_class if device_class in classes else nearest_class(device_class, classes)
            if used != device_class:
                warnings.warn(GoldenDeviceClassWarning(
                    f"golden {name!r} of {test}: none recorded for device class {device_class}, compared with the one "
                    f"recorded for {used} ({shown}); record one for {device_class}: {self.record_command(item)}"),
                    stacklevel=3)
            problems = self._compare(golden, name, observed, (test, name, used), file, item, atol, rtol, topk,
                                     tokenizer)
        except GoldenEntryError as exc:  # an entry of the wrong structure, a missing or foreign safetensors
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if problems:
            origin = f"device class {used}" + (f" (none recorded for {device_class})" if used != device_class else "")
            raise pytest.fail.Exception("\n".join([
                f"golden {name!r} of {test} does not match, {origin}, in {shown}:", *problems,
                f"if the new value is right, record it with: {self.record_command(item)}"]), pytrace=False)

    def _compare(self, golden, name, observed, key, file, item, atol, rtol, topk, tokenizer) -> list[str]:
        from pytest_llmload._internal.session.golden_files import KINDS

        kind = file.classes(*key[:2])[key[2]].get("kind")
        if kind in KINDS and kind != observed.kind:
            return [f"it was recorded as {kind}; the value is {observed.kind}"]
        want = file.read(*key)  # GoldenEntryError: what is wrong with the entry, in one line
        if observed.kind == "text":
            return golden.compare_text(name, observed, want) or []
        if observed.kind == "ids":
            tokenizer = tokenizer if tokenizer is not None else getattr(item, "funcargs", {}).get("llm_tokenizer")
            return golden.compare_ids(name, observed, want, topk, _decoder(tokenizer)) or []
        got, ref = observed.tensors, want["tensors"]
        if set(got) != set(ref):
            return [f"{name}: keys {sorted(got)}, the golden has {sorted(ref)}"]
        precision = self._precision(item)
        problems: list[str] = []
        for key in sorted(got):
            tolerances = golden.tolerance(str(ref[key].dtype).replace("torch.", ""), precision, atol, rtol)
            problems += golden.compare_tensor(name if key == "" else f"{name}[{key!r}]", got[key], ref[key],
                                              *tolerances) or []
        return problems

    # -- what the test ran on ----------------------------------------------------------------------------
    @staticmethod
    def _cell_device(item) -> Any:
        """Where a value that carries no device (ids as a list, text) was computed: the test's model, else
        the cell's device map, else this session's default device."""
        funcargs = getattr(item, "funcargs", {})
        model = funcargs.get("llm_model", funcargs.get("llm_private_model"))
        if model is not None and hasattr(model, "named_modules"):
            from pytest_llmload._internal.planning.devices import input_device

            return input_device(model)
        spec = funcargs.get("llm_spec")
        if spec is not None and spec.device_map == "cpu":
            return "cpu"
        from pytest_llmload._internal.virtual import active_fleet

        if active_fleet() is not None:
            return "virtual"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return "cpu"

    @staticmethod
    def _precision(item) -> tuple[str, str] | None:
        """The precision that sets default tolerances: the cell's, else the model's (None: each tensor's dtype)."""
        funcargs = getattr(item, "funcargs", {})
        spec = funcargs.get("llm_spec")
        if spec is not None and getattr(spec, "precision", "auto") != "auto":
            return spec.precision, "the cell's precision"
        model = funcargs.get("llm_model", funcargs.get("llm_private_model"))
        if model is not None and hasattr(model, "parameters"):
            from pytest_llmload._internal.checks.outputs import model_precision

            return model_precision(model), "the model's precision"
        return None

    # -- files ---------------------------------------------------------------------------------------------
    @staticmethod
    def _path(item) -> str:
        from pytest_llmload._internal.session.golden_files import golden_path

        return str(golden_path(item.path))

    def _file(self, path: str):
        if path not in self._files:
            from pytest_llmload._internal.session.golden_files import GoldenFile

            self._files[path] = GoldenFile(path, self._shown(path))
        return self._files[path]

    def _shown(self, path: str) -> str:
        try:
            return os.path.relpath(path, self.config.invocation_params.dir)
        except ValueError:  # another drive (Windows)
            return path

    def record_command(self, item) -> str:
        """The command that records ``item``'s goldens: its id and the options that decide its cells."""
        path = self._shown(str(item.path))
        nodeid = path + ("::" + item.nodeid.split("::", 1)[1] if "::" in item.nodeid else "")
        kept, args = [], list(self.config.invocation_params.args)
        for index, arg in enumerate(args):
            option = arg.split("=", 1)[0]
            if option in _FLAG_OPTIONS or (option in _VALUE_OPTIONS and "=" in arg):
                kept.append(arg)
            elif option in _VALUE_OPTIONS and index + 1 < len(args):
                kept.append(f"{option}={args[index + 1]}")
        return " ".join(shlex.quote(a) for a in ["pytest", nodeid, *kept, "--llm-update-goldens"])

    def _record(self, path: str, test: str, name: str, device_class: str, observed) -> None:
        from pytest_llmload._internal.distributed.world import launched_world
        from pytest_llmload._internal.session.golden_files import encode

        if launched_world().rank != 0:
            return  # under torchrun every rank computes the same goldens; rank 0 writes them
        entry, blobs = encode(observed, (test, name, device_class))
        self.recorded.setdefault(path, {})[(test, name, device_class)] = (entry, blobs)

    # -- the end of the session: workers send, the controller (or a lone process) writes ---------------------
    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        records = getattr(node, "workeroutput", {}).get(WIRE_KEY)
        if records:
            from pytest_llmload._internal.session.golden_files import from_wire

            from_wire(records, self.recorded)

    def pytest_sessionfinish(self, session) -> None:
        if not self.recorded:
            if self.update and not self.is_worker:
                self.written.append("llmload: --llm-update-goldens recorded no golden (no test of this run called "
                                    "assert_matches_golden or llm_golden.check)")
            return
        if self.is_worker:
            from pytest_llmload._internal.session.golden_files import to_wire

            self.config.workeroutput[WIRE_KEY] = to_wire(self.recorded)
            return
        for path, entries in sorted(self.recorded.items()):
            file = self._file(path)
            try:
                lacking = file.merge_and_write(entries, f"../{os.path.basename(path)[:-len('.json')]}.py")
            except (OSError, ValueError) as exc:  # a safetensors file not ours or damaged, an unwritable folder
                self.written.append(f"llmload: goldens NOT written to {self._shown(path)}: {exc}")
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
                continue
            classes = sorted({key[2] for key in entries})
            self.written.append(f"llmload: recorded {len(entries)} golden{'s' if len(entries) != 1 else ''} "
                                f"({', '.join(classes)}) in {self._shown(path)}")
            if lacking:
                self.written.append(f"llmload: {file.tensors_shown} lacks the tensors of {len(lacking)} golden"
                                    f"{'s' if len(lacking) != 1 else ''} kept from before ({', '.join(lacking)}): "
                                    "record them again")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.written:
            terminalreporter.write_line(line)


def nearest_class(wanted: str, recorded: dict) -> str:
    """The recorded device class to compare with when ``wanted`` has none: the virtual fleet and the CPU
    compute alike; a CUDA card takes the closest compute capability; else the first by name."""
    partner = {"virtual": "cpu", "cpu": "virtual"}.get(wanted)
    if partner in recorded:
        return partner

    def capability(name: str) -> int | None:
        digits = name[len("cuda-sm"):]
        return int(digits) if name.startswith("cuda-sm") and digits.isdigit() else None

    mine = capability(wanted)
    cuda = [c for c in recorded if capability(c) is not None]
    if mine is not None and cuda:
        return min(cuda, key=lambda c: (abs(capability(c) - mine), c))
    return sorted(recorded)[0]


class GoldenChecker:
    """What the ``llm_golden`` fixture gives: ``llm_golden.check(name, value, *, atol=None, rtol=None,
    topk=None, tokenizer=None)`` for the requesting test; ``llm_golden.path`` is its module's golden file."""

    def __init__(self, goldens: Goldens, item):
        self._goldens, self._item = goldens, item
        self.path = goldens._path(item)

    def check(self, name: Any, value: Any, *, atol: Any = None, rtol: Any = None, topk: Any = None,
              tokenizer: Any = None) -> None:
        __tracebackhide__ = True
        self._goldens.check(self._item, name, value, atol=atol, rtol=rtol, topk=topk, tokenizer=tokenizer,
                            where="llm_golden.check")

    @property
    def update(self) -> bool:
        """True under ``--llm-update-goldens`` (values are recorded, not compared)."""
        return self._goldens.update


def assert_matches_golden(name: Any, value: Any, *, atol: Any = None, rtol: Any = None, topk: Any = None,
                          tokenizer: Any = None) -> None:
    """Compare ``value`` with the golden recorded for the running test, ``name`` and this device class (or
    record it under ``--llm-update-goldens``).

    ``value``: a tensor, a dict of tensors, token ids (an integer tensor, a list of ints, ``generate()``'s
    output with ``return_dict_in_generate=True`` -- with ``output_scores=True`` for ``topk`` -- or
    ``{"ids": ids, "scores": scores}``) or text (a str or list of str). ``atol``/``rtol`` default by
    precision; ``topk=k`` lets a generated token differ where the golden's top-k holds it. ``tokenizer``
    decodes ids in a failure (default: the test's ``llm_tokenizer``).
    """
    __tracebackhide__ = True
    if not _RUNNING:
        raise LLMLoadUsageError("assert_matches_golden: no pytest test is running; call it from a test "
                                "(goldens are kept per test), or use the llm_golden fixture")
    goldens, item = _RUNNING[-1]
    goldens.check(item, name, value, atol=atol, rtol=rtol, topk=topk, tokenizer=tokenizer)


def _decoder(tokenizer: Any):
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return None

    def decode(ids: list[int]) -> str:
        try:
            return str(tokenizer.decode(ids))
        except Exception:  # a tokenizer that cannot decode an id: the failure still shows the ids
            return "?"

    return decode
