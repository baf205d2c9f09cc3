"""SynthesizeMe engine against the simulator: accuracy effects, budgets, faults, cancellation, refits."""

from __future__ import annotations

import asyncio

import pytest
from langgraph.store.memory import InMemoryStore

from store.memory import PreferenceMemory
from synth_agent.engine import FitConfig, Judge, Synthesizer, rank, split_votes
from synth_agent.engine.synthesize import NO_NOTE
from synth_agent.evaluate import evaluate
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

POP_SEED = 0


@pytest.fixture(scope="module")
def population() -> Population:
    return Population(24, seed=POP_SEED)


@pytest.fixture(scope="module")
async def accuracy_report(population):
    """One seeded evaluation shared by the accuracy assertions (in-process simulator: exact, fast)."""
    llm = SimBackend(POP_SEED)
    report = await evaluate(
        llm, population.all_votes(25), methods=("default", "persona_demos", "unverified"),
        config=FitConfig(seed=POP_SEED),
    )
    for m, s in report.methods.items():
        print(f"{m:15s} {s.accuracy:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] n={s.n_judgments}")
    return report


async def test_persona_demos_beats_default_judge_by_ten_points(accuracy_report):
    acc = {m: s.accuracy for m, s in accuracy_report.methods.items()}
    assert len(accuracy_report.users) == 24
    assert acc["persona_demos"] >= acc["default"] + 0.10, acc


async def test_unverified_traces_make_a_worse_persona(accuracy_report):
    acc = {m: s.accuracy for m, s in accuracy_report.methods.items()}
    assert acc["unverified"] < acc["persona_demos"], acc


def memory() -> PreferenceMemory:
    return PreferenceMemory(InMemoryStore(), tenant="t1")


async def test_fit_saves_versioned_profile_within_budget(population):
    uid = population.user_ids[0]
    votes = population.votes(uid, 12)
    mem = memory()
    await mem.add_votes(votes)
    res = await Synthesizer(SimBackend(), mem, FitConfig(seed=1)).fit(uid)
    assert res.status == "fitted" and res.profile is not None
    assert res.profile.version == 1 and res.profile.persona.strip()
    assert res.profile.prompt_version == "persona_writer.v2"
    assert 0 < len(res.profile.demos) <= 8
    assert set(res.profile.vote_ids) == {v.id for v in votes}
    # Budget of the issue: at most 100 LLM requests for a 12-vote user at 10 trials / 10 candidates.
    assert res.usage["llm_requests"] <= 100, res.usage
    current = await mem.current_persona(uid)
    assert current is not None and current.persona == res.profile.persona


async def test_concurrent_fits_of_the_same_votes_save_one_version(population):
    """Two fits of the same user, votes and settings at once (a scheduler's and a manual one): the one
    that finishes second returns the version the first saved instead of storing the same fit again."""
    uid = population.user_ids[1]
    mem = memory()
    await mem.add_votes(population.votes(uid, 8))
    a, b = await asyncio.gather(*(Synthesizer(SimBackend(), mem, FitConfig(seed=1)).fit(uid) for _ in range(2)))
    assert a.profile is not None and b.profile is not None
    assert (a.profile.version, b.profile.version) == (1, 1) and a.profile.persona == b.profile.persona
    assert len(await mem.persona_history(uid)) == 1


async def test_not_enough_votes_is_a_result_not_an_error(population):
    uid = population.user_ids[1]
    res = await Synthesizer(SimBackend(), None).fit(uid, population.votes(uid, 4))
    assert res.status == "not_enough_votes" and res.profile is None
    assert "at least 5" in res.message


async def test_fit_rejects_votes_of_other_users(population):
    a, b = population.user_ids[:2]
    with pytest.raises(ValueError, match="belong to other users"):
        await Synthesizer(SimBackend(), None).fit(a, population.votes(b, 6))


async def test_fit_is_deterministic_for_a_seed(population):
    uid = population.user_ids[2]
    votes = population.votes(uid, 12)
    r1 = await Synthesizer(SimBackend(), None, FitConfig(seed=3)).fit(uid, votes)
    r2 = await Synthesizer(SimBackend(), None, FitConfig(seed=3)).fit(uid, votes)
    assert r1.profile and r2.profile
    assert r1.profile.persona == r2.profile.persona and r1.profile.demos == r2.profile.demos


