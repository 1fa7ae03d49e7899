"""Per-sample gradient clipping: book-keeping (one backward) or two passes.

Forward hooks put a tap (an identity autograd node) on each supported layer's output, which
saves the layer's input as autograd saves any tensor: under activation checkpointing it is
freed after the forward and recomputed in backward like the layer's own activations. The
clipper asks autograd only for the gradients of small dummy tensors attached to the taps, so
autograd walks the whole graph but never builds the (unclipped) parameter gradients. As the
gradient of each layer's output reaches its tap, the layer's rule turns it and the input into
per-sample contributions (ghost factors, or the per-sample gradient itself when that is
cheaper). Squared norms are added per sample (for a parameter used by several layers, such as
tied embeddings, the norm of the *sum*, cross terms included), giving clip factors
``min(1, C / ||g_i||)``. ``norm="l1"`` (what Laplace-type noise needs) adds per-layer L1 norms
instead; they have no Gram shortcut, so each layer's per-sample gradients are built (in chunks)
and dropped; two_pass then holds one layer's at a time.

``book_keeping`` keeps every layer's contributions until the end of that backward, then forms
the clipped sums from them. ``two_pass`` reduces each layer's contributions to per-sample
squared norms as they arrive and drops them; a second backward over the retained graph (which
checkpointing recomputes again) forms each layer's clipped sum at its tap and hands it on at
once. It costs a second backward and keeps at most one layer's contributions (plus those of a
parameter used by several layers, until its last use), which is what checkpointing needs.
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
MODES = ("book_keeping", "two_pass")
NORMS = ("l2", "l1")


@dataclass
class _Call:
    module: nn.Module
    batch_size: int
    dummy: Tensor  # the leaf autograd is asked to differentiate
    low_precision: bool  # run in bf16/fp16 (its own dtype or autocast): autograd's gradient is rounded there


class _Tap(torch.autograd.Function):
    """Identity on the output; saves the layer's input (so checkpointing frees and recomputes it)
    and hands both with the output gradient to the clipper on its way through."""

    @staticmethod
    def forward(ctx, output, dummy, layer_input, clipper, call_index):
        ctx.save_for_backward(layer_input)
        ctx.clipper, ctx.call_index = clipper, call_index
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (layer_input,) = ctx.saved_tensors
        ctx.clipper._receive(ctx.call_index, layer_input, grad)
        return grad, grad.new_zeros(()), None, None, None


class PerSampleClipper:
    """Clips per-sample gradients of every trainable parameter of ``model`` to ``max_grad_norm``.

    ``strategy``: "auto" picks ghost norms or direct per-sample gradients per layer (whichever
    is cheaper), "ghost" and "direct" force one. ``mode``: "book_keeping" (one backward) or
    "two_pass" (a second backward; see the module docstring). ``norm``: "l2" or "l1", the norm
    each sample's whole gradient is clipped in. ``verify_first_backward`` compares, once, the
    unclipped sum rebuilt from the hooks with autograd's own batch gradient; a mismatch means a
    parameter is used outside the module that owns it, and raises rather than under-clipping.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        strategy: str = "auto",
        mode: str = "book_keeping",
        norm: str = "l2",
        verify_first_backward: bool = True,
        grad_sink: Callable[[str, Tensor | None], None] | None = None,
        replay_backward_hooks: Callable[[], Callable[[], None]] | None = None,
    ) -> None:
        """``grad_sink``: called as ``grad_sink(name, clipped)`` for every parameter, in one fixed
        order, with the micro-batch's clipped sum (full shape, fp32; fp64 for fp64 models) or None
        where no sample reached it, instead of adding to ``p.grad``. The private step always passes
        one, so sums are never accumulated in a bf16/fp16 parameter dtype; the sharded step sends
        each sum to its owner as soon as it is formed (the fixed order keeps ranks' collectives
        matched), so no rank holds a full-shape buffer per parameter. ``replay_backward_hooks``
        (two_pass): called once the forward is done, it returns what to call before the second
        backward so that an engine's per-module backward hooks fire again for it (ZeRO-3 counts
        the backwards it expects from the forwards, see dpllm.distributed.zero3)."""
        if not 0 < max_grad_norm < math.inf:  # an infinite bound would release unclipped gradients
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.max_grad_norm = float(max_grad_norm)
        self.strategy = strategy
        self.mode = mode
        self.norm = norm
        self._verify = verify_first_backward
        self._calls: list[_Call] = []
        self._collected: dict[str, list[C.Contribution]] = {}
        self._collecting = False
        self._stream: _Stream | None = None  # two_pass: what each pass reduces the contributions to
        self._acc_dtype = torch.float32
        self._rules = {}
        self.parameters: list[nn.Parameter] = []
        self.names: dict[nn.Parameter, str] = {}
        self.by_name: dict[str, nn.Parameter] = {}
        self.shapes: dict[str, torch.Size] = {}
        self._module_params: dict[nn.Module, dict[str, str]] = {}
        self.grad_sink = grad_sink
        self._replay_backward_hooks = replay_backward_hooks
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
        if not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(f"{type(module).__name__} returned {type(output).__name__}; rules need a tensor output")
        if not output.requires_grad:
            return None
        dummy = torch.zeros((), device=output.device, requires_grad=True)
        if self._collecting:
            # activation checkpointing's recompute, inside the clipper's backward: the first
            # forward's calls are the ones used; this tap only saves the input again, where the
            # recompute hands it to the first forward's tap
            return _Tap.apply(output, dummy, inputs[0].detach(), self, -1)
        tapped = _Tap.apply(output, dummy, inputs[0].detach(), self, len(self._calls))
        low = output.dtype in (torch.bfloat16, torch.float16)
        self._calls.append(_Call(module, output.shape[0], dummy, low))
        return tapped

    def _receive(self, index: int, layer_input: Tensor, grad: Tensor) -> None:
        """Called from the backward pass with call ``index``'s input and output gradient."""
        if not self._collecting or index < 0:
            return
        call = self._calls[index]
        acc = self._acc_dtype
        x = layer_input.to(acc) if layer_input.is_floating_point() else layer_input
        for p, contribution in self._rules[call.module](call.module, x, grad.to(acc)):
            name = self._name_of(call.module, p)
            if self._stream is not None and self._stream.sums:  # the second pass sums, it never materialises
                self._stream.add(name, contribution)
                continue
            if isinstance(contribution, C.Outer) and self._direct(contribution):
                contribution = C.materialize(contribution)
            if self._stream is not None:
                self._stream.add(name, contribution)
            else:
                self._collected.setdefault(name, []).append(contribution)

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

    def release_parameters(self) -> None:
        """Drop every reference to the parameters (until :meth:`rebind`): a sharding engine frees
        the full ones as it shards them."""
        self.by_name, self.parameters, self.names = {}, [], {}

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
        verify, failed = self._verify, []
        two_pass = self.mode == "two_pass"  # its one-time check runs in the second pass
        loss = per_sample_loss[keep].sum()
        dummies = [c.dummy for c in calls]
        # per-sample sums over parameters of squared L2 norms, or of L1 norms
        parts = torch.zeros(bsz, dtype=acc_dtype, device=device)
        replay = None
        if two_pass:
            self._stream = _Stream(self._uses(calls), parts, self._norm_part)
            replay = self._replay_backward_hooks() if self._replay_backward_hooks else None
        self._calls, self._collected, self._collecting = calls, {}, True
        try:
            if verify and not two_pass:
                failed = self._backward_against_autograd(loss, calls, keep.to(acc_dtype), self._add_collected(keep.to(acc_dtype)))
            else:
                torch.autograd.grad(loss, dummies, allow_unused=True, retain_graph=two_pass)
            if two_pass:
                self._stream.finish()
        except BaseException:
            self._stream = None
            raise
        finally:
            self._collecting = False
            groups, self._collected, self._calls = self._collected, {}, []

        gram_cache: dict = {}
        for contribs in groups.values():
            parts += self._norm_part(contribs, gram_cache)
        del gram_cache
        keep = keep & torch.isfinite(parts)  # a new tensor: the first pass indexed the loss with the old one
        norms = parts.clamp_min(0).sqrt() if self.norm == "l2" else parts
        factors = torch.where(
            keep, (self.max_grad_norm / norms).clamp(max=1.0).nan_to_num(1.0), torch.zeros_like(norms)
        )
        self.last_dropped = int((~keep).sum())
        if two_pass:
            if replay is not None:
                replay()
            failed = self._second_pass(loss, calls, factors, keep, verify=verify and not self.last_dropped)
        elif self.last_dropped:
            groups = {p: [C.zero_samples(c, keep) for c in cs] for p, cs in groups.items()}

        if verify and not self.last_dropped:  # a dropped sample's NaN would fail any comparison: check the next time
            self._verify = False
            if failed:
                raise UnsupportedModuleError(
                    f"parameter '{failed[0]}' receives gradient from outside the modules the clipper "
                    "hooks (it is used directly in a forward pass, or an input is modified in place); "
                    "its per-sample gradient cannot be bounded"
                )

        if two_pass:  # its sums were handed on during the second pass
            return torch.where(keep, norms, torch.full_like(norms, float("nan")))
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
            self._hand_on(name, clipped)
        return torch.where(keep, norms, torch.full_like(norms, float("nan")))

    def _hand_on(self, name: str, clipped: Tensor | None) -> None:
        """One parameter's clipped micro-batch sum to the sink, or added to ``p.grad``."""
        if self.grad_sink is not None:
            self.grad_sink(name, clipped)
        elif clipped is not None:
            p = self.by_name[name]
            clipped = clipped.to(p.dtype)
            p.grad = clipped if p.grad is None else p.grad.add_(clipped)

    def _uses(self, calls: list[_Call]) -> dict[str, int]:
        """How many recorded calls contribute to each parameter (2 for a tied embedding)."""
        uses: dict[str, int] = {}
        for call in calls:
            for name in self._module_params[call.module].values():
                uses[name] = uses.get(name, 0) + 1
        return uses

    def _second_pass(self, loss: Tensor, calls: list[_Call], factors: Tensor, keep: Tensor, verify: bool) -> list[str]:
        """two_pass: the same backward again; each layer's clipped sum is formed at its tap and
        handed on once its parameter's last use is in (then freed). Parameters come out in the
        order backward completes them, the same on every rank for the same model; those no
        sample reached follow in the registered order. ``verify``: the one-time check against
        autograd runs in this pass (the unclipped sums are formed beside the clipped ones, one
        parameter's kept until autograd's gradient of it is compared). Returns what it failed."""
        stream, failed, deferred = self._stream, [], []
        # without a sink the sums go to p.grad, which the check uses for autograd's gradient: after it
        hand_on = (lambda name, clipped: deferred.append((name, clipped))) if verify and self.grad_sink is None else self._hand_on
        stream.start_sums(factors, keep if self.last_dropped else None, self.shapes, hand_on, verify)
        self._calls, self._collecting = calls, True
        try:
            if verify:
                failed = self._backward_against_autograd(loss, calls, factors, stream.add_unclipped)
            else:
                torch.autograd.grad(loss, [c.dummy for c in calls], allow_unused=True)
            stream.finish()
        finally:
            self._collecting, self._calls, self._stream = False, [], None
        for name, clipped in deferred:
            self._hand_on(name, clipped)
        for name in self.shapes:
            if name not in stream.done:
                self._hand_on(name, None)
        return failed

    def _add_collected(self, weights: Tensor):
        """``add(name, out)``: adds the sum of ``name``'s collected contributions, weighted per sample, into ``out``."""

        def add(name: str, out: Tensor) -> None:
            for c in self._collected.get(name, []):
                C.weighted_sum(c, weights, out=out)

        return add

    def _direct(self, c: C.Outer) -> bool:
        if self.norm == "l1":  # its norms build the per-sample gradients in chunks and drop them
            return False
        if self.strategy == "auto":
            return c.prefers_direct()
        return self.strategy == "direct"

    def _norm_part(self, contribs: list[C.Contribution], cache: dict) -> Tensor:
        """One parameter's share of each sample's norm: its squared L2 norm, or its L1 norm."""
        return self._squared_norm(contribs, cache) if self.norm == "l2" else C.l1_norms(contribs)

    @staticmethod
    def _squared_norm(contribs: list[C.Contribution], cache: dict) -> Tensor:
        total = sum(C.inner(c, c, cache) for c in contribs)
        for a, b in itertools.combinations(contribs, 2):
            total = total + 2 * C.inner(a, b, cache)
        return total

    def _backward_against_autograd(self, loss: Tensor, calls: list, like: Tensor, add_rebuilt) -> list[str]:
        """A backward pass of the clipper's that also accumulates autograd's batch gradient of
        every parameter; each gradient is compared, as it is accumulated, with the unclipped sum
        rebuilt from its module's contributions (received earlier in the same pass;
        ``add_rebuilt(name, out)`` adds it into ``out``), then dropped. One parameter's gradient
        at a time: no second copy of the model. ``like``: the accumulation dtype and device.
        Returns the names of the parameters that do not match."""
        params = self.parameters
        rtol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(params[0].dtype, 5e-2)
        if any(c.low_precision for c in calls):  # autograd's batch gradient went through bf16/fp16 matmuls
            rtol = 5e-2
        failed: list[str] = []

        def compare(p: Tensor, ref: Tensor | None) -> None:
            # the difference built in place on autograd's gradient: one full-size tensor at a time
            diff = torch.zeros(p.shape, dtype=like.dtype, device=like.device) if ref is None else ref.to(like.dtype).neg_()
            scale = diff.norm()
            add_rebuilt(self.names[p], diff)
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


