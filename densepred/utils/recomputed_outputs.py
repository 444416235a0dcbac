"""Norm outputs recomputed in backward instead of saved: the same step, less memory, exactly.

A LayerNorm or GroupNorm saves its input for its own backward. Its output is saved too whenever the next op
needs it: the linear or convolution it feeds (a weight gradient is `grad^T @ input`), or the ReLU after it (its
output, the next convolution's input). Both tensors have the input's size: in Mask2Former's pixel decoder, the
post-norm encoder layers save each of their two LayerNorms' inputs and outputs, and the stride-4 output
convolution its GroupNorm's input and its ReLU's output.

`RecomputedNormOutputs` keeps only the inputs. While it is entered, the outputs of the given norm modules (and
of a ReLU module applied to such an output) are recorded; when autograd saves one of them (or a view of
it), `torch.autograd.graph.saved_tensors_hooks` keep a recipe instead: the module and its input, which the norm
kept anyway. The first backward node that needs the tensor runs the module again on that input (under the
forward's autocast state, without autograd) and the result stays until the last node that saved it has run.
The recomputed values are bitwise the forward's (the same deterministic kernel on the same input), so values
and gradients are unchanged (tests/test_recomputed_outputs.py).

What is never recorded: a module called with more than one tensor, a norm output that shares memory with its
input (an in-place ReLU of a recorded norm output is recorded: its recipe runs both), a tensor modified in place after
it was recorded (it is saved as usual), and anything while `torch.compile` traces. Inside an activation-
checkpointed block the checkpoint's own hooks take precedence (the innermost hooks apply), so checkpointed blocks
keep their behaviour.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm)  # save their input for backward: recomputing their output costs no memory
ACTIVATIONS = (nn.ReLU,)  # saves its own output (the next conv's input): recomputed from a recorded norm output


class _Recipe:
    """How to compute one recorded output again: `module` on its input, under the forward's autocast state.

    The input is a tensor the norm keeps for its own backward, or (`parent`) the recipe of a recorded output.
    It is held weakly until a saved copy of the output is replaced by this recipe (`pin`): a recorded output
    that nobody saves through these hooks (inside an activation-checkpointed block, say) keeps nothing alive.
    """

    def __init__(self, module: nn.Module, source: torch.Tensor | _Recipe, output: torch.Tensor) -> None:
        self.module = module
        self.parent = source if isinstance(source, _Recipe) else None
        self.source_ref = None if self.parent is not None else weakref.ref(source)
        self.source: torch.Tensor | None = None  # the input itself, once pinned
        self.source_version = None if self.parent is not None else source._version
        self.device_type = output.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)
        self.meta = (output.shape, output.stride(), output.dtype)
        self.version = output._version
        # alive output -> its memory is not reused: a saved tensor at that address is the output or a view of it
        self.output = weakref.ref(output)
        self.value: torch.Tensor | None = None  # the recomputed output, from the first unpack on

    def pin(self) -> bool:
        """Hold the input (and the parents' inputs) strongly; False if one is gone already."""
        if self.parent is not None:
            return self.parent.pin()
        if self.source is None:
            self.source = self.source_ref()
        return self.source is not None

    def compute(self) -> torch.Tensor:
        """The output again, without autograd (the module's forward only: its hooks do not run again)."""
        if self.parent is not None:
            source = self.parent.compute()
        else:
            source = self.source
            if source._version != self.source_version:
                raise RuntimeError(
                    f"RecomputedNormOutputs: the input of {type(self.module).__name__} was modified in place after "
                    "the forward pass; its output cannot be recomputed (set recompute_norm_outputs=false)"
                )
        with torch.no_grad(), torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast):
            output = self.module.forward(source)
        if (output.shape, output.stride(), output.dtype) != self.meta:
            raise RuntimeError(
                f"RecomputedNormOutputs: {type(self.module).__name__} recomputed a {tuple(output.shape)} "
                f"{output.dtype} tensor with strides {output.stride()}, the forward's was {self.meta}"
            )
        return output

    def get(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.compute()
        return self.value


class _Packed:
    """A saved tensor replaced by its recipe and the view of the output it was."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, tensor: torch.Tensor) -> None:
        self.recipe = recipe
        self.size, self.stride, self.offset = tensor.shape, tensor.stride(), tensor.storage_offset()

    def unpack(self) -> torch.Tensor:
        return self.recipe.get().as_strided(self.size, self.stride, self.offset)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class RecomputedNormOutputs:
    """Context manager: within it, the outputs of `modules`' norms (LayerNorm, GroupNorm) and of the ReLUs
    applied to them are recomputed in backward instead of saved (see the module docstring).

    `modules`: the modules to watch (typically `model.modules()`; others are ignored). Outside autograd it
    does nothing. Nesting is allowed: the innermost one records and packs.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.watched = [m for m in modules if isinstance(m, NORMS + ACTIVATIONS)]
        # output's storage -> its recipe, until the forward ends; then held only by the saved copies it replaced
        self._recipes: dict[int, _Recipe] = {}
        self._handles: list[Any] = []
        self._saved_hooks: Any = None
        # (ReLU, its input's recipe, its input) while a ReLU of a recorded output runs: it saves its own output
        # inside its forward, before a forward hook could record it
        self._expected: tuple[nn.Module, _Recipe, torch.Tensor] | None = None

    def __enter__(self) -> RecomputedNormOutputs:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.watched:
            self._handles = [m.register_forward_hook(self._record) for m in self.watched]
            activations = [m for m in self.watched if isinstance(m, ACTIVATIONS)]
            self._handles += [m.register_forward_pre_hook(self._expect) for m in activations]
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(*exc)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recipes.clear()

    def _lookup(self, tensor: torch.Tensor) -> _Recipe | None:
        """The live recipe of the recorded output `tensor` is (a view of), if its values are the recorded ones."""
        recipe = self._recipes.get(_storage(tensor))
        alive = recipe is not None and recipe.output() is not None
        return recipe if alive and recipe.version == tensor._version and recipe.meta[2] == tensor.dtype else None

    def _expect(self, module: nn.Module, args: tuple) -> None:
        parent = self._lookup(args[0]) if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        self._expected = None if parent is None else (module, parent, args[0])

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._expected = None  # a ReLU's own save, if any, happened inside its forward (`_pack`)
        if not isinstance(module, NORMS) or len(args) != 1 or not isinstance(output, torch.Tensor):
            return
        (source,) = args
        if isinstance(source, torch.Tensor) and output.requires_grad and output.numel():
            if _storage(output) != _storage(source):
                self._recipes[_storage(output)] = _Recipe(module, source, output)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not tensor.numel():
            return tensor
        recipe = self._lookup(tensor)
        if recipe is None and self._expected is not None:
            module, parent, source = self._expected
            if tensor.shape == source.shape and tensor.dtype == source.dtype and tensor.requires_grad:
                # the expected ReLU saving its own output: record it now
                self._expected = None
                recipe = self._recipes[_storage(tensor)] = _Recipe(module, parent, tensor)
        return tensor if recipe is None or not recipe.pin() else _Packed(recipe, tensor)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, _Packed) else packed
