"""P-tuning v2 training of a frozen ChatGLM-6B / ChatGLM2-6B base (THUDM ``ptuning/``).

Forward: the prefix encoder (fp32) gives (P, layers·2·kv_heads·D); as upstream's
``get_prompt`` it is expanded over the batch, cast to the base dtype, passed through
``Dropout(0.1)`` and split into per-layer keys/values that sit in front of the sequence's own
(no rotary on them, visible to every query). ``PrefixCache`` hands them to the models' own
attention through the KV-cache interface, so the positions and masks are the inference ones:
ChatGLM-6B's 2D positions and prefix-LM mask, ChatGLM2's causal mask. Each layer is
recomputed in backward (gradient checkpointing, as upstream enables). The loss is the mean
cross entropy of the shifted labels (-100 ignored), from fp32 logits of the supervised
positions only.

Optimisation is the HF ``Trainer`` of transformers 4.27 (what upstream pins): its ``AdamW``
(``adamw_hf``: bias-corrected step size, eps added to the uncorrected root), weight decay
except on biases, ``max_grad_norm`` clipping, a linear (or constant/cosine) schedule with
optional warm-up, one optimizer step per ``gradient_accumulation_steps`` micro-batches (each
loss divided by that count). Departure: micro-batches come from one stream of per-epoch
shuffles (``torch.randperm`` seeded with seed + epoch), so the order differs from HF's sampler
and an epoch's last partial accumulation simply continues into the next epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmchat.cache import KVCache
from llmchat.errors import CheckpointError, QuantizationError, UsageError
from llmchat.finetune.data import Features
from llmchat.ptuning import KEY, Dims, PrefixEncoder, dims_of  # noqa: F401 - dims_of re-exported

PREFIX_DROPOUT = 0.1  # upstream ``self.dropout = torch.nn.Dropout(0.1)`` on the prefix
WEIGHTS = "pytorch_model.bin"
STATE = "trainer_state.json"


# -- the model side ----------------------------------------------------------------------------
def new_encoder(d: Dims, pre_seq_len: int, projection: bool, seed: int) -> PrefixEncoder:
    """Upstream's init: torch's defaults (embedding N(0, 1)), drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PrefixEncoder(pre_seq_len, d.kv_size, d.hidden, projection)


class PrefixCache(KVCache):
    """A KV cache whose first P slots are the (differentiable) prefix: ``update`` returns the
    prefix keys/values followed by the new ones instead of writing a buffer."""

    def __init__(self, k: Tensor, v: Tensor) -> None:  # (layers, B, G, P, D)
        layers, b, g, p, d = k.shape
        super().__init__(layers, g, d, 0, batch=b, dtype=k.dtype, device=k.device)
        self.pk, self.pv = k, v
        self.prefix_len = p
        self.offset = p

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat((self.pk[layer], k), dim=2), torch.cat((self.pv[layer], v), dim=2)

    def advance(self, t: int) -> None:
        self.offset += t


def prefix_past(encoder: PrefixEncoder, d: Dims, batch: int, dtype: torch.dtype, *,
                dropout: float) -> tuple[Tensor, Tensor]:
    """Per-layer prefix keys and values, each (layers, B, G, P, D), as upstream's ``get_prompt``
    (cast to the base dtype, then dropout, independently per batch row)."""
    w = encoder.embedding.weight
    p = w.shape[0]
    out = encoder(torch.arange(p, device=w.device))  # (P, W) fp32
    out = out[None].expand(batch, p, out.shape[-1]).to(dtype)
    if dropout:
        out = F.dropout(out, dropout, training=True)
    kv = out.view(batch, p, d.layers * 2, d.kv_heads, d.head_dim).permute(2, 0, 3, 1, 4)
    return kv[0::2], kv[1::2]  # (L, B, G, P, D) each


def _layer(fn: nn.Module, ckpt: bool, *args: Any) -> Tensor:
    if ckpt:
        return checkpoint(fn, *args, use_reentrant=False)  # type: ignore[no-any-return]
    return fn(*args)  # type: ignore[no-any-return]


