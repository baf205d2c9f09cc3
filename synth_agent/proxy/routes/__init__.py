"""The proxy's routers, one per resource; :func:`synth_agent.proxy.app.create_app` includes them all.

* :mod:`.openai` — OpenAI-compatible: chat completions (persona injected), models
* :mod:`.votes` — votes and A/B pairs
* :mod:`.judging` — rerank and judge
* :mod:`.users` — persona, history, prompt export, forget
* :mod:`.ops` — health and metrics

Request models depend on the app's limits, so each module builds its router with
``router(models)``; all share the auth dependency of :mod:`synth_agent.proxy.deps`.
"""
