"""The torch reference model: what every exported graph is validated against. Imports torch.

    from edgemoe.reference import ReferenceModel, generate
    model = ReferenceModel.from_checkpoint(Checkpoint.open(path), dtype=torch.bfloat16)
    result = generate(model, ids_with_image_marker, pixels, max_new_tokens=64)

Modules, one responsibility each: layers (norms, rotary, attention, MLP), moe (routing rule and MoE
layer), decoder (a block and its exportable stages), vision (CLIP/SigLIP features), projector,
splice (image features into the prompt), kv_cache, model (ReferenceModel), generate (greedy),
tiny (tiny random models for tests).
"""

from edgemoe.reference.generate import GenerationResult, generate, greedy_generate
from edgemoe.reference.kv_cache import KVCache
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.moe import Routing, top_k_gating
from edgemoe.reference.splice import IMAGE_TOKEN_INDEX, SplicedPrompt

__all__ = ["GenerationResult", "IMAGE_TOKEN_INDEX", "KVCache", "ReferenceModel", "Routing", "SplicedPrompt",
           "generate", "greedy_generate", "top_k_gating"]
