"""Per-sample gradient clipping in one backward pass (book-keeping with ghost norms).

Forward hooks keep each supported layer's input and put a tap (an identity autograd node) on
its output. ``backward`` asks autograd only for the gradients of small dummy tensors attached
to the taps, so autograd walks the whole graph but never builds the (unclipped) parameter
gradients. As the gradient of each layer's output reaches its tap, the layer's rule turns it
into per-sample contributions (ghost factors, or the per-sample gradient itself when that is
cheaper; the layer's output gradient is then released). Squared norms are added per sample
(for a parameter used by several layers, such as tied embeddings, the norm of the *sum*,
cross terms included), giving clip factors ``min(1, C / ||g_i||)``; the clipped sum is then
formed from the kept tensors and added to ``p.grad``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpllm.privacy import contributions as C
from dpllm.privacy.mixing import refuse_sample_mixing
from dpllm.privacy.rules import UnsupportedModuleError, find_rule

STRATEGIES = ("auto", "ghost", "direct")


@dataclass
class _Call:
    module: nn.Module
    input: Tensor | None
    batch_size: int
    dummy: Tensor  # the leaf autograd is asked to differentiate
    low_precision: bool  # run in bf16/fp16 (its own dtype or autocast): autograd's gradient is rounded there


class _Tap(torch.autograd.Function):
    """Identity on the output; hands the output gradient to the clipper on its way through."""

    @staticmethod
    def forward(ctx, output, dummy, clipper, call_index):
        ctx.clipper, ctx.call_index = clipper, call_index
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.clipper._receive(ctx.call_index, grad)
        return grad, grad.new_zeros(()), None, None


class PerSampleClipper:
    """Clips per-sample gradients of every trainable parameter of ``model`` to ``max_grad_norm``.

    ``strategy``: "auto" picks ghost norms or direct per-sample gradients per layer (whichever
    is cheaper), "ghost" and "direct" force one. ``verify_first_backward`` compares, once, the
    unclipped sum rebuilt from the hooks with autograd's own batch gradient; a mismatch means a
    parameter is used outside the module that owns it, and raises rather than under-clipping.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        strategy: str = "auto",
        verify_first_backward: bool = True,
        grad_sink: Callable[[str, Tensor | None], None] | None = None,
    ) -> None:
        """``grad_sink``: called as ``grad_sink(name, clipped)`` for every parameter, in one fixed
        order, with the micro-batch's clipped sum (full shape, fp32; fp64 for fp64 models) or None
        where no sample reached it, instead of adding to ``p.grad``. The private step always passes
        one, so sums are never accumulated in a bf16/fp16 parameter dtype; the sharded step sends
        each sum to its owner as soon as it is formed (the fixed order keeps ranks' collectives
        matched), so no rank holds a full-shape buffer per parameter."""
        if not 0 < max_grad_norm < math.inf:  # an infinite bound would release unclipped gradients
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.max_grad_norm = float(max_grad_norm)
        self.strategy = strategy
        self._verify = verify_first_backward
        self._calls: list[_Call] = []
        self._collected: dict[str, list[C.Contribution]] = {}
        self._collecting = False
        self._acc_dtype = torch.float32
        self._rules = {}
        self.parameters: list[nn.Parameter] = []
        self.names: dict[nn.Parameter, str] = {}
        self.by_name: dict[str, nn.Parameter] = {}
        self.shapes: dict[str, torch.Size] = {}
        self._module_params: dict[nn.Module, dict[str, str]] = {}
        self.grad_sink = grad_sink
        self._handles = []
        self.last_dropped = 0
        self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            label = module_name or type(model).__name__
            refuse_sample_mixing(module, label)
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = find_rule(module)
            if rule is None:
                names = ", ".join(f"{label}.{n}" for n, _ in own)
                raise UnsupportedModuleError(
                    f"trainable parameter(s) {names} in module '{label}' ({type(module).__name__}) "
                    "have no per-sample gradient rule; freeze them or register a rule in dpllm.privacy.rules"
                )
            self._rules[module] = rule
            for n, p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.parameters.append(p)
                    self.names[p] = f"{label}.{n}"
                    self.by_name[f"{label}.{n}"] = p
                    self.shapes[f"{label}.{n}"] = p.shape
            self._module_params[module] = {n: self.names[p] for n, p in own}
            self._handles.append(module.register_forward_hook(self._record))
        if not self.parameters:
            raise ValueError("the model has no trainable parameters")

    def _record(self, module: nn.Module, inputs, output):
        # A forward inside the clipper's backward is activation checkpointing's recompute: recording
        # it would keep the inputs that checkpointing frees (the first forward's calls are the ones used)
        if not torch.is_grad_enabled() or self._collecting:
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(f"{type(module).__name__} returned {type(output).__name__}; rules need a tensor output")
        if not output.requires_grad:
            return None
        dummy = torch.zeros((), device=output.device, requires_grad=True)
        tapped = _Tap.apply(output, dummy, self, len(self._calls))
        low = output.dtype in (torch.bfloat16, torch.float16)
        self._calls.append(_Call(module, inputs[0].detach(), output.shape[0], dummy, low))
        return tapped

    def _receive(self, index: int, grad: Tensor) -> None:
        """Called from the backward pass with the gradient of call ``index``'s output."""
        if not self._collecting:
            return
        call = self._calls[index]
        acc = self._acc_dtype
        x = call.input.to(acc) if call.input.is_floating_point() else call.input
        for p, contribution in self._rules[call.module](call.module, x, grad.to(acc)):
            if isinstance(contribution, C.Outer) and self._direct(contribution):
                contribution = C.materialize(contribution)
            self._collected.setdefault(self._name_of(call.module, p), []).append(contribution)
        call.input = None  # contributions keep what they need; the rest can be freed now

    def _name_of(self, module: nn.Module, p: Tensor) -> str:
        """The registered name of the parameter a rule returned; sharding engines may have swapped
        the module's parameter object for an unsharded one since the hooks were installed."""
        name = self.names.get(p)
        if name is not None:
            return name
        for attr, full in self._module_params[module].items():
            if getattr(module, attr) is p:
                return full
        raise RuntimeError(f"a rule for {type(module).__name__} returned a tensor that is not one of its parameters")

    def rebind(self, named_parameters: dict[str, nn.Parameter]) -> None:
        """Use the parameter objects a sharding engine put in place of the ones the hooks were
        installed with (FSDP2's shards), and drop every reference to the old, full ones."""
        self.by_name = {name: named_parameters[name] for name in self.shapes}
        self.parameters = list(self.by_name.values())
        self.names = {p: name for name, p in self.by_name.items()}

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls.clear()

    def reset(self) -> None:
        """Forget recorded calls (e.g. after a forward pass that will not be back-propagated)."""
        self._calls.clear()

    # -- the backward pass ---------------------------------------------------------------

    def backward(self, per_sample_loss: Tensor) -> Tensor:
        """Back-propagate ``per_sample_loss`` (shape (B,)) and add the clipped sum to ``p.grad``.

        Returns the pre-clip per-sample gradient norms (B,). Samples with a non-finite loss or
        gradient are dropped from the sum (their norm is reported as NaN and counted in
        ``last_dropped``).
        """
        calls, self._calls = self._calls, []
        if per_sample_loss.dim() != 1:
            raise ValueError(
                f"per_sample_loss must have shape (batch,), got {tuple(per_sample_loss.shape)}; "
                "reduce over tokens per sample, not over the batch"
            )
        bsz = per_sample_loss.shape[0]
        if not per_sample_loss.requires_grad:
            raise ValueError("per_sample_loss does not require grad: was the forward run under no_grad?")
        for call in calls:
            if call.batch_size != bsz:
                hint = ""
                if isinstance(call.module, nn.Embedding) and call.batch_size == 1:
                    hint = (
                        "; an embedding looked up with ids shared by the whole batch (such as BERT's position ids, "
                        "taken from a (1, T) buffer when none are given) hides each sample's gradient of its table: "
                        "pass (B, T) position_ids (dpllm.classification.collate does)"
                    )
                raise ValueError(
                    f"{type(call.module).__name__} output has leading dim {call.batch_size} but the batch "
                    f"has {bsz} samples: per-sample rules need batch-first layer inputs{hint}"
                )
        keep = torch.isfinite(per_sample_loss.detach())
        self._acc_dtype = acc_dtype = torch.promote_types(self.parameters[0].dtype, torch.float32)
        device = per_sample_loss.device
        self._calls, self._collected, self._collecting = calls, {}, True
        verify, failed = self._verify, []
        try:
            if verify:
                failed = self._backward_against_autograd(per_sample_loss[keep].sum(), calls, keep.to(acc_dtype))
            else:
                torch.autograd.grad(per_sample_loss[keep].sum(), [c.dummy for c in calls], allow_unused=True)
        finally:
            self._collecting = False
            groups, self._collected, self._calls = self._collected, {}, []

        sq_norms = torch.zeros(bsz, dtype=acc_dtype, device=device)
        gram_cache: dict = {}
        for contribs in groups.values():
            sq_norms += self._squared_norm(contribs, gram_cache)
        del gram_cache
        keep &= torch.isfinite(sq_norms)
        norms = sq_norms.clamp_min(0).sqrt()
        factors = torch.where(
            keep, (self.max_grad_norm / norms).clamp(max=1.0).nan_to_num(1.0), torch.zeros_like(norms)
        )
        self.last_dropped = int((~keep).sum())
        if self.last_dropped:
            groups = {p: [C.zero_samples(c, keep) for c in cs] for p, cs in groups.items()}

        if verify and not self.last_dropped:  # a dropped sample's NaN would fail any comparison: check the next time
            self._verify = False
            if failed:
                raise UnsupportedModuleError(
                    f"parameter '{failed[0]}' receives gradient from outside the modules the clipper "
                    "hooks (it is used directly in a forward pass, or an input is modified in place); "
                    "its per-sample gradient cannot be bounded"
                )

        scaled: dict = {}
        for name in self.shapes:  # popping frees each layer's kept tensors as soon as its sum is formed
            contribs = groups.pop(name, None)
            clipped = None
            if contribs:
                clipped = C.weighted_sum(contribs[0], factors, scaled)
                for c in contribs[1:]:
                    C.weighted_sum(c, factors, scaled, out=clipped)
                clipped = clipped.view(self.shapes[name])
            del contribs
            if self.grad_sink is not None:
                self.grad_sink(name, clipped)
            elif clipped is not None:
                p = self.by_name[name]
                clipped = clipped.to(p.dtype)
                p.grad = clipped if p.grad is None else p.grad.add_(clipped)
        return torch.where(keep, norms, torch.full_like(norms, float("nan")))

    def _direct(self, c: C.Outer) -> bool:
        if self.strategy == "auto":
            return c.prefers_direct()
        return self.strategy == "direct"

    @staticmethod
    def _squared_norm(contribs: list[C.Contribution], cache: dict) -> Tensor:
        total = sum(C.inner(c, c, cache) for c in contribs)
        for a, b in itertools.combinations(contribs, 2):
            total = total + 2 * C.inner(a, b, cache)
        return total

    def _backward_against_autograd(self, loss: Tensor, calls: list, ones: Tensor) -> list[str]:
        """The backward pass that collects the contributions, also accumulating autograd's batch
        gradient of every parameter; each gradient is compared, as it is accumulated, with the
        unclipped sum rebuilt from its module's contributions (collected earlier in the same
        pass), then dropped. One pass, one parameter's gradient at a time: no retained graph, no
        second copy of the model. Returns the names of the parameters that do not match."""
        params = self.parameters
        rtol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(params[0].dtype, 5e-2)
        if any(c.low_precision for c in calls):  # autograd's batch gradient went through bf16/fp16 matmuls
            rtol = 5e-2
        failed: list[str] = []

        def compare(p: Tensor, ref: Tensor | None) -> None:
            # the difference built in place on autograd's gradient: one full-size tensor at a time
            diff = torch.zeros(p.shape, dtype=ones.dtype, device=ones.device) if ref is None else ref.to(ones.dtype).neg_()
            scale = diff.norm()
            for c in self._collected.get(self.names[p], []):
                C.weighted_sum(c, ones, out=diff)
            if diff.norm() > rtol * scale.clamp_min(torch.finfo(diff.dtype).tiny) + 1e-6:
                failed.append(self.names[p])

        def on_grad(p: Tensor) -> None:
            compare(p, p.grad)
            seen.add(p)
            p.grad = None

        stashed = {p: p.grad for p in params}
        seen: set = set()
        dummies = [c.dummy for c in calls]
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        try:
            for p in params:
                p.grad = None
            torch.autograd.backward(loss, inputs=dummies + [p for p in params if p.requires_grad])
        finally:
            for h in handles:
                h.remove()
            for p, g in stashed.items():
                p.grad = g
            for d in dummies:
                d.grad = None
        for p in params:
            if p not in seen:  # autograd gave it no gradient
                compare(p, None)
        return failed
