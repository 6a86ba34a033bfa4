"""The router's OpenAI-compatible HTTP edge: a third adapter over the chat pipeline.

Code written against the OpenAI SDK (most code that calls LLMs) points `base_url` at
`http://<router>:8080/v1` and gets the mesh's batching, cache, budgets and billing unchanged:
POST /v1/chat/completions (JSON, or SSE with `stream: true`), POST /v1/embeddings, GET
/v1/models and GET /v1/models/{model}. It runs in the router process, on the gRPC server's
event loop (uvloop), and calls the same `ChatPipeline.run` as RouterService/Chat and
ChatStream (and `EmbedPipeline.embed` as RouterService/Embed): no extra hop, the same keys,
tenants, limits, cache and ledger. services/router/openai_compat.py owns the wire format;
this module owns the sockets, the trace span, the headers and the drain.

Why aiohttp's low-level server: measured on this machine (docs/BENCHMARKS.md, "HTTP edge"),
a bare aiohttp server and uvicorn with httptools serving a raw ASGI app cost the same CPU per
request (about 0.1 ms at concurrency 1, a third of a grpc.aio unary call), Starlette on
uvicorn 20-50 % more and uvicorn's pure-Python h11 parser twice as much. aiohttp is already a
dependency (the openai SDK's transport), runs inside an existing loop without taking over its
signals, and shuts down gracefully on its own terms; uvicorn would have needed its internals.

Streams: the status line and headers go out with the pipeline's first event, so an error
before any text (401, 404, 429, ...) is still an HTTP status with OpenAI's error JSON. Then
one `data:` event per chunk, exactly as OpenAI frames them: the role, the text deltas, the
finish reason, then a usage chunk (always, whether `stream_options.include_usage` asked for it
or not) carrying Shepherd's cost, placement and trace id, then `data: [DONE]`. An error after
the stream began (the usage chunk is still sent first) is an `{"error": ...}` event, which
the SDK raises as APIError. A caller that disconnects cancels its request, as a cancelled
gRPC call does: the work stops and what was generated is billed.

Shutdown (libs/server.py's Edge): on SIGTERM the listening socket closes, a request arriving
on a kept-alive connection is refused with 503 (the SDK retries it, on another replica behind
a load balancer), and the requests in flight run to the end within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import unquote

import grpc
from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge

from libs.catalog import Catalog
from libs.errors import ShepherdError
from libs.gate import InFlight
from libs.server import ListenError
from libs.telemetry import current_trace_id, end_http_status, http_server_span
from services.router.auth import Authenticator
from services.router.embeddings import EmbedPipeline
from services.router.openai_compat import (
    DONE,
    ChatCall,
    ErrorResponse,
    StopScanner,
    answer_headers,
    completion,
    cut_at_stop,
    embeddings,
    error_event,
    error_response,
    finish_chunk,
    first_chunk,
    http_error,
    model_entry,
    models_list,
    parse_chat,
    parse_embed,
    text_chunk,
    usage_chunk,
)
from services.router.pipeline import (
    FINISH_TEXT,
    ChatEvent,
    ChatPipeline,
    Ending,
    Metadata,
    Text,
)

_log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"
# Messages may hold 256 x 200,000 characters (services/router/validation.py); a body past
# this is refused with 413 (aiohttp stops reading it at the limit).
MAX_BODY_BYTES = 8 * 1024 * 1024
KEEPALIVE_S = 75.0
JSON = "application/json"
_FINISHED = {"stop", "length", "content_filter"}


class HttpEdge:
    """The OpenAI endpoints on the router's pipelines (see the module doc).

    Implements libs/server.py's `Edge`: `run_server` starts it with the gRPC server and drains
    it with the gRPC calls.
    """

    def __init__(
        self,
        host: str,
        port: int,
        pipeline: ChatPipeline,
        catalog: Catalog,
        authenticator: Authenticator,
        embeddings: EmbedPipeline | None = None,
    ) -> None:
        self._host = host
        self._embeddings = embeddings
        self._port = port
        self._pipeline = pipeline
        self._catalog = catalog
        self._auth = authenticator
        self._inflight = InFlight()
        self._closed = False
        self._runner: web.ServerRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._site: web.TCPSite | None = None
        # Models have no creation date in the catalog: they are as old as this process.
        self._created = int(time.time())

    @property
    def inflight(self) -> int:
        return self._inflight.count

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = web.Server(
            self._handle,
            request_factory=self._request,
            # A caller that goes away cancels its request, as a cancelled gRPC call does.
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=KEEPALIVE_S,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        # No SO_REUSEPORT (aiohttp's default leaves it off): a second router on the same
        # port must fail to start, not split the traffic (libs/server.py does the same).
        self._site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await self._site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise ListenError(
                f"the router's HTTP edge could not listen on {self.address} ({error.strerror}):"
                " is the port in use? (set SHEPHERD_ROUTER_HTTP_PORT to another port, or 0 to"
                " turn the HTTP edge off)"
            ) from None
        _log.info("serving HTTP", extra={"address": self.address})

    async def close(self) -> None:
        """Stop accepting connections; requests on open ones are refused with 503 from now."""
        self._closed = True
        if self._site is not None:
            await self._site.stop()

    async def drain(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._inflight.idle()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # closes idle connections, cancels what is left
            self._runner = None

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> Any:
        """aiohttp's request, with the body limit the edge allows."""
        assert self._loop is not None
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            self._loop,
            client_max_size=MAX_BODY_BYTES,
        )

    # -- requests ---------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method, path = request.method, request.path
        if path in (CHAT_PATH, EMBEDDINGS_PATH):
            route = path
        elif path == MODELS_PATH:
            route = MODELS_PATH
        elif path.startswith(MODELS_PATH + "/"):
            route = MODELS_PATH + "/{model}"
        else:
            return _error(http_error(404, f"Invalid URL ({method} {path})", "unknown_url"), {})
        allowed = "POST" if route in (CHAT_PATH, EMBEDDINGS_PATH) else "GET"
        if method != allowed:
            refusal = _error(
                http_error(405, f"{method} is not allowed on {path}: use {allowed}"), {}
            )
            refusal.headers["allow"] = allowed
            return refusal
        if self._closed:
            refusal = _error(
                http_error(503, "the router is shutting down: retry on another replica"), {}
            )
            refusal.force_close()
            return refusal
        self._inflight.enter()
        try:
            with http_server_span(method, route, request.headers) as span:
                response: web.StreamResponse
                try:
                    response = await self._serve(request, route)
                except ShepherdError as error:
                    response = _error(error_response(error), _ids(""))
                except ConnectionError:
                    # The caller went away while its answer was being written: nobody reads
                    # this response (its work was stopped and billed by the pipeline).
                    response = web.Response(status=499)
                except HTTPRequestEntityTooLarge:
                    response = _error(
                        http_error(
                            413,
                            f"the request body is larger than {MAX_BODY_BYTES} bytes",
                            "request_too_large",
                        ),
                        _ids(""),
                    )
                except Exception:
                    _log.exception("unhandled error", extra={"method": route})
                    response = _error(
                        http_error(
                            500,
                            f"internal error in {method} {route}; see the service logs for"
                            f" trace id {current_trace_id()}",
                            "internal",
                        ),
                        _ids(""),
                    )
                end_http_status(span, response.status, response.reason or "")
                return response
        finally:
            self._inflight.leave()

    async def _serve(self, request: web.BaseRequest, route: str) -> web.StreamResponse:
        metadata = _metadata(request)
        if route == MODELS_PATH:
            await self._auth.tenant_for(metadata)
            return web.Response(
                body=models_list(self._catalog, self._created),
                content_type=JSON,
                headers=_ids(""),
            )
        if route == EMBEDDINGS_PATH:
            return await self._embed(await request.read(), request.headers, metadata)
        if route != CHAT_PATH:
            await self._auth.tenant_for(metadata)
            name = unquote(request.path[len(MODELS_PATH) + 1 :])
            return web.Response(
                body=model_entry(self._catalog, name, self._created),
                content_type=JSON,
                headers=_ids(""),
            )
        body = await request.read()
        call = parse_chat(body, request.headers, uuid.uuid4().hex)
        events = cast(
            AsyncGenerator[ChatEvent, None],
            self._pipeline.run(
                call.request,
                metadata,
                call.timeout_s,
                deltas=call.stream,
                method="POST /v1/chat/completions",
            ),
        )
        async with contextlib.aclosing(events):
            if call.stream:
                return await self._stream(request, call, events)
            return await self._complete(call, events)

    async def _embed(
        self, body: bytes, headers: Mapping[str, str], metadata: Metadata
    ) -> web.Response:
        """POST /v1/embeddings on RouterService/Embed's path (services/router/embeddings.py)."""
        call = parse_embed(body, headers, uuid.uuid4().hex)
        if self._embeddings is None:
            raise ShepherdError(grpc.StatusCode.NOT_FOUND, "this router serves no embeddings")
        try:
            ending = await self._embeddings.embed(call.request, metadata, call.timeout_s)
        except ShepherdError as error:
            return _error(error_response(error), _ids(call.request.request_id))
        return web.Response(
            body=embeddings(call, ending),
            content_type=JSON,
            headers={**_ids(call.request.request_id), **answer_headers(ending)},
        )

    async def _complete(self, call: ChatCall, events: AsyncIterator[ChatEvent]) -> web.Response:
        """One JSON answer: the pipeline's text collected (unary, as gRPC Chat collects it)."""
        parts: list[str] = []
        ending: Ending | None = None
        try:
            async for event in events:
                if isinstance(event, Text):
                    parts.append(event.text)
                else:
                    ending = event
        except ShepherdError as error:
            return _error(error_response(error, call.names), _ids(call.request.request_id))
        assert ending is not None, "the pipeline always ends with an Ending or an error"
        text, stopped = "".join(parts), False
        if call.stop:
            text, stopped = cut_at_stop(text, call.stop)
        return web.Response(
            body=completion(call, text, ending, stopped=stopped),
            content_type=JSON,
            headers={**_ids(call.request.request_id), **answer_headers(ending)},
        )

    async def _stream(
        self, request: web.BaseRequest, call: ChatCall, events: AsyncIterator[ChatEvent]
    ) -> web.StreamResponse:
        """Server-sent events, framed as OpenAI frames them (see the module doc)."""
        response: web.StreamResponse | None = None
        created = int(time.time())
        model = ""
        scanner = StopScanner(call.stop) if call.stop else None
        held: Ending | None = None  # an Ending before any text: an error may follow it

        async def begin() -> web.StreamResponse:
            nonlocal model
            opened = web.StreamResponse(
                headers={
                    "content-type": "text/event-stream; charset=utf-8",
                    "cache-control": "no-cache",
                    "x-accel-buffering": "no",  # proxies such as nginx must not hold events
                    **_ids(call.request.request_id),
                }
            )
            await opened.prepare(request)
            # The pipeline has resolved the name by now (an unknown one raised before).
            model = self._catalog.resolve(call.request.model).name
            await opened.write(first_chunk(call, model, created))
            return opened

        async def end(ending: Ending, stream: web.StreamResponse) -> None:
            stopped = False
            if scanner is not None:
                rest = scanner.flush()
                if rest:
                    await stream.write(text_chunk(call, model, created, rest))
                stopped = scanner.hit
            if stopped or FINISH_TEXT.get(ending.finish_reason) in _FINISHED:
                await stream.write(finish_chunk(call, created, ending, stopped=stopped))
            await stream.write(usage_chunk(call, created, ending))

        try:
            async for event in events:
                if isinstance(event, Ending):
                    if response is None:
                        held = event
                        continue
                    await end(event, response)
                    continue
                if response is None:
                    response = await begin()
                text = scanner.feed(event.text) if scanner is not None else event.text
                if text:
                    await response.write(text_chunk(call, model, created, text))
        except ShepherdError as error:
            failure = error_response(error, call.names)
            if response is None:
                return _error(failure, _ids(call.request.request_id))
            await response.write(error_event(failure.body))
            await response.write_eof()
            return response
        if response is None:
            response = await begin()
            assert held is not None, "the pipeline always ends with an Ending or an error"
            await end(held, response)
        await response.write(DONE)
        await response.write_eof()
        return response


def _metadata(request: web.BaseRequest) -> list[tuple[str, str | bytes]]:
    """The request's credentials as the pipeline reads them (gRPC-style metadata). Every
    Authorization header is passed on, so two of them are refused as on gRPC."""
    return [("authorization", value) for value in request.headers.getall("authorization", ())]


def _ids(request_id: str) -> dict[str, str]:
    """The headers every answer carries: the trace id (and the request id, once known)."""
    headers = {"x-shepherd-trace-id": current_trace_id()}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


def _error(failure: ErrorResponse, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=failure.status,
        body=failure.body,
        content_type=JSON,
        headers={**headers, **failure.headers},
    )
