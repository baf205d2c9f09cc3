"""Which configuration a user is served, and the guard that keeps personalization from hurting.

A fit produces a persona and demos, but for some users they judge *worse* than the
default judge (issue 16: 28 of 120 simulated users; on real data the paper reports the
same). Four validation votes judged in one order cannot tell which users, so after a fit
:meth:`~synth_agent.engine.synthesize.Synthesizer.select_configuration` estimates every
configuration on **all** of the user's context votes by k-fold cross-validation:

* per fold, a persona is written from the verified traces of the *other* folds only and a
  demo set is drawn (with the fit's own recipe) from the other folds only, so no estimate
  has seen the labels of the votes it is scored on;
* every vote of the fold is judged in **both** presentation orders (or one, :attr:`SelectionConfig.orders`)
  by the candidate configurations and ``default`` (no user information);
* judgments go through the user's judgment ledger, so a refit pays only for what changed;
* the per-vote evidence is stored (:attr:`Selection.per_vote`): an incremental refit judges only the
  user's new votes with the current persona and demos, checks they agree with it (:meth:`Selection.drifted`)
  and extends it (:meth:`Selection.extend`), see :meth:`~synth_agent.engine.synthesize.Synthesizer.update`.

**The guard** (:func:`choose`) then serves a personalized configuration only where the
evidence says it beats the default *for this user*. Per vote, the paired difference
``d = correct(config) - correct(default)`` (both orders, so ``d`` ∈ {-2..2}) gives the user's
measured gain ``g`` (mean of ``d``) and its standard error ``s``. Seventeen-odd votes are little
evidence, so the gain is read as a Bayesian posterior that also knows how much personalization
gains across the tenant's *other* users (:func:`population_prior`): their gains say what a user's gain
typically is (``mu``) and how much it really differs between users (``tau``). Twenty-odd noisy gains pin
``tau`` down poorly, so it is integrated out rather than estimated: the prior is a mixture over ``tau`` of
normals ``N(mu(tau), tau² + Var mu(tau))`` weighted by how well each ``tau`` explains the other users' gains,
and the user's posterior is the same mixture updated by their own ``g`` and ``s``. A configuration is
*eligible* when the posterior's 5% quantile (``z`` = :attr:`SelectionConfig.z`, 1.645 ≈ 95% one-sided
posterior probability of a gain) is above zero; the served configuration is the eligible one with the
largest posterior mean gain, else the default judge and no persona. While a tenant has fewer than
:attr:`SelectionConfig.min_prior_users` users with a selection there is no prior, and the bound is the
plain one, ``g - z·s`` (stricter: fewer users are served a persona).

Why a mixture and not one normal with ``tau`` estimated by moments (the rule before): when the other
users' spread looks like pure measurement noise the estimate of ``tau`` collapses to its floor, the
tenant's mean then decides for everyone, and users whose own votes show no gain are served a persona.
On six simulated populations (seeds 0–14, with and without 25% noise users, 720 users) the point estimate
put 13 and 15 of 120 users below the default on two of them; the mixture keeps every population at
10 of 120 or fewer (``docs/results.md``).

Candidates are :attr:`SelectionConfig.candidates` — persona + demos only, by default. Persona only
and demos only can be made candidates (or cross-validated for the record with ``score_all``),
but on the simulator letting them compete served them to users they hurt (six populations, 720
users: 56 or 74 below the default instead of 43, at no gain in mean; ``bench/eval_seeds.py --sweep`` prints
every variant and ``docs/personalization.md`` the figures). A persona version later shown by live A/B traffic to lose to the plain answer is
*demoted* (:func:`demoted`), which also serves the default.

What is served where (:func:`served` reads it off a profile, every serving path uses it):

=================  ===================================  ============================
served             judge (``Judge.from_profile``)        chat / proxy system prompt
=================  ===================================  ============================
``persona_demos``  persona + selected demos              the persona
``persona``        persona, no demos                     the persona
``demos``          step 1's demos, no persona            none
``default``        default judge                         none
=================  ===================================  ============================

Profiles saved before selection existed (no ``meta["selection"]``) serve persona + demos.

    >>> sel = choose({"default": [1, 1, 0, 1], "persona_demos": [2, 1, 1, 2],
    ...               "persona": [1, 1, 0, 1], "demos": [1, 2, 0, 1]}, z=1.0, candidates=("persona_demos", "demos"))
    >>> sel.served, sel.cv_accuracy["persona_demos"], sel.lower_bound["persona_demos"], sel.lower_bound["demos"]
    ('persona_demos', 0.75, 0.25, 0.0)
    >>> sel.rechoose(1.0, {"persona_demos": GainPrior(-0.5, 0.01)})  # a tenant where it never helps
    'default'
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from synth_agent.models import Demo, PersonaProfile

__all__ = [
    "CONFIGURATIONS",
    "Configuration",
    "GainPrior",
    "Selection",
    "SelectionConfig",
    "choose",
    "demoted",
    "population_prior",
    "served",
    "served_demos",
    "served_persona",
    "settled",
    "tenant_prior",
]

Configuration = Literal["persona_demos", "persona", "demos", "default"]
CONFIGURATIONS: tuple[Configuration, ...] = ("persona_demos", "persona", "demos", "default")
"""Every configuration cross-validation scores, persona + demos first."""
PERSONALIZED: tuple[Configuration, ...] = ("persona_demos", "persona", "demos")
TAU_MIN, TAU_MAX, TAU_GRID_POINTS = 0.02, 1.0, 40
"""The grid :func:`population_prior` integrates the between-user spread ``tau`` over (per-vote gain, out of 2:
1 to 50 accuracy points)."""


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))  # as FitConfig
class SelectionConfig:
    """Knobs of cross-validated selection and the per-user guard.

    ``enabled=False`` skips selection (the profile then serves persona + demos, as before issue 16).
    ``folds``: k of the k-fold cross-validation over the user's context votes.
    ``z``: the guard's one-sided confidence multiplier (1.645 ≈ 95%, 1.28 ≈ 90%); larger serves the
    default to more users. ``candidates``: the personalized configurations the guard may serve (only
    these and the default are cross-validated unless ``score_all``).
    ``min_prior_users``: other users of the tenant with a selection needed before their gains form
    the prior (``bench/eval_seeds.py --sweep`` prints the trade-off of ``z`` and ``candidates``).
    """

    enabled: bool = True
    folds: int = 3
    z: float = 1.645
    candidates: tuple[str, ...] = Field(default=("persona_demos",), strict=False)  # a list is fine too
    min_prior_users: int = 8
    orders: int = 2
    """Presentation orders each cross-validated vote is judged in: 2 (both), or 1 — the order the fit's
    default judge already judged it in (its bootstrap trace's), so the default judge's verdicts cost nothing
    and the personalized judges pay half. A one-order verdict counts 0 or 2 (the unit stays "out of 2")."""
    score_all: bool = False
    """Cross-validate persona only and demos only even when they are not candidates (for measurement:
    ``bench/eval_seeds.py`` sets it; a fit then costs about twice the selection judgments)."""
    stop_early: bool = True
    """Judge the cross-validated votes in up to three waves and stop as soon as the guard's decision cannot
    change whatever the remaining votes' judgments turn out to be (:func:`settled`, one candidate only): the
    served configuration is exactly the one full judging gives under the fit's prior; the stored evidence then
    covers the votes judged (:attr:`Selection.skipped` lists the others, with what judging them needs). An
    incremental refit judges the skipped votes first (:meth:`~synth_agent.engine.synthesize.Synthesizer.complete_selection`),
    so it extends exactly the evidence full judging would have stored; ``synth-agent eval``'s leave-one-out prior
    re-applies the guard to the smaller evidence (docs/llm.md, "Stopping cross-validation early")."""

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError("selection folds must be at least 2")
        if not (math.isfinite(self.z) and self.z >= 0):
            raise ValueError("selection z must be a finite number >= 0")
        bad = [c for c in self.candidates if c not in PERSONALIZED]
        if bad or not self.candidates:
            raise ValueError(f"selection candidates must be a non-empty subset of {PERSONALIZED}, got {self.candidates}")
        if self.min_prior_users < 2:
            raise ValueError("selection min_prior_users must be at least 2")
        if self.orders not in (1, 2):
            raise ValueError("selection orders must be 1 or 2")


@dataclass(frozen=True)
class GainPrior:
    """Prior on a configuration's per-vote gain over the default (correct judgments out of 2).

    A normal ``N(mean, var)``, or — what :func:`population_prior` builds — a mixture of normals
    ``components`` = ``((weight, mean, var), ...)`` (``mean``/``var`` then summarise it by moments).
    """

    mean: float
    var: float
    components: tuple[tuple[float, float, float], ...] = ()

    def parts(self) -> tuple[tuple[float, float, float], ...]:
        return self.components or ((1.0, self.mean, self.var),)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _mixture_quantile(parts: Sequence[tuple[float, float, float]], q: float) -> float:
    """The ``q``-quantile of a mixture of normals ``(weight, mean, var)`` (bisection on its CDF)."""
    sds = [math.sqrt(v) for _, _, v in parts]
    lo = min(m - 10 * s for (_, m, _), s in zip(parts, sds, strict=True))
    hi = max(m + 10 * s for (_, m, _), s in zip(parts, sds, strict=True))
    for _ in range(80):
        mid = (lo + hi) / 2
        cdf = sum(w * _phi((mid - m) / s) for (w, m, _), s in zip(parts, sds, strict=True))
        lo, hi = (mid, hi) if cdf < q else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Selection:
    """What cross-validation found for one user, as stored in ``profile.meta["selection"]``.

    ``cv_accuracy``: per configuration, correct / judged over every context vote in both orders.
    ``gain`` / ``gain_sd``: per personalized configuration, the mean and standard deviation of the
    per-vote paired difference to the default (correct judgments out of 2), so the guard can be
    re-applied (:meth:`rechoose`) with another ``z`` or prior without judging again.
    ``lower_bound``: the guard's bound on the gain, in accuracy points (0.05 = 5 points), under
    ``prior`` (the tenant prior used, if any).
    """

    served: Configuration
    cv_accuracy: dict[str, float]
    lower_bound: dict[str, float]
    n_votes: int
    n_judgments: int
    folds: int = 0
    z: float = 1.645
    gain: dict[str, float] = field(default_factory=dict)
    gain_sd: dict[str, float] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=lambda: ["persona_demos"])
    prior: dict[str, list[float]] | None = None
    vote_ids: list[str] = field(default_factory=list)
    """The votes judged, in the order of ``per_vote``'s lists (empty in selections saved before refits kept them)."""
    per_vote: dict[str, list[int]] = field(default_factory=dict)
    """Per configuration, correct judgments per vote out of 2: the evidence an incremental refit extends."""
    orders: int = 2
    skipped: list[str] = field(default_factory=list)
    """Context votes left unjudged because the decision was already settled (:attr:`SelectionConfig.stop_early`):
    ``served`` is the guard's decision for every context vote, while ``per_vote``, ``gain``, ``gain_sd``,
    ``cv_accuracy`` and ``n_votes`` describe only the votes judged (``vote_ids``). :meth:`rechoose` answers as
    full judging where the skipped votes cannot change its decision, and reads the judged votes alone otherwise;
    an incremental refit judges them before :meth:`extend` (``skipped_default``, ``fold_ids``, ``fold_personas``)."""
    skipped_default: list[int] = field(default_factory=list)
    """The default judge's counts of the ``skipped`` votes, in that order (judged anyway: they cost nothing in
    one order, and :func:`settled` needed them)."""
    fold_ids: list[list[str]] = field(default_factory=list)
    """With ``skipped`` votes: the cross-validation folds as fitted (vote ids), and ``fold_personas`` the persona
    each fold was judged with, so an incremental refit can judge the skipped votes exactly as the fit would have
    (:meth:`~synth_agent.engine.synthesize.Synthesizer.complete_selection`) before re-applying the guard."""
    fold_personas: list[str] = field(default_factory=list)
    rule: str = "posterior (tenant prior x this user's cross-validated votes) lower bound of the gain over default > 0"

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Selection:
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**known)

    def posterior_parts(self, config: str, prior: GainPrior | None) -> tuple[tuple[float, float, float], ...]:
        """This user's posterior on the gain for ``config`` (per vote, out of 2) as a mixture of normals
        ``(weight, mean, var)``: one per prior component, reweighted by how well it predicts this user's ``g``."""
        g, sd, n = self.gain[config], self.gain_sd[config], self.n_votes
        if n <= 1 or not math.isfinite(sd):
            return prior.parts() if prior is not None else ((1.0, g, math.inf),)
        se2 = max(sd * sd / n, 1e-6)
        if prior is None:
            return ((1.0, g, se2),)
        out = []
        for w, m0, v0 in prior.parts():
            v = 1.0 / (1.0 / se2 + 1.0 / v0)
            like = math.exp(-0.5 * (g - m0) ** 2 / (v0 + se2)) / math.sqrt(v0 + se2)
            out.append((w * like, v * (g / se2 + m0 / v0), v))
        total = sum(w for w, _, _ in out) or 1.0
        return tuple((w / total, m, v) for w, m, v in out)

    def posterior(self, config: str, prior: GainPrior | None) -> tuple[float, float]:
        """(mean, sd) of this user's gain for ``config`` (per vote, out of 2), given ``prior``."""
        parts = self.posterior_parts(config, prior)
        mean = sum(w * m for w, m, _ in parts)
        return mean, math.sqrt(sum(w * (v + (m - mean) ** 2) for w, m, v in parts))

    def bounds(self, z: float, prior: Mapping[str, GainPrior] | None = None) -> dict[str, float]:
        """The guard's lower bound per personalized configuration, in accuracy points: the posterior's
        ``Phi(-z)`` quantile (``mean - z * sd`` for a normal posterior)."""
        out = {}
        for c in self.gain:
            parts = self.posterior_parts(c, (prior or {}).get(c))
            if len(parts) == 1:
                _, m, v = parts[0]
                out[c] = (m - z * math.sqrt(v)) / 2
            else:
                out[c] = _mixture_quantile(parts, _phi(-z)) / 2
        return out

    def rechoose(
        self, z: float, prior: Mapping[str, GainPrior] | None = None, candidates: Sequence[str] | None = None
    ) -> Configuration:
        """The configuration the guard serves at ``z`` under ``prior`` (from the stored statistics).

        Where cross-validation stopped early (``skipped``), the answer is the one judging every vote gives
        whenever the skipped votes cannot change it under this ``z`` and ``prior`` (:func:`settled`); otherwise
        it reads the votes judged alone (an incremental refit judges the skipped votes first)."""
        cands = candidates if candidates is not None else self.candidates
        if self.skipped and len(self.skipped_default) == len(self.skipped) and "default" in self.per_vote:
            decided = settled(self.per_vote, self.skipped_default, z=z, prior=prior, candidates=cands,
                              orders=self.orders)  # fmt: skip
            if decided is not None:
                return decided
        best: Configuration = "default"
        best_gain = 0.0
        bounds = self.bounds(z, prior)
        for c in cands:
            if c not in self.gain or bounds[c] <= 0:
                continue
            m, _ = self.posterior(c, (prior or {}).get(c))
            if m > best_gain:
                best, best_gain = c, m  # type: ignore[assignment]
        return best

    def drifted(self, new: Mapping[str, Sequence[int]], z: float) -> list[str]:
        """Candidates whose gain on ``new`` votes (per-vote correct counts, as ``per_vote``, default included)
        is below the stored gain by more than ``z`` standard errors of the difference (pooled per-vote spread):
        the configuration has gone stale for this user. Empty when the new votes agree with the evidence.

            >>> sel = choose({"default": [1, 1, 0, 1], "persona_demos": [2, 2, 1, 2]}, z=1.0)
            >>> sel.drifted({"default": [0, 1], "persona_demos": [2, 2]}, 1.0), sel.drifted(
            ...     {"default": [2, 2], "persona_demos": [0, 0]}, 1.0)
            ([], ['persona_demos'])
        """
        out = []
        for c in self.candidates:
            if c not in self.per_vote or c not in new or "default" not in self.per_vote:
                continue
            old_d = [a - b for a, b in zip(self.per_vote[c], self.per_vote["default"], strict=True)]
            new_d = [a - b for a, b in zip(new[c], new["default"], strict=True)]
            if not old_d or not new_d:
                continue
            both = old_d + new_d
            mean = sum(both) / len(both)
            sd = math.sqrt(sum((x - mean) ** 2 for x in both) / max(len(both) - 1, 1))
            gap = sum(old_d) / len(old_d) - sum(new_d) / len(new_d)
            if gap > 0 and gap > z * sd * math.sqrt(1 / len(old_d) + 1 / len(new_d)):
                out.append(c)
        return out

    def extend(
        self,
        vote_ids: Sequence[str],
        new: Mapping[str, Sequence[int]],
        *,
        z: float,
        prior: Mapping[str, GainPrior] | None = None,
        candidates: Sequence[str] | None = None,
    ) -> Selection:
        """This selection with ``new`` votes' per-vote evidence (every stored configuration, default included)
        appended and the guard re-applied: what an incremental refit stores."""
        if set(new) != set(self.per_vote):
            raise ValueError(f"new evidence must cover {sorted(self.per_vote)}, got {sorted(new)}")
        return choose(
            {c: [*self.per_vote[c], *new[c]] for c in self.per_vote}, z=z, folds=self.folds, prior=prior,
            candidates=self.candidates if candidates is None else candidates,
            vote_ids=[*self.vote_ids, *vote_ids], orders=self.orders, skipped=self.skipped,
        )._with_folds(self)  # fmt: skip

    def _with_folds(self, other: Selection) -> Selection:
        """This selection carrying ``other``'s record of skipped votes (their default counts, folds, personas)."""
        return replace(self, skipped_default=list(other.skipped_default), fold_ids=[list(f) for f in other.fold_ids],
                       fold_personas=list(other.fold_personas))  # fmt: skip

    def apply(self, z: float, prior: Mapping[str, GainPrior] | None, candidates: Sequence[str]) -> Selection:
        """This selection with the guard re-applied (served, bounds, prior recorded)."""
        return replace(
            self, served=self.rechoose(z, prior, candidates), lower_bound=self.bounds(z, prior), z=z,
            candidates=list(candidates), prior={c: [p.mean, p.var] for c, p in prior.items()} if prior else None,
        )  # fmt: skip