class _Stream:
    """two_pass: reduces each parameter's contributions as they arrive, once its last use is in.
    First pass: each parameter's share of the per-sample norms (``norm_part``, added into
    ``parts``). Second pass: the clipped sum, handed on at once."""

    def __init__(self, uses: dict[str, int], parts: Tensor, norm_part) -> None:
        self.uses, self.parts, self.norm_part = uses, parts, norm_part
        self.pending: dict[str, int] = dict(uses)
        self.kept: dict = {}  # what came of the parameters whose other uses are still to come
        self.gram_cache: dict = {}  # layers fed the same input (q/k/v) arrive one after another
        # the inputs whose Grams are cached, held so that their memory (the cache's key) cannot be
        # reused by a later layer's input while the entry lives: checkpointing frees each as it goes
        self.gram_sources: list[Tensor] = []
        self.sums = False
        self.done: set[str] = set()

    def start_sums(self, factors: Tensor, keep: Tensor | None, shapes: dict, hand_on, verify: bool) -> None:
        """``keep``: the samples kept, when some were dropped (their rows are zeroed). ``verify``:
        also form the unclipped sums, for the check against autograd."""
        self.pending, self.kept, self.gram_cache, self.gram_sources, self.scaled = dict(self.uses), {}, {}, [], {}
        self.factors, self.keep, self.shapes, self.hand_on, self.sums = factors, keep, shapes, hand_on, True
        self.unclipped: dict[str, Tensor] | None = {} if verify else None

    def add_unclipped(self, name: str, out: Tensor) -> None:
        value = self.unclipped.pop(name, None)
        if value is not None:
            out.view(-1).add_(value.view(-1))

    def add(self, name: str, c: C.Contribution) -> None:
        if self.sums:
            if self.keep is not None:
                c = C.zero_samples(c, self.keep)
            self.kept[name] = C.weighted_sum(c, self.factors, self.scaled, out=self.kept.get(name))
            if self.unclipped is not None:  # no shared scaling cache: these weights are others
                ones = torch.ones_like(self.factors)
                self.unclipped[name] = C.weighted_sum(c, ones, out=self.unclipped.get(name))
        else:
            self.kept.setdefault(name, []).append(c)
        self.pending[name] = self.pending.get(name, 1) - 1
        if self.pending[name] <= 0:
            self._reduce(name)

    def _reduce(self, name: str) -> None:
        value = self.kept.pop(name)
        if self.sums:
            self.done.add(name)
            self.hand_on(name, value.view(self.shapes[name]))
            return
        if len(self.gram_cache) > 1:  # only the latest input's Gram can be shared by what follows
            self.gram_cache.clear()
            self.gram_sources.clear()
        self.gram_sources.extend(c.right for c in value if isinstance(c, C.Outer))
        self.parts += self.norm_part(value, self.gram_cache)

    def finish(self) -> None:
        """Parameters some of whose uses got no gradient: reduce what came."""
        for name in list(self.kept):
            self._reduce(name)
        self.gram_cache, self.gram_sources = {}, []
