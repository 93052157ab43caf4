"""Module injection: attach a method's modules to named submodules of a frozen backbone.

Used by every method that adds modules inside the backbone (adapter, LoRA, SSF). Forward hooks,
not module replacement: the backbone keeps its own forward code and parameter names, so any timm
model works (any head count, qkv bias, fused attention) and its weights load and count as before.
The injected modules live in one ``nn.ModuleDict`` that the method stores under its prefix
(``model.lora_modules = injection.modules``), so ownership, saving and counting need nothing more;
the hooks can be removed again, which is how LoRA and SSF merge into the weights.

Vocabulary: a *target* is a submodule given by its dotted path in the backbone
(``blocks.3.attn.qkv``); an injected module reads the target's output (``source="output"``),
its input (``"input"``) or an input tapped on another module (``tap=``), and its result is added
to the target's output (``combine="add"``) or replaces it (``"replace"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from harness.errors import UserError
from harness.models.model import DMLModel


def select_indices(n: int, chosen: Sequence[int], key: str, what: str = "block") -> list[int]:
    """``chosen`` indices into ``n`` items, sorted and unique; empty means all of them."""
    if not chosen:
        return list(range(n))
    bad = [b for b in chosen if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < n]
    if bad:
        raise UserError(f"bad value {bad[0]!r} in '{key}': valid {what} indices are 0..{n - 1}")
    return sorted(set(chosen))


def block_targets(
    model: nn.Module,
    blocks: Sequence[int],
    names: Sequence[str],
    *,
    key_blocks: str,
    key_names: str,
    types: tuple[type, ...] = (nn.Module,),
) -> dict[str, nn.Module]:
    """``{"blocks.<i>.<name>": module}`` for each chosen block of a timm ViT and each relative name.

    A name that a block lacks, or whose module is not of ``types``, is a one-line UserError listing
    the valid names of that block.
    """
    stack = getattr(model, "blocks", None)
    if not isinstance(stack, nn.Sequential) or not len(stack):
        raise UserError(
            f"{type(model).__name__} has no 'blocks' sequence to inject into; valid: timm ViTs (vit_*, deit_*)"
        )
    if not names:
        raise UserError(f"'{key_names}' is empty; name at least one submodule of a block, e.g. attn.qkv")
    targets: dict[str, nn.Module] = {}
    for i in select_indices(len(stack), blocks, key_blocks):
        block = stack[i]
        valid = sorted(n for n, m in block.named_modules() if n and isinstance(m, types))
        for name in names:
            if name not in valid:
                raise UserError(
                    f"bad value {name!r} in '{key_names}': block {i} has no such "
                    f"{'/'.join(t.__name__ for t in types)}; valid: {', '.join(valid)}"
                )
            targets[f"blocks.{i}.{name}"] = block.get_submodule(name)
    return targets


def module_key(path: str) -> str:
    """A target path as a ModuleDict key (dots are not allowed there)."""
    return path.replace(".", "_")


class Tap:
    """Forward pre-hook that remembers a module's input, for an injected module elsewhere."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.x = args[0]


class InjectedHook:
    """Forward hook combining a target's output with an injected module's result."""

    def __init__(
        self,
        injected: nn.Module,
        source: Literal["output", "input"],
        combine: Literal["add", "replace"],
        tap: Tap | None = None,
    ) -> None:
        self.injected, self.source, self.combine, self.tap = injected, source, combine, tap

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            x, self.tap.x = self.tap.x, None
        else:
            x = args[0] if self.source == "input" else output
        y = self.injected(x).to(output.dtype)
        return output + y if self.combine == "add" else y


class Injection:
    """The injected modules of one method (``modules``, keyed by target) and their hooks."""

    def __init__(self) -> None:
        self.modules = nn.ModuleDict()
        self.targets: dict[str, nn.Module] = {}
        self._handles: dict[str, list[RemovableHandle]] = {}

    def add(
        self,
        path: str,
        target: nn.Module,
        injected: nn.Module,
        *,
        source: Literal["output", "input"] = "output",
        combine: Literal["add", "replace"] = "add",
        tap_input_of: nn.Module | None = None,
    ) -> None:
        """Hook ``injected`` onto ``target``; ``tap_input_of`` feeds it that module's input instead."""
        key = module_key(path)
        handles = []
        tap = None
        if tap_input_of is not None:
            tap = Tap()
            handles.append(tap_input_of.register_forward_pre_hook(tap))
        handles.append(target.register_forward_hook(InjectedHook(injected, source, combine, tap)))
        self.modules[key] = injected
        self.targets[key] = target
        self._handles[key] = handles

    def remove_hooks(self) -> None:
        """Detach every injected module from the backbone (after merging it into the weights)."""
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles.clear()

    @property
    def hooked(self) -> bool:
        return bool(self._handles)


class MergeableModel(DMLModel):
    """A frozen backbone with injected modules that fold into the weights of the modules they
    follow (LoRA, SSF): :meth:`merge_` calls :meth:`fold` per target, then removes the hooks."""

    #: the attribute (carrying the method's prefix) that holds the injected modules
    injected_attr = ""

    def attach(self, injection: Injection) -> None:
        setattr(self, self.injected_attr, injection.modules)
        self._injection = injection

    def fold(self, target: nn.Module, injected: nn.Module) -> None:
        """Fold ``injected`` into ``target``'s own parameters (under ``torch.no_grad``)."""
        raise NotImplementedError

    def merge_(self) -> bool:
        if not self._injection.hooked:
            return False
        with torch.no_grad():
            for key, target in self._injection.targets.items():
                self.fold(target, self._injection.modules[key])
        self._injection.remove_hooks()
        return True
