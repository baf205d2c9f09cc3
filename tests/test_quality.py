"""Quality tests: they fail when personalization stops working, not only when a type is wrong.

Every check here compares against what a simulated user actually prefers (the hidden weights
of :class:`~synth_agent.sim.population.SimUser`, which no model ever sees) and against the
default judge on the same inputs, through each surface a user reaches the judge by: the
engine (chain-of-thought and log-probability modes), best-of-n reranking, the proxy's
``/v1/judge`` and ``/v1/rerank``, and the CLI's ``judge`` and ``rerank``.

They supersede these weaker checks elsewhere (left in place; they still test plumbing):

* ``test_engine_fit.py::test_compare_judges_both_orders_and_rank_strategies`` — verdict only in
  {A, B, tie}, the winner only has the top score;
* ``test_logprob_judge.py::test_logprob_judge_agrees_with_cot_for_one_token`` and
  ``::test_logprob_judge_accuracy_close_to_cot_with_far_fewer_tokens`` — log-prob vs CoT, two
  paths that share one decision rule in the simulator, so they agree whatever the persona says;
  ``::test_reranker_uses_logprob_confidence`` — scores sum to one;
* ``test_graphs_rerank.py::test_ranks_given_candidates_without_generating`` — winner in the list;
* ``test_proxy_api.py::test_rerank_and_judge`` — the ``/v1/judge`` verdict ignored, the
  ``/v1/rerank`` winner only one of the candidates;
* ``test_cli.py::test_full_user_journey`` — ``judge`` and ``rerank`` output ignored beyond
  "persona v1" / "winner: candidate".
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore
from typer.testing import CliRunner

from synth_agent.cli import app as cli_app
from synth_agent.config import Settings
from synth_agent.engine import FitConfig, Judge, Synthesizer, rank
from synth_agent.engine.judge import count_correct
from synth_agent.engine.selection import SelectionConfig
from synth_agent.evaluate import split_for_eval
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import Message, PersonaProfile, Vote
from synth_agent.proxy import ProxyServer, ProxySettings, create_app
from synth_agent.scheduler import SynthesisPolicy
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.generator import PROMPT_POOL, generate_candidates
from synth_agent.sim.population import Population, SimUser, decisive_votes, simulate_votes, vote_to_json
from synth_agent.sim.server import SimEndpoint
from synth_agent.sim.traits import TRAITS

STRONG = SimUser("noa.k+votes@example.com", {**dict.fromkeys(TRAITS, 0.0), "bullets": -3.0, "questions": 2.5})
"""A user with a strong taste the default judge does not share: no bullet lists, questions back welcome."""


def strong_votes(n: int = 20) -> list[Vote]:
    """The votes ``STRONG`` casts (sampled with the usual noise), oldest first."""
    return simulate_votes(STRONG, n, np.random.default_rng(0))


def accuracy(correct_and_total: tuple[int, int]) -> float:
    c, n = correct_and_total
    return c / n


def regret_and_hits(user: SimUser, cases: list[tuple[str, list[str]]], winners: list[int]) -> tuple[float, int]:
    """(mean utility lost against the user's best candidate, how often the user's best was picked)."""
    regret, hits = [], 0
    for (_, cands), w in zip(cases, winners, strict=True):
        u = [user.utility_margin(c, cands[0]) for c in cands]
        regret.append(max(u) - u[w])
        hits += u[w] == max(u)
    return float(np.mean(regret)), hits


def rerank_cases(n_cases: int, n_candidates: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    return [
        (p, generate_candidates(p, n_candidates, rng))
        for p in (PROMPT_POOL[int(rng.integers(len(PROMPT_POOL)))] for _ in range(n_cases))
    ]


# ------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
async def strong_profile() -> PersonaProfile:
    fit = await Synthesizer(SimBackend(0), None, FitConfig(seed=0)).fit(STRONG.user_id, strong_votes(), save=False)
    assert fit.profile is not None
    return fit.profile


@pytest.mark.parametrize("mode", ["cot", "logprob"])
async def test_personalized_judge_picks_what_a_strong_preference_user_prefers(strong_profile, mode) -> None:
    """On 60 pairs where this user's choice is decisive, the judge fitted on their 20 votes mostly
    agrees with them; the default judge (which likes bullet lists) mostly does not. Both orders of
    every pair count. (Learned personas are imperfect: this one names bullet lists only "somewhat"
    and adds traits the user does not care about, hence 0.7 rather than the oracle's 1.0.)"""
    llm = SimBackend(0)
    pairs = decisive_votes(STRONG, 60, np.random.default_rng(1))
    personal = accuracy(await count_correct(Judge.from_profile(llm, strong_profile, mode=mode), pairs,
                                            lambda _v: (True, False)))
    default = accuracy(await count_correct(Judge(llm, mode=mode), pairs, lambda _v: (True, False)))
    assert personal >= 0.65, (personal, default, strong_profile.persona)
    assert default <= 0.45 and personal >= default + 0.3, (personal, default)


@pytest.mark.parametrize("strategy", ["knockout", "round_robin"])
@pytest.mark.parametrize("mode", ["cot", "logprob"])
async def test_rerank_picks_what_a_strong_preference_user_likes_best(strong_profile, strategy, mode) -> None:
    """Best of 4 over 12 prompts: the personalized winner is the user's favourite far more often than
    chance (3 of 12) and loses far less utility than the default judge's winner."""
    llm = SimBackend(0)
    cases = rerank_cases(12, 4, seed=99)
    personal_judge, default_judge = Judge.from_profile(llm, strong_profile, mode=mode), Judge(llm, mode=mode)
    winners: dict[str, list[int]] = {"personal": [], "default": []}
    for prompt, cands in cases:
        ctx = [Message(role="user", content=prompt)]
        winners["personal"].append((await rank(personal_judge, ctx, cands, strategy=strategy)).winner)
        winners["default"].append((await rank(default_judge, ctx, cands, strategy=strategy)).winner)
    regret, hits = regret_and_hits(STRONG, cases, winners["personal"])
    d_regret, d_hits = regret_and_hits(STRONG, cases, winners["default"])
    assert hits >= 6 and hits >= d_hits + 3, (hits, d_hits)
    assert regret <= d_regret - 0.4, (regret, d_regret)


@dataclass
class PopulationRun:
    correct: dict[str, list[tuple[int, int]]]

    def acc(self, key: str) -> float:
        return sum(c for c, _ in self.correct[key]) / sum(n for _, n in self.correct[key])


@pytest.fixture(scope="module")
async def population_run() -> PopulationRun:
    """The 24 x 25 seed-0 population: each user's own profile, the next user's profile, and the default
    judge, in both judge modes, on each user's held-out votes (both orders). Profiles as fitted (persona +
    demos, no per-user guard: what the guard serves is tested in test_personalize.py)."""
    pop, llm = Population(24, seed=0), SimBackend(0)
    contexts, targets = zip(*(split_for_eval(pop.votes(u, 25)) for u in pop.user_ids), strict=True)
    unguarded = FitConfig(seed=0, selection=SelectionConfig(enabled=False))
    fits = [await Synthesizer(llm, None, unguarded).fit(u, c, save=False)
            for u, c in zip(pop.user_ids, contexts, strict=True)]
    profiles = [f.profile for f in fits]
    assert all(p is not None for p in profiles)
    correct: dict[str, list[tuple[int, int]]] = {}
    for i, tg in enumerate(targets):
        other = profiles[(i + 1) % len(profiles)]
        for mode in ("cot", "logprob"):
            judges = {"default": Judge(llm, mode=mode),
                      "own": Judge.from_profile(llm, profiles[i], guard=False, mode=mode),
                      "other": Judge.from_profile(llm, other, guard=False, mode=mode)}
            for name, judge in judges.items():
                correct.setdefault(f"{name}/{mode}", []).append(
                    await count_correct(judge, tg, lambda _v: (True, False)))
    return PopulationRun(correct)


@pytest.mark.parametrize("mode", ["cot", "logprob"])
def test_own_profile_beats_default_judge_in_both_modes(population_run: PopulationRun, mode: str) -> None:
    """The log-probability judge is held to the same bar as chain-of-thought, against the users' votes
    (not against each other: in the simulator both modes share one decision rule)."""
    own, default = population_run.acc(f"own/{mode}"), population_run.acc(f"default/{mode}")
    assert own >= default + 0.08, (own, default)


@pytest.mark.parametrize("mode", ["cot", "logprob"])
def test_someone_elses_profile_scores_at_or_below_default(population_run: PopulationRun, mode: str) -> None:
    other, default = population_run.acc(f"other/{mode}"), population_run.acc(f"default/{mode}")
    assert other <= default + 0.02, (other, default)
    assert population_run.acc(f"own/{mode}") >= other + 0.08


# ------------------------------------------------------------------ proxy

KEY = "sk-quality-1"
NOBODY = "no-persona@example.com"


@dataclass
class Proxy:
    srv: ProxyServer
    url: str

    def post(self, path: str, body: dict) -> dict:
        r = httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A real proxy over the simulator; ``STRONG``'s votes posted to ``/v1/votes`` and learned in the background."""
    with SimEndpoint() as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))  # ours: closed on the server's loop (close=)
        app = create_app(
            Settings(base_url=sim.base_url, home=tmp_path_factory.mktemp("quality-proxy")),
            ProxySettings(api_keys=f"acme:{KEY}", default_model="sim"),
            store=InMemoryStore(), llm=llm,
            checkpointer=InMemorySaver(), fit_config=FitConfig(seed=0), policy=SynthesisPolicy(debounce=0.0),
        )
        with ProxyServer(app, close=[llm]) as srv:
            p = Proxy(srv, srv.base_url)
            p.post("/votes", {"votes": [vote_to_json(v) for v in strong_votes()]})
            state = app.state.proxy
            srv.call(state.scheduler.wait_idle())
            r = httpx.get(f"{p.url}/users/{quote(STRONG.user_id, safe='')}/persona",
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert r.status_code == 200, r.text
            yield p


def test_proxy_judge_verdict_follows_the_users_learned_preference(proxy: Proxy) -> None:
    """``/v1/judge`` for the user the proxy learned (from votes it received) vs a user it knows nothing
    about, on the same 12 decisive pairs in both orders; ties count as wrong."""
    pairs = decisive_votes(STRONG, 12, np.random.default_rng(2))
    right = {STRONG.user_id: 0, NOBODY: 0}
    for v in pairs:
        msgs = [{"role": m.role, "content": m.content} for m in v.context]
        for first_is_chosen in (True, False):
            a, b = (v.chosen, v.rejected) if first_is_chosen else (v.rejected, v.chosen)
            for user in right:
                verdict = proxy.post("/judge", {"user": user, "messages": msgs, "a": a, "b": b})
                assert verdict["personalized"] == (user == STRONG.user_id)
                right[user] += verdict["preferred"] == ("A" if first_is_chosen else "B")
    assert right[STRONG.user_id] >= 15, right  # of 24 judgments
    assert right[STRONG.user_id] >= right[NOBODY] + 6, right


def test_proxy_rerank_winner_is_what_the_user_likes(proxy: Proxy) -> None:
    cases = rerank_cases(8, 4, seed=7)
    winners: dict[str, list[int]] = {STRONG.user_id: [], NOBODY: []}
    for prompt, cands in cases:
        for user in winners:
            out = proxy.post("/rerank", {"user": user, "messages": [{"role": "user", "content": prompt}],
                                         "candidates": cands})
            assert out["personalized_judge"] == (user == STRONG.user_id) and out["best"] == cands[out["winner"]]
            winners[user].append(out["winner"])
    regret, hits = regret_and_hits(STRONG, cases, winners[STRONG.user_id])
    d_regret, d_hits = regret_and_hits(STRONG, cases, winners[NOBODY])
    # chance is 2 of 8; the default judge, whose taste is the opposite of this user's, does worse
    assert hits >= 4 and hits >= d_hits + 2 and regret <= d_regret - 0.5, (hits, regret, d_hits, d_regret)


# ------------------------------------------------------------------ CLI

runner = CliRunner()


def test_cli_judge_and_rerank_follow_the_users_learned_preference(tmp_path: Path) -> None:
    """``ingest`` + ``fit`` a strong-preference user, then ``judge`` the pairs where the user's learned
    judge is right and the default judge is wrong (found in-process with the same simulated model and
    the profile the CLI saved): the CLI must give the user's answer on every one of them; ``rerank``
    must pick the user's favourite where the default judge's winner differs from it."""
    data = tmp_path / "votes.jsonl"
    data.write_text("".join(json.dumps(vote_to_json(v), ensure_ascii=False) + "\n" for v in strong_votes()))
    with SimEndpoint(seed=0) as sim:
        def cli(*args: str) -> str:
            res = runner.invoke(cli_app, ["--home", str(tmp_path / "home"), "--base-url", sim.base_url, *args])
            assert res.exit_code == 0, res.output
            return res.output

        cli("ingest", str(data))
        assert "persona v1" in cli("fit", "--user", STRONG.user_id)
        profile = PersonaProfile.model_validate_json(cli("persona", "--user", STRONG.user_id, "--json"))
        llm = SimBackend(0)  # the endpoint's brain, in process
        personal, default = Judge.from_profile(llm, profile), Judge(llm)

        async def telling_pairs() -> list[tuple[str, str, str]]:
            """(prompt, a, b) with the user's answer as a, where only the personalized judge gets it right."""
            out = []
            for v in decisive_votes(STRONG, 40, np.random.default_rng(3)):
                p, d = await personal.compare(v.context, v.chosen, v.rejected), await default.compare(
                    v.context, v.chosen, v.rejected)
                if p.preferred == "A" and d.preferred == "B":
                    out.append((v.context[0].content, v.chosen, v.rejected))
            return out

        pairs = asyncio.run(telling_pairs())[:2]
        assert len(pairs) == 2  # personalization changes the verdict on decisive pairs
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            a, b = (chosen, rejected) if i % 2 == 0 else (rejected, chosen)
            out = cli("judge", "--user", STRONG.user_id, "--prompt", prompt, "--a", a, "--b", b)
            verdict = re.match(r"\s*(A|B|tie)\b", out)
            assert verdict and verdict.group(1) == ("A" if i % 2 == 0 else "B"), out

        async def telling_case() -> tuple[str, list[str], int]:
            for prompt, cands in rerank_cases(20, 3, seed=5):
                ctx = [Message(role="user", content=prompt)]
                mine, plain = await rank(personal, ctx, cands), await rank(default, ctx, cands)
                u = [STRONG.utility_margin(c, cands[0]) for c in cands]
                if u[mine.winner] == max(u) and plain.winner != mine.winner:
                    return prompt, cands, mine.winner
            raise AssertionError("the personalized and default rerankers never disagree")

        prompt, cands, best = asyncio.run(telling_case())
        out = cli("rerank", "--user", STRONG.user_id, "--prompt", prompt, *[x for c in cands for x in ("-c", c)])
        m = re.search(r"winner: candidate (\d+)", out)
        assert m and int(m.group(1)) - 1 == best, out
