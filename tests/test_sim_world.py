"""The offline simulated world: traits, generator, population, and the simulated LLM (SimBrain).

The persona loop test is the honesty check of the whole simulator: the brain never sees a
user's hidden weights, so a persona can only help when its text carries the right information,
and its judge is equally noisy with or without one (an uninformative persona, or someone
else's, does not beat the default judge).
Run ``pytest tests/test_sim_world.py -k report -s`` to print the accuracy table.
"""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import pytest

from synth_agent.models import Demo, Message, Vote
from synth_agent.prompts import (
    TraceExample,
    generation_system_prompt,
    insight_messages,
    judge_messages,
    label_judge_messages,
    parse_judgment,
    parse_persona,
    persona_messages,
)
from synth_agent.sim import (
    PROMPT_POOL,
    TRAITS,
    Population,
    SimBrain,
    generate_candidates,
    oracle_accuracy,
    parse_preferences,
    random_levels,
    render_response,
    style_from_text,
    trait_vector,
    write_population_jsonl,
)
from synth_agent.sim.traits import trait_dict

# ------------------------------------------------------------------ traits


def test_traits_measure_what_they_claim() -> None:
    plain = "Here is the answer. Keep the dough warm and let it rise until it doubles."
    t = trait_dict(plain)
    assert all(t[k] == 0.0 for k in TRAITS if k not in ("formality",))
    assert t["formality"] == 0.5
    rich = (
        "## Overview\n\nHey! Basically, it depends. This might help, perhaps.\n\n## Steps\n\n"
        "- one\n- two\n- three\n\nFor example, e.g. this. For instance, that.\n\n"
        "```python\nprint(1)\n```\n\n```python\nprint(2)\n```\n\n## More\n\n"
        "Does that help? What else? Anything more? \U0001f642 \U0001f680 \u2728 \U0001f44d"
    )
    r = trait_dict(rich)
    assert r["headings"] == 1.0 and r["code"] == 1.0 and r["examples"] == 1.0
    assert r["emoji"] == 1.0 and r["questions"] == 1.0 and r["bullets"] == pytest.approx(0.5)
    assert r["hedging"] >= 0.75 and r["formality"] < 0.5
    formal = "Certainly. Furthermore, the method is sound. Moreover, it is efficient. Consequently, use it."
    assert trait_dict(formal)["formality"] > 0.75
    assert trait_dict("word " * 400)["length"] == 1.0 and trait_dict("word " * 20)["length"] == 0.0
    v = trait_vector(rich)
    assert v.shape == (len(TRAITS),) and np.all((v >= 0) & (v <= 1))
    # code blocks do not count as lists/headings/questions
    assert trait_dict("```\n# not a heading\n- not a bullet\nwhat?\n```")["headings"] == 0.0


def test_parse_preferences_reads_the_phrase_vocabulary_and_instructions() -> None:
    w = parse_preferences(
        "The user strongly prefers bullet lists and long, detailed answers. The user dislikes emoji. "
        "The user somewhat prefers a casual tone."
    )
    assert w["bullets"] == 2 and w["length"] == 2 and w["emoji"] == -1 and w["formality"] == -0.5
    w = parse_preferences("Use headings, be concise, no emoji. Does not like questions back to the user.")
    assert w["headings"] > 0 and w["length"] < 0 and w["emoji"] < 0 and w["questions"] < 0
    assert parse_preferences("") == {} and parse_preferences("Nothing about style here.") == {}


# ------------------------------------------------------------------ generator


def test_generator_follows_levels() -> None:
    rng = np.random.default_rng(0)
    levels, measured = [], []
    for i in range(300):
        lv = random_levels(rng)
        text = render_response(PROMPT_POOL[i % len(PROMPT_POOL)], lv, rng)
        levels.append([lv[t] for t in TRAITS])
        measured.append(trait_vector(text))
    L, M = np.array(levels), np.array(measured)
    for j, t in enumerate(TRAITS):
        assert np.corrcoef(L[:, j], M[:, j])[0, 1] > 0.9, t


def test_generator_is_deterministic_and_on_topic() -> None:
    assert len(PROMPT_POOL) >= 40
    a = generate_candidates(PROMPT_POOL[0], 3, np.random.default_rng(5))
    b = generate_candidates(PROMPT_POOL[0], 3, np.random.default_rng(5))
    assert a == b and len(set(a)) == 3
    text = render_response("How do I fix a dripping faucet?", {"length": 0.3}, np.random.default_rng(1))
    assert "water" in text.lower()