async def test_incremental_refit_reuses_traces(population):
    uid = population.user_ids[3]
    votes = population.votes(uid, 20)
    mem = memory()
    llm = SimBackend()
    synth = Synthesizer(llm, mem, FitConfig(seed=0))
    await mem.add_votes(votes[:12])
    first = await synth.fit(uid)
    boot_first = llm.stats.site("bootstrap").requests
    await mem.add_votes(votes[12:])
    second = await synth.fit(uid)
    boot_second = llm.stats.site("bootstrap").requests - boot_first
    assert first.profile and second.profile and second.profile.version == 2
    # Step 1 verifies every context vote (train and validation: the persona is written from all of them).
    n_first, n_second = len(first.profile.vote_ids), len(second.profile.vote_ids)
    assert second.profile.meta["reused_traces"] == n_first
    # Only the newly added votes were judged again.
    assert boot_second == n_second - n_first
    history = await mem.persona_history(uid)
    assert [p.version for p in history] == [1, 2]


async def test_cancelled_fit_leaves_no_persona(population):
    uid = population.user_ids[4]
    mem = memory()
    await mem.add_votes(population.votes(uid, 12))
    with SimEndpoint(latency_ms=40) as ep:
        llm = LLMClient(EndpointConfig(base_url=ep.base_url, max_concurrency=4))
        task = asyncio.create_task(Synthesizer(llm, mem).fit(uid))
        # Let it get going (some requests answered), then cancel mid-run.
        for _ in range(200):
            await asyncio.sleep(0.02)
            if ep.stats()["completions"] >= 5:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await llm.aclose()
    assert await mem.current_persona(uid) is None
    assert await mem.persona_history(uid) == []


async def test_faults_change_no_result_of_a_seeded_fit(population):
    uid = population.user_ids[5]
    votes = population.votes(uid, 12)
    profiles = []
    for fault_rate in (0.0, 0.3):
        with SimEndpoint(fault_rate=fault_rate, seed=7, slow_ms=1500) as ep:
            cfg = EndpointConfig(base_url=ep.base_url, timeout=0.5, max_retries=10, backoff_max=0.1)
            async with LLMClient(cfg) as llm:
                res = await Synthesizer(llm, None, FitConfig(seed=5)).fit(uid, votes)
                if fault_rate:
                    assert llm.stats.total().retries > 0
            assert res.profile is not None
            profiles.append(res.profile)
    clean, faulty = profiles
    assert faulty.persona == clean.persona
    assert faulty.demos == clean.demos
    assert faulty.val_accuracy == clean.val_accuracy


async def test_users_fit_concurrently_on_different_backends(population):
    a, b = population.user_ids[6:8]
    llm_a, llm_b = SimBackend(model="judge-a"), SimBackend(model="judge-b")
    mem = memory()
    await mem.add_votes(population.votes(a, 10) + population.votes(b, 10))
    ra, rb = await asyncio.gather(
        Synthesizer(llm_a, mem).fit(a), Synthesizer(llm_b, mem).fit(b)
    )
    assert ra.profile and rb.profile
    assert ra.profile.model == "judge-a" and rb.profile.model == "judge-b"
    assert (await mem.current_persona(a)).user_id == a
    assert (await mem.current_persona(b)).user_id == b


async def test_compare_judges_both_orders_and_rank_strategies(population):
    uid = population.user_ids[8]
    votes = population.votes(uid, 15)
    llm = SimBackend()
    res = await Synthesizer(llm, None).fit(uid, votes[:12])
    judge = Judge.from_profile(llm, res.profile)
    v = votes[12]
    j = await judge.compare(v.context, v.chosen, v.rejected)
    assert len(j.orders) == 2 and {o.swapped for o in j.orders} == {False, True}
    assert j.preferred in ("A", "B", "tie")
    if j.preferred == "tie":
        assert j.confidence == 0.0
    else:
        assert j.confidence == 1.0
    candidates = [votes[i].chosen for i in range(12, 15)] + [votes[i].rejected for i in range(12, 15)]
    ko = await rank(judge, v.context, candidates, strategy="knockout")
    rr = await rank(judge, v.context, candidates, strategy="round_robin")
    assert len(ko.comparisons) == len(candidates) - 1
    assert len(rr.comparisons) == len(candidates) * (len(candidates) - 1) // 2
    assert ko.scores[ko.winner] == max(ko.scores)
    assert rr.scores[rr.winner] == max(rr.scores)
    assert sum(rr.scores) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="strategy"):
        await rank(judge, v.context, candidates, strategy="swiss")  # type: ignore[arg-type]


# ---------------------------------------------------------------- cost: refits, ledger, exact search


