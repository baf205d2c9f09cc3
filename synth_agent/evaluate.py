"""Evaluation harness: compare judges on held-out votes, per user, with confidence intervals.

Per user the votes are split into context (train + validation, used to fit) and
target (held out). The ``split`` field is used when present; otherwise the split
is temporal 50/20/30 (context-train / context-val / target) as in
PersonalRewardBench. Every target vote is judged in both presentation orders and
each order counts as one judgment, so position bias cannot inflate accuracy.

Methods:

* ``default`` — the judge with no user information;
* ``persona`` — persona only; ``demos`` — bootstrapped demos only (step 1);
* ``persona_demos`` — the full SynthesizeMe profile;
* ``unverified`` — persona + demos fitted *without* trace verification (ablation);
* ``memory`` — a running list of LLM-extracted insights as the judge's context;
* ``served`` — what the per-user guard actually serves after cross-validated selection
  (:mod:`synth_agent.engine.selection`): one of the above four, possibly the default judge;
* ``default_logprob`` / ``persona_demos_logprob`` — the same judges in log-probability mode.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from synth_agent import prompts
from synth_agent.engine.judge import Judge, count_correct
from synth_agent.engine.selection import CONFIGURATIONS, Selection, population_prior
from synth_agent.engine.synthesize import FitConfig, FitResult, Synthesizer, stable_coin
from synth_agent.llm.base import ChatBackend
from synth_agent.models import Vote

ALL_METHODS = (
    "default",
    "persona",
    "demos",
    "persona_demos",
    "unverified",
    "memory",
    "served",
    "default_logprob",
    "persona_demos_logprob",
)
DEFAULT_METHODS = ("default", "persona", "demos", "persona_demos", "served", "unverified", "memory")


@dataclass
class UserResult:
    user_id: str
    n_context: int
    n_target: int
    correct: dict[str, int] = field(default_factory=dict)
    judged: dict[str, int] = field(default_factory=dict)
    persona: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    selection: dict[str, Any] | None = None
    """The guard's cross-validated selection (``profile.meta["selection"]``) when ``served`` was evaluated."""
    options: dict[str, int] = field(default_factory=dict)
    """Correct target judgments of each configuration the guard could serve (when ``served`` was evaluated)."""

    def accuracy(self, method: str) -> float | None:
        n = self.judged.get(method, 0)
        return self.correct.get(method, 0) / n if n else None


@dataclass
class MethodSummary:
    accuracy: float
    ci_low: float
    ci_high: float
    n_users: int
    n_judgments: int


@dataclass
class CurvePoint:
    n_context: int
    accuracy: float
    ci_low: float
    ci_high: float
    n_users: int


@dataclass
class EvalReport:
    methods: dict[str, MethodSummary]
    users: list[UserResult]
    curve: list[CurvePoint] = field(default_factory=list)
    curve_slope: float | None = None
    skipped_users: dict[str, str] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, default=str)

    def versus_default(self, method: str) -> tuple[int, int, int]:
        """(below, equal, above): users for whom ``method`` is less / as / more accurate than the
        default judge on their own held-out votes. A mean can hide users personalization hurts."""
        below = equal = above = 0
        for u in self.users:
            a, d = u.accuracy(method), u.accuracy("default")
            if a is None or d is None:
                continue
            below += a < d
            equal += a == d
            above += a > d
        return below, equal, above


def split_for_eval(votes: Sequence[Vote]) -> tuple[list[Vote], list[Vote]]:
    """(context votes labelled train/val, target votes) for one user, time order kept."""
    if any(v.split for v in votes):
        context = [v for v in votes if v.split in ("train", "val")]
        target = [v for v in votes if v.split == "test"]
        if context and target:
            return context, target
    n = len(votes)
    n_train = round(n * 0.5)
    n_val = max(1, round(n * 0.2))
    context = [v.model_copy(update={"split": "train"}) for v in votes[:n_train]]
    context += [v.model_copy(update={"split": "val"}) for v in votes[n_train : n_train + n_val]]
    return context, list(votes[n_train + n_val :])