def choose(
    per_vote: Mapping[str, Sequence[int]],
    *,
    z: float,
    folds: int = 0,
    prior: Mapping[str, GainPrior] | None = None,
    candidates: Sequence[str] = ("persona_demos",),
    vote_ids: Sequence[str] = (),
    orders: int = 2,
    skipped: Sequence[str] = (),
    served: Configuration | None = None,
) -> Selection:
    """The guard: which configuration to serve, from per-vote correct counts (0, 1 or 2 per vote).

    ``per_vote[c][i]`` is how many of vote ``i``'s two presentation orders configuration ``c`` got
    right; every configuration must list the same votes in the same order, ``default`` included.
    ``prior``: the tenant's :func:`population_prior` (None: this user's evidence alone).
    ``vote_ids`` (the votes, in that order), ``orders`` and ``skipped`` are recorded with the evidence.
    ``served``: the decision :func:`settled` found for the whole context when judging stopped early (the
    evidence then covers fewer votes, and the guard applied to it alone may differ); None: the guard's choice.
    """
    base = list(per_vote["default"])
    n = len(base)
    if any(len(per_vote[c]) != n for c in per_vote):
        raise ValueError("every configuration must be scored on the same votes")
    acc = {c: (sum(per_vote[c]) / (2 * n) if n else 0.0) for c in per_vote}
    gain: dict[str, float] = {}
    gain_sd: dict[str, float] = {}
    for c in PERSONALIZED:
        if c not in per_vote:
            continue
        d = [a - b for a, b in zip(per_vote[c], base, strict=True)]
        mean = sum(d) / n if n else 0.0
        gain[c] = mean
        gain_sd[c] = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else math.inf
    sel = Selection(
        served="default", cv_accuracy=acc, lower_bound={}, n_votes=n, n_judgments=orders * n * len(per_vote),
        folds=folds, gain=gain, gain_sd=gain_sd, vote_ids=list(vote_ids),
        per_vote={c: list(per_vote[c]) for c in per_vote}, orders=orders, skipped=list(skipped),
    )  # fmt: skip
    sel = sel.apply(z, prior, candidates)
    return sel if served is None else replace(sel, served=served)


