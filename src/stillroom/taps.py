"""Capture named intermediate outputs of any `nn.Module` with forward hooks.

Feature distillation compares what a teacher layer and a student layer produce for the same batch.
`Taps` hooks the modules named as `model.named_modules()` reports them ("stages.1", "head.0",
"block.0.conv") and collects their outputs during a forward pass:

    with Taps(student, ["stages.1", "pool"]) as taps:
        for x, y in batches:
            taps.clear()                    # one capture window per forward pass
            logits = student(x)
            feats = taps.outputs            # {"stages.1": (N, C, H, W), "pool": (N, C)}

Every hook is removed when the `with` block ends, also when it ends in an exception, so a model
that has been tapped carries no hooks afterwards and exports exactly as it would have untapped.

Behaviours a caller should know:

- A module called more than once in a capture window (weight sharing, recurrence, one activation
  module reused) is resolved by `on_repeat`: "last" (default) keeps the last call's output,
  "first" the first, "stack" stacks every call along a new dim 0 -> (calls, *shape), and "error"
  raises on the second call. A capture window runs from `clear()` (or `attach()`) to the next
  `clear()`, so call `clear()` before every forward pass.
- A module whose output is a tuple or list (nn.MultiheadAttention returns (out, weights); HF
  layers return tuples; nn.LSTM returns (out, (h, c))) or a mapping (HF `ModelOutput`) is captured
  as its first tensor element by default; `select={"attn": 1}` picks another element by index or
  key, and a tuple such as `(1, 0)` walks into nested outputs.
- Captured tensors keep their autograd graph, which a student needs (the feature loss
  backpropagates through them). Pass `detach=True` for a teacher: its activations then hold no
  graph even when it runs with gradients enabled. Under `torch.inference_mode` nothing records a
  graph in the first place.
- A captured tensor is the module's own output, not a copy. An in-place op that runs later in the
  forward pass (`x += shortcut`, `ReLU(inplace=True)`) would change it silently, so `outputs`
  refuses to return a tensor whose version counter moved after capture (tensors made under
  `torch.inference_mode` have no version counter and cannot be checked).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from stillroom.errors import StillroomError

OnRepeat = Literal["last", "first", "stack", "error"]
ON_REPEAT: tuple[str, ...] = ("last", "first", "stack", "error")

Selector = int | str | tuple[int | str, ...]
"""Which element of a tuple/list (int index) or mapping (str key) output to capture; a tuple of
them walks into nested outputs, e.g. (1, 0) is h of nn.LSTM's (out, (h, c))."""


def layer_names(model: nn.Module) -> list[str]:
    """Every name `Taps` accepts for `model`, in `named_modules()` order (the root "" left out).

    A module registered under two names (a shared layer) is listed under both.
    """
    return [name for name, _ in model.named_modules(remove_duplicate=False) if name]


def _unknown_name_error(model: nn.Module, name: str, valid: list[str]) -> StillroomError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = (
        f"closest: {', '.join(repr(c) for c in close)}"
        if close
        else f"no close match among its {len(valid)} modules (e.g. {', '.join(valid[:5])})"
    )
    return StillroomError(
        f"{type(model).__name__} has no module named {name!r}; {hint}. "
        "List them all with stillroom.taps.layer_names(model)"
    )


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    if isinstance(value, tuple | list):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _select_tensor(name: str, output: Any, selector: Selector | None) -> torch.Tensor:
    """The tensor to capture from one module's `output` (a tensor, or a tuple/list/mapping)."""
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            elements = list(output.values())
        elif isinstance(output, tuple | list):
            elements = list(output)
        else:
            elements = []
        for element in elements:
            if isinstance(element, torch.Tensor):
                return element
        raise StillroomError(
            f"module {name!r} returned a {_describe(output)} with no tensor element; "
            "tap a module that outputs tensors"
        )
    path = selector if isinstance(selector, tuple) else (selector,)
    value = output
    for step, key in enumerate(path):
        by_key = isinstance(value, Mapping) and isinstance(key, str) and key in value
        by_index = (
            isinstance(value, tuple | list)
            and isinstance(key, int)
            and -len(value) <= key < len(value)
        )
        if not (by_key or by_index):
            where = "the output" + "".join(f"[{k!r}]" for k in path[:step])
            raise StillroomError(
                f"select[{name!r}]={selector!r}: cannot take [{key!r}] of {where}, a "
                f"{_describe(value)}; use an int index for tuples/lists, a str key for mappings"
            )
        value = value[key]
    if not isinstance(value, torch.Tensor):
        raise StillroomError(
            f"select[{name!r}]={selector!r} picks a {_describe(value)} from the output of "
            f"{name!r}, not a tensor; select a tensor element"
        )
    return value


