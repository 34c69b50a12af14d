"""The Fleet gateway: the one port of a deployment that edge machines reach.

Flower's SuperLink (flwr 1.41 / 1.42) serves all its APIs from one HTTP app on one ``--host:--port``
(127.0.0.1 by default): the Fleet API (``/v1/fleet/*``, SuperNodes), the Control API
(``/v1/control/*``: ``flwr run``, ``flwr list``, ``flwr supernode register``, with no account
authentication outside Flower's enterprise plugins) and the runtime API (``/v1/runtime/*``, ServerApp
and SuperExec). Whoever reaches that port reaches them all. So the SuperLink stays on loopback and
this gateway listens on the public interface with TLS, forwarding to it only POSTs to the routes of
Flower's own Fleet router (``flwr.superlink.routers.fleet.router``); any other path is a 404 that never
reaches the SuperLink. SuperNode authentication (signed headers, checked by the SuperLink) passes
through unchanged. Run it beside the SuperLink (docs/deploy.md)::

    fedcola-gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 \\
        --ssl-certfile server.pem --ssl-keyfile server.key --superlink-ca ca.crt
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length", "content-encoding"}


def fleet_paths() -> list[str]:
    """The paths of Flower's Fleet router: everything a SuperNode calls, and nothing else."""
    from flwr.superlink.routers.fleet.router import router

    return [route.path for route in router.routes]


def app(superlink: str, verify: Path | bool, timeout: float = 120.0) -> Starlette:
    """An ASGI app that forwards the Fleet routes to ``superlink`` (``https://host:port``, TLS checked
    against ``verify``) and answers 404 to everything else."""
    client = httpx.AsyncClient(base_url=superlink, verify=str(verify) if isinstance(verify, Path) else verify, timeout=timeout)

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = await client.post(request.url.path, content=await request.body(), headers=headers)
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=kept)

    async def refuse(request: Request) -> Response:
        return PlainTextResponse("not a Fleet API route\n", status_code=404)

    routes = [Route(path, forward, methods=["POST"]) for path in fleet_paths()]
    routes.append(Route("/{path:path}", refuse, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcola-gateway", description="Expose only the SuperLink's Fleet API (TLS) on the public interface.")
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT the SuperNodes connect to (e.g. 0.0.0.0:9092)")
    parser.add_argument("--superlink", type=_address, default=("127.0.0.1", 9093), help="the SuperLink's loopback HOST:PORT (default 127.0.0.1:9093)")
    parser.add_argument("--ssl-certfile", type=Path, required=True, help="the gateway's TLS certificate (the SuperNodes' --root-certificates must sign it)")
    parser.add_argument("--ssl-keyfile", type=Path, required=True, help="its private key")
    parser.add_argument("--superlink-ca", type=Path, help="CA certificate of the SuperLink's TLS (omit for an --insecure SuperLink on loopback)")
    args = parser.parse_args(argv)
    for path in (args.ssl_certfile, args.ssl_keyfile, args.superlink_ca):
        if path is not None and not path.is_file():
            print(f"fedcola-gateway: {path} is not a readable file", file=sys.stderr)
            return 2
    scheme = "https" if args.superlink_ca else "http"
    host, port = args.superlink
    upstream = app(f"{scheme}://{host}:{port}", args.superlink_ca or False)
    listen_host, listen_port = args.listen
    uvicorn.run(upstream, host=listen_host, port=listen_port, ssl_certfile=str(args.ssl_certfile), ssl_keyfile=str(args.ssl_keyfile),
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
