"""The ``llmchat`` command line: thin typed commands over ``loader.load`` and ``ChatModel``.

Heavy imports (torch, the models, the REPL) happen inside the commands, so ``llmchat --help``
and ``llmchat models`` start instantly. Only model text goes to stdout; errors, notices and
timings go to stderr. Expected failures print one ``error:`` line and exit 1 (2 for usage);
``--debug`` shows the traceback instead. What is not command-line work lives elsewhere: stdin
decoding in ``stdin``, the conversation and its log hook (``-c``/``--cid``) in ``session``, the
``models``/``bench`` tables in ``registry.catalog_table``/``bench.result_table``, the log's
formatting in ``logs``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from llmchat.errors import LLMChatError, UsageError
from llmchat.session import attach_log, check_system, new_conversation, resume
from llmchat.stdin import MAX_INPUT_BYTES, decode_input, read_stdin, stdin_lines
from llmchat.termsafe import visible
from llmchat.types import GenerationConfig, parse_quant

if TYPE_CHECKING:
    from llmchat.conversation import Conversation
    from llmchat.models.base import ChatModel
    from llmchat.types import Reply


class ExitCode(IntEnum):
    SUCCESS = 0
    ERROR = 1
    USAGE = 2
    INTERRUPTED = 130


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat locally with ChatGLM-6B, ChatGLM2-6B, VisualGLM-6B and Qwen-7B-Chat.",
)


def version_callback(value: bool) -> None:
    if value:
        from llmchat import __version__

        print(f"llmchat {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version"
        ),
    ] = False,
) -> None:
    """Chat locally with ChatGLM-6B, ChatGLM2-6B, VisualGLM-6B and Qwen-7B-Chat."""


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


# -- shared options ------------------------------------------------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model name (see `llmchat models`); downloaded to the HF cache on first use.",
        rich_help_panel="Model",
    ),
]
PathOpt = Annotated[
    str | None,
    typer.Option(
        "--model-path",
        "-p",
        help="Local checkpoint directory (config.json, weights, tokenizer).",
        rich_help_panel="Model",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N", rich_help_panel="Model")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto | float32 | float16 | bfloat16 (auto: the model's GPU dtype on CUDA; "
        "float32 on CPU, bfloat16 with --quant 8/4)",
        rich_help_panel="Model",
    ),
]
QuantOpt = Annotated[
    str,
    typer.Option(
        "--quant",
        "-q",
        rich_help_panel="Model",
        help="16 | 8 | 4 (aliases fp16, int8, int4); 16 = the floating-point weights as stored "
        "(a pre-quantized checkpoint loads as it is)",
    ),
]
TempOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        "-t",
        help="0 = greedy (default: the model's)",
        rich_help_panel="Generation",
    ),
]
TopPOpt = Annotated[
    float | None,
    typer.Option(
        "--top-p", help="Nucleus sampling mass (default: the model's)", rich_help_panel="Generation"
    ),
]
TopKOpt = Annotated[
    int | None,
    typer.Option("--top-k", help="0 disables (default: the model's)", rich_help_panel="Generation"),
]
RepOpt = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        help="Divide the scores of tokens already in the prompt or reply by this (> 1 "
        "discourages repeats; transformers' semantics) (default: the model's)",
        rich_help_panel="Generation",
    ),
]
MaxNewOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens", "-n", help="Cap on the reply length", rich_help_panel="Generation"
    ),
]
MaxLenOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        help="Total context budget in tokens (prompt + reply) (default: the model's)",
        rich_help_panel="Generation",
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", help="Seed for reproducible sampling", rich_help_panel="Generation"),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(
        "--system",
        "-s",
        help="System prompt (models with a system role: Qwen)",
        rich_help_panel="Generation",
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Load and speed figures on stderr", rich_help_panel="Output"
    ),
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks", rich_help_panel="Output")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads (default: the physical cores that are free)",
        rich_help_panel="Model",
    ),
]
ApiBaseOpt = Annotated[
    str | None,
    typer.Option("--api-base", help="Use an OpenAI-compatible server (e.g. llmchat serve) at URL",
                 rich_help_panel="Model"),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LLMCHAT_API_KEY", help="Key for --api-base",
                 rich_help_panel="Model"),
]
PtuningOpt = Annotated[
    str | None,
    typer.Option("--ptuning-checkpoint", help="P-tuning v2 prefix directory (ChatGLM-6B/ChatGLM2)",
                 rich_help_panel="Model"),
]
NoLogOpt = Annotated[bool, typer.Option("--no-log", help="Do not write this run to the log")]
ContinueOpt = Annotated[
    bool, typer.Option("--continue", "-c", help="Continue the most recent logged conversation")
]
CidOpt = Annotated[str | None, typer.Option("--cid", help="Continue this logged conversation")]


@dataclass
class RunOptions:
    """The model and generation options shared by ``ask``, ``chat`` and ``image``."""

    model: str | None
    model_path: str | None
    device: str
    dtype: str
    quant: str
    settings: dict[str, Any]  # GenerationConfig fields the user set
    verbose: bool
    debug: bool
    system: str | None = None
    log: bool = True
    cid: str | None = None  # the logged conversation to continue
    history: list[Any] | None = None  # its turns (Messages)
    threads: int | None = None
    api_base: str | None = None  # --api-base: a remote OpenAI-compatible server
    api_key: str | None = None
    ptuning_checkpoint: str | None = None

    def validate(self) -> None:
        """Check every option before the (slow) model load."""
        parse_quant(self.quant)
        GenerationConfig().with_(**self.settings)

    def config(self, model: ChatModel) -> GenerationConfig:
        return model.defaults.with_(**self.settings)


SETTINGS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_new_tokens",
    "max_length",
    "seed",
)
SHARED_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annot)
    for name, annot, default in (
        ("model", ModelOpt, None),
        ("model_path", PathOpt, None),
        ("device", DeviceOpt, "auto"),
        ("dtype", DtypeOpt, "auto"),
        ("quant", QuantOpt, "16"),
        ("threads", ThreadsOpt, None),
        ("temperature", TempOpt, None),
        ("top_p", TopPOpt, None),
        ("top_k", TopKOpt, None),
        ("repetition_penalty", RepOpt, None),
        ("max_new_tokens", MaxNewOpt, None),
        ("max_length", MaxLenOpt, None),
        ("seed", SeedOpt, None),
        ("verbose", VerboseOpt, False),
        ("debug", DebugOpt, False),
        ("ptuning_checkpoint", PtuningOpt, None),
    )
]


def model_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared options (declared once, above) as ``opts: RunOptions``, and run
    it under ``guarded`` (one-line errors, exit codes)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "opts"]
    names = [p.name for p in SHARED_OPTIONS]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        shared = {n: kwargs.pop(n) for n in names}
        settings = {k: shared.pop(k) for k in SETTINGS if shared[k] is not None}
        for k in SETTINGS:
            shared.pop(k, None)
        opts = RunOptions(settings=settings, **shared)
        guarded(opts.debug, lambda: fn(opts=opts, **kwargs))

    command.__signature__ = inspect.Signature([*own, *SHARED_OPTIONS])  # type: ignore[attr-defined]
    return command


T = TypeVar("T")


def guarded(debug: bool, fn: Callable[[], T]) -> T:
    """Run ``fn``; turn expected failures into one stderr line and an exit code."""
    try:
        return fn()
    except LLMChatError as exc:
        if debug:
            raise
        msg = visible(" ".join(str(exc).split()))  # always one line, control characters shown
        err_console().print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
        code = ExitCode.USAGE if isinstance(exc, UsageError) else ExitCode.ERROR
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        Stdout.end_line()
        err_console().print("[dim]interrupted[/]")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except BrokenPipeError:
        raise
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug or an unforeseen environment problem
        if debug:
            raise
        msg = visible(" ".join(str(exc).split()))
        err_console().print(
            f"[bold red]error:[/] {type(exc).__name__}: {escape(msg)} "
            "(run with --debug for the traceback)"
        )
        raise typer.Exit(ExitCode.ERROR) from None


@contextmanager
def load_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar on stderr while the weights stream in (TTY only)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("loading weights"),
        BarColumn(),
        DownloadColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("load", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def load_model(opts: RunOptions, *, default_model: str | None = None) -> ChatModel:
    if opts.api_base:
        from llmchat.client import RemoteChatModel

        return RemoteChatModel(opts.api_base, api_key=opts.api_key, model=opts.model)
    from llmchat.loader import load

    name = opts.model or (None if opts.model_path else default_model)
    with (
        load_progress(sys.stderr.isatty()) as progress,
        warnings.catch_warnings(record=True) as seen,
    ):
        warnings.simplefilter("always")
        model = load(
            name,
            model_path=opts.model_path,
            quant=opts.quant,
            device=opts.device,
            dtype=opts.dtype,
            progress=progress,
            ptuning=opts.ptuning_checkpoint,
            threads=opts.threads,
        )
    for w in seen:  # library warnings (e.g. a quantization fallback) as one-line notes
        msg = visible(" ".join(str(w.message).split()))
        err_console().print(f"[yellow]note:[/] {escape(msg)}")
    if "note" in model.info.extra:
        err_console().print(f"[yellow]note:[/] {escape(visible(str(model.info.extra['note'])))}")
    if opts.verbose:
        i = model.info
        err_console().print(
            f"[dim]{model.name} from {i.path}: {i.device}, {i.dtype}, quant {i.quant}"
            f"{' (' + str(i.extra['quant_backend']) + ')' if 'quant_backend' in i.extra else ''}, "
            f"{i.weight_bytes / 2**30:.2f} GiB weights, loaded in {i.load_s:.1f} s, "
            f"peak RSS {i.peak_rss_bytes / 2**30:.2f} GiB, {i.extra.get('threads')} threads[/]"
        )
        if "prefix" in i.extra:
            err_console().print(f"[dim]prefix: {escape(str(i.extra['prefix']))}[/]")
        if "quant_cache" in i.extra:  # which path --quant took (llmchat.quant.cache)
            err_console().print(f"[dim]{escape(visible(str(i.extra['quant_cache'])))}[/]")
        if "cpu_linear" in i.extra:
            err_console().print(f"[dim]CPU linears: {escape(str(i.extra['cpu_linear']))}[/]")
    return model


class Stdout:
    """Model text to stdout, remembering whether the last thing written ended a line, so a
    diagnostic on stderr (figures, ``interrupted``) always starts on a fresh line."""

    at_line_start = True

    tty: bool | None = None

    @classmethod
    def write(cls, text: str) -> None:
        """On a terminal control characters are shown escaped; a pipe gets the bytes as they
        are."""
        if not text:
            return
        if cls.tty is None:
            cls.tty = sys.stdout.isatty()
        sys.stdout.write(visible(text) if cls.tty else text)
        sys.stdout.flush()
        cls.at_line_start = text.endswith("\n")

    @classmethod
    def end_line(cls) -> None:
        if not cls.at_line_start:
            cls.write("\n")


def run_turn(
    conv: Conversation, question: str, *, image: str | None = None, stream: bool, verbose: bool
) -> Reply:
    """One turn: notes on stderr, the reply streamed to stdout (or not), figures after it."""
    reply = conv.send(question, image=image)
    if reply.dropped_turns:
        Stdout.end_line()
        err_console().print(
            f"[yellow]note:[/] dropped the {reply.dropped_turns} oldest turn(s) from what is "
            f"sent, to fit the context budget of {conv.config.max_length} tokens"
        )
    try:
        for delta in reply:
            if stream:
                Stdout.write(delta)
    except KeyboardInterrupt:
        Stdout.end_line()
        raise
    if verbose:
        s = reply.stats
        Stdout.end_line()
        err_console().print(
            f"[dim]{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), "
            f"{s.completion_tokens} reply tokens, "
            f"first token {s.ttft_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tokens/s "
            f"({s.finish_reason})[/]"
        )
    return reply


def one_shot(
    opts: RunOptions,
    question: str,
    *,
    as_json: bool,
    image: str | None = None,
    default_model: str | None = None,
) -> None:
    model = load_model(opts, default_model=default_model)
    conv = new_conversation(opts, model)
    t0 = time.perf_counter()
    reply = run_turn(conv, question, image=image, stream=not as_json, verbose=opts.verbose)
    if as_json:
        s, i = reply.stats, model.info
        print(
            json.dumps(
                {
                    "model": model.name,
                    "reply": reply.text,
                    "prompt_tokens": s.prompt_tokens,
                    "cached_tokens": s.cached_tokens,
                    "completion_tokens": s.completion_tokens,
                    "seconds": round(time.perf_counter() - t0, 4),
                    "ttft_seconds": round(s.ttft_s, 4),
                    "decode_tokens_per_second": round(s.decode_tokens_per_s, 2),
                    "finish_reason": s.finish_reason,
                    "device": i.device,
                    "dtype": i.dtype,
                    "quant": i.quant,
                    "config": conv.config.to_dict(),
                },
                ensure_ascii=False,
            )
        )
    else:
        Stdout.write("\n")


def line_chat(opts: RunOptions, model: ChatModel, image: str | None = None) -> None:
    """The scripting contract: one user message per stdin line, one reply line each. A line
    that cannot be answered (not UTF-8, too long, over the context budget) is reported on
    stderr with its number and skipped; the batch goes on, and the exit status is then 1."""
    conv = new_conversation(opts, model)
    failed = 0
    for n, raw in stdin_lines():
        try:
            if raw is None:
                raise UsageError(f"the line is over {MAX_INPUT_BYTES >> 20} MiB")
            line = decode_input(raw, "the line", utf16=False)
            if not line.strip():
                continue
            run_turn(conv, line, image=image, stream=True, verbose=opts.verbose)
        except LLMChatError as exc:
            failed += 1
            Stdout.end_line()
            msg = " ".join(str(exc).split())
            err_console().print(f"[bold red]error:[/] line {n}: {escape(msg)} (skipped)")
            continue
        image = None  # attached once, to the first question
        Stdout.write("\n")
    if failed:
        raise typer.Exit(ExitCode.ERROR)


# -- commands -------------------------------------------------------------------------------------
@app.command()
@model_command
def ask(
    question: Annotated[
        str | None, typer.Argument(help="The question; stdin is prepended when piped.")
    ] = None,
    *,
    system: SystemOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the reply and figures")
    ] = False,
    api_base: ApiBaseOpt = None,
    api_key: ApiKeyOpt = None,
    no_log: NoLogOpt = False,
    cont: ContinueOpt = False,
    cid: CidOpt = None,
    opts: RunOptions,
) -> None:
    """Ask one question and stream the answer (scriptable: stdin, --json)."""
    opts.system, opts.api_base, opts.api_key = system, api_base, api_key
    opts.log = not no_log
    resume(opts, cont, cid)
    opts.validate()
    piped = read_stdin()
    parts = [p for p in ((piped or "").strip(), (question or "").strip()) if p]
    if not parts:
        raise UsageError("empty question: pass it as an argument or on stdin")
    one_shot(opts, "\n".join(parts), as_json=as_json, default_model="chatglm2-6b")


@app.command()
@model_command
def chat(
    *,
    system: SystemOpt = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="Raw text instead of rendered Markdown")
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Figures after each reply")] = False,
    api_base: ApiBaseOpt = None,
    api_key: ApiKeyOpt = None,
    no_log: NoLogOpt = False,
    cont: ContinueOpt = False,
    cid: CidOpt = None,
    opts: RunOptions,
) -> None:
    """Chat with multi-turn history: a REPL in a terminal, one reply per line when piped."""
    opts.system, opts.api_base, opts.api_key = system, api_base, api_key
    opts.log = not no_log
    resume(opts, cont, cid)
    interactive(opts, plain=plain, stats=stats)


def interactive(
    opts: RunOptions,
    *,
    plain: bool,
    stats: bool,
    image: str | None = None,
    default_model: str = "chatglm2-6b",
) -> None:
    opts.validate()
    chat_model = load_model(opts, default_model=default_model)
    check_system(opts, chat_model)
    if sys.stdin is not None and sys.stdin.isatty():
        from llmchat.repl import run_repl

        code = run_repl(
            chat_model,
            opts.config(chat_model),
            system=opts.system,
            image=image,
            plain=plain,
            stats=stats or opts.verbose,
            setup=lambda conv: attach_log(opts, chat_model, conv),
        )
        raise typer.Exit(code)
    line_chat(opts, chat_model, image)


@app.command()
@model_command
def image(
    path: Annotated[str, typer.Argument(help="Image file (JPEG, PNG, ...)")],
    question: Annotated[
        str | None, typer.Argument(help="Question; without it, a chat about the image")
    ] = None,
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Raw text instead of Markdown")] = False,
    opts: RunOptions,
) -> None:
    """Chat about a picture with VisualGLM-6B."""
    opts.validate()
    from llmchat.images import check_image

    check_image(path)
    if question is None:
        interactive(opts, plain=plain, stats=False, image=path, default_model="visualglm-6b")
    elif not question.strip():
        raise UsageError("empty question")
    else:
        one_shot(opts, question.strip(), as_json=as_json, image=path, default_model="visualglm-6b")


@app.command()
@model_command
def serve(
    *,
    host: Annotated[str, typer.Option(help="Address to bind (not loopback: use --api-key)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LLMCHAT_API_KEY", help="Require Authorization: Bearer KEY"),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(min=0, help="Requests that may wait for the model (more: 429)")
    ] = None,
    allow_local_images: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="VisualGLM: also accept file:// URLs / absolute paths "
                     "of images inside DIR (default: data: URIs only)"),
    ] = None,
    kv_slots: Annotated[
        int, typer.Option(min=1, max=64, help="Conversations whose KV cache is kept for reuse "
                          "(each holds its prompt's keys/values; on CUDA they yield to a new one "
                          "when memory runs out)")
    ] = 4,
    no_log: NoLogOpt = False,
    opts: RunOptions,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    opts.validate()
    from llmchat.server import check_image_dir, require_serve_deps
    from llmchat.server import serve as run_server

    require_serve_deps()
    if allow_local_images is not None:
        check_image_dir(allow_local_images)
    model = load_model(opts, default_model="chatglm2-6b")
    from llmchat.models.base import TransformerChatModel

    if isinstance(model, TransformerChatModel):
        model.kv_slots = kv_slots
    run_server(model, config=opts.config(model), host=host, port=port, api_key=api_key or None,
               max_queue=max_queue, allow_local_images=allow_local_images,
               conversation_log=not no_log,
               requested={"device": opts.device, "dtype": opts.dtype, "quant": opts.quant})


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List the supported models, their hub ids, and which are in the local cache."""
    from llmchat.registry import catalog, catalog_table

    rows = catalog()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    Console().print(catalog_table(rows))


