"""The stateful accountant: what a run has spent, step by step, across resumes."""

from __future__ import annotations

from dpllm.privacy.accounting import check_arguments, epsilon_of_history


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

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        check_arguments(noise_multiplier, sample_rate, count, self.delta, self.accountant)
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += count
        else:
            self.history.append([noise_multiplier, sample_rate, count])

    def epsilon(self) -> float:
        key = self.steps
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, epsilon_of_history([tuple(h) for h in self.history], self.delta, self.accountant))
        return self._cached[1]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> float:
        """Epsilon if ``count`` more such steps ran (for the budget guard); the history is unchanged."""
        history = [tuple(h) for h in self.history] + [(noise_multiplier, sample_rate, count)]
        return epsilon_of_history(history, self.delta, self.accountant)

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
        return {"delta": self.delta, "accountant": self.accountant, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state["delta"] != self.delta or state["accountant"] != self.accountant:
            raise ValueError(
                f"checkpoint accountant ({state['accountant']}, delta={state['delta']}) differs from this run's "
                f"({self.accountant}, delta={self.delta})"
            )
        self.history = [list(h) for h in state["history"]]
        self._cached = None
