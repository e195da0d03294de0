"""``llmchat finetune``: load the base, train the prefix, evaluate/predict, write results.

Output layout (as upstream's Trainer leaves it): ``OUTPUT_DIR/checkpoint-N/`` every
``save_steps``; after training ``trainer_state.json``, ``train_results.json``; after
``--do_eval`` / ``--do_predict`` ``eval_results.json`` / ``predict_results.json`` (``all_results
.json`` merges them) and, for predict with ``--predict_with_generate``,
``generated_predictions.txt`` with one ``{"labels": ..., "predict": ...}`` per line.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmchat.errors import LLMChatError, UnsupportedCheckpointError, UsageError
from llmchat.finetune.args import parse_args
from llmchat.finetune.data import Example, build_train_set, eval_features, read_examples
from llmchat.finetune.train import (
    PREFIX_DROPOUT,
    StopRequested,
    Trainer,
    check_backward,
    check_output_dir,
    dims_of,
    new_encoder,
    sigint_at_step_boundary,
)
from llmchat.ptuning import SUPPORTED, PrefixEncoder, prefix_kv, read_checkpoint


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Base:
    chat: Any  # TransformerChatModel
    glm2: bool
    dtype: torch.dtype
    config: dict[str, Any]


def base_family(path_or_name: str) -> tuple[Path | None, str | None]:
    """Refuse a base other than ChatGLM-6B/ChatGLM2-6B before loading any weights."""
    from llmchat.loader import find_checkpoint, read_config
    from llmchat.registry import detect, read_tokenizer_config

    p = Path(path_or_name).expanduser()
    path = p if p.is_dir() else find_checkpoint(path_or_name, None, download=True, quant=16)
    hf = read_config(path)
    spec = detect(hf, read_tokenizer_config(path))
    if spec.module not in SUPPORTED:
        raise UnsupportedCheckpointError(
            f"{path} is a {spec.name} checkpoint: llmchat finetune trains P-tuning v2 prefixes "
            "for ChatGLM-6B and ChatGLM2-6B bases only")
    return path, spec.module


def load_base(args: Any) -> Base:
    from llmchat.loader import load, read_config

    path, _ = base_family(args.model_name_or_path)
    dtype = args.dtype
    if args.fp16:
        dtype = "float16"
    elif args.bf16:
        dtype = "bfloat16"
    elif dtype == "auto" and args.device != "cpu" and torch.cuda.is_available():
        dtype = "float16"  # upstream: model.half(), the prefix encoder kept in float32
    chat = load(model_path=path, device=args.device, dtype=dtype,
                quant=args.quantization_bit or 16, threads=args.threads, training=True)
    chat.model.requires_grad_(False)
    hf = read_config(Path(path))
    return Base(chat, chat.module.__name__.endswith("chatglm2"),
                getattr(torch, chat.info.dtype), hf)


def encoder_for(args: Any, base: Base) -> PrefixEncoder:
    d = dims_of(base.chat.module.__name__, base.chat.model.config)
    if args.ptuning_checkpoint:  # start from (or evaluate) a trained prefix
        enc_sd, cfg = read_checkpoint(args.ptuning_checkpoint)
        p = enc_sd["embedding.weight"].shape[0] if "embedding.weight" in enc_sd else 0
        proj = "trans.0.weight" in enc_sd
        if args.pre_seq_len not in (None, p) or (args.pre_seq_len and proj
                                                 != args.prefix_projection):
            raise UsageError(f"--ptuning_checkpoint {args.ptuning_checkpoint} holds a "
                             f"{p}-token prefix (projection {proj}), not --pre_seq_len "
                             f"{args.pre_seq_len} (projection {args.prefix_projection})")
        enc = PrefixEncoder(p, d.kv_size, d.hidden, proj)
        try:
            enc.load_state_dict({k: v.float() for k, v in enc_sd.items()}, strict=True)
        except RuntimeError as e:
            raise UsageError(f"--ptuning_checkpoint {args.ptuning_checkpoint} does not fit this "
                             f"base ({str(e).strip().splitlines()[-1].strip()})") from None
    else:
        enc = new_encoder(d, args.pre_seq_len, args.prefix_projection, args.seed)
    return enc.to(base.chat.device)


class ProgressBar:
    """A rich progress bar on stderr (TTY only): step, loss, learning rate, tokens/s, ETA."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console,
                            transient=True)
        self.task = self.bar.add_task("train", total=total, info="")

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, step: int, total: int, loss: float, lr: float, tps: float,
               s_per_step: float) -> None:
        eta = int(s_per_step * (total - step))
        info = (f"loss {loss:.4f}  lr {lr:.3g}  {tps:,.0f} tok/s  "
                f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        self.bar.update(self.task, completed=step, info=info)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def save_metrics(out: Path, split: str, metrics: dict[str, Any]) -> None:
    """HF ``save_metrics``: ``{split}_results.json`` and the merged ``all_results.json``."""
    _write_json(out / f"{split}_results.json", metrics)
    allp = out / "all_results.json"
    merged: dict[str, Any] = {}
    if allp.is_file():
        try:
            merged = json.loads(allp.read_text(encoding="utf-8"))
        except ValueError:
            merged = {}
    merged.update(metrics)
    _write_json(allp, merged)


def generate_split(args: Any, base: Base, encoder: PrefixEncoder, examples: list[Example],
                   split: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Generate for every example (one at a time, upstream's sampling: top_p 0.7, temperature
    0.95, up to max_source + max_target + 1 tokens in all) and score it."""
    from llmchat.finetune.metrics import compute_metrics
    from llmchat.generate import generate_tokens, make_sampler
    from llmchat.types import GenerationConfig

    chat = base.chat
    tok, model = chat.tokenizer, chat.model
    d = dims_of(chat.module.__name__, model.config)
    k, v = prefix_kv(encoder, d.layers, d.kv_heads, d.head_dim)
    k, v = k.to(base.dtype), v.to(base.dtype)  # upstream casts the prefix to the base dtype
    max_length = args.max_source_length + args.max_target_length + 1
    cfg = GenerationConfig(temperature=args.temperature, top_p=args.top_p, top_k=50,
                           seed=args.seed, max_length=max_length)
    stop = frozenset(chat.arch.stop_ids(tok))
    sample = make_sampler(cfg, eos_ids=sorted(stop), invalid_guard=chat.arch.invalid_scores,
                          device=chat.device)
    pairs: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for ex in examples:
        ids, ref = eval_features(ex, tok, base.glm2, source_prefix=args.source_prefix or "",
                                 max_source=args.max_source_length,
                                 max_target=args.val_max_target_length)
        new = max(max_length - len(ids), 0)
        cache = model.make_cache(len(ids) + new + k.shape[2], dtype=base.dtype,
                                 device=chat.device)
        cache.set_prefix(k, v)
        out = list(generate_tokens(model, ids, cache, sample=sample, max_new_tokens=new,
                                   stop_ids=stop)) if new else []
        pairs.append((tok.decode(ref).strip(), tok.decode(out).strip()))
    runtime = time.perf_counter() - t0
    scores = compute_metrics([p for _, p in pairs], [r for r, _ in pairs])
    metrics: dict[str, Any] = {f"{split}_{k}": v for k, v in scores.items()}
    metrics.update({f"{split}_runtime": round(runtime, 4),
                    f"{split}_samples_per_second": round(len(pairs) / max(runtime, 1e-9), 3),
                    f"{split}_samples": len(pairs)})
    return metrics, pairs


def run(argv: list[str]) -> int:
    """The command; returns the exit status (errors are ``LLMChatError``s)."""
    if any(a in ("-h", "--help") for a in argv):
        from llmchat.finetune.args import build_parser

        build_parser().print_help()
        return 0
    args = parse_args(argv)
    check_output_dir(args)
    out = Path(args.output_dir).expanduser()
    if args.do_eval or args.do_predict:
        if not args.predict_with_generate:
            raise UsageError("--do_eval/--do_predict need --predict_with_generate (llmchat "
                             "scores generated answers only)")
        from llmchat.finetune.metrics import require

        require()
    if args.device == "auto" and not torch.cuda.is_available():
        args.device = "cpu"
    # the base's family and every data file are checked before the (slow) weight load
    base_family(args.model_name_or_path)
    splits = {name: read_examples(path, args.prompt_column, args.response_column,
                                  args.history_column, limit=limit)
              for name, flag, path, limit in (
                  ("train", args.do_train, args.train_file, args.max_train_samples),
                  ("eval", args.do_eval, args.validation_file, args.max_eval_samples),
                  ("predict", args.do_predict, args.test_file, args.max_predict_samples))
              if flag}
    torch.manual_seed(args.seed)  # HF set_seed: the dropout draws come from here
    base = load_base(args)
    check_backward(base.chat.model)
    encoder = encoder_for(args, base)
    results: dict[str, Any] = {}
    if args.do_train:
        examples = splits["train"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = build_train_set(examples, base.chat.tokenizer, base.glm2, args,
                                   args.train_file)
        for w in caught:
            log(f"warning: {w.message}")
        cfg = base.chat.model.config
        d = dims_of(base.chat.module.__name__, cfg)
        trainer = Trainer(base.chat.model, d, encoder, rows, args, base.config,
                          base.chat.tokenizer.pad_id, base.dtype, base.chat.device, log=log)
        if args.resume_from_checkpoint:
            trainer.resume(args.resume_from_checkpoint)
        n_params = sum(p.numel() for p in encoder.parameters())
        log(f"training {n_params:,} prefix parameters on {len(rows)} examples, "
            f"{trainer.total} steps ({base.chat.info.device}, base {base.chat.info.dtype}"
            f"{f', int{args.quantization_bit}' if args.quantization_bit else ''}, "
            f"prefix dropout {PREFIX_DROPOUT})")
        if base.chat.device.type == "cpu" and base.dtype == torch.bfloat16:
            log("note: on CPUs without native bfloat16 matmul, the backward through bfloat16 "
                "linears is far slower than float32 (benchmarks/bench_finetune.py); "
                "--dtype float32 if memory allows")
        bar = ProgressBar(trainer.total) if sys.stderr.isatty() else None
        with sigint_at_step_boundary() as stop:
            try:
                if bar is not None:
                    with bar:
                        trainer.progress = bar
                        metrics = trainer.train(stop)
                else:
                    metrics = trainer.train(stop)
            except StopRequested as s:
                log(f"interrupted at step {trainer.state.global_step}: saved {s} (continue "
                    f"with --resume_from_checkpoint {s})")
                raise KeyboardInterrupt from None
        metrics = {**metrics, "train_samples": len(rows)}
        (out / "trainer_state.json").write_text(trainer.state.to_json(), encoding="utf-8")
        save_metrics(out, "train", metrics)
        results.update(metrics)
        log(f"trained to step {trainer.state.global_step}: "
            f"{out / f'checkpoint-{trainer.state.global_step}'}")
    encoder.eval()
    for split in ("eval", "predict"):
        if split not in splits:
            continue
        with torch.no_grad():
            metrics, pairs = generate_split(args, base, encoder, splits[split], split)
        save_metrics(out, split, metrics)
        results.update(metrics)
        if split == "predict":
            with open(out / "generated_predictions.txt", "w", encoding="utf-8") as f:
                for label, pred in pairs:
                    f.write(json.dumps({"labels": label, "predict": pred},
                                       ensure_ascii=False) + "\n")
        if not args.json:
            for key in sorted(metrics):
                print(f"  {key} = {metrics[key]}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    return 0


def main(argv: list[str]) -> int:
    """Entry without the typer app (tests, ``python -m llmchat.finetune``)."""
    try:
        return run(argv)
    except LLMChatError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