def _reachable(remaining_default: Sequence[int | None], orders: int) -> dict[tuple[int, int], tuple[int, ...]]:
    """Every (sum, sum of squares) the unjudged votes' paired differences ``d`` can reach, each with one list of
    ``d`` reaching it (the guard and the drift test read the votes only through those two sums)."""
    counts = (0, 2) if orders == 1 else (0, 1, 2)
    states: dict[tuple[int, int], tuple[int, ...]] = {(0, 0): ()}
    for cd in remaining_default:
        opts = {c - b for c in counts for b in ((cd,) if cd is not None else counts)}
        states = {(s + x, q + x * x): rest + (x,) for (s, q), rest in states.items() for x in opts}
    return states


def settled(
    per_vote: Mapping[str, Sequence[int]],
    remaining_default: Sequence[int | None],
    *,
    z: float,
    prior: Mapping[str, GainPrior] | None = None,
    candidates: Sequence[str] = ("persona_demos",),
    orders: int = 2,
) -> Configuration | None:
    """The configuration the guard serves whatever the unjudged votes turn out to be, or None if they could
    still change it.

    ``per_vote``: correct counts of the votes judged so far (as :func:`choose` takes them, ``default`` included);
    ``remaining_default``: per unjudged vote, the default judge's count where already known, else None. Each
    unjudged vote can add a paired difference ``d = c - c_default`` with ``c`` in {0, 2} (one order) or {0, 1, 2}
    (both); the guard reads the votes only through the sum and the sum of squares of ``d`` (mean and standard
    deviation), so every reachable (sum, sum of squares) is enumerated and the guard's own rule
    (:meth:`Selection.rechoose`) applied to each: one answer for all of them is the answer of full judging.
    One candidate only (None otherwise: with several, the choice between them would need their joint outcomes).

        >>> settled({"default": [0, 0, 0], "persona_demos": [2, 2, 2]}, [0], z=1.645, orders=1)  # 4th vote: d 0 or 2
        'persona_demos'
        >>> settled({"default": [0, 0, 0], "persona_demos": [2, 2, 2]}, [2, 2, 2], z=1.645, orders=1) is None
        True
    """
    if len(candidates) != 1 or candidates[0] not in per_vote:
        return None
    (cand,) = candidates
    known = [a - b for a, b in zip(per_vote[cand], per_vote["default"], strict=True)]
    states = _reachable(remaining_default, orders)
    n = len(known) + len(remaining_default)
    if n < 2:
        return None
    # the extremes first: if the decision can flip, they usually show it at once
    order = sorted(states, key=lambda sq: -abs(sq[0]))
    answer: Configuration | None = None
    for key in order:
        d = [*known, *states[key]]
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        sel = Selection(served="default", cv_accuracy={}, lower_bound={}, n_votes=n, n_judgments=0,
                        gain={cand: mean}, gain_sd={cand: sd}, candidates=[cand])  # fmt: skip
        got = sel.rechoose(z, prior, candidates)
        if answer is None:
            answer = got
        elif got != answer:
            return None
    return answer