def test_style_guidance_in_a_system_prompt_is_followed() -> None:
    brain = SimBrain(seed=0)
    persona = "The user prefers bullet lists and dislikes emoji."
    assert style_from_text(generation_system_prompt(persona)) == {"bullets": 0.85, "emoji": 0.0}
    guided = plain = 0
    for i, prompt in enumerate(PROMPT_POOL[:30]):
        user = {"role": "user", "content": prompt}
        g = brain.respond(
            [{"role": "system", "content": generation_system_prompt(persona)}, user], temperature=0.7, seed=i
        ).text
        p = brain.respond([user], temperature=0.7, seed=i).text
        gv, pv = trait_dict(g), trait_dict(p)
        guided += gv["bullets"] > 0 and gv["emoji"] == 0
        plain += pv["bullets"] > 0 and pv["emoji"] == 0
    assert guided >= 28 and plain <= 15
    concise = style_from_text("Be concise. Use headings. No emoji.")
    assert concise["length"] < 0.2 and concise["headings"] > 0.5 and concise["emoji"] == 0.0


# ------------------------------------------------------------------ population


def test_population_is_deterministic_with_opaque_ids(tmp_path) -> None:
    p1, p2 = Population(9, seed=3), Population(9, seed=3)
    assert p1.user_ids == p2.user_ids and len(set(p1.user_ids)) == 9
    assert any("@" in u for u in p1.user_ids) and any(not u.isascii() for u in p1.user_ids)
    assert any(len(u) == 36 and u.count("-") == 4 for u in p1.user_ids)
    assert not all(u.isidentifier() for u in p1.user_ids)
    uid = p1.user_ids[4]
    v1, v2 = p1.votes(uid, 6), p2.votes(uid, 6)
    assert [v.model_dump() for v in v1] == [v.model_dump() for v in v2]
    assert len({v.id for v in v1}) == 6
    assert all(a.timestamp < b.timestamp for a, b in zip(v1, v1[1:], strict=False))
    assert [v.id for v in p1.votes(uid, 6, salt=1)] != [v.id for v in v1]
    strong = [t for t, w in p1.user(uid).weights.items() if abs(w) >= 1.5]
    assert 2 <= len(strong) <= 4
    with pytest.raises(KeyError):
        p1.user("nobody")

    path = tmp_path / "pop.jsonl"
    pop = write_population_jsonl(path, 4, 5, seed=3)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20
    votes = [Vote.model_validate(json.loads(line)) for line in lines]
    assert {v.user_id for v in votes} == set(pop.user_ids[:4])
    assert isinstance(json.loads(lines[0])["timestamp"], str)
    datetime.fromisoformat(json.loads(lines[0])["timestamp"])


def test_signs_vary_across_users() -> None:
    pop = Population(40, seed=0)
    W = np.array([u.weight_vector for u in pop.users])
    strong = np.abs(W) >= 1.5
    for j in range(len(TRAITS)):
        signs = np.sign(W[strong[:, j], j])
        if len(signs) >= 4:
            assert (signs > 0).any() and (signs < 0).any(), TRAITS[j]
    assert np.abs(W.mean(axis=0)).max() < 1.0


def test_oracle_accuracy_in_target_range() -> None:
    pop = Population(20, seed=0)
    accs = [oracle_accuracy(u, pop.votes(u.user_id, 40)) for u in pop.users]
    assert 0.8 <= float(np.mean(accs)) <= 0.9


# ------------------------------------------------------------------ brain


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population(20, seed=0)


