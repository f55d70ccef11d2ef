"""The gateway's faces to clients: the HTTP routes (OpenAI, native, batch, embeddings, metrics) and the
public gRPC API, their request models and response formats (JSON, server-sent events), API errors, API
keys, and the HTTP server's limits and drain. Routes turn a request into a GenerationInput for the
pipeline and its results into the client's format; they hold no generation logic of their own."""
