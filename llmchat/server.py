"""``llmchat serve``: an OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/v1/models``).

Built on Starlette + uvicorn rather than FastAPI: three routes do not need FastAPI's pydantic
models or OpenAPI pages, and the request validation that matters is ``GenerationConfig``'s (the
same errors ``llmchat ask`` gives), so FastAPI would only add an import-time cost and a
dependency. Both are the optional extra ``pip install 'llmchat[serve]'`` and are imported only
when the server starts.

One generation runs at a time: an asyncio lock sits in front of the model and each reply is
produced in one worker thread, which streams its deltas back to the event loop. ``max_queue``
bounds how many requests may wait behind the running one (more get 429 with ``Retry-After``).
A client that goes away mid-reply sets the generation's cancel flag; the worker sees it after
the next token (``Reply.every_token``: also tokens that add no text yet) and closes the
``Reply`` from its own thread, which frees the model at once. Stop strings are cut in the
worker too, so the generation ends at the token that completes one.

Across requests the model keeps the KV cache of the last prompt and reply (ChatGLM2, Qwen), so a
conversation re-sent with one more turn prefills only its new tokens; the reused count is
``usage.prompt_tokens_details.cached_tokens``. VisualGLM's ``image_url`` parts: see
``ImagePolicy``. Complete replies go to the conversation log (``TurnLog``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmchat.errors import ContextOverflowError, ImageError, LLMChatError, UsageError
from llmchat.images import ImageFiles
from llmchat.types import GenerationConfig, Message, ReplyStats

if TYPE_CHECKING:
    from llmchat.models.base import ChatModel
    from llmchat.types import Reply

MAX_BODY_BYTES = 1 << 20
# VisualGLM: room for one data: URI image of images.MAX_DATA_BYTES (base64: 4/3) and the text
MAX_IMAGE_BODY_BYTES = 24 << 20
SERVE_EXTRA_HINT = "the server needs the 'serve' extra: pip install 'llmchat[serve]'"


class APIError(Exception):
    """An error answered with the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def require_serve_deps() -> None:
    """Import the optional server dependencies, or fail with one clear line."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{SERVE_EXTRA_HINT} ({exc})") from None


# -- request parsing -----------------------------------------------------------------------------
@dataclass
class ChatRequest:
    system: str | None
    history: list[Message]
    question: Message
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    # images to write to the server's image folder before the reply starts: path -> bytes
    uploads: dict[str, bytes] = field(default_factory=dict)
    # what the conversation log records for each image path (sha256 of a data: URI, the file)
    image_refs: dict[str, str] = field(default_factory=dict)


@dataclass
class ImagePolicy:
    """Where a request's images may come from: ``data:`` URIs always, files only inside
    ``allow_dir`` (``--allow-local-images``), never the network. Each image is checked as
    ``llmchat image`` checks a file, then kept in ``store`` for the model to read."""

    store: ImageFiles = field(default_factory=ImageFiles)
    allow_dir: Path | None = None

    def resolve(self, url: Any, param: str, req: ChatRequest) -> str:
        """The path the model reads for this image (registered in ``req``)."""
        from llmchat import images

        if not isinstance(url, str) or not url:
            raise APIError(400, "an image_url part needs a 'url' string", param=param)
        try:
            data, ref = images.read_image_url(url, self.allow_dir)
            info = images.check_image(data, formats=images.NETWORK_FORMATS,
                                      name=f"the image in {param}")
        except images.ImageRefused as exc:
            raise APIError(400, str(exc), param=param, code="image_url_refused") from None
        except ImageError as exc:
            raise APIError(400, str(exc), param=param) from None
        path, digest = self.store.path(data, info.format)
        req.uploads[path] = data
        req.image_refs[path] = ref or f"sha256:{digest}"
        return path


def _content(value: Any, i: int, role: str, model: ChatModel, images: ImagePolicy,
             req: ChatRequest) -> tuple[str, str | None]:
    """The text of a message's content and the path of its image (None: none)."""
    param = f"messages[{i}].content"
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise APIError(400, "message content must be a string or a list of content parts",
                       param=param)
    parts: list[str] = []
    paths: list[str] = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
            continue
        if kind != "image_url":
            raise APIError(400, "content parts must be of type 'text' (with a 'text' string) "
                           "or 'image_url'", param=f"{param}[{j}]")
        if not model.supports_images:
            raise APIError(400, f"{model.name} takes no images (only VisualGLM-6B does)",
                           param=f"{param}[{j}]", code="images_not_supported")
        if role != "user":
            raise APIError(400, "images go in user messages only", param=f"{param}[{j}]")
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        paths.append(images.resolve(url, f"{param}[{j}].image_url", req))
    if len(set(paths)) > 1:
        raise APIError(400, f"{model.name} takes one image per conversation (as upstream); "
                       "this message has several", param=param, code="too_many_images")
    return "".join(parts), paths[0] if paths else None


