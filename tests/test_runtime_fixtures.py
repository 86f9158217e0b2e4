"""Shared set-up of the runtime tests (imported by the other test_runtime_* modules; no tests here).

Tiny checkpoints of every family are created and exported ONCE per test session (fp32 for all three,
int4 for StableLM) by `export_bundle`, the path `edgemoe export` takes. Exports run before any runtime
session is opened. Helpers drive the engine directly so tests can see every step's logits.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemoe.bundle import Bundle
from edgemoe.model.prompt import Conversation
from edgemoe.model.tokenizer import load_tokenizer

FAMILIES = ("stablelm", "qwen", "phi", "deepseek-vl2-tiny")  # create-checkpoint's family names
QUESTION = "What is in the image?"


@dataclass(frozen=True)
class Tiny:
    """Where the session's tiny checkpoints, bundles and test image are."""

    root: Path
    image: Path

    def checkpoint(self, family: str) -> Path:
        return self.root / f"{family}-ckpt"

    def bundle(self, family: str, precision: str = "fp32") -> Path:
        return self.root / f"{family}-{precision}"


_BUILT: list[Tiny] = []  # each importing module registers its own copy of the fixture: build once per process


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    if not _BUILT:
        _BUILT.append(_build(tmp_path_factory.mktemp("runtime")))
    return _BUILT[0]


def _build(root: Path) -> Tiny:
    from edgemoe.export.options import ExportOptions
    from edgemoe.export.pipeline import export_bundle
    from edgemoe.model.create import create_checkpoint

    image = root / "image.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(image)  # not square: padded
    tiny = Tiny(root, image)
    jobs = [(family, "fp32") for family in FAMILIES] + [("stablelm", "int4"), ("deepseek-vl2-tiny", "int4")]
    try:
        for family, precision in jobs:
            if not tiny.checkpoint(family).exists():
                create_checkpoint(tiny.checkpoint(family), family, "tiny")
            # The exporter calls gc.collect() after every graph; in a test process holding torch and
            # every imported module that is most of a tiny export's time. Frozen objects are skipped.
            gc.freeze()
            export_bundle(tiny.checkpoint(family), tiny.bundle(family, precision), ExportOptions(precision=precision))
    finally:
        gc.unfreeze()
    return tiny


def prompt_ids(bundle_path: Path, question: str = QUESTION) -> list[int]:
    """The first-turn prompt ids (with the image marker) as the runtime builds them."""
    family = Bundle.open(bundle_path).manifest.tokenizer["family"]
    tokenizer = load_tokenizer(bundle_path / "tokenizer", family)
    return Conversation.for_family(family).add_user(question, image=True).encode(tokenizer)


def image_input(bundle_path: Path, image: Path):
    """The image as the bundle's layout prepares it (pixels [T, 3, S, S], tiles for DeepSeek-VL2)."""
    from edgemoe.model.image import prepare_image

    manifest = Bundle.open(bundle_path).manifest
    cfg = manifest.model_config()
    return prepare_image(image, manifest.processor_config(), cfg.image_aspect_ratio, cfg.candidate_resolutions)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def per_expert_store() -> str:
    """The store that pages one expert at a time down to a single expert (a fused store needs a layer's
    experts resident at once): what the tests with the tightest expert budgets run."""
    from edgemoe.offload.mapped import mapped_store_supported

    return "mapped" if mapped_store_supported() else "sessions"


def one_expert_bytes(bundle_path: Path, store: str = "") -> int:
    """The largest expert as the store of kind `store` counts it (default `per_expert_store()`)."""
    from edgemoe.runtime.providers import open_expert_store

    experts = open_expert_store(Bundle.open(bundle_path), store or per_expert_store())
    return max(experts.size_of(key) for key in experts.keys())


def run_engine(bundle_path: Path, image: Path, capacity_bytes: int | None = None, policy: str = "lru",
               max_tokens: int = 12, ids: list[int] | None = None, store: str = "", routing: str = "model",
               gate: object | None = None, moe_out: list | None = None) -> tuple[list[int], list[np.ndarray], object]:
    """Greedy tokens and every step's logits from an engine over `make_provider(capacity, policy)`,
    and the provider's stats; `routing` as `runtime.routing.routers_for`, `gate` replaces the MoE
    layer's HintGate, and `moe_out` receives the MoE layer."""
    from edgemoe.runtime.engine import Engine
    from edgemoe.runtime.moe import MoELayer
    from edgemoe.runtime.providers import make_provider, open_expert_store
    from edgemoe.runtime.routing import Routers, routers_for
    from edgemoe.runtime.trunk import Trunk

    bundle = Bundle.open(bundle_path)
    cfg, manifest = bundle.manifest.model_config(), bundle.manifest
    trunk = Trunk.open(bundle)
    store = store or per_expert_store()  # capacities down to one expert
    provider = make_provider(bundle, capacity_bytes, policy, open_expert_store(bundle, store))
    try:
        routers = routers_for(Routers.load(bundle.path_of("routers.safetensors"), cfg.moe.layers, cfg.moe.routing),
                              routing)
        moe = MoELayer(routers, provider, cfg.moe.layers, cfg.moe.top_k)
        if gate is not None:
            moe.gate = gate
        if moe_out is not None:
            moe_out.append(moe)
        engine = Engine(trunk, moe, manifest.tokenizer["len_tokenizer"], 256)
        features = trunk.encode_image(image_input(bundle_path, image))
        logits: list[np.ndarray] = []
        tokens = list(engine.generate_step(ids or prompt_ids(bundle_path), features, max_tokens,
                                           stop_ids=[manifest.tokenizer["eos_token_id"]],
                                           on_logits=lambda l: logits.append(l.copy())))
        return tokens, logits, provider.stats()
    finally:
        provider.close()


def edgemoe_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`edgemoe ARGS` in a fresh process (python -m edgemoe.cli), text mode."""
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)