async def test_refit_without_new_votes_asks_nothing_and_saves_nothing(population):
    uid = population.user_ids[9]
    mem = memory()
    await mem.add_votes(population.votes(uid, 12))
    llm = SimBackend()
    synth = Synthesizer(llm, mem, FitConfig(seed=0))
    first = await synth.fit(uid)
    asked = llm.stats.total().requests
    again = await synth.fit(uid)
    assert again.status == "unchanged" and again.profile is not None and again.profile.version == 1
    assert llm.stats.total().requests == asked  # not one LLM request
    assert [p.version for p in await mem.persona_history(uid)] == [1]
    # a different budget is a different fit, and force=True refits regardless
    assert (await Synthesizer(llm, mem, FitConfig(seed=0, n_trials=2)).fit(uid)).status == "fitted"
    forced = await synth.fit(uid, force=True)
    assert forced.status == "fitted" and forced.profile.version == 3
    assert forced.profile.persona == first.profile.persona and forced.profile.demos == first.profile.demos
    assert forced.usage["llm_requests"] < first.usage["llm_requests"]  # the stored judgments were reused


async def test_refit_after_new_votes_keeps_the_split_and_reuses_stored_judgments(population):
    uid = population.user_ids[10]
    votes = population.votes(uid, 18)
    mem = memory()
    await mem.add_votes(votes[:12])
    synth = Synthesizer(SimBackend(), mem, FitConfig(seed=0, incremental=False))  # a full refit
    first = await synth.fit(uid)
    await mem.add_votes(votes[12:])
    second = await synth.fit(uid)
    m1, m2 = first.profile.meta, second.profile.meta
    assert set(m1["train_ids"]) <= set(m2["train_ids"]) and set(m1["val_ids"]) <= set(m2["val_ids"])
    new = [v.id for v in votes[12:]]
    assert m2["train_ids"][-4:] == new[:4] and m2["val_ids"][-2:] == new[4:]  # only the new votes were split
    assert second.usage["judgments_reused"] > 0 and m2["reused_traces"] == len(first.profile.vote_ids)
    # the ledger lives with the user's data and goes with it
    assert await mem.get_cached_judgment(uid, "ledger:v1:sim") is not None
    await mem.forget_user(uid)
    assert await mem.get_cached_judgment(uid, "ledger:v1:sim") is None


async def test_refit_after_a_few_new_votes_judges_only_them_and_extends_the_guard(population):
    """An incremental refit pays for what is new: the new votes' traces and one judgment each by persona + demos
    (the default judge's verdict is the trace); persona and demos are kept and the guard's evidence grows."""
    uid = population.user_ids[11]
    votes = population.votes(uid, 16)
    mem = memory()
    await mem.add_votes(votes[:12])
    llm = SimBackend()
    # "always" (the default), named: the counts below assume step 3 raced in the first fit
    synth = Synthesizer(llm, mem, FitConfig(seed=0, race_demos="always"))
    first = await synth.fit(uid)
    asked = llm.stats.total().requests
    await mem.add_votes(votes[12:])
    second = await synth.fit(uid)
    refit_requests = llm.stats.total().requests - asked
    p1, p2 = first.profile, second.profile
    assert second.status == "fitted" and p2.version == 2
    assert p2.persona == p1.persona and p2.demos == p1.demos
    new = [v.id for v in votes[12:]]
    assert p2.meta["refit"] == {"kind": "incremental", "from_version": 1, "new_vote_ids": new}
    assert p2.vote_ids == [*p2.meta["train_ids"], *p2.meta["val_ids"]] and set(p2.vote_ids) == {v.id for v in votes}
    sel1, sel2 = p1.meta["selection"], p2.meta["selection"]
    # the evidence grows by the new votes; votes cross-validation skipped (it stopped early) are judged now
    assert sorted([*sel1["vote_ids"], *sel1["skipped"]]) == sorted(p1.vote_ids)
    assert sorted(sel2["vote_ids"][:-4]) == sorted(p1.vote_ids) and sel2["vote_ids"][-4:] == new
    assert sel2["n_votes"] == 16 and sel2["skipped"] == []
    at = {v: i for i, v in enumerate(sel2["vote_ids"])}
    for c in sel1["per_vote"]:
        assert [sel2["per_vote"][c][at[v]] for v in sel1["vote_ids"]] == sel1["per_vote"][c]
    orders = sel1["orders"]
    # 4 traces + persona + demos on the 4 new votes (its orders), the skipped votes by their fold's persona + demos;
    # no persona written, no candidate raced
    skipped_judgments = len(sel1["skipped"]) * orders
    assert refit_requests == 4 + 4 * orders + 4 * (orders - 1) + skipped_judgments < first.usage["llm_requests"]
    assert llm.stats.site("persona").requests == first.profile.meta["selection"]["folds"] + 1
    # the traces are stored: a forced full refit pays nothing for them, and the same votes again are "unchanged"
    assert (await synth.fit(uid)).status == "unchanged"
    assert {t.vote_id for t in await mem.get_traces(uid)} >= set(new)