def parse_request(body: Any, model: ChatModel, base: GenerationConfig,
                  images: ImagePolicy | None = None) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    images = images or ImagePolicy()
    req = ChatRequest(None, [], Message("user", ""), base)
    messages: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, "each message must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"unknown role {role!r}; expected system, user or assistant",
                           param=f"messages[{i}].role")
        text, image = _content(m.get("content"), i, role, model, images, req)
        messages.append(Message(role, text, image))
    system = None
    if messages[0].role == "system":
        system = messages.pop(0).content
    if any(m.role == "system" for m in messages):
        raise APIError(400, "a system message is only allowed first", param="messages")
    if not messages or messages[-1].role != "user":
        raise APIError(400, "the conversation must end with a user message", param="messages")
    body_msgs = messages[:-1]
    if any(m.role != ("user", "assistant")[j % 2] for j, m in enumerate(body_msgs)) or len(
        body_msgs
    ) % 2:
        raise APIError(400, "the conversation must alternate user and assistant messages",
                       param="messages")
    if not messages[-1].content.strip() and messages[-1].image is None:
        raise APIError(400, "the last user message is empty", param="messages")
    if len({m.image for m in messages if m.image}) > 1:
        raise APIError(400, f"{model.name} takes one image per conversation (as upstream); "
                       "this conversation has several different ones", param="messages",
                       code="too_many_images")
    if system is not None and not model.supports_system:
        if system.strip():
            raise APIError(400, f"{model.name} has no system role", param="messages")
        system = None

    n = body.get("n", 1)
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = bool(so.get("include_usage", False))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop")
    stops = [s for s in stops if s]

    values: dict[str, Any] = {}
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repetition_penalty"), ("seed", "seed"),
                      ("max_completion_tokens", "max_new_tokens"),
                      ("max_tokens", "max_new_tokens")):
        if body.get(key) is not None:
            values[name] = body[key]
    try:
        config = base.with_(**values)
    except UsageError as exc:
        param = next((k for k in values if k in str(exc)), None)
        raise APIError(400, str(exc), param=param) from None
    except TypeError as exc:
        raise APIError(400, str(exc)) from None
    req.system, req.history, req.question, req.config = system, body_msgs, messages[-1], config
    req.stream, req.include_usage, req.stop = stream, include_usage, stops
    return req


