"""The transformers peer (transformers' own StableLm/Phi causal LM, CLIP vision model, StaticCache) against
the project's reference: same image features, same logits, the same greedy tokens.

The two share only the checkpoint reader, the splice and the top-k rule's definition: attention,
rotary, norms, MLPs and the tower are transformers' code in one and the reference's in the other,
and the peer's MoE block dispatches each expert on its own tokens where the reference gathers them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgemoe.bench.peer_child import image_of, prompt_inputs
from edgemoe.bench.prompt import synthetic_image
from edgemoe.errors import EdgeMoEError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.create import create_checkpoint
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.transformers_llava import DeepSpeedMoE, TransformersLlava

TOKENS = 12


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_image(tmp_path_factory.mktemp("img") / "img.png")


def _reference_greedy(ref: ReferenceModel, embeds: torch.Tensor, stop_id: int, limit: int) -> list[int]:
    cache = ref.new_cache()
    ids = [int(ref(embeds, cache, logit_limit=limit)[0, -1].argmax())]
    while len(ids) < TOKENS and ids[-1] != stop_id:
        ids.append(int(ref(ref.embed_tokens(torch.tensor([[ids[-1]]])), cache, logit_limit=limit)[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_transformers_model_equals_the_reference(family: str, image: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.open(create_checkpoint(tmp_path / family, family, "tiny").path)
    hf = TransformersLlava.from_checkpoint(ckpt, torch.float32)
    ref = ReferenceModel.from_checkpoint(ckpt, torch.float32)
    ids, tokenizer, stop_id, _ = prompt_inputs(ckpt, "What is in the picture?")
    prepared = image_of(ckpt, image)
    moe = [m for m in hf.modules() if isinstance(m, DeepSpeedMoE)]
    assert len(moe) == len(ckpt.config.moe.layers)  # every MoE layer is the peer's own block
    with torch.inference_mode():
        feats, want_feats = hf.encode(prepared), ref.encode(prepared)
        torch.testing.assert_close(feats, want_feats, rtol=0, atol=1e-5)
        prompt = hf.embed(ids, [feats])
        logits = hf.lm(inputs_embeds=prompt.embeds).logits[..., : len(tokenizer)]
        want = ref(ref.embed(ids, [want_feats]).embeds, logit_limit=len(tokenizer))[..., : len(tokenizer)]
        assert want.abs().max() > 0.5  # not trivially small
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
        got = hf.generate(prompt.embeds, TOKENS, stop_id, len(tokenizer))
        assert got == _reference_greedy(ref, prompt.embeds, stop_id, len(tokenizer))
        assert got == hf.generate(prompt.embeds, TOKENS, stop_id, len(tokenizer))  # a fresh StaticCache each call
    assert len(got) == TOKENS or got[-1] == stop_id


def test_moe_block_dispatches_like_dense_top_k() -> None:
    """Sparse dispatch == every expert computed densely and masked to the renormalised top 2."""
    torch.manual_seed(0)
    experts = [torch.nn.Linear(8, 8) for _ in range(4)]
    block = DeepSpeedMoE(8, experts, top_k=2)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        probs = torch.softmax(x @ block.deepspeed_moe.gate.wg.weight.T, -1)
        top = probs.topk(2, -1).indices
        mask = torch.zeros_like(probs).scatter(-1, top, 1.0) * probs
        weights = mask / mask.sum(-1, keepdim=True)
        dense = sum(weights[..., e, None] * experts[e](x) for e in range(4))
        torch.testing.assert_close(block(x), dense, rtol=0, atol=1e-6)
    assert {n for n, _ in block.named_parameters()} >= {"deepspeed_moe.gate.wg.weight",
                                                        "deepspeed_moe.experts.deepspeed_experts.3.weight"}


def test_family_without_a_transformers_class_is_one_line(deepseek_checkpoints) -> None:
    ckpt = Checkpoint.open(deepseek_checkpoints["tiny"])
    with pytest.raises(EdgeMoEError, match="transformers has no class for the deepseek_vl2"):
        TransformersLlava.from_checkpoint(ckpt)
