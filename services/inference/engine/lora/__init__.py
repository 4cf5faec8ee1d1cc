"""Multi-LoRA: adapter slots on the device, the per-step segment op, and the wrapped linear layers."""