@app.command()
def bench(
    model: ModelOpt = None,
    model_path: PathOpt = None,
    random: Annotated[
        str | None,
        typer.Option(
            "--random",
            help="Build a full-size random-weight model of this preset (no download), "
            "e.g. chatglm2-6b",
        ),
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option("--layers", help="With --random: keep only this many layers (same widths)"),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = "16",
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=2, help="Prompt length")
    ] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens to decode")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    debug: DebugOpt = False,
) -> None:
    """Measure prefill and decode speed, memory and achieved bandwidth."""

    def run() -> None:
        if not (model or model_path or random):
            raise UsageError("give --model, --model-path or --random SHAPE")
        if layers is not None and (not random or layers < 1):
            raise UsageError("--layers needs --random and a positive count")
        from llmchat.bench import run as run_bench

        r = run_bench(
            model,
            model_path=model_path,
            random_shape=random,
            quant=quant,
            device=device,
            dtype=dtype,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            layers=layers,
        )
        if as_json:
            print(json.dumps(r.to_dict()))
            return
        from llmchat.bench import result_table

        Console().print(result_table(r))

    guarded(debug, run)


@app.command(name="logs")
def logs_cmd(
    action: Annotated[
        str | None, typer.Argument(help="list | path | status | on | off (default: show turns)")
    ] = None,
    count: Annotated[int, typer.Option("-n", "--count", help="How many")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list")] = False,
    query: Annotated[str | None, typer.Option("-q", "--query", help="Full-text search")] = None,
    cid: Annotated[str | None, typer.Option("--cid", help="One conversation")] = None,
    debug: DebugOpt = False,
) -> None:
    """Show and search the conversation log (each finished turn of ask, chat, image, serve)."""

    def run() -> None:
        from llmchat import logs

        if action in ("on", "off"):
            logs.set_enabled(action == "on")
            err_console().print(f"Logging {action}.")
            return
        path = logs.db_path()
        if action == "path":
            print(path)
            return
        if action not in (None, "list", "status"):
            raise UsageError(f"unknown logs action {action!r}: list, path, status, on, off")
        try:
            db = logs.open_existing()
        except logs.LogError as exc:
            raise LLMChatError(str(exc)) from None
        if action == "status":
            print(logs.status_text(db, path))
            return
        if action == "list":
            rows = logs.conversations(db, count) if db is not None else []
            if as_json:
                print(json.dumps(rows, ensure_ascii=False, indent=2))
            else:
                for r in rows:
                    print(logs.conversation_line(r))
                if not rows:
                    err_console().print(f"No conversations logged yet ({path}).")
            return
        rows = logs.responses(db, n=count, query=query, cid=cid) if db is not None else []
        if as_json:
            print(json.dumps(rows, ensure_ascii=False, indent=2))
            return
        if not rows:  # say so on stderr: stdout stays empty for scripts
            what = "matches" if query or cid else "logged turns yet"
            err_console().print(f"No {what} ({path}).")
            return
        text = logs.responses_markdown(rows)
        if sys.stdout.isatty():
            from rich.markdown import Markdown

            Console().print(Markdown(text))
        else:
            print(text, end="")

    guarded(debug, run)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def finetune(ctx: typer.Context) -> None:
    """Train a P-tuning v2 prefix with THUDM ptuning/main.py's flags (--help lists them)."""
    from llmchat.finetune.run import run

    raise typer.Exit(guarded("--debug" in ctx.args, lambda: run(list(ctx.args))))


def _quiet_broken_pipe(self: Console) -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(ExitCode.SUCCESS)


def main() -> None:
    """Console-script entry point: option errors as one ``error:`` line (exit 2), a closed or
    broken stdout handled without a traceback."""
    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, wherever typer keeps it
    # rich's documented hook for a reader that went away (`llmchat --help | head -1`): its
    # default exits 1; for us that is a normal end, as for any Unix filter.
    Console.on_broken_pipe = _quiet_broken_pipe  # type: ignore[method-assign]

    if sys.stdout is None:  # started with stdout closed: nothing can be written
        sys.stderr.write("error: stdout is closed; nothing could be written\n")
        sys.exit(ExitCode.ERROR)
    try:
        code = app(standalone_mode=False)
        sys.stdout.flush()
    except usage_error as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        msg = " ".join(exc.format_message().split())
        err_console().print(f"[bold red]error:[/] {escape(msg)}{hint}", highlight=False)
        sys.exit(ExitCode.USAGE)
    except typer.Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # `llmchat ask ... | head`: the reader has gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(ExitCode.SUCCESS)
    except OSError as exc:  # stdout closed or unwritable (EBADF, ENOSPC, ...)
        sys.stderr.write(f"error: cannot write the output: {exc.strerror or exc}\n")
        sys.exit(ExitCode.ERROR)
    sys.exit(code if isinstance(code, int) else ExitCode.SUCCESS)
