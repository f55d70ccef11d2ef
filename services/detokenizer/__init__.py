"""The detokenizer service: incremental token ids to text, with stop strings.

Per-request state lives with the caller (the gateway), in DetokenizerState, sent with every call,
so the service is stateless and any replica can serve any call.
"""