async def test_an_incremental_refit_after_stopping_early_extends_what_judging_every_vote_stored(population):
    """``SelectionConfig(stop_early=True)``: the refit first judges the votes cross-validation skipped (with the
    fold personas stored in the selection), so the refit's selection is exactly the one a fit that judged every
    vote and was then refitted stores: same evidence, same order, same served configuration, nothing skipped."""
    from synth_agent.engine.selection import SelectionConfig

    exercised = 0
    for uid in population.user_ids:
        votes = population.votes(uid, 16)
        got = {}
        for stop in (True, False):
            mem = memory()
            await mem.add_votes(votes[:12])
            # "always" (the default), named: the comparison assumes every profile's demos were raced
            synth = Synthesizer(SimBackend(), mem, FitConfig(seed=0, race_demos="always", selection=SelectionConfig(stop_early=stop)))
            first = await synth.fit(uid)
            await mem.add_votes(votes[12:])
            got[stop] = (first.profile.meta["selection"], (await synth.fit(uid)).profile)
        (sel1, early), (full1, full) = got[True], got[False]
        assert sorted([*sel1["vote_ids"], *sel1["skipped"]]) == sorted(full1["vote_ids"]) and not full1["skipped"]
        assert sel1["served"] == full1["served"]
        sel2, ref2 = early.meta["selection"], full.meta["selection"]
        assert ("refit" in early.meta) == ("refit" in full.meta), uid
        assert sel2["served"] == ref2["served"], uid
        if "refit" not in early.meta:  # a full refit (the persona went stale) may stop early again: tested above
            assert sorted([*sel2["vote_ids"], *sel2["skipped"]]) == sorted(ref2["vote_ids"])
            continue
        for key in ("vote_ids", "per_vote", "gain", "gain_sd", "n_votes", "skipped", "lower_bound"):
            assert sel2[key] == ref2[key], (uid, key)
        if sel1["skipped"]:  # the skipped votes were paid for at the refit, once
            exercised += 1
            assert early.meta["usage"]["llm_requests"] > full.meta["usage"]["llm_requests"]
    assert exercised, "no user's cross-validation stopped early before an incremental refit"


async def test_a_fit_never_asks_the_same_judge_prompt_twice(population):
    """Step 1's zero-shot candidate and the bootstrap traces judge the validation votes with the same prompt in
    the bootstrap order: the race reads the trace's verdict (the judgment ledger) instead of asking again."""

    class Recording(SimBackend):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[tuple[str, int]] = []

        async def complete(self, messages, **kw):  # type: ignore[no-untyped-def]
            if kw.get("call_site") != "persona":
                self.asked.append((kw.get("call_site"), hash(tuple((m["role"], m["content"]) for m in messages))))
            return await super().complete(messages, **kw)

    for uid in population.user_ids[:6]:
        llm = Recording()
        await Synthesizer(llm, None, FitConfig(seed=0)).fit(uid, population.votes(uid, 12))
        prompts = [h for _, h in llm.asked]
        assert len(prompts) == len(set(prompts)), [site for site, h in llm.asked if prompts.count(h) > 1]


async def test_a_selection_that_skipped_votes_without_its_folds_is_refitted_in_full(population):
    """A profile saved when stopping early did not yet record its folds (no ``fold_ids``) cannot have its skipped
    votes judged as the fit would have: its refit is a full fit, never an error."""
    for uid in population.user_ids:
        votes = population.votes(uid, 16)
        mem = memory()
        await mem.add_votes(votes[:12])
        synth = Synthesizer(SimBackend(), mem, FitConfig(seed=0))
        first = await synth.fit(uid)
        sel = first.profile.meta["selection"]
        if sel["skipped"]:
            break
    else:
        pytest.fail("no user's cross-validation stopped early")
    old = {k: v for k, v in sel.items() if k not in ("skipped_default", "fold_ids", "fold_personas")}
    await mem.update_persona_meta(uid, 1, {"selection": old})
    await mem.add_votes(votes[12:])
    second = await synth.fit(uid)
    assert second.status == "fitted" and "refit" not in second.profile.meta
    assert second.profile.meta["full_fit_votes"] == 16


