"""Which HTTP stack the router's OpenAI-compatible edge runs on: the measurement behind it.

Why this exists: issue 15 asks for the HTTP edge to be served by a production HTTP stack
chosen for speed, measured before choosing, on the router's own event loop (uvloop). Each
candidate serves the same handler in a process of its own: read the JSON body of a chat
request, run a stand-in for the pipeline (one await), and answer with a ChatCompletion built
from the openai package's types (JSON), or with six SSE events (stream). grpc.aio serves the
same through RouterService/Chat and ChatStream, for scale. A closed-loop client in this
process (aiohttp with keep-alive connections, or a grpc.aio channel) sends requests at
concurrency 1 and 32; the figure is the server process's CPU per request, from /proc.

Candidates: aiohttp's low-level server; uvicorn (httptools parser) with a bare ASGI app;
uvicorn with Starlette; uvicorn with its pure-Python h11 parser. A candidate whose package is
missing is skipped and said so.

`python -m bench.http_stacks` (`make bench-http-stacks`) prints the table and writes
.build/bench/http_stacks.json; docs/BENCHMARKS.md ("HTTP edge") records a run. Only 127.0.0.1
is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench.batching import machine, process_cpu_s, run_main, write_report
from bench.streaming import BenchError
from deploy.local.ports import free_port
from libs.config import REPO_ROOT

DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "http_stacks.json"
TEXT = "hello world " * 4
SSE_EVENTS = 5
STACKS = ("grpc.aio", "aiohttp", "uvicorn+httptools", "uvicorn+starlette", "uvicorn+h11")
NEEDS = {
    "uvicorn+httptools": ("uvicorn", "httptools"),
    "uvicorn+starlette": ("uvicorn", "httptools", "starlette"),
    "uvicorn+h11": ("uvicorn", "h11"),
}
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


# -- the servers (each runs in a process of its own: `python -m bench.http_stacks serve`) -----


def completion_json(body: dict[str, Any]) -> bytes:
    from openai.types import CompletionUsage
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice

    answer = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        object="chat.completion",
        created=int(time.time()),
        model=body["model"],
        choices=[
            Choice(
                index=0,
                finish_reason="stop",
                logprobs=None,
                message=ChatCompletionMessage(role="assistant", content=TEXT),
            )
        ],
        usage=CompletionUsage(prompt_tokens=10, completion_tokens=20, total_tokens=30),
    )
    return answer.model_dump_json(exclude_unset=True).encode()


def sse_events() -> list[bytes]:
    chunk = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"hi "}}]}\n\n'
    return [chunk] * SSE_EVENTS + [b"data: [DONE]\n\n"]


async def pipeline() -> str:
    await asyncio.sleep(0)  # the stand-in for the router's pipeline: one await
    return TEXT


async def serve_grpc(port: int) -> None:
    import grpc
    from shepherd.router.v1 import router_pb2, router_pb2_grpc

    class Router(router_pb2_grpc.RouterServiceServicer):
        async def Chat(self, request: Any, context: Any) -> Any:
            text = await pipeline()
            return router_pb2.ChatResponse(model=request.model, text=text, finish_reason="stop")

        async def ChatStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            for _ in range(SSE_EVENTS + 1):
                await asyncio.sleep(0)
                yield router_pb2.ChatStreamResponse(delta=router_pb2.ChatDelta(text="hi "))

    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    router_pb2_grpc.add_RouterServiceServicer_to_server(Router(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await asyncio.Event().wait()


async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = json.loads(await request.read())
        if request.path.endswith("/stream"):
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for event in sse_events():
                await asyncio.sleep(0)
                await response.write(event)
            await response.write_eof()
            return response
        await pipeline()
        return web.Response(body=completion_json(body), content_type="application/json")

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def asgi_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """A bare ASGI application: what the edge would be on uvicorn without a framework."""
    if scope["type"] != "http":
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = json.loads(b"".join(parts))
    if scope["path"].endswith("/stream"):
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for event in sse_events():
            await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await pipeline()
    data = completion_json(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        await pipeline()
        return Response(completion_json(body), media_type="application/json")

    async def stream(request: Request) -> Response:
        json.loads(await request.body())

        async def events() -> AsyncIterator[bytes]:
            for event in sse_events():
                await asyncio.sleep(0)
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/chat/completions/stream", stream, methods=["POST"]),
        ]
    )


async def serve_uvicorn(port: int, app: Any, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=http,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    await uvicorn.Server(config).serve()


def serve(stack: str, port: int) -> None:
    servers: dict[str, Callable[[], Awaitable[None]]] = {
        "grpc.aio": lambda: serve_grpc(port),
        "aiohttp": lambda: serve_aiohttp(port),
        "uvicorn+httptools": lambda: serve_uvicorn(port, asgi_app, "httptools"),
        "uvicorn+starlette": lambda: serve_uvicorn(port, starlette_app(), "httptools"),
        "uvicorn+h11": lambda: serve_uvicorn(port, asgi_app, "h11"),
    }
    uvloop.run(servers[stack]())  # type: ignore[arg-type]


# -- the client -------------------------------------------------------------------------------


async def caller(stack: str, port: int, stream: bool) -> tuple[Callable[[], Awaitable[None]], Any]:
    """One request function for `stack`, and what to close afterwards."""
    if stack == "grpc.aio":
        import grpc
        from shepherd.common.v1 import common_pb2
        from shepherd.router.v1 import router_pb2, router_pb2_grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = router_pb2_grpc.RouterServiceStub(channel)
        message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi there")
        metadata = (("authorization", "Bearer sk-bench"),)

        async def grpc_call() -> None:
            if stream:
                request = router_pb2.ChatStreamRequest(model="m", messages=[message])
                async for _ in stub.ChatStream(request, metadata=metadata, timeout=10):
                    pass
            else:
                request = router_pb2.ChatRequest(model="m", messages=[message])
                await stub.Chat(request, metadata=metadata, timeout=10)

        return grpc_call, channel

    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = f"http://127.0.0.1:{port}/v1/chat/completions" + ("/stream" if stream else "")
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": stream}
    ).encode()
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}

    async def http_call() -> None:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                raise BenchError(f"{stack}: HTTP {response.status}")
            await response.read()

    deadline = time.monotonic() + 20
    while True:
        try:
            await http_call()
            break
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise BenchError(f"{stack} did not start listening") from None
            await asyncio.sleep(0.1)
    return http_call, session


async def measure(
    stack: str, port: int, pid: int, stream: bool, concurrency: int, requests: int
) -> tuple[float, float]:
    """Server CPU ms per request and req/s, closed loop."""
    call, resource = await caller(stack, port, stream)
    try:
        for _ in range(100):
            await call()
        tickets = iter(range(requests))

        async def worker() -> None:
            for _ in tickets:
                await call()

        cpu, began = process_cpu_s([pid]), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, used = time.perf_counter() - began, process_cpu_s([pid]) - cpu
    finally:
        await resource.close()
    return used * 1000 / requests, requests / wall


def available(stack: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in NEEDS.get(stack, ()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[tuple[float, float]]] = {}
    skipped = [s for s in STACKS if not available(s)]
    for stack in skipped:
        print(f"{stack}: skipped, {' or '.join(NEEDS[stack])} is not installed", flush=True)
    stacks = [s for s in STACKS if s not in skipped]
    for repetition in range(args.repetitions):
        for stack in stacks:
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "bench.http_stacks", "serve", stack, str(port)],
                cwd=REPO_ROOT,
            )
            try:
                for stream in (False, True):
                    for concurrency, requests in ((1, args.requests_c1), (32, args.requests)):
                        ms, rps = uvloop.run(
                            measure(stack, port, server.pid, stream, concurrency, requests)
                        )
                        key = f"{stack}|{'SSE' if stream else 'JSON'}|{concurrency}"
                        results.setdefault(key, []).append((ms, rps))
                        print(
                            f"round {repetition + 1}: {stack:<18} {'SSE' if stream else 'JSON':<4}"
                            f" c={concurrency:<3} server CPU {ms:.3f} ms/req, {rps:.0f} req/s",
                            flush=True,
                        )
            finally:
                server.terminate()
                server.wait(timeout=10)
    rows = []
    for key, values in results.items():
        name, kind, level = key.split("|")
        rows.append(
            {
                "stack": name,
                "response": kind,
                "concurrency": int(level),
                "server_cpu_ms_per_request": round(statistics.median(v[0] for v in values), 3),
                "requests_per_s": round(statistics.median(v[1] for v in values)),
                "rounds": [[round(ms, 3), round(rps)] for ms, rps in values],
            }
        )
    return {"rows": rows, "skipped": skipped}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| stack | response | conc | server CPU ms/req (median) | req/s (median) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["response"], r["concurrency"])):
        lines.append(
            f"| {row['stack']} | {row['response']} | {row['concurrency']} |"
            f" {row['server_cpu_ms_per_request']:.3f} | {row['requests_per_s']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_stacks", description=__doc__)
    parser.add_argument("--requests-c1", type=int, default=2000, help="per run at c=1 (2000)")
    parser.add_argument("--requests", type=int, default=6000, help="per run at c=32 (6000)")
    parser.add_argument("--repetitions", type=int, default=3, help="rounds over all stacks (3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = run(args)
    table = markdown(result["rows"])
    print("\n" + table)
    report = {
        "benchmark": "http_stacks",
        "machine": machine(load_before),
        "markdown": table,
        **result,
    }
    return write_report(
        report,
        args.output.resolve(),
        "docs/BENCHMARKS.md (HTTP edge) explains it",
        failed=False,
        require=False,
        holds=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        run_main(main, (BenchError,))
