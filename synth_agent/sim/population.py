"""Simulated users with hidden preferences over response traits, and their A/B votes.

A :class:`SimUser` prefers responses by a Bradley-Terry choice on trait-score
differences, ``P(a) = sigmoid(w . (t(a) - t(b)) / noise)``. Weights are sparse
(2-3 strong traits) and their signs vary across users, so no single generic
taste predicts the population well. Optionally some users are pure noise (all weights
zero: every vote a coin flip), to test that personalization is withheld where it cannot help. The hidden weights never leave this module
except through :meth:`Population.user` (for oracle/ceiling accuracy in tests and
evaluation); the simulated LLM sees only prompt text.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from synth_agent.models import Message, Vote
from synth_agent.sim.generator import PROMPT_POOL, random_levels, render_response
from synth_agent.sim.traits import TRAITS, trait_vector

BASE_NOISE = 0.5
"""Choice temperature; calibrated so an oracle knowing the weights gets ~85% of a user's votes."""

EPOCH = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class SimUser:
    """A simulated user: opaque id, hidden trait weights, choice noise."""

    user_id: str
    weights: dict[str, float]
    noise: float = BASE_NOISE

    @property
    def is_noise(self) -> bool:
        """True for a user without preferences (all hidden weights zero): every vote is a coin flip."""
        return not any(self.weights.values())

    @property
    def weight_vector(self) -> np.ndarray:
        return np.array([self.weights.get(t, 0.0) for t in TRAITS], dtype=float)

    def utility_margin(self, a_text: str, b_text: str) -> float:
        """``w . (t(a) - t(b))``: positive when this user leans to ``a``."""
        return float(self.weight_vector @ (trait_vector(a_text) - trait_vector(b_text)))

    def p_choose_a(self, a_text: str, b_text: str) -> float:
        return _sigmoid(self.utility_margin(a_text, b_text) / self.noise)

    def choose(self, a_text: str, b_text: str, rng: np.random.Generator) -> bool:
        """Sample the user's vote: True if ``a`` is chosen."""
        return bool(rng.random() < self.p_choose_a(a_text, b_text))

    def oracle_prefers_a(self, a_text: str, b_text: str) -> bool:
        """What an oracle that knows the hidden weights predicts (ties go to ``a``)."""
        return self.utility_margin(a_text, b_text) >= 0.0


POPULATION_TILT: dict[str, float] = {
    "length": 0.7,
    "bullets": 0.7,
    "headings": 0.7,
    "examples": 0.7,
    "emoji": 0.3,
    "hedging": 0.3,
}
"""P(a strong weight on this trait is positive); 0.5 elsewhere. A weak population-wide taste."""
STRONG_TRAITS = (2, 4)
"""A user has between 2 and 3 strong traits (upper bound exclusive)."""


def random_weights(rng: np.random.Generator) -> dict[str, float]:
    """2-3 strong traits (|w| in 1.5-3, mostly random sign), small weights elsewhere."""
    k = int(rng.integers(*STRONG_TRAITS))
    strong = set(rng.choice(len(TRAITS), size=k, replace=False).tolist())
    out: dict[str, float] = {}
    for i, t in enumerate(TRAITS):
        if i in strong:
            sign = 1 if rng.random() < POPULATION_TILT.get(t, 0.5) else -1
            out[t] = float(rng.uniform(1.5, 3.0) * sign)
        else:
            out[t] = float(rng.normal(0.0, 0.15))
    return out


_NAMES = (
    "Zoë Müller",
    "李雷",
    "Ана Петрова",
    "José Ñúñez",
    "O'Brien, Siobhán",
    "محمد علي",
    "Søren Kierkegaard-Ås",
    "Ngozi Okonjo 🙂",
    "Dvořák Antonín",
    "山田 花子",
    "Łukasz Żółć",
    "Renée D'Arcy",
    "Ελένη Παππά",
    "user #42 (test)",
)
_EMAIL_LOCAL = (
    "ana",
    "li.wei",
    "zoë",
    "j.o'neil+votes",
    "marta_k",
    "ömer",
    "sam.smith",
    "kim-jisoo",
    "raj",
    "élodie",
)
_EMAIL_DOMAIN = ("example.com", "example.org", "mail.example.net", "bücher.example")


