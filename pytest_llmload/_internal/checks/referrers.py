"""Who keeps an object alive: the chain of references from a root to it, for the leak check's messages.

Found by walking ``gc.get_referrers`` breadth first until a *root*: a module global, a running function's
local, a pytest fixture's cached value, ``gc.garbage`` or the last failure's traceback (closures,
``lru_cache`` wrappers and accelerate hooks are named on the way). Rendered root first, as a path a reader can
follow: ``global _KEEP of module test_leaks (list) -> [0] (LlamaForCausalLM)``. The walk is costly (each level
scans the heap) and runs only when something leaked.
"""

from __future__ import annotations

import gc
import sys
import types
from collections import deque
from typing import Any, Iterable

_MAX_DEPTH = 14
_MAX_LEVEL = 1024  # objects followed per level: a wider level is cut (the chain found may then not be the shortest)
_CHUNK = 256
_INTERNAL_FILES = ("/pytest_llmload/_internal/", "/_pytest/", "/pluggy/")

def _module_of_globals(container: Any) -> types.ModuleType | None:
    if type(container) is not dict:
        return None
    name = container.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    return module if module is not None and getattr(module, "__dict__", None) is container else None


def _is_internal_frame(frame: types.FrameType) -> bool:
    filename = frame.f_code.co_filename.replace("\\", "/")
    return any(part in filename for part in _INTERNAL_FILES)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(cls, torch.Tensor):  # a virtual card's tensor class is its own
        return "Parameter" if isinstance(obj, torch.nn.Parameter) else "Tensor"
    hook = sys.modules.get("accelerate.hooks")
    if hook is not None and isinstance(obj, getattr(hook, "ModelHook", ())):
        return f"{cls.__name__} (an accelerate hook)"
    return cls.__name__


def _is_fixture_def(container: Any) -> bool:
    return type(container).__name__ == "FixtureDef" and type(container).__module__.startswith("_pytest")


def _fixture_root(container: Any) -> str | None:
    """A pytest FixtureDef holding the object (as its cached value, or through its finalizers)."""
    if _is_fixture_def(container):
        where = getattr(container, "baseid", "") or "conftest"
        return f"fixture {container.argname!r} (scope {container.scope}, {where})"
    return None


def _cached_result(container: Any) -> Any:
    return container.cached_result if _is_fixture_def(container) else None


def _root(container: Any, child: Any, running: Any = ()) -> str | None:
    """How ``container`` roots the chain (it needs no referrer to stay alive), or None. A frame is a root
    only while its function runs (``running``: ids of those frames); a finished one is kept by a traceback."""
    module = _module_of_globals(container)
    if module is not None:
        key = next((k for k, v in container.items() if v is child), "?")
        if module.__name__ == "sys" and key in ("last_value", "last_traceback", "last_exc"):
            return f"sys.{key} (the last failed test's traceback keeps its frames and their locals)"
        where = getattr(module, "__file__", None)
        return f"global {key} of module {module.__name__}" + (f" ({where})" if where else "")
    if type(container) is types.FrameType and id(container) in running:
        key = next((k for k, v in container.f_locals.items() if v is child), "?")
        code = container.f_code
        return f"local {key} of running function {code.co_name} ({code.co_filename}:{container.f_lineno})"
    if container is gc.garbage:
        return "gc.garbage (an uncollectable reference cycle)"
    fixture = _fixture_root(container)
    if fixture is not None:
        return fixture
    return None


def _safely(describe, container: Any, *args: Any, fallback: Any) -> Any:
    """An object in the chain may raise on any attribute read (a proxy, a broken __getattribute__)."""
    try:
        return describe(container, *args)
    except Exception:
        return fallback


def _step(container: Any, child: Any) -> str:
    """How ``container`` refers to ``child``, as an accessor (``[0]``, ``.model``, ``['key']``)."""
    kind = type(container)
    if issubclass(kind, dict):
        for key, value in dict.items(container):
            if value is child:
                return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"
            if key is child:
                return " (a dict key)"
        return " (in a dict)"
    if issubclass(kind, (list, tuple)):
        for index, value in enumerate(list.__iter__(container) if issubclass(kind, list) else tuple.__iter__(container)):
            if value is child:
                return f"[{index}]"
    if issubclass(kind, (set, frozenset, deque)):
        return " (in a set)" if not issubclass(kind, deque) else " (in a deque)"
    if kind is types.CellType:
        return " (a closure variable)"
    if kind is types.FunctionType:
        return f" (closure of function {container.__qualname__})"
    if kind is types.MethodType:
        return ".__self__"
    if kind.__name__ == "_lru_cache_wrapper":
        name = getattr(container, "__qualname__", "?")
        return f" (cached by lru_cache function {name})"
    try:
        attrs = object.__getattribute__(container, "__dict__")
    except Exception:
        attrs = None
    if type(attrs) is dict:
        for key, value in attrs.items():
            if value is child:
                return f".{key}"
    slots = [s for klass in kind.__mro__ for s in klass.__dict__.get("__slots__", ()) if isinstance(s, str)]
    for slot in slots:
        descriptor = next((k.__dict__[slot] for k in kind.__mro__ if slot in k.__dict__), None)
        try:
            if descriptor is not None and descriptor.__get__(container, kind) is child:
                return f".{slot}"
        except Exception:
            continue
    return f" (held by a {_type_name(container)})"