async def test_a_full_refit_when_the_new_votes_show_the_persona_stale_or_the_context_grew_a_lot(population):
    from synth_agent.engine.selection import Selection

    uid = population.user_ids[12]
    votes = population.votes(uid, 24)
    mem = memory()
    await mem.add_votes(votes[:12])
    synth = Synthesizer(SimBackend(), mem, FitConfig(seed=0))
    first = await synth.fit(uid)
    # stale: the stored evidence says persona + demos wins every vote, the new votes cannot agree
    sel = first.profile.meta["selection"]
    rigged = {**sel, "per_vote": {"default": [0] * 12, "persona_demos": [2] * 12}}
    await mem.update_persona_meta(uid, 1, {"selection": rigged})
    await mem.add_votes(votes[12:14])
    stale = await synth.fit(uid)
    assert "refit" not in stale.profile.meta and stale.profile.meta["full_fit_votes"] == 14
    stale_sel = Selection.from_meta(stale.profile.meta["selection"])
    assert stale_sel.n_votes + len(stale_sel.skipped) == 14
    # growth: 14 → 24 votes is more than half again the last full fit: a full refit
    await mem.add_votes(votes[14:])
    grown = await synth.fit(uid)
    assert "refit" not in grown.profile.meta and grown.profile.meta["full_fit_votes"] == 24
    # another configuration is never updated incrementally
    assert Synthesizer(SimBackend(), mem, FitConfig(seed=0, n_trials=2)).plan(votes, grown.profile).new == []
    # how refits are done is not part of the result: no new votes is "unchanged" either way (synth-agent fit --full)
    full = Synthesizer(SimBackend(), mem, FitConfig(seed=0, incremental=False))
    assert full.plan(votes, grown.profile).status == "unchanged"
    await mem.add_votes(population.votes(uid, 26)[24:])
    more = population.votes(uid, 26)
    assert more[:24] == votes and synth.plan(more, grown.profile).new and not full.plan(more, grown.profile).new


async def test_one_order_selection_judges_each_vote_once_and_gets_the_default_for_free(population):
    """``SelectionConfig(orders=1)``: every context vote in its bootstrap trace's order; the default judge's
    verdicts are the traces (no request), persona + demos pays one judgment per vote; counts stay out of 2."""
    from synth_agent.engine.selection import SelectionConfig

    uid = population.user_ids[13]
    votes = population.votes(uid, 12)
    llm = SimBackend()
    one_order = SelectionConfig(orders=1, stop_early=False)  # every vote judged (stopping early: its own test)
    fit = await Synthesizer(llm, None, FitConfig(seed=0, selection=one_order)).fit(uid, votes)
    sel = fit.profile.meta["selection"]
    assert sel["orders"] == 1 and sel["n_judgments"] == 2 * 12 and sel["n_votes"] == 12
    assert sorted(sel["vote_ids"]) == sorted(v.id for v in votes)
    assert all(x in (0, 2) for c in sel["per_vote"] for x in sel["per_vote"][c])
    traces = {t.vote_id: t for t in fit.traces}
    for vid, got in zip(sel["vote_ids"], sel["per_vote"]["default"], strict=True):
        if vid in traces:  # a train vote: the default judge's verdict is its trace's
            assert got == 2 * traces[vid].verified
    # requests at the select call site: the validation votes' traces, the fold personas are "persona",
    # and one persona + demos judgment per vote (the default judge asked nothing)
    n_val = len(fit.profile.meta["val_ids"])
    assert llm.stats.site("select").requests <= n_val + 12


async def test_raced_selection_equals_scoring_every_candidate(population):
    """Branch and bound is exact: the same winner and accuracy as judging every candidate on every vote."""
    from synth_agent.engine.judge import Judge, count_correct

    cfg = FitConfig(seed=0, n_trials=10, n_demo_candidates=10)
    for uid in population.user_ids[11:15]:
        llm = SimBackend()
        synth = Synthesizer(llm, None, cfg)
        train, val = split_votes(population.votes(uid, 14), cfg.train_fraction)
        traces, _ = await synth.verify(uid, train, llm=llm)
        cands = synth.bootstrap_candidates(uid, train, traces)
        raced = await synth.rank_bootstrap(val, cands, llm=llm)
        orders = lambda v, s=synth: [s._order(v, "val")]  # noqa: E731
        scores = [(await count_correct(Judge(llm).with_demos(c), val, orders))[0] for c in cands]
        n_traces = [sum(d.reasoning is not None for d in c) for c in cands]
        best = max(range(len(cands)), key=lambda i: (scores[i], n_traces[i], -i))
        assert raced.best == best and raced.correct[best] == scores[best]
        assert raced.judgments < len(cands) * len(val)
        persona = await synth.write_persona(train, traces, [t.vote_id for t in traces if t.verified], llm=llm)
        sel = await synth.select_demos(uid, persona, train, val, traces, seed_demos=cands[best], llm=llm)
        demo_cands = synth.demo_candidates(uid, train, traces, cands[best])
        pj = Judge(llm, persona=persona)
        dscores = [(await count_correct(pj.with_demos(c), val, orders))[0] for c in demo_cands]
        dbest = max(range(len(demo_cands)), key=lambda i: (dscores[i], -i))
        assert sel.demos == demo_cands[dbest] and sel.accuracy == dscores[dbest] / len(val)


