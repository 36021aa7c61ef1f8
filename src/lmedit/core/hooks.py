"""Forward hooks as context managers: the only place in lmedit that registers hooks.

    >>> with TraceDict(model, ["model.layers.3.mlp.down_proj"], retain_input=True) as td:
    ...     model(**batch)
    >>> keys = td["model.layers.3.mlp.down_proj"].input          # [batch, pos, d_ff]

    >>> def add(output, name):                                    # edit a module's output in flight
    ...     return output + delta
    >>> with Trace(model, "model.layers.3.mlp.down_proj", edit_output=add):
    ...     model(**batch)

Hooks are removed in ``__exit__``, also when the forward pass raises. ``stop=True`` aborts the forward pass
right after the (last) traced module ran, which saves the layers above it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmedit.models.arch import get_submodule

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by the Trace that raised it."""


def _first_tensor(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


class Trace:
    """Retain and/or edit the input and output of one module during forward passes.

    Args:
        model: the root module.
        name: dotted module name (``model.get_submodule`` syntax).
        retain_output / retain_input: keep the module's output / first positional input on ``.output`` /
            ``.input`` (tensors; the first element when a module returns a tuple).
        detach: detach retained tensors (default False, so gradients can flow through them).
        edit_output: ``fn(output, name) -> output`` replacing the module's output.
        edit_input: ``fn(input, name) -> input`` replacing the module's first positional input.
        stop: raise StopForward after the module ran; the Trace swallows it on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        retain_output: bool = True,
        retain_input: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
        stop: bool = False,
    ):
        self.name = name
        self.module = get_submodule(model, name)
        self.input: Any = None
        self.output: Any = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

        def keep(x: Any) -> Any:
            x = _first_tensor(x)
            return x.detach() if detach and isinstance(x, torch.Tensor) else x

        if retain_input or edit_input is not None:

            def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
                new_args = args
                if edit_input is not None:
                    new_args = (edit_input(args[0], name), *args[1:])
                if retain_input:
                    self.input = keep(new_args[0])
                return new_args if edit_input is not None else None

            self._handles.append(self.module.register_forward_pre_hook(pre_hook))

        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if edit_output is not None:
                output = edit_output(output, name)
            if retain_output:
                self.output = keep(output)
            if stop:
                raise StopForward()
            return output

        if retain_output or edit_output is not None or stop:
            self._handles.append(self.module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict):
    """Several Traces at once, keyed by module name; the same options apply to each.

    With ``stop=True`` the forward pass ends after the last of ``names`` in execution order has run.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        retain_output: bool = True,
        retain_input: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
        stop: bool = False,
    ):
        super().__init__()
        names = list(dict.fromkeys(names))
        self._names = names
        self._pending = set(names)
        self._stopper: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name in names:
                self[name] = Trace(
                    model,
                    name,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    detach=detach,
                    edit_output=edit_output,
                    edit_input=edit_input,
                )
            if stop:
                # registered after each Trace's own hook, so retention happens before the stop
                for name in names:
                    hook = self._stop_hook(name)
                    self._stopper.append(get_submodule(model, name).register_forward_hook(hook))
        except Exception:
            self.close()
            raise

    def _stop_hook(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._pending.discard(name)
            if not self._pending:
                self._pending = set(self._names)
                raise StopForward()

        return hook

    def close(self) -> None:
        for t in self.values():
            t.close()
        for h in self._stopper:
            h.remove()
        self._stopper.clear()

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def active_hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks currently registered anywhere in ``model`` (for tests and debugging)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