def _user_id(i: int, rng: np.random.Generator) -> str:
    kind = i % 3
    if kind == 0:
        local = _EMAIL_LOCAL[int(rng.integers(len(_EMAIL_LOCAL)))]
        dom = _EMAIL_DOMAIN[int(rng.integers(len(_EMAIL_DOMAIN)))]
        return f"{local}{i}@{dom}"
    if kind == 1:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return f"{_NAMES[int(rng.integers(len(_NAMES)))]} {i}"


def simulate_votes(
    user: SimUser,
    n_votes: int,
    rng: np.random.Generator,
    start_time: datetime = EPOCH,
    *,
    prompts: Sequence[str] = PROMPT_POOL,
) -> list[Vote]:
    """``n_votes`` votes by ``user``: a pool prompt as context, two random-style candidates,
    chosen/rejected by :meth:`SimUser.choose`, increasing timestamps, distinct ids."""
    votes: list[Vote] = []
    t = start_time
    for _ in range(n_votes):
        prompt, a, b = _candidate_pair(prompts, rng)
        chosen, rejected = (a, b) if user.choose(a, b, rng) else (b, a)
        t = t + timedelta(minutes=int(rng.integers(5, 60 * 24)))
        votes.append(_vote(user, "sim-" + rng.bytes(8).hex(), prompt, chosen, rejected, t))
    return votes


def _candidate_pair(prompts: Sequence[str], rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt, a, b): a pool prompt and two distinct random-style answers to it."""
    prompt = prompts[int(rng.integers(len(prompts)))]
    a = render_response(prompt, random_levels(rng), rng)
    b = render_response(prompt, random_levels(rng), rng)
    while b.strip() == a.strip():
        b = render_response(prompt, random_levels(rng), rng)
    return prompt, a, b


def _vote(
    user: SimUser, vote_id: str, prompt: str, chosen: str, rejected: str, timestamp: datetime | None = None
) -> Vote:
    return Vote(
        id=vote_id,
        user_id=user.user_id,
        context=[Message(role="user", content=prompt)],
        chosen=chosen,
        rejected=rejected,
        timestamp=timestamp,
    )


def decisive_votes(
    user: SimUser,
    n_votes: int,
    rng: np.random.Generator,
    *,
    min_margin: float = 1.5,
    prompts: Sequence[str] = PROMPT_POOL,
) -> list[Vote]:
    """``n_votes`` pairs on which ``user``'s taste is decisive (``|w . (t(a) - t(b))| >= min_margin``,
    i.e. the user picks the same side at least ~95% of the time at the base noise), with ``chosen``
    the response the user prefers in expectation. Quality tests judge against these: a judge
    that has learned the user must get them right, a judge that has not has no reason to.
    Raises ``ValueError`` for a user without such pairs (e.g. a noise user)."""
    if user.is_noise:
        raise ValueError("a noise user has no decisive pairs")
    votes: list[Vote] = []
    tries = 0
    while len(votes) < n_votes:
        tries += 1
        if tries > 1000 * n_votes:
            raise ValueError(f"could not find {n_votes} pairs with margin >= {min_margin} for this user")
        prompt, a, b = _candidate_pair(prompts, rng)
        margin = user.utility_margin(a, b)
        if abs(margin) < min_margin:
            continue
        chosen, rejected = (a, b) if margin > 0 else (b, a)
        votes.append(_vote(user, "sim-decisive-" + rng.bytes(8).hex(), prompt, chosen, rejected))
    return votes


def oracle_accuracy(user: SimUser, votes: Sequence[Vote]) -> float:
    """Share of ``votes`` an oracle knowing ``user``'s hidden weights predicts correctly."""
    if not votes:
        return float("nan")
    return sum(user.oracle_prefers_a(v.chosen, v.rejected) for v in votes) / len(votes)