def hidden_states(model: nn.Module, d: Dims, ids: Tensor, cache: KVCache, *, ckpt: bool
                  ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The last layer's output (B, T, hidden) and the head (final norm + output layer), from
    the model's own modules and position/mask code."""
    tr = model.transformer
    cfg = model.config
    if d.glm2:
        from llmchat.models import chatglm2

        cos, sin = chatglm2.rope_cos_sin(cache.positions(ids.shape[1]), cfg.kv_channels // 2,
                                         cfg.rope_theta)
        x = tr.embedding.word_embeddings(ids)
        for block in tr.encoder.layers:
            x = _layer(block, ckpt, x, cos, sin, cache)
        norm, out = tr.encoder.final_layernorm, tr.output_layer
        return x, lambda h: out(norm(h))
    from llmchat.models import chatglm

    pos, block_pos, mask = chatglm.glm_positions(ids, cfg, cache)
    cos, sin = chatglm.rope_cos_sin(pos, block_pos, cfg.head_dim)
    x = tr.word_embeddings(ids)
    for layer in tr.layers:
        x = _layer(layer, ckpt, x, cos, sin, mask, cache)
    norm, emb = tr.final_layernorm, tr.word_embeddings
    return x, lambda h: F.linear(norm(h), emb.weight)  # tied lm_head


def prefix_loss(model: nn.Module, d: Dims, encoder: PrefixEncoder, ids: Tensor,
                labels: Tensor, *, dtype: torch.dtype, dropout: float = PREFIX_DROPOUT,
                ckpt: bool = True) -> Tensor:
    """Mean cross entropy of ``labels[:, 1:]`` (-100: ignored) given the prefix."""
    k, v = prefix_past(encoder, d, ids.shape[0], dtype, dropout=dropout)
    x, head = hidden_states(model, d, ids, PrefixCache(k, v), ckpt=ckpt)
    target = labels[:, 1:]
    keep = target != -100
    logits = head(x[:, :-1][keep]).float()  # (N, V): the supervised positions only
    return F.cross_entropy(logits, target[keep])


def collate(rows: list[Features], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-pad a micro-batch to its longest row (pad id, label -100)."""
    n = max(len(r.input_ids) for r in rows)
    ids = [r.input_ids + [pad_id] * (n - len(r.input_ids)) for r in rows]
    lab = [r.labels + [-100] * (n - len(r.labels)) for r in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(lab, dtype=torch.long, device=device))


def check_backward(model: nn.Module) -> None:
    """Training through a quantized base needs input gradients through its linears: probe one
    so a missing backward is one clear line, before any step."""
    from llmchat.quant import QuantizedLinear

    q = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if q is None:
        return
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    dev = next(model.parameters()).device
    x = torch.zeros(1, 1, q.in_features, dtype=dtype, device=dev, requires_grad=True)
    try:
        q(x).float().sum().backward()
        ok = x.grad is not None
    except RuntimeError:
        ok = False
    if not ok:
        raise QuantizationError(
            f"--quantization_bit {q.bits}: this llmchat's quantized linears have no backward "
            "(input gradients), so the prefix cannot be trained through them; train on a "
            "float16/bfloat16 base instead")


# -- the optimizer: transformers' AdamW (adamw_hf) ---------------------------------------------
class HFAdamW(torch.optim.Optimizer):
    """transformers.AdamW (correct_bias=True): the step is ``lr·sqrt(1-β2^t)/(1-β1^t)·m /
    (sqrt(v) + eps)``, then decoupled weight decay ``p -= lr·wd·p``. Its state dict has the same
    layout (``step`` int, ``exp_avg``, ``exp_avg_sq``) so an HF ``optimizer.pt`` loads."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=True))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = v.sqrt().add_(group["eps"])
                size = group["lr"]
                if group["correct_bias"]:
                    size = size * math.sqrt(1.0 - b2 ** st["step"]) / (1.0 - b1 ** st["step"])
                p.addcdiv_(m, denom, value=-size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def make_optimizer(encoder: PrefixEncoder, args: Any) -> HFAdamW:
    """HF's two groups: weights with ``weight_decay``, biases without (no LayerNorm here)."""
    named = list(encoder.named_parameters())
    decay = [p for n, p in named if not n.endswith("bias")]
    rest = [p for n, p in named if n.endswith("bias")]
    return HFAdamW([{"params": decay, "weight_decay": args.weight_decay},
                    {"params": rest, "weight_decay": 0.0}], lr=args.learning_rate,
                   betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                   weight_decay=args.weight_decay)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """transformers' schedule functions (``get_scheduler``) as a multiplier of the peak lr."""
    def f(step: int) -> float:
        if kind != "constant" and step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        if kind == "cosine":
            prog = (step - warmup) / max(1, total - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * prog)))
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """``trainer_state.json`` with HF's keys (what ``TrainerState.load_from_json`` takes)."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    num_train_epochs: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        d = {"best_metric": None, "best_model_checkpoint": None, "epoch": self.epoch,
             "global_step": self.global_step, "is_hyper_param_search": False,
             "is_local_process_zero": True, "is_world_process_zero": True,
             "log_history": self.log_history, "max_steps": self.max_steps,
             "num_train_epochs": self.num_train_epochs, "total_flos": 0,
             "trial_name": None, "trial_params": None}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


class StopRequested(Exception):
    pass


@contextmanager
def sigint_at_step_boundary() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C: ask the loop to stop after the current step; second: stop now."""
    hit = [False]

    def handler(signum: int, frame: Any) -> None:
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to stop now)\n")

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
        yield lambda: False
        return
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, old)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    st: dict[str, Any] = {"python": random.getstate(), "cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    if "python" in st:
        v = st["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    torch.random.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class Trainer:
    model: nn.Module
    dims: Dims
    encoder: PrefixEncoder
    rows: list[Features]
    args: Any
    base_config: dict[str, Any]
    pad_id: int
    dtype: torch.dtype
    device: torch.device
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
    progress: Any = None  # llmchat.finetune.run.ProgressBar or None
    state: TrainState = field(default_factory=TrainState)

    def __post_init__(self) -> None:
        a = self.args
        n = len(self.rows)
        self.batches_per_epoch = -(-n // a.per_device_train_batch_size)
        ga = a.gradient_accumulation_steps
        per_epoch = max(self.batches_per_epoch // ga, 1)
        if a.max_steps > 0:
            self.total = a.max_steps
            epochs = a.max_steps // per_epoch + int(a.max_steps % per_epoch > 0)
        else:
            self.total = math.ceil(a.num_train_epochs * per_epoch)
            epochs = math.ceil(a.num_train_epochs)
        warm = a.warmup_steps if a.warmup_steps > 0 else math.ceil(self.total * a.warmup_ratio)
        self.optimizer = make_optimizer(self.encoder, a)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(a.lr_scheduler_type, warm, self.total))
        self.state.max_steps, self.state.num_train_epochs = self.total, epochs
        self.out = Path(a.output_dir)
        self._perm: tuple[int, list[int]] | None = None

    # data order: epoch e is torch.randperm(N) seeded with seed + e
    def _micro_batch(self, i: int) -> list[Features]:
        epoch, j = divmod(i, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            g = torch.Generator().manual_seed(seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        bs = self.args.per_device_train_batch_size
        return [self.rows[k] for k in self._perm[1][j * bs:(j + 1) * bs]]

    def resume(self, directory: str) -> None:
        d = Path(directory).expanduser()
        need = [WEIGHTS, "optimizer.pt", "scheduler.pt", STATE]
        missing = [f for f in need if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"--resume_from_checkpoint {d}: no {missing[0]} (not a "
                                  "checkpoint-N directory written by a training run)")

        def load(name: str) -> Any:
            try:
                return torch.load(d / name, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
                raise CheckpointError(f"--resume_from_checkpoint {d}: cannot read {name} "
                                      f"({str(e).splitlines()[0]})") from None

        sd = {k.split(KEY, 1)[1]: v for k, v in load(WEIGHTS).items() if KEY in k}
        try:
            self.encoder.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            self.optimizer.load_state_dict(load("optimizer.pt"))
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"--resume_from_checkpoint {d}: it does not match this run's --pre_seq_len/"
                f"--prefix_projection ({str(e).splitlines()[0]})") from None
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if (d / "rng_state.pth").is_file():
            set_rng_state(load("rng_state.pth"), self.device)
        try:
            st = json.loads((d / STATE).read_text(encoding="utf-8"))
            self.state.global_step = int(st["global_step"])
            self.state.epoch = float(st.get("epoch") or 0.0)
            self.state.log_history = list(st.get("log_history") or [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"--resume_from_checkpoint {d}: bad {STATE} ({e})") from None
        if self.state.global_step >= self.total:
            self.log(f"{d} is at step {self.state.global_step}, the run has {self.total} steps: "
                     "nothing left to train")

    def save(self) -> Path:
        """``checkpoint-N``: the prefix-encoder parameters only (fp32, upstream key names),
        config.json with pre_seq_len/prefix_projection, and what resuming needs. Each file is
        replaced atomically; trainer_state.json is written last."""
        step = self.state.global_step
        d = self.out / f"checkpoint-{step}"
        d.mkdir(parents=True, exist_ok=True)
        weights = {KEY + k: v.detach().float().cpu().clone()
                   for k, v in self.encoder.state_dict().items()}
        cfg = {**self.base_config, "pre_seq_len": self.encoder.embedding.num_embeddings,
               "prefix_projection": self.encoder.projection}
        _atomic(d / WEIGHTS, lambda p: torch.save(weights, p))
        _atomic(d / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n",
                                                          encoding="utf-8"))
        _atomic(d / "optimizer.pt", lambda p: torch.save(self.optimizer.state_dict(), p))
        _atomic(d / "scheduler.pt", lambda p: torch.save(self.scheduler.state_dict(), p))
        _atomic(d / "rng_state.pth", lambda p: torch.save(rng_state(self.device), p))
        args = {k: v for k, v in vars(self.args).items() if not k.startswith("_")}
        _atomic(d / "training_args.json",
                lambda p: p.write_text(json.dumps(args, indent=2) + "\n", encoding="utf-8"))
        _atomic(d / STATE, lambda p: p.write_text(self.state.to_json(), encoding="utf-8"))
        return d

    def train(self, stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        a = self.args
        ga = a.gradient_accumulation_steps
        st = self.state
        params = [p for p in self.encoder.parameters()]
        self.encoder.train()
        window, last_logged, saved_at = 0.0, st.global_step, -1
        losses: list[float] = []
        t0, tokens, start_step = time.perf_counter(), 0, st.global_step
        while st.global_step < self.total:
            step_loss = 0.0
            self.optimizer.zero_grad(set_to_none=True)
            for j in range(ga):
                i = st.global_step * ga + j
                ids, labels = collate(self._micro_batch(i), self.pad_id, self.device)
                loss = prefix_loss(self.model, self.dims, self.encoder, ids, labels,
                                   dtype=self.dtype, ckpt=a.gradient_checkpointing)
                (loss / ga).backward()
                step_loss += float(loss.detach()) / ga
                tokens += ids.numel()
            if not math.isfinite(step_loss):
                raise CheckpointError(
                    f"the loss is {step_loss} at step {st.global_step + 1}: the base overflows "
                    "in this dtype (try --dtype float32 or bfloat16) or --learning_rate is "
                    "too high")
            if a.max_grad_norm and a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            st.global_step += 1
            st.epoch = st.global_step * ga / self.batches_per_epoch
            window += step_loss
            losses.append(step_loss)
            lr = self.scheduler.get_last_lr()[0]
            if self.progress is not None:
                done = st.global_step - start_step
                self.progress.update(st.global_step, self.total, step_loss, lr,
                                     tokens / max(time.perf_counter() - t0, 1e-9),
                                     (time.perf_counter() - t0) / done)
            if st.global_step % a.logging_steps == 0:
                entry = {"epoch": round(st.epoch, 2), "learning_rate": lr,
                         "loss": round(window / (st.global_step - last_logged), 4),
                         "step": st.global_step}
                st.log_history.append(entry)
                self.log(json.dumps({k: entry[k] for k in ("loss", "learning_rate", "epoch")}))
                window, last_logged = 0.0, st.global_step
            if a.save_strategy == "steps" and st.global_step % a.save_steps == 0:
                self.save()
                saved_at = st.global_step
            if stop() and st.global_step < self.total:
                path = self.save() if saved_at != st.global_step else (
                    self.out / f"checkpoint-{st.global_step}")
                raise StopRequested(str(path))
        runtime = time.perf_counter() - t0
        done = st.global_step - start_step
        metrics = {"epoch": round(st.epoch, 2), "train_loss": sum(losses) / max(len(losses), 1),
                   "train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(
                       done * ga * a.per_device_train_batch_size / max(runtime, 1e-9), 3),
                   "train_steps_per_second": round(done / max(runtime, 1e-9), 3),
                   "total_flos": 0, "step": st.global_step}
        st.log_history.append(metrics)
        if done and saved_at != st.global_step:  # HF would not; the final prefix is kept too
            self.save()
        return metrics


def check_output_dir(args: Any) -> None:
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a directory")
    if (args.do_train and out.is_dir() and not args.overwrite_output_dir
            and not args.resume_from_checkpoint and any(out.glob("checkpoint-*"))):
        raise UsageError(f"--output_dir {out} already holds checkpoints: pass "
                         "--overwrite_output_dir to write over them (nothing else is deleted) "
                         "or --resume_from_checkpoint to continue one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output_dir {out}: cannot create it ({e.strerror or e})") from None
