"""The launched world (from the environment), the tp device map's loading, and per-rank bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping


from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import is_whole_number

NEEDS_LAUNCHER = "needs torchrun/accelerate launch with >= 2 processes"
DEFAULT_TIMEOUT = 300.0


# -- the launched world, from the environment (pure) ------------------------------------------------

@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def launched(self) -> bool:
        return self.world_size >= 2


def launched_world(env: Mapping[str, str] | None = None) -> World:
    """Rank, world size and local rank as torchrun / accelerate launch set them (a lone process: 0, 1, 0)."""
    env = os.environ if env is None else env

    def number(*names: str, default: int) -> int:
        for name in names:
            value = env.get(name, "").strip()
            if is_whole_number(value):
                return int(value)
        return default

    world_size = max(1, number("WORLD_SIZE", default=1))
    rank = number("RANK", default=0)
    local_rank = number("LOCAL_RANK", "ACCELERATE_LOCAL_PROCESS_INDEX", default=0)
    return World(rank=rank if rank < world_size else 0, world_size=world_size, local_rank=local_rank)


@dataclass(frozen=True)
class DistInfo:
    """What the ``llm_dist`` fixture gives: this process's place in the launched world.

    ``group`` is the default process group (``torch.distributed.group.WORLD``), or None in a lone process.
    """

    rank: int
    world_size: int
    local_rank: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- the requires_world_size marker (its arguments are checked in marks.py) -------------------------

def world_size_reasons(world: World, n: int) -> list[str]:
    """Why a test that needs ``n`` processes cannot run in ``world`` (empty when it can)."""
    if world.world_size >= n:
        return []
    found = (f"this run has {world.world_size} processes" if world.launched
             else "this run was not started by a launcher (WORLD_SIZE unset or 1)")
    return [f"needs a world size of >= {n} (torchrun --nproc-per-node {n} or accelerate launch "
            f"--num_processes {n}); {found}"]


def tp_reasons(world: World) -> list[str]:
    """Why a ``tp`` cell cannot run in ``world``."""
    if world.launched:
        return []
    return [f"device map tp {NEEDS_LAUNCHER} (WORLD_SIZE is {world.world_size})"]


def tp_plan_problem(model: str, config: Any, cls: Any) -> str | None:
    """Why ``model`` cannot load tensor parallel: neither its config nor its class has a TP plan."""
    if getattr(config, "base_model_tp_plan", None) or getattr(cls, "_tp_plan", None):
        return None
    return (f"device map tp needs a tensor-parallel plan: {model} ({type(config).__name__}) has none "
            "(no base_model_tp_plan in its config); use process, or a model whose config has one")


# -- loading a tp cell --------------------------------------------------------------------------------

def backend_for(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def init_process_group(timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the launched world's default process group if nobody did yet (gloo on CPU, nccl on GPUs), with
    ``timeout`` for its collectives. Returns whether this call created it."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    world = launched_world()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend_for(cuda), timeout=datetime.timedelta(seconds=timeout))
    return True


def tp_load_kwargs(model: str, config: Any, cls: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for a tensor-parallel load over the launched world.

    transformers 5.24 deprecates ``tp_plan=`` on ``from_pretrained`` (a FutureWarning) in favour of
    ``distributed_config=DistributedConfig(tp_plan=...)``, which is what this returns.
    """
    world = launched_world()
    reasons = tp_reasons(world)
    if reasons:
        raise LLMLoadUsageError(reasons[0])
    problem = tp_plan_problem(model, config, cls)
    if problem:
        raise LLMLoadUsageError(problem)
    init_process_group(active_timeout())
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_plan="auto")}


SESSION_TIMEOUT = [DEFAULT_TIMEOUT]  # the session's --llm-dist-timeout, for loads outside a configured session


def active_timeout() -> float:
    return SESSION_TIMEOUT[0]


def rank_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's shards, bytes of the whole model): DTensors count their local part."""
    local = total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        size = tensor.element_size()
        total += tensor.nelement() * size
        local_tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        local += local_tensor.nelement() * size
    return local, total


def rank_view(model, per_device: dict[str, int], footprint: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Under a launcher: per-device bytes keyed ``rankR:device`` (a tp rank counts only its shards) and the
    world size, for the load report. A lone process: unchanged."""
    world = launched_world()
    if not world.launched:
        return per_device, {}
    extra: dict[str, Any] = {"world_size": world.world_size}
    if any(hasattr(p, "to_local") for p in model.parameters()):
        local, _ = rank_bytes(model)
        device = next(iter(per_device), "cpu")
        per_device = {device: local}
        extra["tensor_parallel"] = True
    return {f"rank{world.rank}:{d}": b for d, b in per_device.items()}, extra


