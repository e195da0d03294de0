"""The conversation log: real SQLite files in the per-test LLMCHAT_HOME, real processes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from llmchat import logs
from llmchat.types import ReplyStats

ROOT = Path(__file__).resolve().parent.parent
CPU = ["--device", "cpu", "--dtype", "float32"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


def run_cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llmchat", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def stats() -> ReplyStats:
    return ReplyStats(prompt_tokens=3, completion_tokens=4, finish_reason="stop", total_s=0.5)


def test_fts_search_with_chinese_and_short_like() -> None:
    lg = logs.Logger(model="m", model_path=None, options={})
    lg.log("c1", "今天天气怎么样", None, "北京今天晴朗", stats(), {})
    lg.log("c1", "hello there", None, "general kenobi", stats(), {})
    db = logs.connect()
    assert [r["prompt"] for r in logs.responses(db, n=5, query="天气怎")] == ["今天天气怎么样"]
    assert [r["prompt"] for r in logs.responses(db, n=5, query="晴朗")] == ["今天天气怎么样"]
    assert [r["prompt"] for r in logs.responses(db, n=5, query="kenobi")] == ["hello there"]


def test_older_schema_is_migrated() -> None:
    path = logs.db_path()
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(logs.V1)
    db.execute("INSERT INTO conversations VALUES ('old', '旧的对话', 'm', '2020-01-01')")
    db.execute("INSERT INTO responses VALUES ('r1','old','m','旧问题来了',NULL,'旧回答在此','{}',"
               "1,2,30,'2020-01-01')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    db = logs.connect()
    assert db.execute("PRAGMA user_version").fetchone()[0] == logs.SCHEMA_VERSION
    assert [r["id"] for r in logs.responses(db, n=5, query="旧问题")] == ["r1"]


def test_corrupt_file_warns_once_and_reply_is_given(glm2_dir: Path) -> None:
    path = logs.db_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database at all" * 100)
    res = run_cli(["ask", "-p", str(glm2_dir), *CPU, *GREEDY, "你好"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert res.stderr.count("warning:") == 1 and str(path) in res.stderr
    assert "Traceback" not in res.stderr


def test_three_process_continuation_matches_one_chat(glm2_dir: Path) -> None:
    qs = ["你好", "然后呢", "再说一遍"]
    one = run_cli(["chat", "-p", str(glm2_dir), *CPU, *GREEDY, "--no-log"], "\n".join(qs) + "\n")
    assert one.returncode == 0, one.stderr
    assert not logs.db_path().exists()  # --no-log
    a = run_cli(["chat", "-p", str(glm2_dir), *CPU, *GREEDY], qs[0] + "\n")
    b = run_cli(["chat", "-c", *GREEDY], qs[1] + "\n")
    c = run_cli(["ask", "-c", *GREEDY, qs[2]])
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    assert a.stdout + b.stdout + c.stdout == one.stdout
    out = run_cli(["logs", "-n", "20", "--json"])
    rows = json.loads(out.stdout)
    assert [r["prompt"] for r in rows] == qs
    assert len({r["conversation_id"] for r in rows}) == 1
    for key in ("id", "conversation_id", "model", "prompt", "system", "response", "options",
                "prompt_tokens", "completion_tokens", "finish_reason", "duration_ms",
                "datetime_utc"):
        assert key in rows[0]
    assert run_cli(["logs", "list"]).stdout.count("3 turn(s)") == 1


def test_continue_with_empty_log_and_unknown_cid() -> None:
    r = run_cli(["ask", "-c", "hi"])
    assert r.returncode != 0 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["ask", "--cid", "nope", "hi"])
    assert r.returncode != 0 and "nope" in r.stderr


def test_two_processes_writing_at_once_both_land() -> None:
    code = ("import sys\nfrom llmchat import logs\nfrom llmchat.types import ReplyStats\n"
            "lg = logs.Logger(model='m', model_path=None, options={})\n"
            "for i in range(30):\n"
            "    lg.log(sys.argv[1], f'q{i}', None, 'r', ReplyStats(total_s=0.1), {})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, cid], env=env,
                              stderr=subprocess.PIPE, text=True) for cid in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "warning" not in err, err
    db = logs.connect()
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 60


def test_each_logged_turn_records_the_active_prefix() -> None:
    import sqlite3

    from llmchat import logs
    from llmchat.cli import RunOptions
    from llmchat.conversation import Conversation
    from llmchat.session import attach_log
    from llmchat.types import GenerationConfig
    from tests.fakes import FakeChatModel

    model = FakeChatModel()
    opts = RunOptions(model=None, model_path="/m", device="cpu", dtype="auto", quant="16",
                      settings={}, verbose=False, debug=False)
    conv = Conversation(model, GenerationConfig())
    attach_log(opts, model, conv)
    conv.send("one").consume()
    model.info.extra["prefix"] = "ckpt-300 (P-tuning v2, 128 tokens)"
    conv.send("two").consume()
    db = sqlite3.connect(logs.db_path())
    rows = db.execute("SELECT prompt, options FROM responses ORDER BY rowid").fetchall()
    got = {p: json.loads(o)["ptuning_prefix"] for p, o in rows}
    assert got == {"one": None, "two": "ckpt-300 (P-tuning v2, 128 tokens)"}


def test_unusable_log_directory_warns_once_and_still_answers(
    glm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LLMCHAT_HOME", str(blocker / "home"))  # mkdir fails: a file is in the way
    res = run_cli(["ask", "-p", str(glm2_dir), *CPU, *GREEDY, "你好"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert res.stderr.count("warning:") == 1 and "logging is off" in res.stderr
    assert "Traceback" not in res.stderr


def test_continue_after_the_model_directory_is_gone(glm2_dir: Path, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "ckpt"
    shutil.copytree(glm2_dir, moved)
    first = run_cli(["ask", "-p", str(moved), *CPU, *GREEDY, "你好"])
    assert first.returncode == 0, first.stderr
    shutil.rmtree(moved)
    res = run_cli(["ask", "-c", *GREEDY, "然后呢"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and str(moved) in res.stderr
    assert "--model-path" in res.stderr
    # the logged turn is kept: pointing at a copy continues it
    again = run_cli(["ask", "-c", "-p", str(glm2_dir), *CPU, *GREEDY, "然后呢"])
    assert again.returncode == 0, again.stderr
    rows = json.loads(run_cli(["logs", "-n", "5", "--json"]).stdout)
    assert [r["prompt"] for r in rows] == ["你好", "然后呢"]
    assert len({r["conversation_id"] for r in rows}) == 1


def test_an_empty_log_says_so_on_stderr_only() -> None:
    for args in (["logs"], ["logs", "list"], ["logs", "-q", "天气怎么样"]):
        res = run_cli(args)
        assert res.returncode == 0, res.stderr
        assert res.stdout == "" and "No " in res.stderr and str(logs.db_path()) in res.stderr
    assert run_cli(["logs", "--json"]).stdout.strip() == "[]"


def test_continue_keeps_the_settings_of_the_conversation(glm2_dir: Path) -> None:
    qs = ["你好", "然后呢"]
    one = run_cli(["chat", "-p", str(glm2_dir), *CPU, *GREEDY, "--no-log"], "\n".join(qs) + "\n")
    assert one.returncode == 0, one.stderr
    a = run_cli(["ask", "-p", str(glm2_dir), *CPU, *GREEDY, qs[0]])
    b = run_cli(["ask", "-c", qs[1]])  # no flags: greedy and 8 new tokens carry on
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout + b.stdout == one.stdout
    rows = json.loads(run_cli(["logs", "-n", "5", "--json"]).stdout)
    assert [r["options"]["max_new_tokens"] for r in rows] == [8, 8]
    # a flag given with -c wins over the carried setting
    c = run_cli(["ask", "-c", "--max-new-tokens", "2", "--json", "再说一遍"])
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout)["completion_tokens"] <= 2
