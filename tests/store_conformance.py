"""Reusable conformance suite for stores: BaseStore behaviour + the PreferenceMemory contract.

Use it by subclassing ``BaseStoreConformance`` and/or ``MemoryConformance`` in a
``test_*.py`` module and defining a ``store`` fixture that returns a *fresh*
``BaseStore`` whose semantic index embeds the field ``text`` with MiniLM. The same
assertions then hold for ChromaStore (embedded or server) and LangGraph's
InMemoryStore, which is the point: PreferenceMemory must work on any BaseStore.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta

import pytest
from langgraph.store.base import BaseStore, InvalidNamespaceError

from store.embeddings import MiniLMEmbeddings
from store.memory import FIT_KINDS, PreferenceMemory
from synth_agent.models import Demo, Message, PersonaProfile, Trace, Vote


@functools.cache
def shared_minilm() -> MiniLMEmbeddings:
    """One model per test process (loading it takes a fraction of a second, but tests share it)."""
    return MiniLMEmbeddings()


def make_vote(user_id: str, text: str, n: int = 0, *, ts: datetime | None = None) -> Vote:
    return Vote(
        user_id=user_id,
        context=[Message(role="user", content=text)],
        chosen=f"chosen answer {n} to {text}",
        rejected=f"rejected answer {n}",
        timestamp=ts,
    )


TOPICS = {
    "python": "How do I write a Python function that reverses a list of integers?",
    "cooking": "What is a good recipe for a tomato pasta sauce with basil?",
    "travel": "Which museums should I visit on a weekend trip to Paris?",
    "garden": "When should I plant tulip bulbs in my garden?",
}

ODD_USERS = ["ana@example.com", "élodie.dupont", "用户.测试", "a.b.c", "50%/off", "3f2b9c1e-8a7d-4c5e-9f00-1234567890ab"]


class BaseStoreConformance:
    """LangGraph BaseStore semantics every store we ship must honour."""

    async def test_put_get_roundtrip_and_timestamps(self, store: BaseStore) -> None:
        ns = ("docs", "ü ñ", "a@b", "x/y", "spa ce", "%25")
        value = {"text": "hello", "nested": {"n": 1, "l": [1, "two", None]}, "emoji": "🙂"}
        await store.aput(ns, "k.1", value)
        item = await store.aget(ns, "k.1")
        assert item is not None
        assert item.value == value and item.key == "k.1" and item.namespace == ns
        assert item.created_at.tzinfo is not None and item.updated_at >= item.created_at
        await asyncio.sleep(0.01)
        await store.aput(ns, "k.1", {"text": "changed"})
        again = await store.aget(ns, "k.1")
        assert again is not None and again.value == {"text": "changed"}
        assert again.updated_at > item.updated_at  # InMemoryStore also resets created_at; Chroma keeps it
        assert await store.aget(ns, "missing") is None
        assert await store.aget(("docs",), "k.1") is None

    async def test_delete(self, store: BaseStore) -> None:
        await store.aput(("a", "b"), "k", {"text": "x"})
        await store.aput(("a", "b"), "k2", {"text": "y"})
        await store.adelete(("a", "b"), "k")
        assert await store.aget(("a", "b"), "k") is None
        assert [i.key for i in await store.asearch(("a",))] == ["k2"]
        assert [i.key for i in await store.asearch(("a",), query="x")] == ["k2"]
        await store.adelete(("a", "b"), "never-existed")  # no error

    async def test_invalid_namespaces_rejected(self, store: BaseStore) -> None:
        for bad in [("a.b",), ("",), ()]:
            with pytest.raises(InvalidNamespaceError):
                await store.aput(bad, "k", {"v": 1})
        with pytest.raises(InvalidNamespaceError):
            await store.asearch(("x.y",))

    async def test_search_filters(self, store: BaseStore) -> None:
        ns = ("f",)
        for i in range(6):
            await store.aput(ns, f"k{i}", {"n": i, "color": "red" if i % 2 else "blue", "meta": {"tag": i % 3}})
        await store.aput(("other",), "k0", {"n": 0, "color": "red"})

        async def keys(**flt: object) -> set[str]:
            return {i.key for i in await store.asearch(ns, filter=dict(flt), limit=100)}

        assert await keys(color="red") == {"k1", "k3", "k5"}
        assert await keys(n={"$eq": 2}) == {"k2"}
        assert await keys(n={"$ne": 2}) == {"k0", "k1", "k3", "k4", "k5"}
        assert await keys(n={"$gt": 3}) == {"k4", "k5"}
        assert await keys(n={"$gte": 3}) == {"k3", "k4", "k5"}
        assert await keys(n={"$lt": 2}) == {"k0", "k1"}
        assert await keys(n={"$lte": 1, "$gte": 1}) == {"k1"}
        assert await keys(color="blue", n={"$gt": 1}) == {"k2", "k4"}
        assert await keys(meta={"tag": 0}) == {"k0", "k3"}
        assert await keys(color="green") == set()

    async def test_search_pagination(self, store: BaseStore) -> None:
        ns = ("p", "q")
        for i in range(25):
            await store.aput(ns, f"k{i:02d}", {"n": i, "even": i % 2 == 0}, index=False)
        pages = [await store.asearch(("p",), limit=10, offset=o) for o in (0, 10, 20, 30)]
        assert [len(p) for p in pages] == [10, 10, 5, 0]
        assert len({i.key for p in pages for i in p}) == 25
        fpages = [await store.asearch(("p",), filter={"even": True}, limit=5, offset=o) for o in (0, 5, 10)]
        assert [len(p) for p in fpages] == [5, 5, 3]
        keys = [i.key for p in fpages for i in p]
        assert len(set(keys)) == 13 and all(int(k[1:]) % 2 == 0 for k in keys)

    async def test_semantic_search(self, store: BaseStore) -> None:
        ns = ("sem", "u1")
        for name, text in TOPICS.items():
            await store.aput(ns, name, {"text": text, "topic": name})
        await store.aput(("sem", "u2"), "python", {"text": TOPICS["python"], "topic": "python"})
        hits = await store.asearch(ns, query="debugging a Python script that sorts arrays", limit=4)
        assert [h.key for h in hits][0] == "python" and len(hits) == 4
        scores = [h.score for h in hits]
        assert all(s is not None for s in scores) and scores == sorted(scores, reverse=True)  # type: ignore[type-var]
        assert {h.namespace for h in hits} == {ns}
        food = await store.asearch(ns, query="italian dinner", limit=1)
        assert [h.key for h in food] == ["cooking"]
        filtered = await store.asearch(ns, query="python code", filter={"topic": {"$ne": "python"}}, limit=10)
        assert "python" not in {h.key for h in filtered} and len(filtered) == 3
        page2 = await store.asearch(ns, query="python code", limit=2, offset=2)
        page1 = await store.asearch(ns, query="python code", limit=2)
        assert not {h.key for h in page1} & {h.key for h in page2}

    async def test_search_sorting_finds_the_one_distinct_item(self, store: BaseStore) -> None:
        """LangGraph's ``test_search_sorting`` case: one distinct item among 200 that share one embedding.

        An approximate index can bury the exact match under the duplicates; a namespace of this
        size must be ranked exactly, so the match comes first with a clearly higher score.
        """
        from langgraph.store.base import PutOp

        ns = ("sorting", "u")
        same = "The weather report for the coast: wind from the west, light rain later."
        # Trailing spaces do not change the tokens, so all 200 share one vector (distinct strings only
        # because InMemoryStore cannot embed one text twice in a batch: it dedupes, then miscounts).
        dups = [PutOp(ns, f"dup{i:03d}", {"text": same + " " * i}) for i in range(200)]
        await store.abatch([*dups, PutOp(ns, "one", {"text": "mmm"})])
        hits = await store.asearch(ns, query="mmm", limit=10)
        assert len(hits) == 10 and hits[0].key == "one"
        assert hits[0].score is not None and hits[1].score is not None and hits[0].score > hits[1].score
        offset = await store.asearch(ns, query="mmm", limit=5, offset=1)
        assert "one" not in {h.key for h in offset} and len(offset) == 5

    async def test_filter_on_nested_fields_by_dotted_path(self, store: BaseStore) -> None:
        """LangGraph's ``test_filter_keys_with_hyphens_and_digits``: a dotted filter key reaches nested fields.

        SqliteStore/PostgresStore behaviour; LangGraph's InMemoryStore matches top-level keys only.
        """
        from langgraph.store.memory import InMemoryStore

        if type(store) is InMemoryStore:
            pytest.skip("InMemoryStore filters top-level keys only (SqliteStore and ChromaStore follow dotted paths)")
        await store.aput(("docs",), "hyphen", {"access-level": "public", "user": {"access-level": "nested"}})
        await store.aput(("docs",), "digit", {"123abc": "ok", "user": {"123abc": "ok2"}})
        assert [r.key for r in await store.asearch(("docs",), filter={"access-level": "public"})] == ["hyphen"]
        assert [r.key for r in await store.asearch(("docs",), filter={"user.access-level": "nested"})] == ["hyphen"]
        assert [r.key for r in await store.asearch(("docs",), filter={"user.123abc": "ok2"})] == ["digit"]
        assert await store.asearch(("docs",), filter={"user.missing": "x"}) == []

    async def test_unindexed_items_are_not_semantic_hits(self, store: BaseStore) -> None:
        ns = ("idx",)
        await store.aput(ns, "indexed", {"text": TOPICS["garden"]})
        await store.aput(ns, "plain", {"text": TOPICS["python"]}, index=False)
        hits = await store.asearch(ns, query="python programming", limit=5)
        assert hits[0].key == "indexed" and hits[0].score is not None
        assert all(h.score is None for h in hits if h.key == "plain")
        assert {h.key for h in await store.asearch(ns)} == {"indexed", "plain"}

    async def test_list_namespaces(self, store: BaseStore) -> None:
        for ns in [("a", "b", "c"), ("a", "b", "d", "e"), ("a", "b", "d", "i"), ("a", "b", "f"), ("a", "c", "f"),
                   ("z", "ü@x", "f")]:
            await store.aput(ns, "k", {"v": 1}, index=False)
        assert await store.alist_namespaces(prefix=("a", "b"), max_depth=3) == [
            ("a", "b", "c"), ("a", "b", "d"), ("a", "b", "f")]
        assert await store.alist_namespaces(suffix=("f",)) == [("a", "b", "f"), ("a", "c", "f"), ("z", "ü@x", "f")]
        assert await store.alist_namespaces(prefix=("a", "*", "f")) == [("a", "b", "f"), ("a", "c", "f")]
        assert await store.alist_namespaces(suffix=("*", "f"), prefix=("z",)) == [("z", "ü@x", "f")]
        assert await store.alist_namespaces(max_depth=1) == [("a",), ("z",)]
        everything = await store.alist_namespaces()
        assert len(everything) == 6 and everything == sorted(everything)
        assert await store.alist_namespaces(limit=2, offset=1) == everything[1:3]
        assert await store.alist_namespaces(prefix=("nope",)) == []

    async def test_batch_mixed_ops_and_concurrency(self, store: BaseStore) -> None:
        await asyncio.gather(*(store.aput(("c",), f"k{i}", {"i": i}, index=False) for i in range(60)))
        assert len(await store.asearch(("c",), limit=100)) == 60
        from langgraph.store.base import GetOp, ListNamespacesOp, PutOp, SearchOp

        res = await store.abatch(
            [GetOp(("c",), "k1"), SearchOp(("c",), {"i": 5}), ListNamespacesOp(), PutOp(("c",), "new", {"i": -1})]
        )
        assert res[0].value == {"i": 1} and [i.key for i in res[1]] == ["k5"]  # type: ignore[union-attr,index]
        assert ("c",) in res[2] and res[3] is None  # type: ignore[operator]
        assert (await store.aget(("c",), "new")) is not None


class MemoryConformance:
    """The PreferenceMemory contract on any BaseStore."""

    async def test_add_vote_idempotent_and_ordered(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        t0 = datetime(2024, 1, 1, tzinfo=UTC)
        late = make_vote("u", "third", 3, ts=t0 + timedelta(days=2))
        early = make_vote("u", "first", 1, ts=t0)
        assert await mem.add_vote(late) is True
        assert await mem.add_vote(early) is True
        assert await mem.add_vote(early) is False
        mid = make_vote("u", "second", 2, ts=t0 + timedelta(days=1))
        res = await mem.add_votes([mid, mid, late])
        assert (res.added, res.duplicates) == (1, 2)
        assert [v.id for v in await mem.list_votes("u")] == [early.id, mid.id, late.id]
        assert (await mem.list_votes("u"))[0] == early
        assert await mem.count_votes("u") == 3
        assert await mem.count_votes("nobody") == 0 and await mem.list_votes("nobody") == []

    async def test_arrival_order_without_timestamps_and_paging(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store, page_size=7)
        votes = [make_vote("p", f"question number {i}", i) for i in range(20)]
        for v in votes:
            await mem.add_vote(v)
        assert [v.id for v in await mem.list_votes("p")] == [v.id for v in votes]
        assert await mem.count_votes("p") == 20

    async def test_concurrent_add_vote(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        votes = [make_vote("busy", f"concurrent question {i}", i) for i in range(200)]
        flags = await asyncio.gather(*(mem.add_vote(v) for v in votes))
        assert all(flags)
        assert await mem.count_votes("busy") == 200
        assert sorted(v.id for v in await mem.list_votes("busy")) == sorted(v.id for v in votes)
        again = await asyncio.gather(*(mem.add_vote(v) for v in votes))
        assert not any(again)
        dup = await asyncio.gather(*(mem.add_vote(votes[0]) for _ in range(10)))
        assert not any(dup)
        assert await mem.count_votes("busy") == 200

    async def test_invalid_input_stores_nothing(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        good = make_vote("v", "fine question")
        raw = {"user_id": "v", "context": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
        with pytest.raises(ValueError, match="not a Vote"):
            await mem.add_votes([good, raw])  # type: ignore[list-item]
        broken = make_vote("v", "other question")
        broken.rejected = broken.chosen  # mutated after validation
        with pytest.raises(ValueError, match="nothing was stored"):
            await mem.add_votes([good, broken])
        assert await mem.count_votes("v") == 0 and await mem.list_users() == []
        with pytest.raises(ValueError):
            await mem.list_votes(" padded ")
        with pytest.raises(ValueError):
            await mem.relevant_votes("v", "q", k=0)
        with pytest.raises(ValueError):
            await mem.put_traces("v", [{"vote_id": "x"}])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            await mem.put_cached_judgment("v", "k", {"bad": object()})
        with pytest.raises(ValueError):
            PreferenceMemory(store, tenant="")

    async def test_forget_fit_kinds_keeps_votes(self, store: BaseStore) -> None:
        # a forget that raced a running fit erases what the fit wrote afterwards, never later votes
        mem = PreferenceMemory(store)
        vote = make_vote("raced", "a vote cast after the user was forgotten")
        await mem.add_vote(vote)
        await mem.save_persona(PersonaProfile(user_id="raced", persona="likes short answers"))
        await mem.put_traces("raced", [Trace(vote_id=vote.id, chosen_first=True, reasoning="r", predicted="A", verified=True)])
        counts = await mem.forget_user("raced", kinds=FIT_KINDS)
        assert counts == {"personas": 1, "traces": 1, "judgments": 0}
        assert [v.id for v in await mem.list_votes("raced")] == [vote.id]
        assert await mem.persona_history("raced") == [] and await mem.get_traces("raced") == []
        assert await mem.list_users() == ["raced"]
        with pytest.raises(ValueError, match="unknown kinds"):
            await mem.forget_user("raced", kinds=["votez"])
        assert await mem.count_votes("raced") == 1

    async def test_relevant_votes_semantic(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        votes = {name: make_vote("r", text, i) for i, (name, text) in enumerate(TOPICS.items())}
        await mem.add_votes(votes.values())
        await mem.add_vote(make_vote("r2", "Python list reversal in one line?"))
        top = await mem.relevant_votes("r", "My Python code throws an IndexError when I loop over a list", k=2)
        assert top[0].id == votes["python"].id and len(top) == 2
        assert all(v.user_id == "r" for v in top)
        assert (await mem.relevant_votes("r", "vacation in France", k=1))[0].id == votes["travel"].id
        assert len(await mem.relevant_votes("r", "anything", k=10)) == 4
        assert await mem.relevant_votes("nobody", "python") == []

    async def test_personas_versioned(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        assert await mem.current_persona("pp") is None and await mem.persona_history("pp") == []
        demo = Demo(vote_id="v1", context=[Message(role="user", content="hi")], chosen="a", rejected="b",
                    reasoning="short")
        p1 = await mem.save_persona(PersonaProfile(user_id="pp", persona="Likes brevity.", demos=[demo]))
        p2 = await mem.save_persona(PersonaProfile(user_id="pp", persona="Likes brevity and code."))
        assert (p1.version, p2.version) == (1, 2)
        saved = await asyncio.gather(
            *(mem.save_persona(PersonaProfile(user_id="pp", persona=f"variant {i}")) for i in range(5))
        )
        assert sorted(p.version for p in saved) == [3, 4, 5, 6, 7]
        history = await mem.persona_history("pp")
        assert [p.version for p in history] == [1, 2, 3, 4, 5, 6, 7]
        assert history[0].demos == [demo] and history[0].persona == "Likes brevity."
        current = await mem.current_persona("pp")
        assert current is not None and current.version == 7
        # a version's meta can be amended in place (live-lift demotion): same version, other fields kept
        amended = await mem.update_persona_meta("pp", 1, {"demoted": {"votes": 12}})
        assert amended is not None and amended.version == 1 and amended.demos == [demo]
        history = await mem.persona_history("pp")
        assert history[0].meta == {"demoted": {"votes": 12}} and history[0].persona == "Likes brevity."
        assert [p.version for p in history] == [1, 2, 3, 4, 5, 6, 7] and not history[6].meta
        assert await mem.update_persona_meta("pp", 99, {"demoted": True}) is None
        with pytest.raises(ValueError):
            await mem.save_persona({"user_id": "pp", "persona": "x"})  # type: ignore[arg-type]

    async def test_one_fit_is_saved_once(self, store: BaseStore) -> None:
        """Two runs of the same fit (same ``fit_key``) racing: the second to save, having started from
        version ``since``, gets the first's version back and writes nothing; a refit started from that
        version (forced) and a fit of other votes are saved as usual."""
        mem = PreferenceMemory(store)
        fit = {"fit_key": "k1"}
        a = await mem.save_persona(PersonaProfile(user_id="fk", persona="run a", meta=fit), since=0)
        b = await mem.save_persona(PersonaProfile(user_id="fk", persona="run b", meta=fit), since=0)
        assert (a.version, b.version, b.persona) == (1, 1, "run a")
        assert [p.persona for p in await mem.persona_history("fk")] == ["run a"]
        forced = await mem.save_persona(PersonaProfile(user_id="fk", persona="forced", meta=fit), since=1)
        other = await mem.save_persona(PersonaProfile(user_id="fk", persona="more votes", meta={"fit_key": "k2"}),
                                       since=1)
        keyless = await mem.save_persona(PersonaProfile(user_id="fk", persona="no key"), since=0)
        assert (forced.version, other.version, keyless.version) == (2, 3, 4)
        assert len(await mem.persona_history("fk")) == 4

    async def test_traces_and_judgment_cache(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        t1 = Trace(vote_id="v1", chosen_first=True, reasoning="r1", predicted="A", verified=True, model="m")
        t2 = Trace(vote_id="v1", chosen_first=False, reasoning="r2", predicted="A", verified=False, model="m")
        await mem.put_traces("tr", [t1, t2])
        t1b = t1.model_copy(update={"reasoning": "updated"})
        await mem.put_traces("tr", [t1b])
        assert await mem.get_traces("tr") == [t1b, t2]
        assert await mem.get_traces("other") == []
        assert await mem.get_cached_judgment("tr", "k.1/ü") is None
        await mem.put_cached_judgment("tr", "k.1/ü", {"preferred": "A", "p": 0.9})
        assert await mem.get_cached_judgment("tr", "k.1/ü") == {"preferred": "A", "p": 0.9}
        assert await mem.get_cached_judgment("other", "k.1/ü") is None

    async def test_forget_user(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store)
        for user in ("gone", "stays"):
            await mem.add_votes([make_vote(user, f"q{i} {user}", i) for i in range(3)])
            await mem.save_persona(PersonaProfile(user_id=user, persona="p"))
            await mem.save_persona(PersonaProfile(user_id=user, persona="p2"))
            await mem.put_traces(user, [Trace(vote_id="v", chosen_first=True, reasoning="r", predicted="A",
                                              verified=True)])
            await mem.put_cached_judgment(user, "key", {"x": 1})
            await store.aput(mem.namespace(user, "pending_votes"), "tok", {"a": "x", "b": "y"}, index=False)
            await store.aput(mem.namespace(user, "lift"), "tok", {"version": 1, "won": True, "at": "2026-01-01"},
                             index=False)
        counts = await mem.forget_user("gone")
        assert counts == {"votes": 3, "personas": 2, "traces": 1, "judgments": 1, "pending_votes": 1, "lift": 1}
        assert await store.aget(mem.namespace("gone", "lift"), "tok") is None
        assert await store.aget(mem.namespace("gone", "pending_votes"), "tok") is None
        assert await store.aget(mem.namespace("stays", "pending_votes"), "tok") is not None
        assert await mem.list_votes("gone") == [] and await mem.current_persona("gone") is None
        assert await mem.get_traces("gone") == [] and await mem.get_cached_judgment("gone", "key") is None
        assert await mem.relevant_votes("gone", "q1") == []
        assert await mem.list_users() == ["stays"]
        assert await mem.count_votes("stays") == 3 and len(await mem.persona_history("stays")) == 2
        assert await mem.get_cached_judgment("stays", "key") == {"x": 1}
        assert await mem.forget_user("gone") == {
            "votes": 0, "personas": 0, "traces": 0, "judgments": 0, "pending_votes": 0, "lift": 0}

    async def test_tenant_isolation(self, store: BaseStore) -> None:
        a, b = PreferenceMemory(store, "tenant.a"), PreferenceMemory(store, "tenant-b")
        await a.add_vote(make_vote("x", TOPICS["python"]))
        await a.save_persona(PersonaProfile(user_id="x", persona="a's persona"))
        await a.put_cached_judgment("x", "k", {"t": "a"})
        assert await b.list_votes("x") == [] and await b.current_persona("x") is None
        assert await b.relevant_votes("x", "python") == [] and await b.list_users() == []
        assert await b.get_cached_judgment("x", "k") is None
        await b.add_vote(make_vote("x", TOPICS["cooking"]))
        assert [v.query_text for v in await a.list_votes("x")] == [TOPICS["python"]]
        await b.forget_user("x")
        assert await a.count_votes("x") == 1 and await a.list_users() == ["x"]
        await a.add_vote(make_vote("y", TOPICS["garden"]))
        assert await a.list_votes("y") != await a.list_votes("x")
        assert await a.users_with_counts() == {"x": 1, "y": 1}

    async def test_odd_user_ids_round_trip(self, store: BaseStore) -> None:
        mem = PreferenceMemory(store, tenant="acme.example/eu")
        for i, user in enumerate(ODD_USERS):
            await mem.add_vote(make_vote(user, f"question for user {i}", i))
            await mem.save_persona(PersonaProfile(user_id=user, persona=f"persona {i}"))
        assert await mem.list_users() == sorted(ODD_USERS)
        for i, user in enumerate(ODD_USERS):
            votes = await mem.list_votes(user)
            assert len(votes) == 1 and votes[0].user_id == user
            assert votes[0].query_text == f"question for user {i}"
            persona = await mem.current_persona(user)
            assert persona is not None and persona.user_id == user and persona.persona == f"persona {i}"
        # "a.b.c" must not collide with any other encoding
        assert (await mem.forget_user("a.b.c"))["votes"] == 1
        assert await mem.list_users() == sorted(u for u in ODD_USERS if u != "a.b.c")