async def test_step1_most_traces_judges_nothing_and_seeds_step3_with_the_smallest_set_of_most_traces(population):
    """``step1="most_traces"`` (the default) asks no judgment in step 1: its winner is the candidate with the most
    traces, then the FEWEST demos (not the most: every served judgment carries them), and step 3 starts from it;
    ``step1="race"`` judges the candidates on validation."""
    tie_broken = 0
    for uid in population.user_ids[:8]:
        votes = population.votes(uid, 12)
        llm = SimBackend()
        synth = Synthesizer(llm, None, FitConfig(seed=0))
        fit = await synth.fit(uid, votes)
        assert llm.stats.site("bootstrap_score").requests == 0
        train, val = split_votes(votes, synth.config.train_fraction)
        cands = synth.bootstrap_candidates(uid, train, fit.traces)
        most = max(sum(d.reasoning is not None for d in c) for c in cands)
        tied = [c for c in cands if sum(d.reasoning is not None for d in c) == most]
        smallest = min(tied, key=len)
        assert fit.bootstrap_demos == smallest and smallest
        tie_broken += len(smallest) < max(len(c) for c in tied)
        assert synth.demo_candidates(uid, train, fit.traces, fit.bootstrap_demos)[0] == smallest
        verified = [t.verified for t in fit.traces if t.vote_id in {v.id for v in val}]
        assert fit.profile.meta["bootstrap_accuracy"] == sum(verified) / len(verified)
    assert tie_broken  # some user has sets of equally many traces but different sizes: the tie-break is exercised
    raced_llm = SimBackend()
    await Synthesizer(raced_llm, None, FitConfig(seed=0, step1="race")).fit(uid, votes)
    assert raced_llm.stats.site("bootstrap_score").requests > 0


async def test_step1_most_traces_without_a_verified_trace_starts_step3_from_zero_shot(population, monkeypatch):
    """A user none of whose traces verified has two step-1 sets, zero-shot and labels-only (no traces in either):
    ``"most_traces"`` takes zero-shot (the fewest demos), judges nothing, and the fit still completes, step 3
    racing labelled rivals against it, and saves a profile whose served configuration the guard chose."""
    uid = population.user_ids[0]
    votes = population.votes(uid, 12)
    monkeypatch.setattr(Synthesizer, "_usable", lambda self, train, traces: [])  # no trace may be a demo
    llm = SimBackend()
    synth = Synthesizer(llm, None, FitConfig(seed=0, race_demos="always"))  # the guard serves this user no demos
    fit = await synth.fit(uid, votes)
    train, _ = split_votes(votes, synth.config.train_fraction)
    cands = synth.bootstrap_candidates(uid, train, fit.traces)
    assert [len(c) for c in cands][0] == 0 and len(cands) == 2 and len(cands[1]) > 0
    assert fit.bootstrap_demos == [] and llm.stats.site("bootstrap_score").requests == 0
    assert llm.stats.site("demo_select").requests > 0  # step 3 still raced rivals against the zero-shot set
    assert fit.profile is not None and all(d.reasoning is None for d in fit.profile.demos)


def test_step1_race_keeps_the_config_key_of_profiles_fitted_before_it_was_a_knob():
    """Profiles fitted before ``step1`` existed raced step 1 and carry no such key: "race" leaves it out (so their
    refits stay incremental under ``step1="race"``); "most_traces" is another configuration, so it is in the key."""
    raced = Synthesizer(SimBackend(), None, FitConfig(step1="race"))
    most = Synthesizer(SimBackend(), None, FitConfig())
    assert "step1" not in raced._result_config() and most._result_config()["step1"] == "most_traces"
    assert raced.config_key() != most.config_key()


async def test_persona_writer_trims_examples_when_the_endpoint_reports_a_context_overflow(population):
    from synth_agent.llm.errors import ContextOverflowError

    class SmallContext(SimBackend):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        async def complete(self, messages, **kw):
            size = sum(len(m["content"]) for m in messages)
            if kw.get("call_site") == "persona":
                self.sizes.append(size)
                if size > 9_000:
                    raise ContextOverflowError("HTTP 400: maximum context length is 2048 tokens", context_length=2048)
            return await super().complete(messages, **kw)

    uid = population.user_ids[15]
    llm = SmallContext()
    res = await Synthesizer(llm, None, FitConfig(seed=0, verify=False)).fit(uid, population.votes(uid, 14))
    assert res.profile is not None and res.profile.persona
    assert llm.sizes[0] > 9_000 >= llm.sizes[-1] and len(llm.sizes) >= 2


