"""The gateway's OpenAI-compatible HTTP front: the same calls as its gRPC API, in the API people know."""