def test_brain_is_deterministic_and_parses(pop: Population) -> None:
    v = pop.votes(pop.user_ids[0], 1)[0]
    msgs = judge_messages(v.context, v.chosen, v.rejected)
    r1, r2 = SimBrain(0).respond(msgs), SimBrain(0).respond(msgs)
    assert r1 == r2
    pj = parse_judgment(r1.text)
    obj = json.loads(r1.text)
    assert obj["preferred"] == pj.preferred and "Prediction" in pj.reasoning
    # label judge: one letter, logprobs calibrated and ordered
    lab = SimBrain(0).respond(
        label_judge_messages(v.context, v.chosen, v.rejected, persona="The user prefers bullet lists."),
        top_logprobs=5,
        max_tokens=1,
    )
    assert lab.text in ("A", "B") and lab.top_logprobs is not None
    alts = dict(lab.top_logprobs[0])
    assert lab.top_logprobs[0][0][0] == lab.text
    assert math.exp(alts["A"]) + math.exp(alts["B"]) == pytest.approx(1.0, abs=0.01)
    # chat: deterministic at temperature 0, varied by seed at temperature > 0
    chat = [{"role": "user", "content": "How do I start running?"}]
    assert SimBrain(0).respond(chat).text == SimBrain(0).respond(chat).text
    assert (
        SimBrain(0).respond(chat, temperature=1.0, seed=1).text
        != SimBrain(0).respond(chat, temperature=1.0, seed=2).text
    )
    assert "running" in SimBrain(0).respond(chat).text.lower() or "walking" in SimBrain(0).respond(chat).text


def test_brain_insight_and_persona_formats(pop: Population) -> None:
    brain = SimBrain(0)
    v = pop.votes(pop.user_ids[1], 1)[0]
    insight = brain.respond(insight_messages(v.context, v.chosen, v.rejected, "A")).text
    assert insight.endswith(".") and "\n" not in insight
    ex = TraceExample(v.context, v.chosen, v.rejected, brain.rationale(v.chosen, v.rejected, "A"), "A")
    text = brain.respond(persona_messages([ex])).text
    assert text.startswith("<persona>") and text.rstrip().endswith("</persona>")
    persona = parse_persona(text)
    assert len(persona.split()) <= 120 and "the examples" not in persona.lower()


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        [{"role": "system"}],
        [1, "x"],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [
            {"role": "system", "content": "You are a preference judge."},
            {"role": "user", "content": "<response_a>x"},
        ],
        [
            {"role": "system", "content": "You write user personas."},
            {"role": "user", "content": "<example>?</example>"},
        ],
        [{"role": "system", "content": "You extract insights."}, {"role": "user", "content": "no tags"}],
    ],
)
def test_brain_never_raises(messages) -> None:
    reply = SimBrain(0).respond(messages, temperature=float("nan"), json_mode=True)
    assert isinstance(reply.text, str) and reply.text


# ------------------------------------------------------------------ the persona loop


def _accuracy(brain: SimBrain, votes: list[Vote], persona: str | None = None, demos: tuple = ()) -> float:
    ok = n = 0
    for v in votes:
        for chosen_first in (True, False):
            a, b = (v.chosen, v.rejected) if chosen_first else (v.rejected, v.chosen)
            got = parse_judgment(
                brain.respond(judge_messages(v.context, a, b, persona=persona, demos=demos)).text
            )
            ok += (got.preferred == "A") == chosen_first
            n += 1
    return ok / n


GENERIC_PERSONAS = (
    "The user prefers long, detailed answers and bullet lists. The user dislikes emoji.",
    "The user strongly prefers headings and worked examples. The user dislikes hedging.",
)
"""Personas that carry no information about any one user: the same text is given to every user."""


