"""The CLI as a user runs it: CliRunner for options and errors, subprocesses for the pipes."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmchat.cli import app
from llmchat.loader import load
from llmchat.types import Message

runner = CliRunner()
CPU = ["--device", "cpu", "--dtype", "float32"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def run_cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmchat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def expected_replies(model_dir: Path, questions: list[str], max_new: int = 12) -> list[str]:
    m = load(model_path=model_dir, device="cpu", dtype="float32")
    cfg = m.defaults.with_(temperature=0, max_new_tokens=max_new)
    history: list[Message] = []
    out = []
    for q in questions:
        reply = m.chat([*history, Message("user", q)], cfg)
        history += [Message("user", q), Message("assistant", reply)]
        out.append(reply)
    return out


def test_ask_streams_the_reply_to_stdout(glm2_dir: Path) -> None:
    res = runner.invoke(app, ["ask", "--model-path", str(glm2_dir), *CPU, *GREEDY, "你好"])
    assert res.exit_code == 0, res.output
    assert res.stdout == expected_replies(glm2_dir, ["你好"])[0] + "\n"


def test_ask_reads_stdin_and_prepends_it(glm2_dir: Path) -> None:
    alone = runner.invoke(app, ["ask", "-p", str(glm2_dir), *CPU, *GREEDY], input="总结这段话\n")
    assert alone.exit_code == 0
    assert alone.stdout == expected_replies(glm2_dir, ["总结这段话"])[0] + "\n"
    both = runner.invoke(
        app, ["ask", "-p", str(glm2_dir), *CPU, *GREEDY, "summarize"], input="line one\nline two\n"
    )
    assert both.stdout == expected_replies(glm2_dir, ["line one\nline two\nsummarize"])[0] + "\n"


def test_ask_json(glm2_dir: Path) -> None:
    res = runner.invoke(app, ["ask", "-p", str(glm2_dir), *CPU, *GREEDY, "--json", "hi"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["model"] == "chatglm2-6b"
    assert data["reply"] == expected_replies(glm2_dir, ["hi"])[0]
    m = load(model_path=glm2_dir, device="cpu", dtype="float32")
    assert data["prompt_tokens"] == m.count_tokens([Message("user", "hi")])
    assert data["completion_tokens"] == 12
    assert {"seconds", "ttft_seconds", "decode_tokens_per_second", "finish_reason"} <= set(data)


@pytest.mark.parametrize(
    "args,message,code",
    [
        (["--model-path", "/nonexistent/dir", "q"], "model directory not found", 1),
        (["--top-p", "1.5", "q"], "top_p must be in (0, 1]", 2),
        (["--temperature", "-1", "q"], "temperature must be >= 0", 2),
        (["--max-new-tokens", "0", "q"], "max_new_tokens must be a positive integer", 2),
        (["--quant", "3", "q"], "invalid --quant '3'", 2),
        (["--device", "tpu", "q"], "invalid --device", 2),
        (["--dtype", "float64", "q"], "invalid --dtype", 2),
        (["   "], "empty question", 2),
        (["--system", "be brief", "q"], "has no system role", 2),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(
    glm2_dir: Path, args: list[str], message: str, code: int
) -> None:
    full = ["ask", *(["-p", str(glm2_dir)] if "--model-path" not in args else []), *args]
    res = runner.invoke(app, full)
    assert res.exit_code == code
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert res.stdout == ""


def test_cuda_without_cuda(glm2_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = runner.invoke(app, ["ask", "-p", str(glm2_dir), "--device", "cuda", "q"])
    assert res.exit_code == 1 and "CUDA is not available" in res.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ask", "-p", str(tmp_path / "nope"), "--debug", "q"])
    assert res.exit_code != 0 and res.exception is not None


def test_models_lists_presets() -> None:
    res = runner.invoke(app, ["models", "--json"])
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == [
        "chatglm-6b",
        "chatglm2-6b",
        "qwen-7b-chat",
        "visualglm-6b",
    ]
    assert rows[1]["hub_id"] == "THUDM/chatglm2-6b" and rows[1]["cached"] is None
    assert runner.invoke(app, ["models"]).exit_code == 0


def test_chat_pipe_contract_keeps_history(glm2_dir: Path) -> None:
    """`printf 'q1\\nq2\\nq3\\n' | llmchat chat ...` prints one reply line per question."""
    questions = ["你好", "what is 1+1?", "再见"]
    res = run_cli(
        ["chat", "--model-path", str(glm2_dir), *CPU, *GREEDY], stdin="\n".join(questions) + "\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n") == [*expected_replies(glm2_dir, questions), ""]
    assert "Traceback" not in res.stderr


def test_chat_pipe_drops_old_turns_with_notice(glm2_dir: Path) -> None:
    res = run_cli(
        [
            "chat",
            "-p",
            str(glm2_dir),
            *CPU,
            "--temperature",
            "0",
            "-n",
            "40",
            "--max-length",
            "120",
        ],
        stdin="第一个问题\n第二个问题\n第三个问题\n",
    )
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 3
    assert "dropped the 1 oldest turn" in res.stderr


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from llmchat.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_bench_on_a_checkpoint_and_usage_errors(glm2_dir: Path) -> None:
    res = runner.invoke(
        app,
        [
            "bench",
            "-p",
            str(glm2_dir),
            "--device",
            "cpu",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "6",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["model"] == "chatglm2-6b" and r["prompt_tokens"] == 8 and r["new_tokens"] == 6
    assert r["decode_tokens_per_s"] > 0 and r["bytes_per_token"] > 0 and r["copy_gb_per_s"] > 0
    assert r["decode_path"] == "eager" and r["weight_bytes"] > r["bytes_per_token"] - 10**6
    table = runner.invoke(
        app,
        [
            "bench",
            "-p",
            str(glm2_dir),
            "--device",
            "cpu",
            "--prompt-tokens",
            "4",
            "--new-tokens",
            "3",
        ],
    )
    assert table.exit_code == 0 and "decode tokens/s" in table.stdout
    if torch.backends.mkldnn.is_available() and platform.machine() in ("x86_64", "AMD64"):
        assert "packed for oneDNN" in table.stdout  # the fp32 CPU path is named
    for args, msg in (
        (["bench"], "give --model"),
        (["bench", "-p", str(glm2_dir), "--layers", "2"], "--layers needs --random"),
    ):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and msg in bad.stderr


def test_version_and_option_panels() -> None:
    from llmchat import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"llmchat {__version__}"
    helptext = CliRunner().invoke(app, ["ask", "--help"], terminal_width=120).output
    for panel in ("Model", "Generation", "Output"):
        assert f"─ {panel} " in helptext
    assert "discourages repeats" in helptext


def test_verbose_figures_start_on_a_fresh_line(glm2_dir: Path) -> None:
    """As on a terminal, where stdout and stderr share one screen."""
    res = subprocess.run([sys.executable, "-m", "llmchat", "ask", "-p", str(glm2_dir), "-t", "0",
                          "-n", "5", "-v", "你好"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300)
    assert res.returncode == 0, res.stdout
    figures = [ln for ln in res.stdout.splitlines() if "prompt tokens (0 cached)" in ln]
    assert len(figures) == 1 and figures[0].startswith(tuple("0123456789"))


@pytest.mark.parametrize("args", [
    ["ask", "--temperature", "abc", "x"], ["ask", "--top-k", "1.5", "x"],
    ["ask", "--no-such-option", "x"], ["ask", "-m", "nosuchmodel", "x"],
])
def test_option_errors_are_one_error_line_and_exit_2(args: list[str]) -> None:
    res = run_cli(args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr


def test_closed_or_broken_stdout_is_handled(glm2_dir: Path) -> None:
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    head = subprocess.run(["bash", "-c", f"{sys.executable} -m llmchat --help | head -1; "
                           "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert head.returncode == 0, head.stderr
    for extra in ([], ["--json"]):
        res = subprocess.run(["bash", "-c", f"{sys.executable} -m llmchat ask {' '.join(extra)} "
                              f"-p {glm2_dir} -n 3 hi >&-"], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == 1 and res.stderr.strip().startswith("error: ")
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_piped_chat_skips_a_bad_line_and_answers_the_rest(glm2_dir: Path) -> None:
    questions = ["你好", "介绍一下你自己"]
    want = expected_replies(glm2_dir, questions, max_new=6)
    data = ("你好\n".encode() + b"bad \xff\xfe line\n" + b"x" * (5 << 20) + b"\n"
            + "介绍一下你自己\n".encode())
    res = subprocess.run([sys.executable, "-m", "llmchat", "chat", "-p", str(glm2_dir), "-t", "0",
                          "-n", "6"], input=data, capture_output=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    err = res.stderr.decode()
    assert res.returncode == 1 and "Traceback" not in err
    assert "line 2: the line is not valid UTF-8 text (byte 4) (skipped)" in err
    assert "line 3: the line is over 4 MiB (skipped)" in err
    assert res.stdout.decode() == "".join(r + "\n" for r in want)


@pytest.mark.parametrize("data", [b"caf\xe9", b"\xff\xfeh\x00i\x00" + b"\x00\xd8", b"h\x00i\x00"])
def test_ask_refuses_stdin_that_is_not_text(glm2_dir: Path, data: bytes) -> None:
    res = subprocess.run([sys.executable, "-m", "llmchat", "ask", "-p", str(glm2_dir), "-n", "3"],
                         input=data, capture_output=True, timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 2 and err.startswith("error: stdin") and len(err.splitlines()) == 1


def test_ask_reads_utf16_with_a_byte_order_mark(glm2_dir: Path) -> None:
    want = expected_replies(glm2_dir, ["你好"], max_new=4)
    res = subprocess.run([sys.executable, "-m", "llmchat", "ask", "-p", str(glm2_dir), "-t", "0",
                          "-n", "4"], input="你好".encode("utf-16"), capture_output=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.decode() == want[0] + "\n"
