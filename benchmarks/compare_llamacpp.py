"""llmchat next to llama.cpp on the same random ChatGLM2-6B-shaped weights: decode and prefill.

Builds one random-weight checkpoint in the exact upstream ChatGLM2-6B layout (full widths and
vocabulary, ``--layers`` layers, fp16 ``.bin`` shards, the real ``tokenizer.model``), converts
it to GGUF with llama.cpp's own converter (``convert_hf_to_gguf.py`` and gguf-py from the
llama-cpp-python source distribution of the installed version), makes Q8_0 with the
converter's ``--outtype q8_0`` and Q4_0 with llama.cpp's quantizer (``llama_model_quantize``),
then compares the pairs F16 / bf16, Q8_0 / int8 and Q4_0 / int4 with the same thread count.

Each side runs in its own process (the two OpenMP runtimes would otherwise spin against each
other) and the sides alternate round by round (ABBA), so machine noise hits both alike. A round
is one ``--prompt``-token prefill from an empty cache, then ``--decode-tokens`` one-token steps.
Printed: medians, and llmchat / llama.cpp ratios (above 1 = llmchat faster).

The stock converter reads ChatGLM's vocabulary only through the tokenizer's remote code
(``AutoTokenizer(trust_remote_code=True)``), which a checkpoint with just ``tokenizer.model``
does not have (and llmchat never runs). When it refuses, the script converts with a subclass of
the converter's own ``ChatGLMModel`` whose vocabulary step is the converter's SentencePiece
reader (``_set_vocab_sentencepiece`` on ``tokenizer.model``); weights and graph are unchanged,
and the token ids are fed directly, so no tokenizer runs during the timing.

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install --no-binary llama-cpp-python \\
        'llmchat[bench]'                       # llama-cpp-python, built from source for this CPU
    python -m benchmarks.compare_llamacpp [--layers 4] [--threads 2] [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install --no-binary '
           "llama-cpp-python 'llmchat[bench]'  (builds llama.cpp from source for this CPU)")
# name -> (GGUF file type, llmchat --quant, llmchat --dtype)
PAIRS = {"f16": ("F16", 16, "bfloat16"), "q8_0": ("Q8_0", 8, "auto"), "q4_0": ("Q4_0", 4, "auto")}
LLMCHAT_NAME = {16: "bf16", 8: "int8", 4: "int4"}

# Run by the converter's Python with (source dir, checkpoint dir, outtype, out file): the
# converter's own ChatGLMModel, its vocabulary read from tokenizer.model by its own
# SentencePiece routine instead of the tokenizer's remote code.
CONVERT_SPM = r"""
import os, sys
from pathlib import Path
src, model_dir, outtype, outfile = sys.argv[1:5]
sys.path[:0] = [src, os.path.join(src, "gguf-py")]
import torch, gguf
from conversion.chatglm import ChatGLMModel

class ChatGLM2SentencePiece(ChatGLMModel):
    model_arch = ChatGLMModel.model_arch

    def set_vocab(self):
        # padded_vocab_size rows in the embedding; the pieces past the tokenizer are padding
        self.hparams.setdefault("vocab_size", self.hparams["padded_vocab_size"])
        self._set_vocab_sentencepiece()

ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
with torch.inference_mode():
    ChatGLM2SentencePiece(Path(model_dir), ftype, Path(outfile)).write()