def bootstrap_ci(
    per_user: Sequence[tuple[int, int]], *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Pooled accuracy and a 95% CI by resampling users (correct, judged) with replacement."""
    arr = np.array(per_user, dtype=float)
    if len(arr) == 0 or arr[:, 1].sum() == 0:
        return float("nan"), float("nan"), float("nan")
    acc = arr[:, 0].sum() / arr[:, 1].sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    sample = arr[idx]
    accs = sample[:, :, 0].sum(axis=1) / np.maximum(sample[:, :, 1].sum(axis=1), 1)
    lo, hi = np.percentile(accs, [2.5, 97.5])
    return float(acc), float(lo), float(hi)


def serve_with_tenant_prior(users: Sequence[UserResult], config: FitConfig) -> None:
    """Score ``served``: the guard's choice per user, with the prior the other evaluated users give
    (as in a tenant, where a user's prior comes from the tenant's other users; leave-one-out here)."""
    sc = config.selection
    sels = {u.user_id: Selection.from_meta(u.selection) for u in users if u.selection}
    for u in users:
        sel = sels.get(u.user_id)
        if sel is None:
            continue
        others = [s for uid, s in sels.items() if uid != u.user_id]
        chosen = sel.apply(sc.z, population_prior(others, min_users=sc.min_prior_users), sc.candidates)
        u.selection = chosen.as_meta()
        u.correct["served"] = u.options[chosen.served]
        u.judged["served"] = 2 * u.n_target


def _unselected(config: FitConfig) -> FitConfig:
    """``config`` without cross-validated selection (methods that judge persona + demos as fitted)."""
    return replace(config, selection=replace(config.selection, enabled=False))


async def _judge_targets(judge: Judge, targets: Sequence[Vote]) -> int:
    """Number of correct judgments over both orders of every target vote."""
    correct, _ = await count_correct(judge, targets, lambda _v: (True, False))
    return correct


async def memory_persona(llm: ChatBackend, context: Sequence[Vote], seed: int = 0) -> str:
    """The 'memory' baseline: one extracted insight per context vote, listed as the user's profile."""

    async def one(v: Vote) -> str:
        cf = stable_coin(seed, v.id, "insight")
        first, second = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
        msgs = prompts.insight_messages(v.context, first, second, "A" if cf else "B")
        comp = await llm.complete(msgs, call_site="memory_insight", max_tokens=120)
        return comp.text.strip()

    insights = await asyncio.gather(*(one(v) for v in context))
    lines = [f"- {i}" for i in insights if i]
    return "Observations from this user's past choices:\n" + "\n".join(lines)


async def evaluate_user(
    llm: ChatBackend,
    user_id: str,
    votes: Sequence[Vote],
    methods: Sequence[str],
    config: FitConfig,
) -> UserResult | str:
    """Fit and judge one user; returns a reason string when the user cannot be evaluated."""
    context, targets = split_for_eval(votes)
    if not targets:
        return "no held-out target votes"
    res = UserResult(user_id, len(context), len(targets))
    need_fit = {"persona", "demos", "persona_demos", "persona_demos_logprob", "served"} & set(methods)
    if "served" not in methods:
        config = _unselected(config)
    # persona + demos is scored for every user, and "served" re-applies the guard under another prior: race
    # step 3 for everyone, as a fit that serves persona + demos does
    config = replace(config, race_demos="always")
    fit: FitResult | None = None
    if need_fit:
        fit = await Synthesizer(llm, None, config).fit(user_id, context, save=False)
        if fit.status != "fitted":
            return fit.message
        res.persona = fit.profile.persona if fit.profile else None
        res.usage = fit.usage
        res.selection = fit.profile.meta.get("selection") if fit.profile else None
    judges: dict[str, Judge] = {}
    internal: list[str] = []  # configurations judged only so the guard's choice can be scored
    if "served" in methods:
        internal = [c for c in CONFIGURATIONS if c not in methods]
    for m in [*methods, *internal]:
        if m == "default":
            judges[m] = Judge(llm, call_site="eval_default")
        elif m == "default_logprob":
            judges[m] = Judge(llm, mode="logprob", call_site="eval_default")
        elif m in ("persona", "demos", "persona_demos", "persona_demos_logprob"):
            assert fit is not None and fit.profile is not None
            p = fit.profile
            if m == "persona":
                judges[m] = Judge(llm, persona=p.persona, call_site="eval_persona")
            elif m == "demos":
                judges[m] = Judge(llm, demos=tuple(fit.bootstrap_demos), call_site="eval_demos")
            elif m == "persona_demos":
                judges[m] = Judge.from_profile(llm, p, guard=False, call_site="eval_persona_demos")
            else:
                judges[m] = Judge.from_profile(llm, p, guard=False, mode="logprob", call_site="eval_persona_demos")
        elif m == "served":
            continue  # one of the four configurations: scored after the guard has chosen (see evaluate)
        elif m == "unverified":
            unv = await Synthesizer(llm, None, _unselected(replace(config, verify=False))).fit(
                user_id, context, save=False
            )
            if unv.profile is None:
                return unv.message
            judges[m] = Judge.from_profile(llm, unv.profile, guard=False, call_site="eval_unverified")
        elif m == "memory":
            judges[m] = Judge(llm, persona=await memory_persona(llm, context, config.seed), call_site="eval_memory")
        else:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    counts = await asyncio.gather(*(_judge_targets(j, targets) for j in judges.values()))
    for m, c in zip(judges, counts, strict=True):
        if m in internal:
            res.options[m] = c
            continue
        res.correct[m] = c
        res.judged[m] = 2 * len(targets)
    for name in CONFIGURATIONS:
        if name in res.correct and "served" in methods:
            res.options[name] = res.correct[name]
    return res


async def context_curve(
    llm: ChatBackend,
    by_user: dict[str, list[Vote]],
    sizes: Sequence[int],
    config: FitConfig,
    concurrency: int = 8,
) -> tuple[list[CurvePoint], float | None]:
    """Accuracy of persona+demos when fitted on the first k context votes, for each k in ``sizes``."""
    sem = asyncio.Semaphore(concurrency)
    per_size: dict[int, list[tuple[int, int]]] = {k: [] for k in sizes}

    async def one(uid: str, votes: list[Vote], k: int) -> None:
        context, targets = split_for_eval(votes)
        if len(context) < k or not targets:
            return
        sub = context[:k]
        n_val = max(1, round(k * 2 / 7))
        sub = [v.model_copy(update={"split": "train"}) for v in sub[: k - n_val]] + [
            v.model_copy(update={"split": "val"}) for v in sub[k - n_val :]
        ]
        async with sem:
            fit = await Synthesizer(llm, None, _unselected(config)).fit(uid, sub, save=False)
            if fit.profile is None:
                return
            c = await _judge_targets(Judge.from_profile(llm, fit.profile, guard=False, call_site="eval_curve"), targets)
        per_size[k].append((c, 2 * len(targets)))

    await asyncio.gather(*(one(u, vs, k) for u, vs in by_user.items() for k in sizes))
    points = []
    for k in sizes:
        if per_size[k]:
            acc, lo, hi = bootstrap_ci(per_size[k], seed=k)
            points.append(CurvePoint(k, acc, lo, hi, len(per_size[k])))
    slope = None
    if len(points) >= 2:
        slope = float(np.polyfit([p.n_context for p in points], [p.accuracy for p in points], 1)[0])
    return points, slope


async def evaluate(
    llm: ChatBackend,
    votes: Sequence[Vote],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    config: FitConfig | None = None,
    concurrency: int = 8,
    curve_sizes: Sequence[int] = (),
    on_user_done: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate ``methods`` on every user in ``votes`` (users run concurrently)."""
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
    config = config or FitConfig()
    by_user: dict[str, list[Vote]] = {}
    for v in votes:
        by_user.setdefault(v.user_id, []).append(v)
    for uid in by_user:
        by_user[uid].sort(key=lambda v: v.timestamp.timestamp() if v.timestamp else 0.0)
    sem = asyncio.Semaphore(concurrency)
    users: list[UserResult] = []
    skipped: dict[str, str] = {}

    async def run(uid: str, vs: list[Vote]) -> None:
        async with sem:
            r = await evaluate_user(llm, uid, vs, methods, config)
        if isinstance(r, str):
            skipped[uid] = r
        else:
            users.append(r)
        if on_user_done:
            on_user_done(uid)

    await asyncio.gather(*(run(u, vs) for u, vs in by_user.items()))
    users.sort(key=lambda r: r.user_id)
    if "served" in methods:
        serve_with_tenant_prior(users, config)
    summaries = {}
    for m in methods:
        pu = [(u.correct[m], u.judged[m]) for u in users if m in u.judged]
        acc, lo, hi = bootstrap_ci(pu)
        summaries[m] = MethodSummary(acc, lo, hi, len(pu), sum(n for _, n in pu))
    curve, slope = await context_curve(llm, by_user, curve_sizes, config, concurrency) if curve_sizes else ([], None)
    return EvalReport(
        methods=summaries,
        users=users,
        curve=curve,
        curve_slope=slope,
        skipped_users=skipped,
        usage=llm.stats.as_dict(),
        config={"methods": list(methods), **asdict(config)},
    )


def write_plots(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """Accuracy per method (with 95% CIs) and accuracy vs context votes (with fitted slope)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(report.methods)
    accs = [report.methods[m].accuracy * 100 for m in names]
    err_lo = [max(0.0, (report.methods[m].accuracy - report.methods[m].ci_low) * 100) for m in names]
    err_hi = [max(0.0, (report.methods[m].ci_high - report.methods[m].accuracy) * 100) for m in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    colors = ["#9aa5b1" if m.startswith("default") else "#3b82f6" for m in names]
    ax.bar(names, accs, yerr=[err_lo, err_hi], capsize=4, color=colors)
    for i, a in enumerate(accs):
        ax.text(i + 0.08, a + err_hi[i] + 1.5, f"{a:.1f}", ha="center", fontsize=9)
    ax.axhline(50, color="black", lw=0.8, ls="--")
    ax.set_ylabel("accuracy on held-out votes (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Judge accuracy per method ({len(report.users)} users, 95% CI)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    p = out / "accuracy_per_method.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    if report.curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [c.n_context for c in report.curve]
        ys = [c.accuracy * 100 for c in report.curve]
        ax.errorbar(
            xs, ys,
            yerr=[[y - c.ci_low * 100 for y, c in zip(ys, report.curve, strict=True)],
                  [c.ci_high * 100 - y for y, c in zip(ys, report.curve, strict=True)]],
            fmt="o-", capsize=4, label="persona + demos",
        )
        if report.curve_slope is not None:
            b = np.polyfit(xs, ys, 1)
            ax.plot(xs, np.polyval(b, xs), "--", label=f"fit: {report.curve_slope * 100:+.2f} pts/vote")
        if "default" in report.methods:
            ax.axhline(report.methods["default"].accuracy * 100, color="gray", ls=":", label="default judge")
        ax.set_xlabel("context votes used to fit")
        ax.set_ylabel("accuracy on held-out votes (%)")
        ax.set_title("Accuracy vs number of context votes")
        ax.legend()
        fig.tight_layout()
        p = out / "accuracy_vs_votes.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
