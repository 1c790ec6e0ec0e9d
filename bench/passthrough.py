"""A bare aiohttp passthrough proxy: every request forwarded to one upstream as it is, the answer streamed back.
`bench/proxy.py` runs it as its own process beside the proxy, as the floor the proxy's CPU per request is
measured against. Run: `python bench/passthrough.py --listen 127.0.0.1:PORT --upstream http://HOST:PORT`.
"""

from __future__ import annotations

import argparse
import sys

import aiohttp
from aiohttp import web


def app_for(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with app["session"].request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
            reply = web.StreamResponse(status=up.status)
            reply.content_type = up.content_type
            await reply.prepare(request)
            async for chunk in up.content.iter_any():
                await reply.write(chunk)
            await reply.write_eof()
            return reply

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the base URL every request goes to")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(app_for(args.upstream.rstrip("/")), host=host, port=int(port), print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