class StopCutter:
    """Holds back text that may be the start of a stop string; cuts at the first one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buf = ""
        self.hit = False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def push(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.buf += delta
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.buf = self.buf[: min(found)], ""
            return out
        cut = max(0, len(self.buf) - self.keep)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# -- the engine: one generation at a time, in a worker thread -------------------------------------
class QueueFull(Exception):
    pass


@dataclass
class Result:
    """A completion as the client gets it: the text (cut at a stop string), why it ended."""

    text: str
    finish_reason: str  # "stop" | "length"
    stats: ReplyStats
    complete: bool  # ran to its end or to a stop string (not stopped because the client left)


class Generation:
    """One reply produced by a worker thread; events arrive on an asyncio queue:
    ("start", None), ("delta", text), ("end", Result) or ("error", exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()

    def post(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed (shutdown)
            pass


class Engine:
    def __init__(self, model: ChatModel, base: GenerationConfig,
                 max_queue: int | None = None, *, images: ImagePolicy | None = None,
                 log: TurnLog | None = None) -> None:
        self.model = model
        self.base = base
        self.max_queue = max_queue
        self.images = images or ImagePolicy()
        self.log = log
        self.lock: asyncio.Lock | None = None
        self.waiting = 0
        self.shutdown = threading.Event()
        self.active: set[Generation] = set()
        # One long-lived thread runs every generation (as the CLI's one thread does): CUDA
        # graphs and caches captured on the first reply are replayed from the same thread.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmchat-generate")

    def stop_all(self) -> None:
        self.shutdown.set()
        for g in list(self.active):
            g.cancel.set()

    async def start(self, req: ChatRequest) -> Generation:
        """Wait for the model, then start the reply in a worker thread."""
        if self.lock is None:
            self.lock = asyncio.Lock()
        lock = self.lock
        if self.max_queue is not None and lock.locked() and self.waiting >= self.max_queue:
            raise QueueFull
        self.waiting += 1
        try:
            await lock.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        gen = Generation(loop)
        self.active.add(gen)

        def release() -> None:
            self.active.discard(gen)
            lock.release()

        def work() -> None:
            try:
                self._run(gen, req)
            finally:
                try:
                    loop.call_soon_threadsafe(release)
                except RuntimeError:
                    pass

        if self.shutdown.is_set():
            gen.cancel.set()
        self.pool.submit(work)
        return gen

    def _run(self, gen: Generation, req: ChatRequest) -> None:
        """Produce the reply: stream its text (held back where it may start a stop string, cut
        at the first one), stop within a token of a cancel, then log it when complete."""
        from llmchat.conversation import Conversation

        try:
            self.images.store.put(req.uploads)
            conv = Conversation(self.model, req.config, system=req.system,
                                turns=list(req.history))
            reply: Reply = conv.send(req.question.content, image=req.question.image)
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            gen.post("error", exc)
            return
        reply.every_token = True  # a chance to stop after every token, text or not
        gen.post("start", None)
        cutter = StopCutter(req.stop)
        parts: list[str] = []
        try:
            for delta in reply:
                text = cutter.push(delta)
                if text:
                    parts.append(text)
                    gen.post("delta", text)
                if cutter.hit or gen.cancel.is_set():
                    reply.close()
                    break
        except BaseException as exc:  # noqa: BLE001
            gen.post("error", exc)
            return
        if reply.done and not cutter.hit:
            rest = cutter.flush()
            if rest:
                parts.append(rest)
                gen.post("delta", rest)
        text = "".join(parts)
        if reply.done and not req.stop:
            text = reply.text  # the post-processed reply (equal to the deltas joined)
        finish = "length" if reply.done and reply.stats.finish_reason == "length" else "stop"
        result = Result(text, finish, reply.stats, complete=reply.done or cutter.hit)
        gen.post("end", result)
        if result.complete and self.log is not None:
            self.log.write(req, result, self.model)


# -- the conversation log ------------------------------------------------------------------------
class TurnLog:
    """Each complete reply goes to the conversation log (``llmchat.logs``), as ``ask``/``chat``
    log theirs, while ``llmchat logs on`` is in effect (checked per reply). Requests that
    continue a logged reply (the same history plus its question and answer) join its
    conversation id, so a chat sent as growing ``messages`` arrays is one logged conversation.
    A failure to log never fails a request: one warning on stderr, then logging stops."""

    KEEP = 10_000  # conversation heads remembered

    def __init__(self, model: ChatModel, requested: dict[str, Any] | None = None) -> None:
        self.requested = requested or {}
        self.logger: Any = None
        self.heads: OrderedDict[str, str] = OrderedDict()
        self.failed = False

    @staticmethod
    def key(system: str | None, messages: list[Message], refs: dict[str, str]) -> str:
        import hashlib

        items = [system, *[(m.role, m.content, refs.get(m.image or "", m.image))
                           for m in messages]]
        return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()

    def write(self, req: ChatRequest, result: Result, model: ChatModel) -> None:
        if self.failed:
            return
        try:
            from llmchat import logs

            if not logs.enabled():
                return
            if self.logger is None:
                i = model.info
                self.logger = logs.Logger(
                    model=model.name, model_path=str(i.path) if i.path else None,
                    options={"quant": i.quant, "dtype": i.dtype, "device": i.device,
                             "requested": self.requested, "via": "serve"})
            head = self.key(req.system, req.history, req.image_refs)
            cid = self.heads.pop(head, None) or uuid.uuid4().hex
            settings = {**req.config.to_dict(), "stop": req.stop or None,
                        "ptuning_prefix": model.info.extra.get("prefix")}
            q = req.question
            self.logger.log(cid, q.content, req.system, result.text, result.stats, settings,
                            image=req.image_refs.get(q.image or "", q.image))
            if self.logger.broken:
                self.failed = True
                return
            turn = [*req.history, q, Message("assistant", result.text)]
            self.heads[self.key(req.system, turn, req.image_refs)] = cid
            while len(self.heads) > self.KEEP:
                self.heads.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - logging never costs a reply
            self.failed = True
            print(f"warning: cannot write the conversation log ({' '.join(str(exc).split())}); "
                  "logging is off for this server", file=sys.stderr, flush=True)


# -- the app --------------------------------------------------------------------------------------
def model_names(model: ChatModel) -> list[str]:
    names = [model.name]
    spec = getattr(model, "spec", None)
    if spec is not None:
        names += [*spec.aliases, spec.hub_id]
    return list(dict.fromkeys(names))


def error_from(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    msg = " ".join(str(exc).split())
    if isinstance(exc, ContextOverflowError):
        return APIError(400, msg, code="context_length_exceeded")
    if isinstance(exc, UsageError | ImageError):
        return APIError(400, msg)
    if isinstance(exc, LLMChatError):
        return APIError(500, msg, type="server_error")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def create_app(model: ChatModel, *, config: GenerationConfig | None = None,
               api_key: str | None = None, max_queue: int | None = None,
               max_body: int | None = None, allow_local_images: str | Path | None = None,
               log: TurnLog | None = None) -> Any:
    """The Starlette app. ``log``: where complete replies are logged (None: nowhere);
    ``allow_local_images``: the folder ``file://`` URLs / absolute image paths may point into.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    allow = Path(allow_local_images).resolve(strict=True) if allow_local_images else None
    engine = Engine(model, config or model.defaults, max_queue,
                    images=ImagePolicy(allow_dir=allow), log=log)
    if max_body is None:
        max_body = MAX_IMAGE_BODY_BYTES if model.supports_images else MAX_BODY_BYTES
    names = model_names(model)
    lowered = {n.lower() for n in names}
    created = int(time.time())

    def error_response(err: APIError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not _safe_equal(token.strip(), api_key):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except Exception as exc:  # noqa: BLE001 - never a traceback in a response
                return error_response(error_from(exc))

        return wrapped

    async def health(request: Request) -> Response:
        busy = engine.lock is not None and engine.lock.locked()
        return JSONResponse({"status": "ok", "model": model.name, "busy": busy,
                             "waiting": engine.waiting})

    async def list_models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model.name, "object": "model", "created": created, "owned_by": "llmchat",
             "aliases": names[1:]}
        ]})

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise APIError(413, f"request body over {max_body} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"request body over {max_body} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None

    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        if model.supports_images:  # decoding and checking images takes a while: not here
            req = await asyncio.get_running_loop().run_in_executor(
                None, parse_request, body, model, engine.base, engine.images)
        else:
            req = parse_request(body, model, engine.base, engine.images)
        asked = body.get("model")
        if asked is not None and (not isinstance(asked, str) or asked.lower() not in lowered):
            raise APIError(404, f"model {asked!r} not found; this server serves "
                           f"{', '.join(names)}", param="model", code="model_not_found")
        try:
            gen = await engine.start(req)
        except QueueFull:
            raise APIError(429, "the server is busy; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, gen))
        try:
            kind, value = await gen.events.get()
            if kind == "error":
                raise value
        except BaseException:  # the request fails before its reply starts
            gen.cancel.set()
            watcher.cancel()
            raise
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return SSEResponse(gen, req, cid, model.name, watcher)
        try:
            return JSONResponse(await _complete(gen, req, cid, model.name))
        finally:
            gen.cancel.set()  # no-op when finished; stops it when the client went away
            watcher.cancel()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_response(APIError(status, f"{request.method} {request.url.path}: "
                                       f"{getattr(exc, 'detail', 'not found')}",
                                       code="not_found" if status == 404 else None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(error_from(exc))

    app = Starlette(
        routes=[
            Route("/health", endpoint(health), methods=["GET"]),
            Route("/v1/models", endpoint(list_models), methods=["GET"]),
            Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found, Exception: server_error},
    )
    app.state.engine = engine
    return app


def _safe_equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


async def _watch_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]],
                            gen: Generation) -> None:
    try:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                gen.cancel.set()
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001
        gen.cancel.set()


def _usage(stats: ReplyStats) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose keys/values the model
    kept from an earlier request (the longest common prefix), not recomputed."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


async def _complete(gen: Generation, req: ChatRequest, cid: str, name: str) -> dict[str, Any]:
    while True:
        kind, value = await gen.events.get()
        if kind == "error":
            raise value
        if kind == "end":
            result: Result = value
            break
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": _usage(result.stats),
    }


class SSEResponse:
    """``text/event-stream`` chunks exactly as OpenAI streams them; a failed send or an
    ``http.disconnect`` cancels the generation."""

    def __init__(self, gen: Generation, req: ChatRequest, cid: str, name: str,
                 watcher: asyncio.Future[Any]) -> None:
        self.gen, self.req, self.cid, self.name, self.watcher = gen, req, cid, name, watcher
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
              usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.cid, "object": "chat.completion.chunk", "created": self.created,
            "model": self.name, "system_fingerprint": None,
            "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if self.req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gen = self.gen
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            ]})

            async def emit(data: bytes) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": True})

            await emit(self.chunk({"role": "assistant", "content": ""}))
            while True:
                kind, value = await gen.events.get()
                if kind == "delta":
                    await emit(self.chunk({"content": value}))
                elif kind == "error":
                    err = error_from(value)
                    await emit(f"data: {json.dumps(err.body())}\n\n".encode())
                    break
                else:
                    result: Result = value
                    await emit(self.chunk({}, result.finish_reason))
                    if self.req.include_usage:
                        await emit(self.chunk(None, usage=_usage(result.stats)))
                    break
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
        except OSError:  # the client went away
            pass
        finally:
            gen.cancel.set()
            self.watcher.cancel()


# -- running it -----------------------------------------------------------------------------------
def serve(model: ChatModel, *, config: GenerationConfig | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_queue: int | None = None,
          allow_local_images: str | Path | None = None, conversation_log: bool = True,
          requested: dict[str, Any] | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Run the server until SIGINT/SIGTERM (then stop generations and return).
    ``conversation_log``: log complete replies (while ``llmchat logs on``); ``requested``: the
    device/dtype/quant asked for, recorded with them as ``ask`` records its own."""
    require_serve_deps()
    import uvicorn

    allow = check_image_dir(allow_local_images) if allow_local_images else None
    turn_log = TurnLog(model, requested) if conversation_log else None
    app = create_app(model, config=config, api_key=api_key, max_queue=max_queue,
                     allow_local_images=allow, log=turn_log)
    engine: Engine = app.state.engine
    if allow is not None and not model.supports_images:
        log(f"notice: --allow-local-images has no effect: {model.name} takes no images")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"notice: listening on {host} without --api-key: anyone who can reach this port "
            "can use the model")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stop_all()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean stop: exit 0, not the signal again

    cfg = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                         timeout_graceful_shutdown=5, lifespan="off")
    server = Server(cfg)
    log(f"serving {model.name} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    try:
        server.run()
    finally:
        engine.stop_all()
        engine.pool.shutdown(wait=True, cancel_futures=True)
        engine.images.store.close()
    if not server.started:
        raise LLMChatError(f"could not listen on {host}:{port}")


def check_image_dir(path: str | Path) -> Path:
    """``--allow-local-images DIR``: an existing folder, symlinks resolved."""
    try:
        real = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise UsageError(f"--allow-local-images: {path} does not exist") from None
    if not real.is_dir():
        raise UsageError(f"--allow-local-images: {path} is not a directory")
    return real