class _Recording(SimBackend):
    """The simulator, recording every persona-writer prompt and every call site."""

    def __init__(self) -> None:
        super().__init__()
        self.persona_prompts: list[str] = []
        self.sites: list[str] = []

    async def complete(self, messages, **kw):  # type: ignore[no-untyped-def, override]
        self.sites.append(kw.get("call_site", ""))
        if kw.get("call_site") == "persona":
            self.persona_prompts.append(messages[-1]["content"])
        return await super().complete(messages, **kw)


@pytest.mark.parametrize("persona_votes", ["all", "verified", "choices"])
async def test_persona_writer_sees_every_context_vote_with_a_rationale_where_the_judge_was_wrong(
    population, persona_votes
):
    uid = population.user_ids[5]
    votes = population.votes(uid, 14)
    llm = _Recording()
    res = await Synthesizer(llm, None, FitConfig(seed=0, persona_votes=persona_votes)).fit(uid, votes, save=False)
    assert res.profile is not None
    context = set(res.profile.vote_ids)
    traces = {t.vote_id: t for t in res.traces}
    assert set(traces) == context  # validation votes are verified too, not only train votes
    verified = [v for v in votes if traces[v.id].verified]
    assert 0 < len(verified) < len(votes)  # the case this test is about: the judge got some votes wrong
    final = llm.persona_prompts[0]  # the fit's own persona is written first, the folds' after it
    shown = final.count("<example>")
    rationales = llm.sites.count("persona_rationale")
    if persona_votes == "all":
        assert shown == len(votes)  # every context vote, train and validation
        # each vote the judge got wrong is explained once per fit, however many folds write a persona
        assert rationales == len(votes) - len(verified)
        assert all(traces[v.id].reasoning in final for v in verified)
        assert "The user prefers" in final  # the insight prompt's rationale, where the trace was wrong
    elif persona_votes == "choices":
        # every context vote, the verified ones with their trace, the others as the bare choice: no extra call
        assert shown == len(votes) and rationales == 0
        assert all(traces[v.id].reasoning in final for v in verified)
        assert final.count(NO_NOTE) == len(votes) - len(verified)
    else:
        assert shown == len(verified) and rationales == 0


async def test_context_demos_are_every_context_vote_labelled_and_cross_validation_uses_the_same_recipe(population):
    """demo_votes="context": the served demos are the user's context votes (train and validation), each labelled
    with the user's choice; each cross-validation fold's persona + demos judge gets the other folds' votes."""
    uid = population.user_ids[5]
    votes = population.votes(uid, 14)
    llm = _Recording()
    cfg = FitConfig(seed=0, demo_votes="context", max_context_demos=12, race_demos="always")
    res = await Synthesizer(llm, None, cfg).fit(uid, votes, save=False)
    assert res.profile is not None
    demos = res.profile.demos
    assert [d.vote_id for d in demos] == res.profile.vote_ids[-12:]  # the most recent, in time order
    by_id = {v.id: v for v in votes}
    assert all(d.reasoning is None and d.chosen == by_id[d.vote_id].chosen for d in demos)
    # no search: the one set is judged once per validation vote (its in-sample accuracy), never raced
    assert 0 < llm.sites.count("demo_select") <= len(res.profile.meta["val_ids"])
    synth = Synthesizer(SimBackend(0), None, cfg)
    folds = synth.cv_folds(uid, votes[:10])
    outside = [v for fold in folds[1:] for v in fold]
    assert [d.vote_id for d in synth.demo_candidates("u", outside, [])[0]] == [v.id for v in outside][-12:]
    with pytest.raises(ValueError):
        FitConfig(demo_votes="every")  # type: ignore[arg-type]


def test_persona_writer_v3_names_the_note_the_engine_writes_for_a_bare_choice():
    """persona_writer.v3 tells the writer how to read a vote shown without reasoning (persona_votes="choices"):
    it must quote the engine's note, or a real LLM cannot tell those examples apart."""
    from synth_agent import prompts

    text = prompts.load("persona_writer.v3")
    assert NO_NOTE.strip("()") in text
    msgs = prompts.persona_messages([], version="persona_writer.v3")
    assert msgs[0]["content"] == text