def world_report(n_users: int = 20, n_votes: int = 15, n_test: int = 20, seed: int = 0) -> dict[str, float]:
    """Mean judge accuracy on held-out votes per condition (a minimal SynthesizeMe-like loop).

    Train = first 70% of each user's votes. Bootstrap: the default judge reasons about each train
    vote in a random order; matching predictions are verified traces. Personas are written from
    verified traces, from unverified ones (reasoning pointing the wrong way), from rationales in the
    true direction for every train vote ("correct") and in the wrong direction ("wrong").
    Controls for the simulator's honesty: ``generic_<i>`` gives every user the same text
    (:data:`GENERIC_PERSONAS`), ``other_persona+demos`` judges each user with the verified
    persona and demos of the *next* user in the population.
    """
    population = Population(n_users, seed)
    brain = SimBrain(seed=0)
    res: dict[str, list[float]] = {}
    fitted: list[tuple[str | None, tuple]] = []
    tests: list[list[Vote]] = []

    def add(k: str, x: float) -> None:
        res.setdefault(k, []).append(x)

    for user in population.users:
        votes = population.votes(user.user_id, n_votes)
        test = population.votes(user.user_id, n_test, salt=1)
        train = votes[: max(1, round(0.7 * n_votes))]
        rng = np.random.default_rng([seed, 17])
        verified, unverified, correct, wrong = [], [], [], []
        demos: list[Demo] = []
        labels: list[Demo] = []
        for v in train:
            cf = bool(rng.random() < 0.5)
            a, b = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
            truth, other = ("A", "B") if cf else ("B", "A")
            got = parse_judgment(brain.respond(judge_messages(v.context, a, b)).text)
            ex = TraceExample(v.context, a, b, got.reasoning, truth)
            demo = Demo(
                vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=cf
            )
            if got.preferred == truth:
                verified.append(ex)
                demos.append(demo.model_copy(update={"reasoning": got.reasoning}))
            else:
                unverified.append(ex)
                labels.append(demo)
            correct.append(TraceExample(v.context, a, b, brain.rationale(a, b, truth), truth))
            wrong.append(TraceExample(v.context, a, b, brain.rationale(a, b, other), truth))

        def persona(examples: list[TraceExample]) -> str | None:
            return parse_persona(brain.respond(persona_messages(examples)).text) if examples else None

        all_demos = tuple(demos + labels[:4])
        add("default", _accuracy(brain, test))
        add("persona_correct", _accuracy(brain, test, persona(correct)))
        add("persona_wrong", _accuracy(brain, test, persona(wrong)))
        add("persona_verified", _accuracy(brain, test, persona(verified)))
        add("persona_unverified", _accuracy(brain, test, persona(unverified)))
        add("persona_verified+demos", _accuracy(brain, test, persona(verified), all_demos))
        add("demos", _accuracy(brain, test, None, all_demos))
        add("oracle", oracle_accuracy(user, test))
        for i, text in enumerate(GENERIC_PERSONAS):
            add(f"generic_{i}", _accuracy(brain, test, text))
        fitted.append((persona(verified), all_demos))
        tests.append(test)
    for i, test in enumerate(tests):
        other_persona, other_demos = fitted[(i + 1) % len(fitted)]
        add("other_persona+demos", _accuracy(brain, test, other_persona, other_demos))
    return {k: float(np.mean(v)) for k, v in res.items()}


@pytest.fixture(scope="module")
def report() -> dict[str, float]:
    return world_report()


def test_persona_from_correct_reasoning_beats_default_judge(report: dict[str, float]) -> None:
    assert 0.42 <= report["default"] <= 0.62
    assert report["persona_correct"] >= report["default"] + 0.10
    assert report["persona_verified"] >= report["default"] + 0.05
    assert report["persona_verified+demos"] >= report["default"] + 0.10
    assert report["persona_verified+demos"] > report["persona_verified"]


def test_wrong_reasoning_makes_a_worse_persona(report: dict[str, float]) -> None:
    assert report["persona_wrong"] <= report["persona_correct"] - 0.08
    assert report["persona_unverified"] <= report["persona_verified"] - 0.05
    assert report["persona_wrong"] <= report["default"] + 0.03


def test_someone_elses_persona_does_not_beat_the_default_judge(report: dict[str, float]) -> None:
    # the persona and demos of another user carry no information about this one
    assert report["other_persona+demos"] <= report["default"] + 0.02, report
    assert report["persona_verified+demos"] >= report["other_persona+demos"] + 0.10, report