def referrer_chain(target: Any, *, ignore: Iterable[Any] = ()) -> list[str]:
    """The shortest chain of references from a root to ``target``, root first, one line per hop.

    ``ignore``: objects that refer to the target only because the caller holds it. The caller's frames
    inside this package, pytest's and pluggy's frames, and this walk's own bookkeeping are ignored.
    Breadth first, one level at a time: each ``gc.get_referrers`` call scans the whole heap, so a level's
    objects are asked in chunks of ``_CHUNK`` (a scan for 256 objects costs about 8 scans for one).
    """
    objects: dict[int, Any] = {id(target): target}  # everything visited, by id
    nearer: dict[int, int] = {}  # id(referrer) -> id of the object it refers to (one hop nearer the target)
    level: list = [target]
    batches: list = []  # the lists gc.get_referrers returned: they refer to what they hold
    ignored = {id(item) for item in ignore} | {id(objects), id(batches), id(nearer)}
    frame = sys._getframe()
    ignored.add(id(frame))
    locals_of, running = _running_locals()
    ignored.update((id(locals_of), id(running)))

    try:
        for _ in range(_MAX_DEPTH):
            ignored.add(id(level))
            following: list = []
            ignored.add(id(following))
            for start in range(0, len(level), _CHUNK):
                chunk = level[start:start + _CHUNK]
                wanted = {id(obj) for obj in chunk}
                referrers = gc.get_referrers(*chunk)
                batches.append(referrers)
                ignored.update((id(referrers), id(chunk), id(wanted)))
                for container in referrers:
                    key = id(container)
                    if key in ignored or key in objects:
                        continue
                    if type(container) is types.FrameType and _is_internal_frame(container):
                        continue
                    obj = next((r for r in gc.get_referents(container) if id(r) in wanted), None)
                    if obj is None:
                        continue
                    objects[key] = container
                    nearer[key] = id(obj)
                    root = _safely(_root, container, obj, running, fallback=None)
                    if root is not None:
                        path = _path(container, target, objects, nearer)
                        if len(path) > 2 and path[1] is _safely(_cached_result, container, fallback=None):
                            root += ": its cached value"  # pytest's (value, key, exception) tuple: the value
                            del path[1]
                        return _render(root, path)
                    following.append(container)
            for obj in level:  # a running function's local (its frame may not be an object yet): a root too,
                if id(obj) in locals_of:  # named after the other roots at the same distance
                    holder, name = locals_of[id(obj)]
                    code = holder.f_code
                    root = f"local {name} of running function {code.co_name} ({code.co_filename}:{holder.f_lineno})"
                    return _render(root, [None, *_path(obj, target, objects, nearer)])
            level = following[:_MAX_LEVEL]
            if not level:
                break
        holders = sorted({_safely(_type_name, c, fallback=type(c).__name__) for c in gc.get_referrers(target)
                          if id(c) not in ignored and c is not frame})
        return [f"no root within {_MAX_DEPTH} references (a deeper chain, or a holder that only C code reaches: an "
                f"autograd graph, a C++ cache); what holds it directly: {', '.join(holders[:4]) or 'nothing Python sees'}"]
    finally:
        del frame
        locals_of.clear()
        running.clear()
        objects.clear()
        batches.clear()


def _path(first: Any, target: Any, objects: dict, nearer: dict) -> list:
    """From ``first`` down to ``target``, one object per hop."""
    path = [first]
    while path[-1] is not target:
        path.append(objects[nearer[id(path[-1])]])
    return path


def _running_locals() -> tuple[dict[int, tuple[types.FrameType, str]], set[int]]:
    """id(value) -> (frame, name) for the locals of every running function outside this package and pytest,
    and the ids of every running frame."""
    found: dict[int, tuple[types.FrameType, str]] = {}
    running: set[int] = set()
    for top in sys._current_frames().values():
        frame = top
        while frame is not None:
            running.add(id(frame))
            if not _is_internal_frame(frame) and frame.f_locals is not frame.f_globals:
                for name, value in frame.f_locals.items():
                    found.setdefault(id(value), (frame, name))
            frame = frame.f_back
    return found, running


def _is_namespace(holder: Any, obj: Any) -> bool:
    """Whether ``obj`` is ``holder``'s own attribute dict: an instance's ``__dict__`` or a class's namespace
    (which ``cls.__dict__`` shows only through a mappingproxy)."""
    if issubclass(type(holder), type):  # not isinstance: a proxy can fake __class__
        return type(obj) is dict and any(r is obj for r in gc.get_referents(holder))
    return object.__getattribute__(holder, "__dict__") is obj


def _holder_name(holder: Any) -> str:
    return f"class {holder.__qualname__}" if issubclass(type(holder), type) else _type_name(holder)


def _render(root: str, path: list) -> list[str]:
    """Root first: ``root`` (which names the root's first hop), then each further hop down to the target as
    ``-> accessor (type)``. The hop into an object's own ``__dict__`` (or a class's namespace) and into a torch
    module's ``_modules``/``_parameters``/``_buffers`` is folded into the next accessor. The root's line names
    the type of the object the root holds (a ``_Holder``, ``class _Keeper``), as each hop's line does."""
    lines = [root]
    for holder, obj in zip(path[1:], path[2:]):
        if _safely(_is_namespace, holder, obj, fallback=False):
            continue
        if type(obj) is dict and _safely(_step, holder, obj, fallback="") in ("._modules", "._parameters", "._buffers"):
            continue
        step = _safely(_step, holder, obj, fallback=" (held by an object whose attributes cannot be read)")
        lines.append(f"-> {step.strip()} ({_safely(_type_name, obj, fallback=type(obj).__name__)})")
    if len(path) >= 2:  # each line names the type of what it reaches: the root's line, its first hop's
        lines[0] += f" ({_safely(_holder_name, path[1], fallback=type(path[1]).__name__)})"
    return lines