async def test_step3_races_only_where_the_guard_serves_its_demos(population):
    """``race_demos="served"``: cross-validation decides first; a user the guard serves persona + demos
    gets exactly the demos racing alongside it gives ("always"), a user it serves the default gets the set
    cross-validation's recipe draws from all train votes, unraced, and no step-3 request. The guard's evidence and
    decision do not change."""
    kinds = {"raced": 0, "unraced": 0}
    for uid in population.user_ids[:12]:
        votes = population.votes(uid, 14)
        lazy_llm, always_llm = SimBackend(), SimBackend()
        lazy = await Synthesizer(lazy_llm, None, FitConfig(seed=0, race_demos="served")).fit(uid, votes, save=False)
        always = await Synthesizer(always_llm, None, FitConfig(seed=0, race_demos="always")).fit(uid, votes, save=False)
        assert lazy.profile is not None and always.profile is not None
        assert lazy.profile.meta["selection"] == always.profile.meta["selection"]
        assert lazy.profile.persona == always.profile.persona
        if lazy.profile.meta["selection"]["served"] == "persona_demos":
            kinds["raced"] += 1
            assert lazy.profile.meta["demos_status"] == "selected"
            assert lazy.profile.demos == always.profile.demos
            assert lazy.profile.val_accuracy == always.profile.val_accuracy
            assert lazy_llm.stats.site("demo_select").requests == always_llm.stats.site("demo_select").requests > 0
        else:
            kinds["unraced"] += 1
            assert lazy.profile.meta["demos_status"] == "unraced" and lazy.profile.val_accuracy is None
            assert lazy_llm.stats.site("demo_select").requests == 0 < always_llm.stats.site("demo_select").requests
            train, val = split_votes(votes, 0.7)
            recipe = Synthesizer(SimBackend(), None, FitConfig(seed=0))  # cross-validation's recipe, on all of train
            assert lazy.profile.demos == recipe.demo_candidates(uid, train, lazy.traces)[0] and lazy.profile.demos
            assert lazy.usage["prompt_tokens"] < always.usage["prompt_tokens"]
    assert kinds["raced"] and kinds["unraced"]  # the population holds both kinds of user


async def test_a_refit_that_turns_to_persona_demos_races_the_demos_the_fit_skipped(population, monkeypatch):
    """``race_demos="served"``: a profile with unraced demos is refitted incrementally like any other (the new votes
    judged with its demos, the recipe cross-validation scored); while the guard still serves the default nothing is
    raced, and once it serves persona + demos the refit runs step 3 as a full fit on the refit's split would — the
    current persona, step 1's pick on that split first — and saves the winner as selected."""
    from dataclasses import replace

    from synth_agent.engine.selection import Selection

    mem = memory()
    synth = Synthesizer(SimBackend(), mem, FitConfig(seed=0, race_demos="served"))
    for uid in population.user_ids:
        votes = population.votes(uid, 16)
        await mem.add_votes(votes[:12])
        first = await synth.fit(uid)
        if first.profile is not None and first.profile.meta["demos_status"] == "unraced":
            break
    else:
        pytest.fail("no user of the population is served the default")
    await mem.add_votes(votes[12:])
    plan = synth.plan(votes, first.profile)
    assert plan.new, "the refit is incremental"
    sel = Selection.from_meta(first.profile.meta["selection"])
    assert await synth.refit_demos(uid, plan, sel) is None  # still the default: nothing to race
    turned = replace(sel, served="persona_demos")
    raced = await synth.refit_demos(uid, plan, turned)
    assert raced is not None and raced.candidates_scored > 1
    traces, _ = await synth.verify(uid, [*plan.train, *plan.val])  # stored by now: in the split's order
    cands = synth.bootstrap_candidates(uid, plan.train, traces)  # step 1 on the refit's split
    seed = cands[(await synth.pick_bootstrap(plan.val, cands, traces))[0]]
    expect = await Synthesizer(SimBackend(), None, FitConfig(seed=0)).select_demos(
        uid, first.profile.persona, plan.train, plan.val, traces, seed_demos=seed
    )
    assert raced.demos == expect.demos and raced.accuracy == expect.accuracy
    # through fit(): the refit's guard turns (forced here), so the saved version carries raced demos
    real_update = Synthesizer.update

    async def update_then_turn(self, *a, **k):  # type: ignore[no-untyped-def]
        out = await real_update(self, *a, **k)
        return replace(out, served="persona_demos") if out is not None else None

    monkeypatch.setattr(Synthesizer, "update", update_then_turn)
    llm = SimBackend()
    second = await Synthesizer(llm, mem, FitConfig(seed=0, race_demos="served")).fit(uid)
    assert second.profile is not None and second.profile.meta["refit"]["kind"] == "incremental"
    assert second.profile.meta["demos_status"] == "selected" and second.profile.demos == raced.demos
    assert second.profile.val_accuracy == raced.accuracy and llm.stats.site("demo_select").requests > 0
    assert second.profile.persona == first.profile.persona
