"""The proxy's request pipeline, one router for the proxy and `gpu-router route --explain`.

Like the gateways that route on what a model server can tell them (llm-d's endpoint picker, SGLang's
cache-aware router): `candidates` sees every node that could serve the request, filters drop the ones that
must not (`installed`: installed and up; `protected`: serving it there evicts no priority or busy model;
`healthy`: not failing — failing ones stay, last, for retries), weighted scorers give each survivor a score in
[0, 1] (`residency`, `queue`, `affinity`, `speed`), and `picker` orders them. `pipeline.choose` runs it all.
"""