class Population:
    """A seeded population of simulated users; everything derived from it is deterministic.

    ``noise_fraction`` of the users (rounded; chosen by the seed) are *noise users*: their hidden
    weights are all zero, so each of their votes is a fair coin flip and no judge, personalized
    or not, can beat 50% on them in expectation. The other users are exactly the users of the
    same seed without noise users, so a population with and without them can be compared user
    by user.

    >>> pop = Population(10, seed=0, noise_fraction=0.3)
    >>> len(pop.noise_user_ids)
    3
    >>> [u.weights for u in pop.users if u.user_id not in pop.noise_user_ids] == [
    ...     u.weights for u in Population(10, seed=0).users if u.user_id not in pop.noise_user_ids]
    True
    """

    def __init__(self, n_users: int, seed: int = 0, *, noise_fraction: float = 0.0) -> None:
        if not 0.0 <= noise_fraction <= 1.0:
            raise ValueError("noise_fraction must be between 0 and 1")
        self.seed = int(seed)
        self.noise_fraction = float(noise_fraction)
        rng = np.random.default_rng([self.seed, 7919])
        n_noise = round(noise_fraction * n_users)
        noisy = set(np.random.default_rng([self.seed, 7919, 1]).permutation(n_users)[:n_noise].tolist())
        users: list[SimUser] = []
        seen: set[str] = set()
        for i in range(n_users):
            uid = _user_id(i, rng)
            while uid in seen:
                uid += "'"
            seen.add(uid)
            weights = random_weights(rng)
            noise = BASE_NOISE * float(rng.uniform(0.85, 1.15))
            if i in noisy:  # drawn all the same, so the other users do not depend on noise_fraction
                weights = dict.fromkeys(TRAITS, 0.0)
            users.append(SimUser(uid, weights, noise))
        self.users: list[SimUser] = users
        self._by_id = {u.user_id: (i, u) for i, u in enumerate(users)}

    @property
    def noise_user_ids(self) -> list[str]:
        """Ids of the users whose votes are pure noise (see the class docstring)."""
        return [u.user_id for u in self.users if u.is_noise]

    def __len__(self) -> int:
        return len(self.users)

    @property
    def user_ids(self) -> list[str]:
        return [u.user_id for u in self.users]

    def user(self, user_id: str) -> SimUser:
        """The hidden user behind ``user_id`` (for oracle accuracy; never give it to the judge)."""
        try:
            return self._by_id[user_id][1]
        except KeyError:
            raise KeyError(f"no simulated user {user_id!r} in this population") from None

    def votes(self, user_id: str, n_votes: int, *, salt: int = 0) -> list[Vote]:
        """``n_votes`` deterministic votes of one user; another ``salt`` gives fresh (e.g. held-out) votes."""
        index, user = self._by_id[user_id]
        rng = np.random.default_rng([self.seed, index, salt])
        start = EPOCH + timedelta(days=index) + timedelta(days=400 * salt)
        return simulate_votes(user, n_votes, rng, start)

    def all_votes(self, n_votes: int, *, salt: int = 0) -> list[Vote]:
        return [v for u in self.users for v in self.votes(u.user_id, n_votes, salt=salt)]


def vote_to_json(v: Vote) -> dict[str, object]:
    """A vote in the JSONL data format of the design brief."""
    return {
        "id": v.id,
        "user_id": v.user_id,
        "context": [{"role": m.role, "content": m.content} for m in v.context],
        "chosen": v.chosen,
        "rejected": v.rejected,
        "timestamp": v.timestamp.isoformat() if v.timestamp else None,
    }


def write_population_jsonl(
    path: str | Path, n_users: int, n_votes: int, seed: int = 0, *, noise_fraction: float = 0.0
) -> Population:
    """Write ``n_users`` x ``n_votes`` votes, one JSON object a line; return the population.
    ``noise_fraction``: share of users whose votes are pure noise (see :class:`Population`)."""
    pop = Population(n_users, seed, noise_fraction=noise_fraction)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for v in pop.all_votes(n_votes):
            fh.write(json.dumps(vote_to_json(v), ensure_ascii=False) + "\n")
    return pop
