"""The stateful accountant: what a run has spent, step by step, across resumes."""

from __future__ import annotations

from dpllm.privacy import lmo
from dpllm.privacy.accounting import check_arguments, composed_pld, epsilon_of_history, step_pld


class _RunningPLD:
    """The PLD of a growing history, extended one step at a time.

    Epsilon is reported every step, and self-composing the whole history anew costs several
    times composing one more step onto the last total. The composition is anchored so that its
    value depends on the history alone, never on which steps were queried: n steps of the last
    segment are (earlier segments) o p^a o p o ... o p, with a = n rounded down to a multiple of
    ``anchor_every`` self-composed at once. A resumed run so reports what an uninterrupted one
    does, and a query after a gap (a resume, a sparse ``log_every``) costs one self-composition
    and at most ``anchor_every - 1`` single-step ones.
    """

    anchor_every = 16

    def __init__(self) -> None:
        self._key = None  # (earlier segments, noise multiplier, sample rate, anchor)
        self._pld = None
        self._steps = 0  # steps of the last segment in self._pld

    def epsilon(self, segments: list[tuple[float, float, int]], delta: float) -> float:
        *earlier, (sigma, q, n) = segments
        anchor = n // self.anchor_every * self.anchor_every
        key = (tuple(earlier), sigma, q, anchor)
        if key != self._key or self._steps > n:
            parts = earlier + ([(sigma, q, anchor)] if anchor else [])
            self._key, self._pld, self._steps = key, composed_pld(parts), anchor
        step = step_pld(sigma, q)
        while self._steps < n:
            self._pld = step if self._pld is None else self._pld.compose(step)
            self._steps += 1
        return max(self._pld.get_epsilon_for_delta(delta), 0.0)


class PrivacyAccountant:
    """Records (noise_multiplier, sample_rate) steps as run-length segments and reports epsilon.

    Its state is the history itself, so a resumed run composes exactly the steps that ran,
    whatever the earlier runs used.
    """

    def __init__(self, delta: float, accountant: str = "pld") -> None:
        check_arguments(1.0, 1.0, 0, delta, accountant)
        self.delta = delta
        self.accountant = accountant
        self.history: list[list] = []  # [noise_multiplier, sample_rate, steps]
        self._cached: tuple[int, float] | None = None
        self._running = _RunningPLD()

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        self._check(noise_multiplier, sample_rate, count)
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += count
        else:
            self.history.append([noise_multiplier, sample_rate, count])

    def epsilon(self) -> float:
        key = self.steps
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._epsilon_now())
        return self._cached[1]

    def _check(self, noise_multiplier: float, sample_rate: float, count: int) -> None:
        check_arguments(noise_multiplier, sample_rate, count, self.delta, self.accountant)

    def _epsilon_of(self, history: list[tuple]) -> float:
        return epsilon_of_history(history, self.delta, self.accountant)

    def _epsilon_now(self) -> float:
        segments = [tuple(h) for h in self.history if h[2] > 0]
        if self.accountant != "pld" or not segments or any(s == 0 for s, _, _ in segments):
            return epsilon_of_history(segments, self.delta, self.accountant)  # RDP is cheap; 0 and inf are immediate
        return self._running.epsilon(segments, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> float:
        """Epsilon if ``count`` more such steps ran (for the budget guard); the history is unchanged."""
        return self._epsilon_of([tuple(h) for h in self.history] + [(noise_multiplier, sample_rate, count)])

    def steps_within(self, noise_multiplier: float, sample_rate: float, target_epsilon: float, limit: int) -> int:
        """How many more such steps (at most ``limit``) keep the total epsilon within the target."""
        if limit <= 0 or self.epsilon_after(noise_multiplier, sample_rate, limit) <= target_epsilon:
            return max(limit, 0)
        lo, hi = 0, limit  # epsilon_after(lo) fits (or lo == 0), epsilon_after(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(noise_multiplier, sample_rate, mid) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> dict:
        state = {"delta": self.delta, "accountant": self.accountant, "history": [list(h) for h in self.history]}
        mechanism = self._mechanism_state()
        return state if mechanism is None else {**state, "mechanism": mechanism}

    def _mechanism_state(self) -> dict | None:
        """What the history's noise multipliers are multipliers of (None: the Gaussian)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        if state.get("mechanism") != self._mechanism_state():
            # not even an accepted mismatch can compose a history of another mechanism's steps
            raise ValueError(
                f"the checkpoint's steps ran mechanism {state.get('mechanism') or 'gaussian'}, this run's is "
                f"{self._mechanism_state() or 'gaussian'}: its history cannot be accounted here"
            )
        if state["delta"] != self.delta or state["accountant"] != self.accountant:
            raise ValueError(
                f"checkpoint accountant ({state['accountant']}, delta={state['delta']}) differs from this run's "
                f"({self.accountant}, delta={self.delta})"
            )
        self.history = [list(h) for h in state["history"]]
        self._cached = None


class LMOAccountant(PrivacyAccountant):
    """The same history for LMO-DP steps: a step at noise multiplier ``s`` is ``law.scaled(1/s)``
    at L1 sensitivity 1 (the noise and the clipping bound share the unit C), accounted with lmo.py's
    RDP bound."""

    def __init__(self, delta: float, law: lmo.LMONoise) -> None:
        super().__init__(delta)
        self.accountant = "lmo-rdp"
        self.law = law

    def _check(self, noise_multiplier: float, sample_rate: float, count: int) -> None:
        if not 0 < noise_multiplier < float("inf"):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
        lmo.check_arguments(1.0, sample_rate, count, self.delta)

    def _epsilon_of(self, history: list[tuple]) -> float:
        return lmo.epsilon_of_history([(self.law.scaled(1 / s), q, n) for s, q, n in history], self.delta)

    def _epsilon_now(self) -> float:
        return self._epsilon_of([tuple(h) for h in self.history])

    def _mechanism_state(self) -> dict:
        return {"lmo": self.law.to_dict()}
