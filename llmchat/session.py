"""What a command sets up around a loaded model before the first turn: the ``Conversation``
with its system prompt, the turns and id of a logged conversation it continues (``-c`` /
``--cid``, whose model and options are reused unless flags override them), and the hook that
logs every finished turn. ``opts`` is the command line's ``cli.RunOptions``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmchat.errors import LLMChatError, UsageError

if TYPE_CHECKING:
    from llmchat.cli import RunOptions
    from llmchat.conversation import Conversation
    from llmchat.models.base import ChatModel
    from llmchat.types import Reply


def check_system(opts: RunOptions, model: ChatModel) -> None:
    """``--system`` against the model: ``-s ""`` means no system prompt (an empty one where the
    model has a system role, as upstream's ``chat(system="")``)."""
    if opts.system is not None and not model.supports_system:
        if opts.system.strip():
            raise UsageError(f"{model.name} has no system role; --system is not available")
        opts.system = None


def new_conversation(opts: RunOptions, model: ChatModel) -> Conversation:
    from llmchat.conversation import Conversation

    check_system(opts, model)
    conv = Conversation(model, opts.config(model), system=opts.system)
    attach_log(opts, model, conv)
    return conv


def attach_log(opts: RunOptions, model: ChatModel, conv: Conversation) -> None:
    """Give ``conv`` the continued turns and id (``-c``/``--cid``) and the log hook."""
    if opts.cid:
        conv.id = opts.cid
        conv.turns = list(opts.history or [])
    if not opts.log:
        return
    from llmchat import logs

    if not logs.enabled():
        return
    i = model.info
    logger = logs.Logger(
        model=model.name, model_path=str(i.path) if i.path else opts.model_path,
        options={"quant": i.quant, "dtype": i.dtype, "device": i.device,
                 "requested": {"device": opts.device, "dtype": opts.dtype,
                               "quant": opts.quant}},
    )

    defaults = model.defaults.to_dict()

    def log(c: Conversation, question: Any, reply: Reply) -> None:
        # the P-tuning prefix active for this turn (/prefix may switch it mid-chat), and the
        # settings changed from the model's defaults (flags or /set), which -c carries on
        config = c.config.to_dict()
        changed = {k: v for k, v in config.items() if defaults.get(k) != v}
        settings = {**config, "ptuning_prefix": model.info.extra.get("prefix"),
                    "changed_settings": changed}
        logger.log(c.id, question.content, c.system, reply.text, reply.stats, settings,
                   image=question.image)

    conv.log = log


def resume(opts: RunOptions, cont: bool, cid: str | None) -> None:
    """``-c``/``--cid``: find the logged conversation, reuse its model and options unless
    flags override them, and keep its turns for the new Conversation."""
    if not cont and not cid:
        return
    from dataclasses import fields
    from pathlib import Path

    from llmchat import logs
    from llmchat.types import GenerationConfig, Message

    try:
        db = logs.open_existing()
    except logs.LogError as exc:
        raise LLMChatError(str(exc)) from None
    row = None
    if db is not None:
        row = logs.get_conversation(db, cid) if cid else logs.latest_conversation(db)
    if row is None:
        if cid:
            raise UsageError(f"no logged conversation with id {cid!r} "
                             "(see `llmchat logs list`)")
        raise UsageError("the conversation log is empty: nothing to continue "
                         "(start one with `llmchat chat` or `llmchat ask`)")
    saved = json.loads(row["options"] or "{}")
    if not opts.model and not opts.model_path:
        path = row["model_path"]
        if path and not Path(path).exists():
            raise UsageError(f"conversation {row['id']} used the model at {path}, which no "
                             "longer exists: pass --model-path DIR or --model NAME")
        opts.model_path = path
        if not path:
            opts.model = row["model"]
    req = saved.get("requested", {})
    for key, default in (("device", "auto"), ("dtype", "auto"), ("quant", "16")):
        if getattr(opts, key) == default and req.get(key):
            setattr(opts, key, str(req[key]))
    if opts.system is None and saved.get("system") is not None:
        opts.system = saved["system"]
    changed = saved.get("changed_settings")  # the last turn's; flags given now win
    if isinstance(changed, dict):
        known = {f.name for f in fields(GenerationConfig)}
        opts.settings = {**{k: v for k, v in changed.items() if k in known}, **opts.settings}
    opts.cid = row["id"]
    history = []
    for t in logs.turns(db, row["id"]):
        history += [Message("user", t["prompt"], t["image"]), Message("assistant", t["response"])]
    opts.history = history
