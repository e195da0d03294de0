"""The command line of THUDM's ``ptuning/main.py`` (its ``ModelArguments``,
``DataTrainingArguments`` and the ``Seq2SeqTrainingArguments`` it relies on), parsed with
argparse so ``llmchat finetune`` accepts the seed's command as is.

Every flag takes its upstream underscore spelling and the dashed one. Booleans follow
``HfArgumentParser``: a bare ``--do_train`` is true, ``--do_train false`` is false, and a
flag whose default is true also has ``--no_<name>``. Flags that only steer HF machinery llmchat
does not have (dataset caches, report_to, ...) are accepted and ignored; flags that would change
the result in a way llmchat does not implement are refused with one clear line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from llmchat.errors import UsageError


def str2bool(value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage block
        raise UsageError(f"finetune: {message} (see llmchat finetune --help)")


@dataclass(frozen=True)
class Flag:
    name: str
    type: Any
    default: Any
    help: str = ""


STR, INT, FLOAT, BOOL = str, int, float, bool
# (name, type, default, help): the upstream names and defaults
FLAGS = (
    # ModelArguments
    Flag("model_name_or_path", STR, None, "base checkpoint directory (or preset name)"),
    Flag("ptuning_checkpoint", STR, None, "start from this prefix (evaluation of a checkpoint)"),
    Flag("quantization_bit", INT, None, "quantize the frozen base to 4 or 8 bits"),
    Flag("pre_seq_len", INT, None, "prefix length P (P-tuning v2)"),
    Flag("prefix_projection", BOOL, False, "train through a 2-layer MLP (upstream's projection)"),
    # DataTrainingArguments
    Flag("prompt_column", STR, None, "the column holding the prompt"),
    Flag("response_column", STR, None, "the column holding the answer"),
    Flag("history_column", STR, None, "the column holding [[question, answer], ...] history"),
    Flag("train_file", STR, None, "training data (JSON lines, a JSON list, or CSV)"),
    Flag("validation_file", STR, None, "evaluation data for --do_eval"),
    Flag("test_file", STR, None, "prediction data for --do_predict"),
    Flag("max_source_length", INT, 1024, "prompt tokens kept"),
    Flag("max_target_length", INT, 128, "answer tokens kept"),
    Flag("val_max_target_length", INT, None, "answer tokens kept for eval (default: the above)"),
    Flag("max_train_samples", INT, None, "use only the first N training examples"),
    Flag("max_eval_samples", INT, None, "use only the first N evaluation examples"),
    Flag("max_predict_samples", INT, None, "use only the first N prediction examples"),
    Flag("num_beams", INT, None, "beams for generation (1 only)"),
    Flag("ignore_pad_token_for_loss", BOOL, True, "labels equal to the pad id count as -100"),
    Flag("source_prefix", STR, "", "text put before every prompt"),
    # Seq2SeqTrainingArguments
    Flag("output_dir", STR, None, "where checkpoint-N/ and the results go"),
    Flag("overwrite_output_dir", BOOL, False, "write into a directory holding checkpoints"),
    Flag("do_train", BOOL, False, "train the prefix"),
    Flag("do_eval", BOOL, False, "evaluate on --validation_file"),
    Flag("do_predict", BOOL, False, "predict --test_file, write generated_predictions.txt"),
    Flag("per_device_train_batch_size", INT, 8, "examples per micro-batch"),
    Flag("per_device_eval_batch_size", INT, 8, "accepted; evaluation generates one at a time"),
    Flag("gradient_accumulation_steps", INT, 1, "micro-batches per optimizer step"),
    Flag("learning_rate", FLOAT, 5e-5, "AdamW peak learning rate"),
    Flag("weight_decay", FLOAT, 0.0, "AdamW weight decay (not on biases)"),
    Flag("adam_beta1", FLOAT, 0.9, "AdamW beta1"),
    Flag("adam_beta2", FLOAT, 0.999, "AdamW beta2"),
    Flag("adam_epsilon", FLOAT, 1e-8, "AdamW epsilon"),
    Flag("max_grad_norm", FLOAT, 1.0, "gradient clipping (0: off)"),
    Flag("num_train_epochs", FLOAT, 3.0, "epochs, when --max_steps is not given"),
    Flag("max_steps", INT, -1, "optimizer steps (overrides --num_train_epochs)"),
    Flag("lr_scheduler_type", STR, "linear", "linear | constant | constant_with_warmup | cosine"),
    Flag("warmup_ratio", FLOAT, 0.0, "warm-up as a fraction of the steps"),
    Flag("warmup_steps", INT, 0, "warm-up steps (overrides --warmup_ratio)"),
    Flag("logging_steps", INT, 500, "log loss and learning rate every N steps"),
    Flag("save_steps", INT, 500, "write checkpoint-N every N steps"),
    Flag("save_strategy", STR, "steps", "steps | no"),
    Flag("seed", INT, 42, "seed for the prefix init, dropout and shuffling"),
    Flag("data_seed", INT, None, "seed for the shuffling only"),
    Flag("fp16", BOOL, False, "run the base in float16"),
    Flag("bf16", BOOL, False, "run the base in bfloat16"),
    Flag("predict_with_generate", BOOL, False, "generate for eval/predict and score it"),
    Flag("generation_max_length", INT, None, "accepted (upstream passes its own max_length)"),
    Flag("generation_num_beams", INT, None, "beams for generation (1 only)"),
    Flag("resume_from_checkpoint", STR, None, "continue from this checkpoint-N directory"),
    Flag("gradient_checkpointing", BOOL, True,
         "recompute each layer in backward (upstream always enables it)"),
    # llmchat's own
    Flag("device", STR, "auto", "auto | cpu | cuda | cuda:N | mps"),
    Flag("threads", INT, None, "CPU threads (default: the free physical cores)"),
    Flag("dtype", STR, "auto", "base dtype: auto (fp16 on CUDA) | float32 | float16 | bfloat16"),
    Flag("temperature", FLOAT, 0.95, "eval/predict sampling temperature (0: greedy)"),
    Flag("top_p", FLOAT, 0.7, "eval/predict nucleus sampling"),
    Flag("json", BOOL, False, "print the final metrics as one JSON object"),
    Flag("debug", BOOL, False, "show tracebacks"),
)
# accepted and ignored: they steer HF machinery (caches, hubs, loggers) llmchat does not have
IGNORED = (
    ("overwrite_cache", BOOL), ("preprocessing_num_workers", INT), ("cache_dir", STR),
    ("use_fast_tokenizer", BOOL), ("model_revision", STR), ("use_auth_token", BOOL),
    ("config_name", STR), ("tokenizer_name", STR), ("resize_position_embeddings", BOOL),
    ("pad_to_max_length", BOOL), ("lang", STR), ("forced_bos_token", STR),
    ("logging_dir", STR), ("logging_strategy", STR), ("logging_first_step", BOOL),
    ("report_to", STR), ("run_name", STR), ("disable_tqdm", BOOL),
    ("dataloader_num_workers", INT), ("dataloader_pin_memory", BOOL),
    ("evaluation_strategy", STR), ("save_total_limit", INT), ("save_on_each_node", BOOL),
    ("remove_unused_columns", BOOL), ("local_rank", INT), ("no_cuda", BOOL),
    ("ddp_find_unused_parameters", BOOL), ("push_to_hub", BOOL), ("optim", STR),
)
REFUSED = {
    "dataset_name": "--dataset_name (hub datasets): pass local --train_file/--validation_file",
    "dataset_config_name": "--dataset_config_name: pass local files",
    "deepspeed": "--deepspeed: llmchat trains on one device",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmchat finetune", allow_abbrev=False,
                description="P-tuning v2 training and evaluation of a ChatGLM-6B or ChatGLM2-6B "
                            "base, with THUDM ptuning/main.py's command line.")
    for f in FLAGS:
        _add(p, f.name, f.type, f.default, f.help)
    for name, typ in IGNORED:
        _add(p, name, typ, None, argparse.SUPPRESS)
    for name in REFUSED:
        _add(p, name, STR, None, argparse.SUPPRESS)
    return p


def _add(p: argparse.ArgumentParser, name: str, typ: Any, default: Any, help: str) -> None:
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    if typ is bool:
        p.add_argument(*names, dest=name, type=str2bool, nargs="?", const=True, default=default,
                       metavar="BOOL", help=help)
        if default is True:  # HfArgumentParser's --no_<flag> for a default-true boolean
            p.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", dest=name,
                           action="store_false", help=argparse.SUPPRESS)
    else:
        p.add_argument(*names, dest=name, type=typ, default=default, help=help)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the flags; bad combinations are ``UsageError``s."""
    a = build_parser().parse_args(argv)
    for name, why in REFUSED.items():
        if getattr(a, name) is not None:
            raise UsageError(f"{why} is not supported")
    if not a.model_name_or_path:
        raise UsageError("--model_name_or_path is required")
    if not a.output_dir:
        raise UsageError("--output_dir is required")
    if not (a.do_train or a.do_eval or a.do_predict):
        raise UsageError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if a.pre_seq_len is None and a.ptuning_checkpoint is None:
        raise UsageError("--pre_seq_len is required: llmchat finetune trains P-tuning v2 "
                         "prefixes only (full fine-tuning of the base is not supported)")
    if a.pre_seq_len is not None and a.pre_seq_len < 1:
        raise UsageError(f"--pre_seq_len must be at least 1, got {a.pre_seq_len}")
    if a.quantization_bit not in (None, 4, 8):
        raise UsageError(f"--quantization_bit must be 4 or 8, got {a.quantization_bit}")
    for beams in (a.num_beams, a.generation_num_beams):
        if beams not in (None, 1):
            raise UsageError("beam search (--num_beams > 1) is not implemented")
    if not a.prompt_column or not a.response_column:
        raise UsageError("--prompt_column and --response_column are required")
    need = [("do_train", "train_file"), ("do_eval", "validation_file"),
            ("do_predict", "test_file")]
    for flag, file in need:
        if getattr(a, flag) and not getattr(a, file):
            raise UsageError(f"--{flag} requires --{file}")
    for name in ("max_source_length", "max_target_length", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.max_target_length < 3 and a.do_train:
        raise UsageError("--max_target_length must be at least 3 (the answer keeps "
                         "max_target_length - 2 tokens on ChatGLM-6B)")
    if a.max_source_length < 3:
        raise UsageError("--max_source_length must be at least 3")
    if a.do_train and a.max_steps <= 0 and not (a.num_train_epochs > 0
                                                and math.isfinite(a.num_train_epochs)):
        raise UsageError("pass --max_steps N or a positive --num_train_epochs")
    if not (a.learning_rate >= 0 and math.isfinite(a.learning_rate)):
        raise UsageError(f"--learning_rate must be a finite number >= 0, got {a.learning_rate}")
    if a.lr_scheduler_type not in ("linear", "constant", "constant_with_warmup", "cosine"):
        raise UsageError(f"--lr_scheduler_type {a.lr_scheduler_type!r} is not supported "
                         "(linear, constant, constant_with_warmup, cosine)")
    if a.save_strategy not in ("steps", "no"):
        raise UsageError(f"--save_strategy {a.save_strategy!r} is not supported (steps, no)")
    if a.fp16 and a.bf16:
        raise UsageError("--fp16 and --bf16 exclude each other")
    if a.val_max_target_length is None:
        a.val_max_target_length = a.max_target_length
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top_p in (0, 1]")
    return a