def population_prior(selections: Sequence[Selection], *, min_users: int = 8) -> dict[str, GainPrior]:
    """Hierarchical prior per configuration from other users' selections.

    The other users' measured gains ``g_j`` (standard errors ``s_j``) are modelled as
    ``g_j ~ N(mu, tau² + s_j²)``: ``mu`` the tenant's typical gain, ``tau`` the real spread between users.
    Twenty-odd noisy gains pin neither down, and a point estimate of ``tau`` that comes out small (it often
    does: the spread of the gains is mostly measurement noise) would let the tenant's mean decide for every
    user — on the simulator that served personas to noise users whose own evidence showed no gain. So
    ``tau`` is integrated out on a grid (uniform prior on ``tau``, ``mu`` flat and integrated analytically),
    and the prior for a new user is a mixture over ``tau`` of ``N(mu_hat(tau), tau² + Var(mu_hat(tau)))``
    weighted by how well each ``tau`` explains the others' gains. Empty with fewer than ``min_users``
    usable selections.
    """
    out: dict[str, GainPrior] = {}
    for c in PERSONALIZED:
        pts = [(s.gain[c], max(s.gain_sd[c] ** 2 / s.n_votes, 1e-6)) for s in selections
               if c in s.gain and s.n_votes > 1 and math.isfinite(s.gain_sd[c])]  # fmt: skip
        if len(pts) < min_users:
            continue
        comps = []
        for k in range(TAU_GRID_POINTS):
            tau = TAU_MIN * (TAU_MAX / TAU_MIN) ** (k / (TAU_GRID_POINTS - 1))
            w = [1.0 / (tau * tau + se2) for _, se2 in pts]
            sw = sum(w)
            mu = sum(wi * g for wi, (g, _) in zip(w, pts, strict=True)) / sw
            loglik = 0.5 * sum(math.log(wi) for wi in w) - 0.5 * math.log(sw) - 0.5 * sum(
                wi * (g - mu) ** 2 for wi, (g, _) in zip(w, pts, strict=True)
            )
            comps.append((loglik + math.log(tau), mu, tau * tau + 1.0 / sw))  # + log tau: grid is log-spaced
        top = max(lw for lw, _, _ in comps)
        weights = [math.exp(lw - top) for lw, _, _ in comps]
        total = sum(weights)
        parts = tuple((wi / total, m, v) for wi, (_, m, v) in zip(weights, comps, strict=True) if wi / total > 1e-9)
        mean = sum(w * m for w, m, _ in parts)
        var = sum(w * (v + (m - mean) ** 2) for w, m, v in parts)
        out[c] = GainPrior(mean, var, parts)
    return out


