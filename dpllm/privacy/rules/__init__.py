"""Registry of per-sample gradient rules, one module type per file.

A rule turns one recorded call of a module (its input, and the gradient of the loss with
respect to its output) into per-sample contributions to each of the module's own parameters.
Rules are found by type (walking the MRO) or, for classes that the registry cannot know in
advance such as each model family's RMSNorm, by a matcher that checks the module's behaviour.

peft LoRA adapters need no rule of their own: ``lora_A``/``lora_B`` are ``nn.Linear`` modules
and are clipped as such; their frozen base layer is skipped.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn

from dpllm.privacy.contributions import Contribution

# rule(module, input, grad_output) -> [(parameter, contribution), ...]
Rule = Callable[[nn.Module, Tensor, Tensor], Iterable[tuple[nn.Parameter, Contribution]]]

_BY_TYPE: dict[type, Rule] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], Rule]] = []
_VALIDATORS: dict[type, Callable[[nn.Module], None]] = {}


class UnsupportedModuleError(ValueError):
    """A trainable parameter sits in a module whose per-sample gradient cannot be bounded."""


def register(module_type: type, validate: Callable[[nn.Module], None] | None = None) -> Callable[[Rule], Rule]:
    """Register ``rule`` for ``module_type``; ``validate`` raises for settings it cannot bound."""

    def wrap(rule: Rule) -> Rule:
        _BY_TYPE[module_type] = rule
        if validate is not None:
            _VALIDATORS[module_type] = validate
        return rule

    return wrap


def register_matcher(matches: Callable[[nn.Module], bool]) -> Callable[[Rule], Rule]:
    def wrap(rule: Rule) -> Rule:
        _MATCHERS.append((matches, rule))
        return rule

    return wrap


def find_rule(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            if cls in _VALIDATORS:
                _VALIDATORS[cls](module)
            return _BY_TYPE[cls]
    for matches, rule in _MATCHERS:
        if matches(module):
            return rule
    return None


def flatten_positions(x: Tensor, trailing: int = 1) -> Tensor:
    """(B, *positions, *feature) -> (B, T, *feature) with T the product of the position dims."""
    return x.reshape(x.shape[0], -1, *x.shape[x.dim() - trailing :])


# Importing the rule files registers them.
from dpllm.privacy.rules import embedding, layer_norm, linear, rms_norm  # noqa: E402,F401
