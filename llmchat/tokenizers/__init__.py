"""One module per architecture for its text side: the tokenizer (special tokens, pre- and
post-processing, reading its files safely), the chat template (``build_prompt``, golden-tested,
and ``encode_messages``, exactly upstream's ids) and the reply post-processing (``postprocess``,
``holdback``, ``stop_ids``). No torch. The model files re-export these as their contract hooks;
what the tokenizers share (the protocol, the streaming detokenizer) is in ``llmchat.tokenizer``.
"""
