"""Command-line options and ini keys: declared once, read and checked once at start-up.

Every value a user can get wrong becomes one :class:`LLMLoadUsageError` line naming the option and
what is accepted. Paths given in the ini resolve against the ini file's folder (as pytest does for
``testpaths``), paths on the command line against the directory pytest was started in. Nothing here
imports torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import parse_size
from pytest_llmload._internal.config.specs import (
    parse_device_map,
    parse_max_memory,
    parse_model,
    parse_precision,
    split_values,
    unique,
)
from pytest_llmload._internal.config.numbers import is_whole_number, parse_count

DEFAULT_MODEL = "builtin:tiny-llama"
MAX_DIST_TIMEOUT = 7 * 24 * 3600  # seconds; torch's collectives take the timeout as a C int of milliseconds
LEAK_CHECK_MODES = ("loads", "tests", "off")
_ON, _OFF = ("true", "yes", "on"), ("false", "no", "off")  # besides a GPU count (0 = off)

# (option, ini key, help, extra add_option kwargs, ini type, ini default): the one list of options.
OPTIONS: list[tuple[str, str, str, dict, str, Any]] = [
    ("--llm-model", "llm_models", "model: hub id, local directory or builtin:NAME (repeatable; "
     "default builtin:tiny-llama)", dict(action="append", metavar="ID"), "linelist", None),
    ("--llm-device-map", "llm_device_maps", "device map: auto, balanced, balanced_low_0, sequential, cpu, "
     "cuda, cuda:N, N, disk, process, tp, a JSON object or @file.json (repeatable; default auto)",
     dict(action="append", metavar="MAP"), "linelist", None),
    ("--llm-precision", "llm_precisions", "precision: auto, fp32, fp16, bf16, int8, nf4, fp4 (repeatable; "
     "default auto = the checkpoint's dtype)", dict(action="append", metavar="P"), "linelist", None),
    ("--llm-max-memory", "llm_max_memory", "per-device budgets, e.g. 0=20GiB,1=20GiB,cpu=64GiB",
     dict(metavar="SPEC"), "string", None),
    ("--llm-require-gpus", "llm_require_gpus", "GPU CI mode: a test skipped for missing hardware fails "
     "instead; with a count N, the session fails at start-up with fewer than N visible GPUs (0 = off)",
     dict(nargs="?", const="true", metavar="N"), "string", None),
    ("--llm-trust-remote-code", "llm_trust_remote_code", "allow checkpoints to run their own code "
     "(off by default)", dict(action="store_const", const=True), "bool", False),
    ("--llm-hub-kernels", "llm_hub_kernels", "let transformers kernelize loads with kernels from the Hub "
     "(its own default since 5.25; off: every load passes use_kernels=False and contacts no server for a "
     "local or built-in checkpoint; never on virtual GPUs)", dict(action="store_const", const=True), "bool", False),
    ("--llm-allow-pickle", "llm_allow_pickle", "allow checkpoints that only have pickle weights "
     "(pytorch_model.bin); unpickling can run code", dict(action="store_const", const=True), "bool", False),
    ("--llm-cache-size", "llm_cache_size", "how many loaded models the session keeps at once (default 2)",
     dict(metavar="N"), "string", None),
    ("--llm-report", "llm_report", "write the load report as JSON to PATH (always written, atomically)",
     dict(metavar="PATH"), "string", None),
    ("--llm-fit-margin", "llm_fit_margin", "share of free memory the fit check keeps spare before a load "
     "(default 0.1); 'off' disables the fit check", dict(metavar="FRACTION"), "string", None),
    ("--llm-cuda-context", "llm_cuda_context", "memory a CUDA context takes per GPU, for the fit check "
     "(default: measured on the first GPU, 500MiB until then)", dict(metavar="SIZE"), "string", None),
    ("--llm-footprint-baseline", "llm_footprint_baseline", "JSON file of each cell's footprint: recorded "
     "when missing, and a later run fails a cell whose footprint grew beyond the tolerance",
     dict(metavar="PATH"), "string", None),
    ("--llm-footprint-tolerance", "llm_footprint_tolerance", "how much a footprint may grow over its "
     "baseline (default 0.05, i.e. 5 percent)", dict(metavar="FRACTION"), "string", None),
    ("--llm-dist-timeout", "llm_dist_timeout", "under torchrun/accelerate launch: seconds a collective or the "
     "per-test lockstep check waits for the other ranks before the test fails (default 300)",
     dict(metavar="SECONDS"), "string", None),
    ("--llm-gpus-per-worker", "llm_gpus_per_worker", "under pytest-xdist, give each worker its own K GPUs "
     "(disjoint slices of the visible ones)", dict(metavar="K"), "string", None),
    ("--llm-virtual-gpus", "llm_virtual_gpus", "run the session on a virtual GPU fleet: CPU-backed cards "
     "with real values, e.g. 2x24GiB or 24GiB,16GiB@9.0", dict(metavar="SPEC", action="append"), "string", None),
    ("--llm-coverage", "llm_coverage", "run nothing: evaluate every test and cell against each GPU CI runner "
     "profile (cpu or NxSIZE[@CAPABILITY], comma-separated, e.g. cpu,1x24GiB,2x80GiB@9.0), print which tests "
     "each runs, skips or fails, and exit 1 if a test runs nowhere", dict(metavar="RUNNERS"), "string", None),
    ("--llm-coverage-allow-unrun", "llm_coverage_allow_unrun", "with --llm-coverage: report tests that no "
     "runner runs without failing the session", dict(action="store_const", const=True), "bool", False),
    ("--llm-max-gpu-peak", "llm_max_gpu_peak", "fail any test whose peak allocated GPU memory on a GPU "
     "exceeded SIZE (as limit_gpu_memory does for one test)", dict(metavar="SIZE"), "string", None),
    ("--llm-emulate-gpu", "llm_emulate_gpu", "make every visible GPU look and act SIZE big (capped with "
     "torch.cuda.set_per_process_memory_fraction; a virtual fleet's cards shrink), e.g. 24GiB",
     dict(metavar="SIZE"), "string", None),
    ("--llm-leak-check", "llm_leak_check", "loads (default): a model the session cache releases must be "
     "collected and give its GPU memory back, else a warning naming what keeps it alive (a failure under "
     "--llm-require-gpus); tests: also every test must leave GPU memory as it found it; off",
     dict(metavar="MODE"), "string", None),
    ("--llm-update-goldens", "llm_update_goldens", "record the golden outputs this run computes "
     "(assert_matches_golden, llm_golden) for this device class instead of comparing with them",
     dict(action="store_const", const=True), "bool", False),
]


def add_options(parser: pytest.Parser) -> None:
    """Declare every option with its ini twin (help strings are escaped for argparse's %-formatting)."""
    group = parser.getgroup("llmload", "language model loading (pytest-llmload)")
    for option, ini, help_text, kwargs, ini_type, default in OPTIONS:
        group.addoption(option, dest=ini, help=f"{help_text} [ini: {ini}]".replace("%", "%%"), **kwargs)
        parser.addini(ini, help_text, type=ini_type, default=default)


def option_name(dest: str) -> str:
    return next(option for option, ini, *_ in OPTIONS if ini == dest)


@dataclass
class Options:
    models: list
    device_maps: list
    precisions: list
    max_memory: dict | None
    require_gpus: bool
    min_gpus: int | None
    trust_remote_code: bool
    allow_pickle: bool
    cache_size: int
    report: str | None
    fit_margin: float | None = 0.1  # None: fit check off
    cuda_context: int | None = None  # None: measured on first use
    baseline: str | None = None
    baseline_tolerance: float = 0.05
    dist_timeout: float = 300.0
    coverage: list | None = None  # runner profiles (coverage.Runner) of --llm-coverage
    coverage_allow_unrun: bool = False
    max_gpu_peak: int | None = None
    emulate_gpu: int | None = None
    hub_kernels: bool = False  # --llm-hub-kernels: transformers' own default instead of use_kernels=False
    virtual_gpus: "VirtualGpus | None" = None  # the session's fleet (read_virtual_gpus)
    leak_check: str = "loads"  # --llm-leak-check: "loads", "tests" or "off"
    update_goldens: bool = False  # --llm-update-goldens


WORKER_NOTE = pytest.StashKey[str]()  # what --llm-gpus-per-worker gave this xdist worker, for the header
INHERITED_FLEET = "LLMLOAD_VIRTUAL_GPUS"  # the session's fleet, for child processes that run pytest with the plugin


@dataclass(frozen=True)
class VirtualGpus:
    """The session's fleet as asked for: its spec text, where it was set, and its cards (parsed once)."""

    text: str
    source: str  # "--llm-virtual-gpus", "llm_virtual_gpus" (ini) or INHERITED_FLEET (a parent session's)
    cards: tuple

    @property
    def inherited(self) -> bool:
        return self.source == INHERITED_FLEET


_FLEET_KEY = pytest.StashKey["VirtualGpus | None"]()


def read_virtual_gpus(config: pytest.Config, *, early: bool = False) -> VirtualGpus | None:
    """``--llm-virtual-gpus``, else ``llm_virtual_gpus``, else the parent session's fleet: the one reader of
    the session's fleet, parsed once (``early``: from the known arguments, before the command line is whole).
    An empty or repeated value is one usage error, as for every option."""
    if not early and _FLEET_KEY in config.stash:
        return config.stash[_FLEET_KEY]
    cli = (config.known_args_namespace.llm_virtual_gpus if early
           else config.getoption("llm_virtual_gpus", None))
    if cli:
        if len(cli) > 1:
            raise LLMLoadUsageError(f"--llm-virtual-gpus was given {len(cli)} times ({', '.join(map(repr, cli))}): "
                                    "a session runs on one fleet; give it once")
        text, source = cli[0], "--llm-virtual-gpus"
    else:
        text, source = config.getini("llm_virtual_gpus"), "llm_virtual_gpus"
        if text is None:  # the key is not in the ini (pytest gives the default, None); "" is an empty value
            text, source = os.environ.get(INHERITED_FLEET), INHERITED_FLEET
            if not text:
                text = None
        elif not str(text).strip():
            raise LLMLoadUsageError(f"llm_virtual_gpus (ini) was given an empty value {text!r}: give a fleet "
                                    "such as 2x24GiB or leave the key out")
    if text is not None and not str(text).strip():
        raise LLMLoadUsageError(f"{source} was given an empty value {text!r}: give a value or leave the option out "
                                "(an unset shell variable?)")
    if text is not None:  # the fleet's code is imported only where a fleet is asked for
        from pytest_llmload._internal.virtual.fleet import parse_virtual_spec
    setting = None if text is None else VirtualGpus(
        str(text).strip(), source, tuple(parse_virtual_spec(str(text), what=f"{source} value")))
    if not early:
        config.stash[_FLEET_KEY] = setting
    return setting


class _Reader:
    """Reads one option: the command line wins; empty command-line values are errors, not defaults."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.cli_dir = Path(config.invocation_params.dir)
        self.ini_dir = Path(config.inipath).parent if config.inipath else Path(config.rootpath)

    def _check_empty(self, dest: str, value: Any) -> None:
        if isinstance(value, str) and not value.strip():
            raise LLMLoadUsageError(
                f"{option_name(dest)} was given an empty value {value!r}: give a value or leave the option out "
                "(an unset shell variable?)"
            )

    def values(self, dest: str) -> list[tuple[str, Path]]:
        """Each value with the folder relative paths in it resolve against. Only ini lists split on commas."""
        cli = self.config.getoption(dest, None)
        if cli:
            for raw in cli:
                self._check_empty(dest, raw)
            return [(raw.strip(), self.cli_dir) for raw in cli]
        return [(v, self.ini_dir) for v in split_values(self.config.getini(dest) or [])]

    def scalar(self, dest: str) -> tuple[Any, Path]:
        cli = self.config.getoption(dest, None)
        if cli is not None:
            self._check_empty(dest, cli)
            return (cli.strip() if isinstance(cli, str) else cli), self.cli_dir
        value = self.config.getini(dest)
        if isinstance(value, str):
            value = value.strip()
        return (value if value not in ("", None) else None), self.ini_dir

    def path(self, dest: str) -> str | None:
        value, base = self.scalar(dest)
        if value is None:
            return None
        return str((base / Path(str(value)).expanduser()).resolve())

    def source(self, dest: str) -> str:
        """Where ``dest``'s value came from, as an error names it: ``--llm-report`` or ``llm_report (ini)``."""
        return option_name(dest) if self.config.getoption(dest, None) is not None else f"{dest} (ini)"


def parse_require_gpus(value: Any) -> tuple[bool, int | None]:
    """``--llm-require-gpus``: no value/true -> strict; N -> strict with N GPUs at start-up; 0/false -> off."""
    if value in (None, "", False):
        return False, None
    if value is True:
        return True, None
    text = str(value).strip().lower()
    if text in _ON:
        return True, None
    if text in _OFF:
        return False, None
    count = parse_count(text, "--llm-require-gpus", minimum=0,
                        accepted="no value, true/false or a GPU count such as 2 (0 = off)")
    return (True, count) if count > 0 else (False, None)


_DECIMAL = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?[ \t]*")


def _fraction(text: str, option: str, *, upper: float | None, accepted: str) -> float:
    # ASCII digits only (float() reads '٥' as 5 and 'nan', 'inf' as numbers)
    value = float(text) if _DECIMAL.fullmatch(text) else math.nan
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        raise LLMLoadUsageError(f"invalid {option} value {text!r}: expected {accepted}")
    return value


def reclaim_positional(config: pytest.Config) -> None:
    """``pytest --llm-require-gpus tests/`` makes argparse take ``tests/`` as the optional count: give it back."""
    value = config.getoption("llm_require_gpus", None)
    if not isinstance(value, str) or not value.strip() or value.strip().lower() in _ON + _OFF:
        return
    if is_whole_number(value.strip()):
        return
    if not os.path.exists(value.split("::")[0]):
        return
    config.option.llm_require_gpus = "true"
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(value)
    else:
        config.args[:] = [value]
        config.args_source = pytest.Config.ArgsSource.ARGS


def parse_options(config: pytest.Config) -> Options:
    """Read and check every option at start-up; a bad value raises one :class:`LLMLoadUsageError`."""
    read = _Reader(config)
    models = [parse_model(v, base=d) for v, d in read.values("llm_models")] or [parse_model(DEFAULT_MODEL)]
    device_maps = [parse_device_map(v, base=d) for v, d in read.values("llm_device_maps")] \
        or [parse_device_map("auto")]
    precisions = [parse_precision(v) for v, _ in read.values("llm_precisions")] or ["auto"]
    require, min_gpus = parse_require_gpus(read.scalar("llm_require_gpus")[0])
    cache_size = parse_count(read.scalar("llm_cache_size")[0] or "2", "--llm-cache-size", minimum=1)

    margin_text = str(read.scalar("llm_fit_margin")[0] or "0.1").strip().lower()
    fit_margin = None if margin_text in ("off", "no", "false", "none") else _fraction(
        margin_text, "--llm-fit-margin", upper=1, accepted="a fraction in [0, 1) such as 0.1, or 'off'")

    context_text = read.scalar("llm_cuda_context")[0]
    cuda_context = parse_size(context_text) if context_text and str(context_text) != "auto" else None
    tolerance = _fraction(str(read.scalar("llm_footprint_tolerance")[0] or "0.05"), "--llm-footprint-tolerance",
                          upper=None, accepted="a finite fraction >= 0 such as 0.05")
    timeout_accepted = f"a number of seconds > 0 and at most {MAX_DIST_TIMEOUT} (a week) such as 300"
    dist_timeout = _fraction(str(read.scalar("llm_dist_timeout")[0] or "300"), "--llm-dist-timeout",
                             upper=MAX_DIST_TIMEOUT + 1, accepted=timeout_accepted)
    if dist_timeout <= 0 or dist_timeout > MAX_DIST_TIMEOUT:  # 1e300 overflowed torch's C int under torchrun
        raise LLMLoadUsageError(f"invalid --llm-dist-timeout value {read.scalar('llm_dist_timeout')[0]!r}: "
                                f"expected {timeout_accepted}")
    report = read.path("llm_report")
    baseline = read.path("llm_footprint_baseline")
    for dest, path in (("llm_report", report), ("llm_footprint_baseline", baseline)):
        if path:
            check_writable(path, read.source(dest))
    coverage_text = read.scalar("llm_coverage")[0]
    coverage = None
    if coverage_text:
        from pytest_llmload._internal.session.runners import parse_runners

        coverage = parse_runners(str(coverage_text))
    virtual = read_virtual_gpus(config)
    if coverage and virtual is not None and not virtual.inherited:
        raise LLMLoadUsageError(f"--llm-coverage evaluates runner profiles; leave out {virtual.source} "
                                f"({virtual.text!r})")
    leak_text = str(read.scalar("llm_leak_check")[0] or "loads").strip().lower()
    if leak_text not in LEAK_CHECK_MODES:
        raise LLMLoadUsageError(f"invalid {read.source('llm_leak_check')} value "
                                f"{read.scalar('llm_leak_check')[0]!r}: expected one of {', '.join(LEAK_CHECK_MODES)}")
    return Options(
        leak_check=leak_text,
        update_goldens=bool(read.scalar("llm_update_goldens")[0]),
        virtual_gpus=virtual,
        coverage=coverage,
        coverage_allow_unrun=bool(read.scalar("llm_coverage_allow_unrun")[0]),
        max_gpu_peak=_option_size(read.scalar("llm_max_gpu_peak")[0], "--llm-max-gpu-peak"),
        emulate_gpu=_option_size(read.scalar("llm_emulate_gpu")[0], "--llm-emulate-gpu"),
        models=unique(models),
        device_maps=unique(device_maps),
        precisions=unique(precisions),
        max_memory=parse_max_memory(read.scalar("llm_max_memory")[0]),
        require_gpus=require,
        min_gpus=min_gpus,
        trust_remote_code=bool(read.scalar("llm_trust_remote_code")[0]),
        allow_pickle=bool(read.scalar("llm_allow_pickle")[0]),
        hub_kernels=bool(read.scalar("llm_hub_kernels")[0]),
        cache_size=cache_size,
        report=report,
        fit_margin=fit_margin,
        cuda_context=cuda_context,
        baseline=baseline,
        baseline_tolerance=tolerance,
        dist_timeout=dist_timeout,
    )


def _option_size(value: Any, option: str) -> int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except (LLMLoadUsageError, ValueError, TypeError, OverflowError):
        size = 0
    if size < 1:
        raise LLMLoadUsageError(f"invalid {option} value {value!r}: expected a size > 0 such as '24GiB' or '512MiB'")
    return size


def check_writable(path: str, option: str) -> None:
    """A file the session will write at the end must be writable now, not found broken after the tests.

    A missing folder is fine where it can be created (it is, when the file is written, as pytest's
    ``--junitxml`` does); nothing is created here. ``option`` names where the value came from:
    ``--llm-report`` or ``llm_report (ini)``."""
    shown = f"{option}={path}" if option.startswith("--") else f"{option} = {path}"
    target = Path(path)
    if target.is_dir():
        raise LLMLoadUsageError(f"{shown}: is a directory; expected a file path to write")
    parent = target.parent
    if not parent.is_dir():
        existing = parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise LLMLoadUsageError(f"{shown}: cannot create the folder {parent}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise LLMLoadUsageError(f"{shown}: cannot create the folder {parent}: {existing} is not writable")
        return
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise LLMLoadUsageError(f"{shown}: cannot write there (permission denied)")


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so readers never see half a file.
    Missing parent folders are created (as pytest's ``--junitxml`` does); nothing is ever deleted but the
    temporary file."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".llmload-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
