"""The runtime: answers questions about an image from a bundle, experts paged within a budget.

    from edgemoe.runtime import ask, ChatSession
    result = ask("bundle/", "What is in the image?", "cat.jpg", max_tokens=64, expert_budget="25%")
    print(result.text, result.stats.decode_tokens_per_s)

Modules, data flow first:
  sessions.py    ORT session options (the offload package's: one thread policy, no arenas)
  trunk.py       the resident graphs: vision, projector, embed, attention, dense MLPs, head
  embedding.py   the embedding table read in place from embed.onnx (only the rows a prompt uses)
  kv_cache.py    preallocated KV buffers (fp16 or fp32, as exported) the attention graphs update in place
  routing.py     the fp32 top-2 router in numpy, deterministic
  moe.py         route -> dispatch -> experts (from an ExpertProvider) -> combine; next-layer hints
  engine.py      prefill (image spliced) and decode; generate_step yields ids (no tokenizer)
  sampling.py    greedy; temperature, top-k, top-p, min-p, repeat penalty with a seed
  detokenize.py  ids -> streamed text, cut at stop strings
  options.py     GenerationOptions; --memory-budget auto
  budget.py      --memory-budget / --expert-budget -> expert cache capacity
  live_budget.py the plan kept true as the run changes (KV growth, prompts, the vision tower)
  providers.py   resident or offloading provider; its counters
  stats.py       GenerationStats, GenerationResult, RSS sampling
  transcript.py  a conversation as JSON (chat's /save, /load)
  image_encoder.py  a conversation's images as prompt rows (prompt cache, else the vision tower)
  prompt_cache.py   image features and image-prefix KV rows kept on disk across processes
  api.py         ask(), ChatSession (a conversation, or a server's requests through one engine)
Nothing here imports torch or transformers.
"""

from edgemoe.runtime.api import ChatSession, GenerationOptions, ask
from edgemoe.runtime.engine import ContextError, Engine
from edgemoe.runtime.sampling import Sampler
from edgemoe.runtime.stats import GenerationResult, GenerationStats

__all__ = ["ChatSession", "ContextError", "Engine", "GenerationOptions", "GenerationResult", "GenerationStats",
           "Sampler", "ask"]