def _same_trait_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` pairs of different texts whose measured traits are identical (they differ in a sign-off)."""
    rng = np.random.default_rng(11)
    pairs = []
    while len(pairs) < n:
        text = render_response(PROMPT_POOL[len(pairs) % len(PROMPT_POOL)], random_levels(rng), rng)
        a, b = text + " Good luck.", text + " Have fun."
        if np.array_equal(trait_vector(a), trait_vector(b)):
            pairs.append((a, b))
    return pairs


def _logit_p_a(brain: SimBrain, a: str, b: str, persona: str | None, demos: tuple) -> float:
    msgs = label_judge_messages([Message(role="user", content="Any advice?")], a, b, persona=persona, demos=demos)
    rows = brain.respond(msgs, max_tokens=1, top_logprobs=2).top_logprobs
    assert rows is not None
    lp = dict(rows[0])
    return lp["A"] - lp["B"]


def test_judge_is_equally_noisy_with_or_without_user_information(pop: Population) -> None:
    """On pairs whose measured traits are identical nothing but the judge's own noise decides, so its
    log-odds must be spread the same whether or not the prompt carries a persona or demos (the old
    simulator shrank the noise 2-4x as soon as a persona was present, flattering every persona)."""
    brain = SimBrain(seed=0)
    uid = pop.user_ids[2]
    votes = pop.votes(uid, 6)
    demos = tuple(
        Demo(vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=i % 2 == 0,
             reasoning=brain.rationale(v.chosen, v.rejected, "A"))
        for i, v in enumerate(votes)
    )  # fmt: skip
    persona = "The user strongly prefers bullet lists and worked examples. The user dislikes emoji."
    conditions = {"none": (None, ()), "persona": (persona, ()), "demos": (None, demos), "both": (persona, demos)}
    logits: dict[str, np.ndarray] = {}
    for name, (p, d) in conditions.items():
        logits[name] = np.array(
            [_logit_p_a(brain, x, y, p, d) for a, b in _same_trait_pairs(60) for x, y in ((a, b), (b, a))]
        )
    spread = {k: float(np.std(v)) for k, v in logits.items()}
    assert spread["none"] > 0.5, spread  # the judge has noise to compare
    for name in ("persona", "demos", "both"):
        assert 0.8 <= spread[name] / spread["none"] <= 1.25, spread
        # and it is no more decisive: the same share of confident calls (|P(A) - 0.5| > 0.25)
        confident = {k: float(np.mean(np.abs(v) > np.log(3))) for k, v in logits.items()}
        assert abs(confident[name] - confident["none"]) <= 0.1, confident


def test_uninformative_persona_scores_like_the_default_judge() -> None:
    """The same generic persona for every user (no information about anyone) does not beat the
    default judge: paired per user over 90 users x 20 held-out votes, both orders."""
    diffs: dict[str, list[float]] = {text: [] for text in GENERIC_PERSONAS}
    for s in (0, 1, 2):
        population, brain = Population(30, seed=100 + s), SimBrain(seed=s)
        for user in population.users:
            test = population.votes(user.user_id, 20, salt=1)
            base = _accuracy(brain, test)
            for text in GENERIC_PERSONAS:
                diffs[text].append(_accuracy(brain, test, text) - base)
    for text, d in diffs.items():
        mean = float(np.mean(d))
        boot = np.random.default_rng(0).integers(0, len(d), size=(2000, len(d)))
        lo, hi = np.percentile(np.asarray(d)[boot].mean(axis=1), [2.5, 97.5])
        assert lo <= 0.0, (text, mean, lo, hi)  # no evidence that it helps
        assert -0.05 <= mean <= 0.02, (text, mean, lo, hi)  # within noise of the default judge


def test_noise_users_vote_by_coin_flip() -> None:
    clean, noisy = Population(30, seed=4), Population(30, seed=4, noise_fraction=0.2)
    ids = noisy.noise_user_ids
    assert len(ids) == 6 and noisy.user_ids == clean.user_ids
    assert ids == Population(30, seed=4, noise_fraction=0.2).noise_user_ids  # seeded
    for a, b in zip(clean.users, noisy.users, strict=True):
        if b.user_id in ids:
            assert b.is_noise and not any(b.weights.values()) and not a.is_noise
        else:  # every other user, and their votes, unchanged by adding noise users
            assert a == b and not b.is_noise
            assert clean.votes(a.user_id, 3) == noisy.votes(b.user_id, 3)
    # a noise user's vote is a fair coin whatever the pair: chosen = the first-drawn candidate half the time
    rng = np.random.default_rng(0)
    user = noisy.user(ids[0])
    texts = [render_response(PROMPT_POOL[i % len(PROMPT_POOL)], random_levels(rng), rng) for i in range(40)]
    assert all(user.p_choose_a(x, y) == 0.5 for x, y in zip(texts, texts[1:], strict=False))
    firsts = [user.choose(texts[0], texts[1], rng) for _ in range(2000)]
    assert 0.46 <= float(np.mean(firsts)) <= 0.54
    assert Population(10, seed=0, noise_fraction=1.0).noise_user_ids == Population(10, seed=0).user_ids
    assert Population(10, seed=0).noise_user_ids == []
    with pytest.raises(ValueError, match="noise_fraction"):
        Population(5, noise_fraction=1.5)


def test_population_docstring_examples_run() -> None:
    import doctest

    import synth_agent.sim.population as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_report(report: dict[str, float]) -> None:
    print("\nsimulated world, 20 users x 15 votes (first 70% train), 20 held-out votes each, both orders:")
    for k, v in report.items():
        print(f"  {k:24s} {v:.3f}")
    assert 0.8 <= report["oracle"] <= 0.92
