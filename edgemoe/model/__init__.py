"""Reading MoE-LLaVA checkpoints: config parsing, per-family tensor name maps, lazy weight access,
tokenizers, prompt templates and image preprocessing. Pure numpy; no torch on this path (except the
restricted `.bin` loader, imported only when a pickle shard is met)."""
