"""The user's own nn.Module, named once in a recipe as `factory: my_models:build_student`.

A factory is any callable (function or class) that returns an `nn.Module`. The recipe gives its
keyword arguments; stillroom adds `input_shape=` (the data's per-sample shape, a tuple) and
`num_outputs=` (classes or regression targets) only when the callable declares parameters of those
names, so one factory builds for any data set while a factory that hard-codes its sizes is called
with the recipe's kwargs alone:

    def build_student(hidden: int, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), ...)

The reference is resolved once, when the recipe loads, and never from a received run folder.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from stillroom.errors import StillroomError

DATA_KWARGS = ("input_shape", "num_outputs")
"""Parameters filled from the data when the factory declares them; a recipe never sets them."""

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REF = re.compile(rf"({_NAME}):({_NAME})")

_FROM_SEARCH_PATHS: set[str] = set()
"""Modules the last resolve imported from its search paths, dropped before the next one."""


def resolve_factory(ref: str, search_paths: Sequence[Path] = ()) -> Callable[..., nn.Module]:
    """The callable named by `ref` ("dotted.module:attribute", the attribute may be dotted too).

    `search_paths` (the caller passes the recipe's folder and the current directory) go in front
    of sys.path for this import only. Modules imported from those folders are the user's own
    files: each call imports them afresh, so an edit is picked up and two recipe folders with a
    same-named `my_models.py` each get their own. Installed packages are never re-imported.
    """
    match = _REF.fullmatch(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise StillroomError(
            f"factory {ref!r} must look like module:function, e.g. my_models:build_student "
            "(a dotted module name without .py, then the function or class)"
        )
    module_name, attribute = match.groups()
    module = _import(module_name, [Path(p) for p in search_paths])
    target: Any = module
    where = f"module {module_name!r}"
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise StillroomError(f"factory {ref}: {where} has no {part!r}; {_offer(target, part)}")
        target = getattr(target, part)
        where = f"{where[:-1]}.{part}'"
    if not callable(target):
        raise StillroomError(
            f"factory {ref} is a {type(target).__name__}, not a function or class; name a "
            "callable that returns an nn.Module"
        )
    return target


def build_from_factory(
    ref: str,
    kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    num_outputs: int,
    search_paths: Sequence[Path] = (),
) -> nn.Module:
    """Call the factory `ref` with `**kwargs`, plus `input_shape=` and `num_outputs=` when its
    signature has parameters of those names (see the module docstring), and check it returns an
    nn.Module. The arguments are bound to the signature before the call, so a misspelt kwarg
    fails with the parameters the factory takes rather than somewhere inside it."""
    factory = resolve_factory(ref, search_paths)
    given = sorted(set(kwargs) & set(DATA_KWARGS))
    if given:
        raise StillroomError(
            f"factory {ref}: kwargs set {', '.join(given)}, which stillroom fills from the data; "
            "remove them from the recipe"
        )
    call_kwargs = dict(kwargs)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C types carry no signature
        signature = None
    if signature is not None:
        data = {"input_shape": tuple(input_shape), "num_outputs": num_outputs}
        call_kwargs.update({k: v for k, v in data.items() if k in signature.parameters})
        takes = ", ".join(signature.parameters) or "no arguments"
        params = signature.parameters.values()
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        unknown = [k for k in kwargs if k not in signature.parameters]
        if unknown and not open_ended:  # a misspelt name first: it explains the missing one too
            raise StillroomError(
                f"factory {ref} got an unexpected keyword argument {unknown[0]!r}; "
                f"it takes: {takes}"
            )
        try:
            signature.bind(**call_kwargs)
        except TypeError as err:
            raise StillroomError(
                f"factory {ref} cannot be called with kwargs ({', '.join(kwargs) or 'none'}): "
                f"{_last_line(err)}; it takes: {takes}"
            ) from None
    try:
        model = factory(**call_kwargs)
    except Exception as err:  # the user's code: any failure is theirs to fix, shown in one line
        raise StillroomError(
            f"factory {ref} raised {type(err).__name__}: {_last_line(err)}; check its kwargs and "
            f"that it builds for input shape {tuple(input_shape)} with {num_outputs} outputs"
        ) from err
    if not isinstance(model, nn.Module):
        raise StillroomError(
            f"factory {ref} returned a {type(model).__name__}, not a torch nn.Module; return "
            "the model itself"
        )
    return model


def _import(module_name: str, search_paths: list[Path]) -> ModuleType:
    """import_module with `search_paths` in front of sys.path, restored afterwards."""
    # drop what an earlier resolve imported from its folders: the files may have been edited, or
    # this recipe's folder may hold a different module of the same name
    for name in _FROM_SEARCH_PATHS:
        sys.modules.pop(name, None)
    _FROM_SEARCH_PATHS.clear()
    homes = {p.resolve() for p in search_paths}
    before = set(sys.modules)
    saved = list(sys.path)
    sys.path[:0] = [str(p) for p in search_paths]
    importlib.invalidate_caches()  # a file written since the last import must be seen
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise _not_found(module_name, err, search_paths) from None
    except Exception as err:  # the user's module failed while running its top level
        raise StillroomError(
            f"factory module {module_name!r} raised {type(err).__name__} while importing: "
            f"{_last_line(err)}; fix the module"
        ) from err
    finally:
        sys.path[:] = saved
        new = set(sys.modules) - before
        _FROM_SEARCH_PATHS.update(n for n in new if _home(n, sys.modules[n]) in homes)
    top = module_name.partition(".")[0]
    first = next((p for p in search_paths if _defines(p, top)), None)
    home = _home(top, sys.modules[top])
    if first is not None and first.resolve() != home:
        raise StillroomError(
            f"factory module {top!r} in {first} has the name of a module already imported "
            f"from {home}; rename your file"
        )
    return module


def _not_found(module_name: str, err: ModuleNotFoundError, search_paths: list[Path]) -> Exception:
    """Tell "the module is missing" apart from "the module imports something missing"."""
    looked = ", ".join(str(p) for p in search_paths)
    looked = f"{looked} and the installed packages" if looked else "the installed packages"
    missing = err.name or ""
    if missing == module_name or module_name.startswith(f"{missing}."):
        top = module_name.partition(".")[0]
        return StillroomError(
            f"factory module {module_name!r} not found (looked in {looked}); put {top}.py "
            "next to the recipe or fix the name"
        )
    return StillroomError(
        f"factory module {module_name!r} imports {missing!r}, which is not installed "
        f"({_last_line(err)}); install it or fix the import"
    )


def _home(name: str, module: Any) -> Path | None:
    """The folder from which the module `name` was imported as `top[.sub...]` (None: no file)."""
    file = getattr(module, "__file__", None)  # builtins and namespace packages have none
    if file is None:
        return None
    path = Path(file)
    depth = name.count(".") + (path.name == "__init__.py")
    return path.parents[depth].resolve() if depth < len(path.parents) else None


def _defines(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()


def _offer(target: Any, missing: str) -> str:
    """'did you mean X? it defines: a, B' over the public callables `target` defines itself."""
    own = getattr(target, "__name__", None)
    names = sorted(
        name
        for name, value in vars(target).items()
        if not name.startswith("_")
        and callable(value)
        and (not isinstance(target, ModuleType) or getattr(value, "__module__", None) == own)
    )
    if not names:
        return "it defines no public functions or classes"
    close = difflib.get_close_matches(missing, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}it defines: {', '.join(names)}"


def _last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1].strip() if lines else "(no message)"
