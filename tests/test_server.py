"""``llmchat serve`` as clients see it: a real server process on 127.0.0.1, driven by the official
``openai`` client (plain, streamed, multi-turn, Chinese) and by httpx for the error cases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from llmchat.loader import load  # noqa: E402
from llmchat.types import Message  # noqa: E402
from tests.checkpoints import chatglm2_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CPU = ["--device", "cpu", "--dtype", "float32"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_real_connect = socket.socket.connect


@pytest.fixture(autouse=True)
def _loopback_only(_isolate: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest blocks the network; let this module reach 127.0.0.1 (and nothing else)."""

    def connect(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK:
            raise RuntimeError("tests must not use the network")
        return _real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_dir: Path, log: Path, *extra: str,
                 env: dict[str, str] | None = None) -> Server:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "LLMCHAT_API_KEY"}
    full_env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                 "LLMCHAT_HOME": str(log.parent / "llmchat-home"), **(env or {})}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmchat", "serve", "-p", str(model_dir), *CPU,
             "--port", str(port), *extra],
            stdout=f, stderr=subprocess.STDOUT, env=full_env,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {server.stderr()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except (OSError, httpx.HTTPError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start: {server.stderr()}")


def stop(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)
    return server.proc.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM2 with an 8192-token budget: greedy "你好" runs to any length limit, so a
    long reply (max_tokens=6000: tens of seconds) holds the model while a test looks on."""
    return chatglm2_checkpoint(tmp_path_factory.mktemp("glm2-long") / "chatglm2-6b",
                               seq_length=32768)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(model_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    stop(s)


@pytest.fixture(scope="module")
def reference(model_dir: Path):  # noqa: ANN201
    return load(model_path=model_dir, device="cpu", dtype="float32")


def greedy(model, messages: list[Message], max_new: int) -> str:  # noqa: ANN001
    return model.chat(messages, model.defaults.with_(temperature=0, max_new_tokens=max_new))


def client(server: Server, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=kw.pop("api_key", "unused"),
                         max_retries=0, timeout=120, **kw)


def wait_idle(server: Server, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not httpx.get(server.url + "/health", timeout=5).json()["busy"]:
            return True
        time.sleep(0.05)
    return False


# -- the happy paths -----------------------------------------------------------------------------
def test_models_lists_the_served_model_and_its_aliases(server: Server) -> None:
    models = client(server).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["chatglm2-6b"]
    assert "chatglm2" in models.data[0].model_extra["aliases"]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "chatglm2-6b"


def test_greedy_completion_equals_chat_with_history(server: Server, reference) -> None:  # noqa: ANN001
    history = [Message("user", "你好"), Message("assistant", "你好👋！我是人工智能助手。")]
    question = "介绍一下北京"
    expected = greedy(reference, [*history, Message("user", question)], 16)
    res = client(server).chat.completions.create(
        model="chatglm2",  # an alias
        messages=[*(m.to_dict() for m in history), {"role": "user", "content": question}],
        temperature=0, max_tokens=16,
    )
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == expected
    assert res.choices[0].finish_reason == "length"
    prompt = reference.count_tokens([*history, Message("user", question)])
    assert res.usage.prompt_tokens == prompt
    assert res.usage.completion_tokens == 16
    assert res.usage.total_tokens == prompt + 16


def test_streamed_completion_is_the_same_reply(server: Server, reference) -> None:  # noqa: ANN001
    expected = greedy(reference, [Message("user", "写一首诗")], 20)
    stream = client(server).chat.completions.create(
        model="chatglm2-6b",
        messages=[{"role": "user", "content": [{"type": "text", "text": "写一首"},
                                                {"type": "text", "text": "诗"}]}],
        temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == reference.count_tokens([Message("user", "写一首诗")])


def test_raw_sse_framing(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", server.base + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"usage"' not in raw  # only with stream_options.include_usage


def test_stop_strings_cut_the_reply(server: Server, reference) -> None:  # noqa: ANN001
    full = greedy(reference, [Message("user", "你好")], 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    c = client(server)
    res = c.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user",
                                    "content": "你好"}], temperature=0, max_tokens=24,
                                    stop=[stop, "never-there"])
    assert res.choices[0].message.content == cut
    assert res.choices[0].finish_reason == "stop"
    stream = c.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user",
                                       "content": "你好"}], temperature=0, max_tokens=24,
                                       stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    c = client(server)

    def ask() -> str:
        return c.chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": "hello"}],
            temperature=0.9, top_p=0.9, seed=7, max_tokens=10,
            extra_body={"top_k": 20, "repetition_penalty": 1.1},
        ).choices[0].message.content

    assert ask() == ask()


def test_concurrent_requests_all_get_their_replies(server: Server, reference) -> None:  # noqa: ANN001
    questions = ["你好", "hello", "1+1=?", "天气"]
    expected = {q: greedy(reference, [Message("user", q)], 8) for q in questions}
    got: dict[str, str] = {}
    c = client(server)

    def run(q: str) -> None:
        stream = q == "hello"  # one of them streamed
        res = c.chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": q}], temperature=0,
            max_tokens=8, stream=stream,
        )
        if stream:
            got[q] = "".join(ch.choices[0].delta.content or "" for ch in res if ch.choices)
        else:
            got[q] = res.choices[0].message.content

    threads = [threading.Thread(target=run, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected


def test_a_dropped_stream_stops_its_generation(server: Server, reference) -> None:  # noqa: ANN001
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": 6000, "stream": True}
    with httpx.stream("POST", server.base + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # (greedy "你好" runs to the 6000-token limit: tens of seconds)
    # a stopped generation frees the model at once
    assert wait_idle(server, timeout=3), "the dropped stream's generation kept running"
    expected = greedy(reference, [Message("user", "你好")], 8)
    res = client(server).chat.completions.create(
        model="chatglm2-6b", messages=[{"role": "user", "content": "你好"}], temperature=0,
        max_tokens=8)
    assert res.choices[0].message.content == expected


def test_max_tokens_is_capped_by_the_context_budget(reference) -> None:  # noqa: ANN001
    from starlette.testclient import TestClient

    from llmchat.server import create_app

    budget = 40
    prompt = reference.count_tokens([Message("user", "你好")])
    with TestClient(create_app(reference, config=reference.defaults.with_(max_length=budget))
                    ) as tc:
        r = tc.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": 10**12})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == budget - prompt
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_every_token_gives_the_consumer_a_turn(reference) -> None:  # noqa: ANN001
    """The server stops a reply within one token of a cancel: with ``every_token`` the stream
    yields once per generated token, even where the token adds no text yet."""
    config = reference.defaults.with_(temperature=0, max_new_tokens=40)
    reply = reference.generate([Message("user", "写一首诗")], config)
    reply.every_token = True
    deltas = list(reply)
    n = reply.stats.completion_tokens
    assert n <= len(deltas) <= n + 1  # + the final flush
    assert "".join(deltas) == reply.text
    plain = reference.generate([Message("user", "写一首诗")], config)
    assert len([d for d in plain]) < n  # some tokens add no text on their own


def follow_up(c: openai.OpenAI, first: str, **kw: object) -> tuple[object, object]:
    """Two turns of one conversation, sent as growing messages arrays."""
    msgs = [{"role": "user", "content": first}]
    r1 = c.chat.completions.create(model="chatglm2-6b", messages=msgs, temperature=0,
                                   max_tokens=12, **kw)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "介绍一下北京"}]
    r2 = c.chat.completions.create(model="chatglm2-6b", messages=msgs, temperature=0,
                                   max_tokens=12, **kw)
    return r1, r2


def test_a_follow_up_reuses_the_cached_prefix_and_logs(server: Server, model_dir: Path,
                                                         tmp_path: Path) -> None:
    """Turn 2 reports the reused prompt prefix as usage.prompt_tokens_details.cached_tokens and
    its reply equals a server that recomputes everything (LLMCHAT_KV_REUSE=0), whose log (a
    temporary LLMCHAT_HOME) then holds both turns as one conversation; SIGINT stops it (0)."""
    r1, r2 = follow_up(client(server), "你好")
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens - 3 <= cached < r2.usage.prompt_tokens, (cached, r1.usage)
    # the same request again, streamed: everything but the last prompt token is reused
    stream = client(server).chat.completions.create(
        model="chatglm2-6b", temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, messages=[
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": r1.choices[0].message.content},
            {"role": "user", "content": "介绍一下北京"}])
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        r2.choices[0].message.content)

    s = start_server(model_dir, tmp_path / "recompute.log", env={"LLMCHAT_KV_REUSE": "0"})
    try:
        f1, f2 = follow_up(client(s), "你好")
        cut = client(s).chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": "hello"}],
            temperature=0, max_tokens=12, stop=[r2.choices[0].message.content[2:4]])
    finally:
        s.proc.send_signal(signal.SIGINT)
        s.proc.wait(timeout=30)
    assert s.proc.returncode == 0 and "Traceback" not in s.stderr(), s.stderr()
    assert f2.usage.prompt_tokens_details.cached_tokens == 0
    assert f1.choices[0].message.content == r1.choices[0].message.content
    assert f2.choices[0].message.content == r2.choices[0].message.content
    assert f2.usage.prompt_tokens == r2.usage.prompt_tokens

    res = run_client(["logs", "--json", "-n", "10"],
                     env={"LLMCHAT_HOME": str(tmp_path / "llmchat-home")})
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [(r["prompt"], r["response"]) for r in rows] == [
        ("你好", f1.choices[0].message.content), ("介绍一下北京", f2.choices[0].message.content),
        ("hello", cut.choices[0].message.content)]
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"] != rows[2]["conversation_id"]
    assert rows[1]["prompt_tokens"] == f2.usage.prompt_tokens
    assert rows[2]["options"]["stop"] and rows[0]["options"]["temperature"] == 0


def test_serve_no_log_and_a_failing_log(model_dir: Path, tmp_path: Path, reference,  # noqa: ANN001
                                        monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from llmchat import logs
    from llmchat import server as srv
    from llmchat.cli import app

    seen: list[dict[str, object]] = []
    with pytest.MonkeyPatch.context() as mp:  # (not monkeypatch.undo: it drops the isolation)
        mp.setattr(srv, "serve", lambda model, **kw: seen.append(kw))
        for extra in ([], ["--no-log"]):
            res = CliRunner().invoke(app, ["serve", "-p", str(model_dir), *CPU, *extra])
            assert res.exit_code == 0, res.output
    assert [kw["conversation_log"] for kw in seen] == [True, False]

    def complete(tc: TestClient) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                "max_tokens": 3}
        r = tc.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 10  # the log is written after the reply is sent
        while tc.get("/health").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)

    home = Path(os.environ["LLMCHAT_HOME"])
    assert home.is_relative_to(tmp_path)  # never the user's own log
    with TestClient(srv.create_app(reference, log=srv.TurnLog(reference))) as tc:
        logs.set_enabled(False)  # `llmchat logs off` is honoured
        complete(tc)
        assert not logs.db_path().exists()
        logs.set_enabled(True)
        complete(tc)
        assert [r["prompt"] for r in logs.responses(logs.connect(), n=5)] == ["hi"]

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMCHAT_HOME", str(tmp_path / "file" / "home"))  # cannot be created
    capfd.readouterr()
    with TestClient(srv.create_app(reference, log=srv.TurnLog(reference))) as tc:
        for _ in range(2):
            complete(tc)
    err = capfd.readouterr().err
    assert err.count("warning:") == 1, err


# -- errors --------------------------------------------------------------------------------------
U = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": []}, 400, "messages"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0]"),  # ChatGLM2 takes no images
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
         "messages[0].content[0]"),
        ({"messages": [U, {"role": "assistant", "content": "a"}]}, 400, "messages"),
        ({"messages": [{"role": "system", "content": "be brief"}, U]}, 400, "messages"),
        ({"messages": [U], "n": 2}, 400, "n"),
        ({"messages": [U], "top_p": 1.5}, 400, "top_p"),
        ({"messages": [U], "temperature": -1}, 400, "temperature"),
        ({"messages": [U], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [U], "max_tokens": 0}, 400, "max_new_tokens"),
        ({"messages": [U], "seed": 1.5}, 400, "seed"),
        ({"messages": [U], "stream": "yes"}, 400, "stream"),
        ({"messages": [U], "stop": 3}, 400, "stop"),
        ({"messages": [U], "model": "gpt-4"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hello world " * 5000}]}, 400, None),  # too long
        (b"{" + b" " * (1 << 20) + b"}", 413, None),
    ],
)
def test_bad_requests_get_openai_errors(server: Server, body: object, status: int,
                                        param: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base + "/chat/completions", timeout=60,
                   headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param


def test_unknown_routes_and_methods(server: Server) -> None:
    r = httpx.get(server.base + "/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.base + "/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_on_errors(server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4", messages=[U])
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="chatglm2-6b", messages=[U], top_p=3)


# -- a second server: API key, a full queue, SIGTERM ----------------------------------------------
def test_api_key_queue_and_sigterm(model_dir: Path, tmp_path: Path, reference) -> None:  # noqa: ANN001
    s = start_server(model_dir, tmp_path / "keyed.log", "--max-queue", "0",
                     env={"LLMCHAT_API_KEY": "sekret"})
    try:
        r = httpx.post(s.base + "/chat/completions", json={"messages": [U]}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        assert client(s, api_key="sekret").models.list().data[0].id == "chatglm2-6b"

        # one long stream holds the model; with --max-queue 0 the next request is refused
        body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
                "max_tokens": 6000, "stream": True}
        auth = {"Authorization": "Bearer sekret"}
        with httpx.stream("POST", s.base + "/chat/completions", json=body, headers=auth,
                          timeout=60) as r:
            lines = r.iter_lines()  # kept: dropping it would close the stream
            next(lines)
            busy = httpx.post(s.base + "/chat/completions",
                              json={"messages": [U], "max_tokens": 4}, headers=auth, timeout=30)
            assert busy.status_code == 429
            assert busy.headers["retry-after"]
            assert busy.json()["error"]["type"] == "rate_limit_error"
        assert wait_idle(s, timeout=5)
        res = client(s, api_key="sekret").chat.completions.create(
            model="chatglm2-6b", messages=[U], temperature=0, max_tokens=6)
        assert res.choices[0].message.content == greedy(reference, [Message("user", "hi")], 6)
    finally:
        code = stop(s)
    assert code == 0, s.stderr()
    assert "Traceback" not in s.stderr()


def test_sigterm_mid_stream_exits_cleanly(model_dir: Path, tmp_path: Path) -> None:
    s = start_server(model_dir, tmp_path / "term.log")
    try:
        body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
                "max_tokens": 6000, "stream": True}
        with httpx.stream("POST", s.base + "/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: dropping it would close the stream
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(timeout=20)
    finally:
        stop(s)
    assert s.proc.returncode == 0, s.stderr()


def test_missing_extra_is_one_clear_line(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from llmchat.cli import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    res = CliRunner().invoke(app, ["serve", "-p", str(model_dir), *CPU])
    assert res.exit_code == 2
    assert "pip install 'llmchat[serve]'" in res.output
    assert "Traceback" not in res.output


# -- client mode: llmchat ask/chat --api-base ------------------------------------------------------
def run_client(args: list[str], stdin: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "LLMCHAT_API_KEY"}
    return subprocess.run([sys.executable, "-m", "llmchat", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                               **(env or {})})


def test_ask_and_chat_against_the_server(server: Server, reference) -> None:  # noqa: ANN001
    greedy_args = ["--api-base", server.base, "--temperature", "0", "--max-new-tokens", "8"]
    res = run_client(["ask", *greedy_args, "你好"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == greedy(reference, [Message("user", "你好")], 8) + "\n"

    res = run_client(["ask", *greedy_args, "--json", "hello"])
    data = json.loads(res.stdout)
    assert data["model"] == "chatglm2-6b"
    assert data["reply"] == greedy(reference, [Message("user", "hello")], 8)
    assert data["completion_tokens"] == 8 and data["finish_reason"] == "length"
    # "[Round 1]\n\n问：" is still cached from the request before (the server reports it)
    assert 0 < data["cached_tokens"] < data["prompt_tokens"]

    res = run_client(["chat", *greedy_args], stdin="你好\n北京\n")
    assert res.returncode == 0, res.stderr
    first = greedy(reference, [Message("user", "你好")], 8)
    second = greedy(reference, [Message("user", "你好"), Message("assistant", first),
                                Message("user", "北京")], 8)
    assert res.stdout == f"{first}\n{second}\n"

    res = run_client(["ask", "--api-base", server.base, "-m", "gpt-4", "hi"])
    assert res.returncode == 1 and "not found" in res.stderr and "Traceback" not in res.stderr


# -- VisualGLM: image_url parts -------------------------------------------------------------------
@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from tests.ckpt_visualglm import visualglm_checkpoint

    return visualglm_checkpoint(tmp_path_factory.mktemp("vg") / "visualglm-6b",
                                dtype=torch.float32)


def noise_png(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def data_uri(path: Path, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def ask_image(tc, question: str, url: str | None, history: list | None = None,  # noqa: ANN001
              **kw: object):  # noqa: ANN201
    content: list[dict[str, object]] = [{"type": "text", "text": question}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    body = {"messages": [*(history or []), {"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 8, **kw}
    return tc.post("/v1/chat/completions", json=body)


def test_visualglm_data_uri_replies_equal_llmchat_image(vg_dir: Path, tmp_path: Path) -> None:
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from llmchat.cli import app
    from llmchat.server import create_app

    pic = noise_png(tmp_path / "pic.png", 7)
    flags = ["-p", str(vg_dir), *CPU, "--temperature", "0", "--max-new-tokens", "8"]
    one = CliRunner().invoke(app, ["image", str(pic), "这是什么？", *flags])
    assert one.exit_code == 0, one.output
    chat = CliRunner().invoke(app, ["image", str(pic), *flags], input="这是什么？\n颜色呢？\n")
    assert chat.exit_code == 0, chat.output

    model = load(model_path=vg_dir, device="cpu", dtype="float32")
    with TestClient(create_app(model)) as tc:
        r1 = ask_image(tc, "这是什么？", data_uri(pic))
        assert r1.status_code == 200, r1.text
        a1 = r1.json()["choices"][0]["message"]["content"]
        assert one.stdout == a1 + "\n"
        # turn 2: the image stays with the first message, as `llmchat image` attaches it
        history = [{"role": "user", "content": [
                        {"type": "text", "text": "这是什么？"},
                        {"type": "image_url", "image_url": {"url": data_uri(pic)}}]},
                   {"role": "assistant", "content": a1}]
        r2 = ask_image(tc, "颜色呢？", None, history)
        assert r2.status_code == 200, r2.text
        assert chat.stdout == f"{a1}\n{r2.json()['choices'][0]['message']['content']}\n"
        # the same image again (a client resending it each turn) is still one image
        r3 = ask_image(tc, "颜色呢？", data_uri(pic, "image/jpeg"), history)
        assert r3.json()["choices"][0]["message"]["content"] == (
            r2.json()["choices"][0]["message"]["content"])
        # the prompt holds the image's placeholders
        assert r1.json()["usage"]["prompt_tokens"] == model.count_tokens(
            [Message("user", "这是什么？", str(pic))])


def test_visualglm_image_sources_and_refusals(vg_dir: Path, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from llmchat.server import create_app

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    pic = noise_png(allowed / "pic.png", 7)
    other = noise_png(tmp_path / "other.png", 8)
    (allowed / "link.png").symlink_to(other)
    (allowed / "notes.txt").write_text("hello")
    model = load(model_path=vg_dir, device="cpu", dtype="float32")

    def refused(r, code: str | None = None, match: str = "") -> None:  # noqa: ANN001
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"].startswith("messages"), err
        assert match in err["message"], err
        if code:
            assert err["code"] == code, err

    with TestClient(create_app(model)) as tc:
        expected = ask_image(tc, "这是什么？", data_uri(pic)).json()
        refused(ask_image(tc, "q", pic.as_uri()), "image_url_refused", "--allow-local-images")
        refused(ask_image(tc, "q", str(pic)), "image_url_refused")
        refused(ask_image(tc, "q", "https://example.com/cat.png"), "image_url_refused",
                "not fetched")
        refused(ask_image(tc, "q", "data:image/png;base64,@@@"), None, "base64")
        refused(ask_image(tc, "q", "data:text/plain;base64,aGk="), None, "not an image")
        refused(ask_image(tc, "q", data_uri(allowed / "notes.txt")), None, "not an image")
        two = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_uri(other)}}, {"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "b"}]
        refused(ask_image(tc, "q", data_uri(pic), two), "too_many_images")
        bad_role = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(pic)}}]}]
        refused(ask_image(tc, "q", None, bad_role), None, "user messages")
        only_image = ask_image(tc, "", data_uri(pic))
        assert only_image.status_code == 200, only_image.text

    with TestClient(create_app(model, allow_local_images=allowed)) as tc:
        for url in (pic.as_uri(), str(pic), f"file://localhost{pic}"):
            r = ask_image(tc, "这是什么？", url)
            assert r.status_code == 200, r.text
            assert r.json()["choices"] == expected["choices"]
        refused(ask_image(tc, "q", other.as_uri()), "image_url_refused", "outside")
        refused(ask_image(tc, "q", str(allowed / "link.png")), "image_url_refused", "outside")
        refused(ask_image(tc, "q", str(allowed / ".." / "other.png")), "image_url_refused")
        refused(ask_image(tc, "q", str(allowed / "missing.png")), None, "not found")
        refused(ask_image(tc, "q", "file://elsewhere/x.png"), "image_url_refused")
        refused(ask_image(tc, "q", "pic.png"), "image_url_refused")
        refused(ask_image(tc, "q", "http://127.0.0.1/pic.png"), "image_url_refused")


# -- in process (Starlette's TestClient, no sockets): Qwen's system role, the bind notice ----------
def test_qwen_system_prompt_in_process(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from llmchat.server import create_app
    from tests.ckpt_qwen import qwen_checkpoint

    model = load(model_path=qwen_checkpoint(tmp_path / "qwen-7b-chat"), device="cpu",
                 dtype="float32")
    msgs = [Message("system", "你是一个诗人。"), Message("user", "写诗"),
            Message("assistant", "好的"), Message("user", "再来一首")]
    expected = greedy(model, msgs, 10)
    default_system = greedy(model, [Message("user", "hi")], 6)
    with TestClient(create_app(model)) as tc:
        r = tc.post("/v1/chat/completions", json={
            "model": "qwen", "messages": [m.to_dict() for m in msgs], "temperature": 0,
            "max_tokens": 10})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        again = tc.post("/v1/chat/completions", json={  # Qwen reuses the prefix too
            "messages": [m.to_dict() for m in msgs], "temperature": 0, "max_tokens": 10}).json()
        assert again["choices"][0]["message"]["content"] == expected
        usage = again["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        r = tc.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 6})
        assert r.json()["choices"][0]["message"]["content"] == default_system
        assert tc.get("/v1/models").json()["data"][0]["id"] == "qwen-7b-chat"


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from llmchat import server as srv
    from tests.fakes import FakeChatModel

    ran: list[tuple[str, int]] = []

    def fake_run(self: uvicorn.Server) -> None:
        ran.append((self.config.host, self.config.port))
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    logs: list[str] = []
    srv.serve(FakeChatModel(), host="0.0.0.0", port=9, log=logs.append)
    assert ran == [("0.0.0.0", 9)]
    assert any("without --api-key" in line for line in logs)
    logs.clear()
    srv.serve(FakeChatModel(), host="0.0.0.0", port=9, api_key="k", log=logs.append)
    srv.serve(FakeChatModel(), port=9, log=logs.append)
    assert not any("without --api-key" in line for line in logs)