"""


# -- setup ----------------------------------------------------------------------------------------
def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        print(f"error: llama_cpp is not installed; install it with: {INSTALL}", file=sys.stderr)
        sys.exit(2)
    return llama_cpp


def converter_source(work: Path, given: str | None) -> Path:
    """The llama.cpp tree holding ``convert_hf_to_gguf.py``: given, or from the sdist of the
    installed llama-cpp-python (``pip download``)."""
    if given:
        root = Path(given)
        for cand in (root, root / "vendor" / "llama.cpp"):
            if (cand / "convert_hf_to_gguf.py").is_file():
                return cand
        sys.exit(f"error: no convert_hf_to_gguf.py in {root} or {root}/vendor/llama.cpp")
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    src = work / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    print(f"fetching the llama-cpp-python {ver} source for its converter", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "-d", str(work), f"llama-cpp-python=={ver}"], check=True)
    with tarfile.open(work / f"llama_cpp_python-{ver}.tar.gz") as tar:
        tar.extractall(work, filter="data")
    return src


def write_checkpoint(path: Path, layers: int, seed: int) -> None:
    """Random weights in the upstream ChatGLM2-6B layout: full widths and vocabulary."""
    if (path / "done").is_file():
        return
    import torch

    from llmchat.models import chatglm2
    from tests.checkpoints import random_state_dict, save_checkpoint, shared, upstream_config

    hf = dict(upstream_config("chatglm2-6b"), num_layers=layers)  # the upstream file, 28 -> L
    with torch.device("meta"):
        model = chatglm2.Model(chatglm2.Config.from_hf(hf))
    sd = random_state_dict(model, seed=seed, std=0.02)
    rot = hf["kv_channels"] // 2  # upstream checkpoints carry the (unused) rotary buffer
    sd["transformer.rotary_pos_emb.inv_freq"] = (
        1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
    tok = shared("tokenizers/chatglm2-6b")
    print(f"writing the random checkpoint ({layers} layers) to {path}", flush=True)
    save_checkpoint(path, hf, sd, fmt="bin-sharded", shards=layers + 1,
                    tokenizer_files=(tok / "tokenizer.model", tok / "tokenizer_config.json"))
    (path / "done").write_text("")


def convert(src: Path, hf: Path, outtype: str, out: Path, notes: list[str]) -> None:
    """``convert_hf_to_gguf.py`` as shipped; if it refuses the vocabulary, its own ChatGLM
    class with its SentencePiece vocabulary step (see the module docstring)."""
    if out.is_file():
        return
    print(f"converting to {out.name} with llama.cpp's convert_hf_to_gguf.py", flush=True)
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    tmp = out.with_suffix(".part")
    stock = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf),
                            "--vocab-only", "--outfile", str(tmp)],
                           capture_output=True, text=True, env=env)
    tmp.unlink(missing_ok=True)
    if stock.returncode == 0:
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", outtype,
               "--outfile", str(tmp)]
    else:
        last = (stock.stderr.strip().splitlines() or ["(no message)"])[-1]
        note = (f"the stock converter refused this ChatGLM2 checkpoint ({last[:160]}); converted "
                "with its ChatGLMModel and its SentencePiece vocabulary step")
        if note not in notes:
            notes.append(note)
            print("note: " + note, flush=True)
        cmd = [sys.executable, "-c", CONVERT_SPM, str(src), str(hf), outtype, str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: the conversion to {outtype} failed:\n{done.stderr[-3000:]}")
    tmp.rename(out)


def quantize(llama_cpp: Any, f16: Path, out: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (what ``llama-quantize`` runs), default mixture."""
    if out.is_file():
        return
    print(f"quantizing to {out.name} with llama_model_quantize", flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = out.with_suffix(".part")
    import ctypes

    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc:
        sys.exit(f"error: llama_model_quantize to {ftype} failed ({rc})")
    tmp.rename(out)


def tensor_types(src: Path, gguf_file: Path) -> str:
    """The GGUF types of one layer's linears and of the output layer (what each side streams)."""
    sys.path.insert(0, str(src / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    keys = ("blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight", "token_embd.weight")
    return ", ".join(f"{k.removesuffix('.weight')} {types.get(k, '?')}" for k in keys)


# -- the two sides (each in its own process) ----------------------------------------------------
def prompt_ids(n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def worker(args: argparse.Namespace) -> None:
    """Answer JSON commands on stdin; C libraries' prints go to stderr, not the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    ids = prompt_ids(args.prompt)
    steps = prompt_ids(args.decode_tokens, seed=1)
    ctx = args.prompt + args.decode_tokens + 8
    prefill: Callable[[], None]
    step: Callable[[int], None]
    logits: Callable[[], list[float]]
    if args.worker == "llama":
        import llama_cpp
        import numpy as np

        llm = llama_cpp.Llama(model_path=args.path, n_ctx=ctx, n_batch=args.prompt,
                              n_ubatch=args.prompt, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        info = {"path": "llama.cpp " + llama_cpp.__version__}

        def prefill() -> None:
            llm.reset()
            llm.eval(ids)

        def step(tok: int) -> None:
            llm.eval([tok])

        def logits() -> list[float]:
            prefill()
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(float).tolist()
    else:
        import torch

        from llmchat.loader import load

        chat = load(model_path=args.path, device="cpu", dtype=args.dtype, quant=args.quant,
                    threads=args.threads)
        net = chat.model  # type: ignore[attr-defined]
        dtype = getattr(torch, chat.info.dtype)
        cache = net.make_cache(ctx, dtype=dtype, device="cpu")
        info = {"path": f"llmchat {chat.info.dtype}"
                + "".join(f", {k} {v}" for k, v in chat.info.extra.items()
                          if k in ("quant_backend", "cpu_linear", "threads"))}
        x = torch.tensor([ids])

        @torch.inference_mode()
        def prefill() -> None:
            cache.reset()
            net(x, cache, last_only=True)

        @torch.inference_mode()
        def step(tok: int) -> None:
            net(torch.tensor([[tok]]), cache, last_only=True)

        @torch.inference_mode()
        def logits() -> list[float]:
            cache.reset()
            return net(x, cache, last_only=True)[0, -1].float().tolist()

    proto.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "logits":
            proto.write(json.dumps({"logits": logits()}) + "\n")
        elif cmd["op"] == "round":
            t0 = time.perf_counter()
            prefill()
            pre = time.perf_counter() - t0
            times = []
            for tok in steps:
                t0 = time.perf_counter()
                step(tok)
                times.append(time.perf_counter() - t0)
            proto.write(json.dumps({"prefill_s": pre, "decode_s": times}) + "\n")
        else:
            break


def _env() -> dict[str, str]:
    """The workers' environment: this checkout first on the path, no quantized-weights cache."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, LLMCHAT_QUANT_CACHE="0")


class Side:
    """One worker process and its measurements."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.compare_llamacpp", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=REPO, env=_env())
        self.info = self._read()
        self.prefill: list[float] = []
        self.decode: list[float] = []

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"error: the {self.name} worker died (its messages are above)")
        return dict(json.loads(line))

    def ask(self, op: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def round(self) -> None:
        r = self.ask("round")
        self.prefill.append(r["prefill_s"])
        self.decode.extend(r["decode_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask_quit()

    def ask_quit(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


def compare(name: str, gguf_file: Path, hf: Path, args: argparse.Namespace) -> dict[str, Any]:
    ftype, bits, dtype = PAIRS[name]
    common = ["--prompt", str(args.prompt), "--decode-tokens", str(args.decode_tokens),
              "--threads", str(args.threads)]
    sides = [Side("llama.cpp", ["--worker", "llama", "--path", str(gguf_file), *common]),
             Side("llmchat", ["--worker", "llmchat", "--path", str(hf), "--quant", str(bits),
                              "--dtype", dtype, *common])]
    try:
        # one untimed prefill each (also the warm-up): the same last-position logits?
        agree = cosine(sides[0].ask("logits")["logits"], sides[1].ask("logits")["logits"])
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                side.round()
    finally:
        for side in sides:
            side.close()
    lc, lm = sides
    row = {"pair": f"{ftype} / {LLMCHAT_NAME[bits]}", "logits_cosine": agree,
           "llama_cpp": lc.info["path"], "llmchat": lm.info["path"]}
    for side, key in ((lc, "llama_cpp"), (lm, "llmchat")):
        row[f"{key}_decode_ms"] = 1e3 * statistics.median(side.decode)
        row[f"{key}_prefill_tok_s"] = args.prompt / statistics.median(side.prefill)
    row["decode_ratio"] = row["llama_cpp_decode_ms"] / row["llmchat_decode_ms"]
    row["prefill_ratio"] = row["llmchat_prefill_tok_s"] / row["llama_cpp_prefill_tok_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompt", type=int, default=128, help="prefill length in tokens")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side and pair")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="subset of " + ",".join(PAIRS))
    ap.add_argument("--work", help="keep the checkpoint and GGUF files here (reused)")
    ap.add_argument("--llama-cpp-src", help="llama.cpp tree (or llama-cpp-python sdist) "
                    "with convert_hf_to_gguf.py; default: pip download the installed version's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--worker", choices=("llama", "llmchat"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--quant", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "llmchat":  # never loads llama.cpp (and its OpenMP) next to torch
        worker(args)
        return
    llama_cpp = require_llama_cpp()
    if args.worker:
        worker(args)
        return
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if not pairs or any(p not in PAIRS for p in pairs):
        sys.exit(f"error: --pairs takes a subset of {','.join(PAIRS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="compare_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    try:
        src = converter_source(work, args.llama_cpp_src)
        hf = work / f"chatglm2-L{args.layers}-s{args.seed}"
        write_checkpoint(hf, args.layers, args.seed)
        files = {}
        for name in pairs:
            files[name] = work / f"{hf.name}-{name}.gguf"
            if name == "q4_0":
                files.setdefault("f16", work / f"{hf.name}-f16.gguf")
                convert(src, hf, "f16", files["f16"], notes)
                quantize(llama_cpp, files["f16"], files[name], "Q4_0", args.threads)
            else:
                convert(src, hf, name, files[name], notes)
        rows = []
        print(f"ChatGLM2-6B widths, {args.layers} layers, vocab 65024, {args.threads} threads, "
              f"{args.prompt}-token prompt, {args.rounds} rounds x {args.decode_tokens} decode "
              f"steps, sides alternating", flush=True)
        for name in pairs:
            print(f"  {PAIRS[name][0]} GGUF: {tensor_types(src, files[name])}", flush=True)
            rows.append(compare(name, files[name], hf, args))
            r = rows[-1]
            print(f"  {r['pair']}: {r['llmchat']}; logits cosine {r['logits_cosine']:.4f}\n"
                  f"    decode {r['llama_cpp_decode_ms']:.0f} / {r['llmchat_decode_ms']:.0f} ms"
                  f"/token ({r['decode_ratio']:.2f}x), prefill {r['llama_cpp_prefill_tok_s']:.1f}"
                  f" / {r['llmchat_prefill_tok_s']:.1f} tok/s ({r['prefill_ratio']:.2f}x)",
                  flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| | " + " | ".join(f"llama.cpp {r['pair'].split(' / ')[0]} / llmchat "
                              f"{r['pair'].split(' / ')[1]}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| decode ms/token | " + " | ".join(
        f"{r['llama_cpp_decode_ms']:.0f} / {r['llmchat_decode_ms']:.0f}" for r in rows) + " |")
    print("| prefill tok/s | " + " | ".join(
        f"{r['llama_cpp_prefill_tok_s']:.1f} / {r['llmchat_prefill_tok_s']:.1f}" for r in rows)
        + " |")
    print("| decode speed, llmchat / llama.cpp | " + " | ".join(
        f"{r['decode_ratio']:.2f}x" for r in rows) + " |")
    print("| prefill speed, llmchat / llama.cpp | " + " | ".join(
        f"{r['prefill_ratio']:.2f}x" for r in rows) + " |")
    for note in notes:
        print("note: " + note)
    if args.json:
        print(json.dumps({"rows": rows, "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
