"""The tokenizer service: text and chat conversations to token ids (stateless; any replica serves any call)."""