class Taps:
    """Forward hooks that record the outputs of the named modules of `model`.

    Args:
        model: any module; names are looked up in `model.named_modules()`.
        names: module names to capture, e.g. ["stages.0", "head.0"]; see `layer_names(model)`.
        on_repeat: what to keep when a module runs more than once in a capture window: "last",
            "first", "stack" (-> (calls, *shape)) or "error".
        select: per-name element of a tuple/list/mapping output (int index, str key, or a tuple
            of them for nested outputs); names not listed capture the first tensor element.
        detach: drop the autograd graph of captured tensors (use for a teacher).

    Raises StillroomError at construction for an unknown or repeated name, an unknown
    `on_repeat`, or a `select` key that is not among `names`.

    Use as a context manager (hooks attached on entry, removed on exit) or call `attach()` and
    `remove()` yourself. Captured outputs stay readable after the hooks are removed.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        on_repeat: OnRepeat = "last",
        select: Mapping[str, Selector] | None = None,
        detach: bool = False,
    ) -> None:
        if isinstance(names, str):
            raise StillroomError(f"names must be a list of module names, got the string {names!r}")
        names = list(names)
        if not names:
            raise StillroomError("Taps needs at least one module name to capture")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise StillroomError(f"module names listed more than once: {repeated}")
        if on_repeat not in ON_REPEAT:
            raise StillroomError(
                f"on_repeat={on_repeat!r} is not one of {', '.join(map(repr, ON_REPEAT))}"
            )
        select = dict(select or {})
        stray = sorted(set(select) - set(names))
        if stray:
            raise StillroomError(f"select names {stray} are not among the tapped names {names}")

        modules = dict(model.named_modules(remove_duplicate=False))
        valid = layer_names(model)
        for name in names:
            if name not in modules or not name:
                raise _unknown_name_error(model, name, valid)

        self.model = model
        self.names = names
        self.on_repeat = on_repeat
        self.select = select
        self.detach = detach
        self._modules = {name: modules[name] for name in names}
        self._handles: list[RemovableHandle] = []
        # per name: (tensor, version counter at capture, or None for inference tensors)
        self._captured: dict[str, list[tuple[torch.Tensor, int | None]]] = {}

    # ------------------------------------------------------------------ hooks

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Taps:
        """Register one forward hook per name and start an empty capture window."""
        if self._handles:
            raise StillroomError("these taps are already attached; call remove() first")
        self.clear()
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the captured outputs: start a new capture window (call before each forward)."""
        self._captured = {}

    def __enter__(self) -> Taps:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        selector = self.select.get(name)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _select_tensor(name, output, selector)
            if self.detach:
                tensor = tensor.detach()
            calls = self._captured.setdefault(name, [])
            if calls and self.on_repeat == "error":
                raise StillroomError(
                    f"module {name!r} ran twice in one capture window (on_repeat='error'); if it "
                    "is shared or recurrent choose on_repeat='last', 'first' or 'stack', else "
                    "call taps.clear() before each forward pass"
                )
            if calls and self.on_repeat == "first":
                return
            version = None if tensor.is_inference() else tensor._version
            if self.on_repeat == "last":
                calls.clear()
            calls.append((tensor, version))

        return hook

    # ------------------------------------------------------------------ results

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """name -> captured tensor for every tapped name, in the order given.

        With on_repeat="stack" each value is (calls, *shape). Raises StillroomError when a tapped
        module did not run since the last `clear()`, or its output was changed in place later in
        the forward pass.
        """
        missing = [name for name in self.names if name not in self._captured]
        if missing:
            raise StillroomError(
                f"tapped modules {missing} did not run since the last clear(); run a forward pass "
                "with the taps attached, and tap modules on the forward path"
            )
        result: dict[str, torch.Tensor] = {}
        for name in self.names:
            calls = self._captured[name]
            for tensor, version in calls:
                if version is not None and tensor._version != version:
                    raise StillroomError(
                        f"the output of {name!r} was modified in place after it was captured "
                        "(an in-place op such as `+=` or ReLU(inplace=True) follows it); tap the "
                        "module after that op, or make the op out of place"
                    )
            tensors = [tensor for tensor, _ in calls]
            if self.on_repeat == "stack":
                shapes = {tuple(t.shape) for t in tensors}
                if len(shapes) > 1:
                    raise StillroomError(
                        f"on_repeat='stack' cannot stack the outputs of {name!r}: its calls "
                        f"returned shapes {sorted(shapes)}; use on_repeat='last' or 'first'"
                    )
                result[name] = torch.stack(tensors)
            else:
                assert len(tensors) == 1, "last/first/error keep exactly one output per name"
                result[name] = tensors[0]
        return result

    def run(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """clear(), run `model(*args, **kwargs)` and return (its output, `outputs`)."""
        if not self._handles:
            raise StillroomError("attach the taps (or enter `with Taps(...)`) before run()")
        self.clear()
        result = self.model(*args, **kwargs)
        return result, self.outputs


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then restore every submodule's own training flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def feature_shapes(
    model: nn.Module,
    example_input: torch.Tensor,
    names: Sequence[str],
    *,
    on_repeat: OnRepeat = "last",
    select: Mapping[str, Selector] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the named outputs for one forward of `example_input` (N, ...), batch dim included.

    Runs under no_grad and in eval mode, because a training-mode forward would update BatchNorm
    running statistics and fail on a batch of one; every module's training flag is restored.
    Use it to size projectors: a (N, C, H, W) student map meeting a (N, C', H, W) teacher map
    needs a C -> C' projector.
    """
    taps = Taps(model, names, on_repeat=on_repeat, select=select, detach=True)
    with torch.no_grad(), _eval_mode(model), taps:
        _, outputs = taps.run(example_input)
    return {name: tuple(tensor.shape) for name, tensor in outputs.items()}


__all__ = ["ON_REPEAT", "OnRepeat", "Selector", "Taps", "feature_shapes", "layer_names"]
