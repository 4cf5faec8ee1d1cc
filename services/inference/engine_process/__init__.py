"""The engine in a process of its own, so its steps never share a GIL with the worker's gRPC front.

`core` is the child: it owns the model, scheduler, KV cache and LoRA slots and runs step after
step, one message out per step. `process` starts, watches and stops that child; `client` is the
front's view (`async for out in client.generate(...)`, or a stream that calls its consumer back from
the step handler), which coalesces a request's tokens and
restarts a crashed engine. `protocol` is every message between them; `handoff` carries adapter
weights as mapped files instead of through the socket.
"""