async def tenant_prior(memory: Any, user_id: str, config: SelectionConfig, *, limit: int = 500) -> dict[str, GainPrior]:
    """The prior for ``user_id`` from the current selections of up to ``limit`` other users of the same
    tenant (``memory``: a ``PreferenceMemory``; anything without ``list_users``/``current_persona`` gives none)."""
    list_users = getattr(memory, "list_users", None)
    current = getattr(memory, "current_persona", None)
    if list_users is None or current is None:
        return {}
    others = [u for u in await list_users() if u != user_id][:limit]
    profiles = await asyncio.gather(*(current(u) for u in others))
    sels = [
        Selection.from_meta(p.meta["selection"]) for p in profiles
        if p is not None and isinstance(p.meta.get("selection"), Mapping) and p.meta["selection"].get("gain")
    ]  # fmt: skip
    return population_prior(sels, min_users=config.min_prior_users)


# ---------------------------------------------------------------- serving

def demoted(profile: PersonaProfile) -> bool:
    """True when live A/B traffic showed this persona version losing to the plain answer."""
    return bool(profile.meta.get("demoted"))


def served(profile: PersonaProfile | None) -> Configuration:
    """The configuration the guard serves for ``profile`` (``default`` for no profile or a demoted one)."""
    if profile is None or demoted(profile):
        return "default"
    sel = profile.meta.get("selection")
    if not isinstance(sel, Mapping):
        return "persona_demos"  # fitted before selection existed: served as it always was
    s = sel.get("served")
    return s if s in CONFIGURATIONS else "persona_demos"


def served_persona(profile: PersonaProfile | None) -> str | None:
    """The persona text to inject as a system prompt / give the judge, or None where the guard says no."""
    if profile is None or served(profile) not in ("persona_demos", "persona"):
        return None
    return profile.persona


def served_demos(profile: PersonaProfile | None) -> list[Demo]:
    """The judge's few-shot demos under the guard (step 1's for ``demos``, none for ``persona``/``default``)."""
    s = served(profile)
    if profile is None or s in ("persona", "default"):
        return []
    if s == "demos":
        return [Demo.model_validate(d) for d in profile.meta.get("bootstrap_demos") or []]
    return list(profile.demos)
