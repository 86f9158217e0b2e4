"""--precision auto on a tiny StableLM: the evaluator is exact at fp32 and restarts at the first MoE layer that
differs; the policy really mixes precisions under a budget that all-int4 misses; the chosen bundle meets that
budget on held-out prompts and images, measured on the bundle's own expert files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.bundle import Bundle
from edgemoe.errors import EdgeMoEError
from edgemoe.export import pipeline
from edgemoe.export.auto import expert_keys
from edgemoe.export.calibration import calibration_set, embed_samples, synthetic_image
from edgemoe.export.evaluator import ExpertEvaluator
from edgemoe.export.expert_graphs import ExpertGraphs, cpu_session
from edgemoe.export.options import ExportOptions
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.create import create_checkpoint
from edgemoe.model.tokenizer import load_tokenizer
from edgemoe.quant.metrics import AccuracyBudget
from edgemoe.quant.schemes import Precision, QuantError

# The tiny model's random experts move its logits little: every expert at int8 costs mean KL ~1.5e-6, at int4
# ~5e-5, one expert alone at int4 4e-6..1.2e-5 (measured). A KL budget of 2e-5 therefore admits int8 everywhere
# and some int4, but not all: a policy that works must mix. Top-1 never moves on this model.
BUDGET = AccuracyBudget(min_top1=0.98, max_kl=2e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return Checkpoint.open(create_checkpoint(tmp_path_factory.mktemp("auto") / "tiny", "stablelm", "tiny").path)


@pytest.fixture(scope="module")
def tokenizer(ckpt: Checkpoint):
    return load_tokenizer(ckpt.directory, "stablelm")


def _samples(ckpt: Checkpoint, tokenizer, held_out: bool):
    cset = calibration_set(tokenizer, "stablelm", ckpt.tower.processor, held_out=held_out)
    return embed_samples(ckpt, cset)


@pytest.fixture(scope="module")
def graphs(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> ExpertGraphs:
    return ExpertGraphs(ckpt, tmp_path_factory.mktemp("graphs"))


@pytest.fixture(scope="module")
def evaluator(ckpt: Checkpoint, tokenizer, graphs: ExpertGraphs) -> tuple[ExpertEvaluator, int]:
    """The calibration set's evaluator, prepared, and how many decoder layers its baseline ran."""
    ev = ExpertEvaluator(ckpt, _samples(ckpt, tokenizer, False), graphs, vocab_rows=len(tokenizer)).prepare()
    return ev, ev.layers_run


@pytest.fixture(scope="module")
def auto_bundle(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> pipeline.ExportResult:
    out = tmp_path_factory.mktemp("auto-bundle") / "b"
    return pipeline.export_bundle(ckpt.directory, out, ExportOptions(precision="auto", accuracy_budget=BUDGET))


class BundleExperts:
    """The evaluator's expert sessions, from a bundle's files (each at the precision the bundle chose)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def session(self, key: ExpertKey, precision: Precision):
        entry = self.bundle.manifest.expert(key)
        assert entry.precision == precision.value
        return cpu_session(self.bundle.path_of(entry))


def test_evaluator_is_exact_at_fp32_and_restarts_at_the_first_differing_layer(ckpt, evaluator) -> None:
    ev, baseline_layers = evaluator
    cfg = ckpt.config
    assert baseline_layers == cfg.num_layers
    err = ev({})
    assert err.top1_agreement == 1.0 and err.mean_kl == 0.0 and err.max_abs == 0.0
    last = max(cfg.moe.layers)
    before = ev.layers_run
    lowered = ev({ExpertKey(last, 1): Precision.INT4})
    assert ev.layers_run - before == cfg.num_layers - last  # only the last MoE layer onward was recomputed
    assert lowered.mean_kl > 0.0


def test_budget_needs_mixing_on_this_model(ckpt, evaluator) -> None:
    """The premise of the next test, measured: all-int8 is inside BUDGET and all-int4 is not."""
    ev, _ = evaluator
    keys = expert_keys(ckpt)
    assert BUDGET.allows(ev({k: Precision.INT8 for k in keys}))
    assert not BUDGET.allows(ev({k: Precision.INT4 for k in keys}))


def test_auto_mixes_precisions_and_meets_its_budget_on_held_out_data(auto_bundle, ckpt, tokenizer) -> None:
    counts = auto_bundle.expert_counts()
    assert len(counts) > 1 and set(counts) == {"int8", "int4"}, counts
    policy = auto_bundle.manifest.policy
    assert policy["mode"] == "auto" and policy["auto"]["levels"] == ["int8", "int4"]
    assert BUDGET.allows(auto_bundle.policy.error)  # on the calibration set, as the policy measured
    chosen_schemes = sorted(auto_bundle.policy.assignment.items())
    assert policy["auto"]["assignment"] == {str(k): s.to_dict() for k, s in chosen_schemes}
    bundle = Bundle.open(auto_bundle.path)
    bundle.verify()
    chosen = {k: Precision(e.precision) for k, e in bundle.manifest.experts().items()}
    held_out = _samples(ckpt, tokenizer, True)
    ev = ExpertEvaluator(ckpt, held_out, BundleExperts(bundle), vocab_rows=len(tokenizer)).prepare()
    err = ev(chosen)
    assert err.tokens > 300
    assert BUDGET.allows(err), f"held-out {err} misses {BUDGET}"


def test_size_budget_is_met_with_the_least_lowering(ckpt, graphs, tmp_path: Path) -> None:
    keys = expert_keys(ckpt)
    int8, int4 = (sum(graphs.size(k, p) for k in keys) for p in (Precision.INT8, Precision.INT4))
    budget = int4 + (int8 - int4) // 2  # about half the experts must go to int4
    result = pipeline.export_bundle(ckpt.directory, tmp_path / "b",
                                    ExportOptions(precision="auto", size_budget=budget,
                                                  accuracy_budget=AccuracyBudget(0.9, 1.0)))
    assert result.manifest.expert_bytes_total <= budget
    assert set(result.expert_counts()) == {"int8", "int4"}


def test_local_sensitivity_is_each_experts_weighted_error_over_its_layers_output(ckpt, tokenizer, graphs) -> None:
    """Recomputed here from the reference components for the first MoE layer, whose input is the
    embeddings (tiny StableLM: MoE on layers 0 and 2): every expert's routed tokens, weights and the
    layer's output energy over all samples."""
    import torch

    from edgemoe.export import components

    samples = _samples(ckpt, tokenizer, False)
    ev = ExpertEvaluator(ckpt, samples, graphs, vocab_rows=len(tokenizer),
                         local_levels=[Precision.INT8, Precision.INT4]).prepare()
    first = min(ckpt.config.moe.layers)
    assert first == 0 and set(ev.local) == set(expert_keys(ckpt))  # every expert got tokens here
    experts = ckpt.config.moe.experts_in(first)
    layer = components.decoder_layer(ckpt, first, experts=list(range(experts)))
    with torch.inference_mode():
        blocks = [layer.attention_block(torch.from_numpy(s.embeds)[None], torch.arange(s.embeds.shape[0])[None])
                  for s in samples]
        h, m = torch.cat([b[0][0] for b in blocks]), torch.cat([b[1][0] for b in blocks])
        routing = layer.moe.route(m)
        moe_out, errors = torch.zeros_like(m), {}
        for e in range(experts):
            token, slot = routing.tokens_of(e)
            w = routing.weights[token, slot, None]
            y = layer.moe.experts[e](m[token])
            moe_out.index_add_(0, token, y * w)
            for p in (Precision.INT8, Precision.INT4):
                yq = torch.from_numpy(graphs.session(ExpertKey(first, e), p).run(None, {"x": m[token].numpy()})[0])
                errors[ExpertKey(first, e), p] = float((w * (yq - y)).double().square().sum())
        energy = float((h + moe_out).double().square().sum())
    for (key, p), err in errors.items():
        assert ev.local[key][p] == pytest.approx(err / energy, rel=1e-4), (key, p)
    assert all(ev.local[key][Precision.INT4] > ev.local[key][Precision.INT8] > 0 for key in ev.local)


def test_many_experts_rank_by_local_sensitivity_and_still_meet_the_budget(ckpt, monkeypatch,
                                                                          tmp_path: Path) -> None:
    """Above MODEL_SENSITIVITY_MAX experts no evaluation is spent on sensitivities; every assignment kept
    is still measured on the whole model."""
    from edgemoe.export import auto as auto_module

    monkeypatch.setattr(auto_module, "MODEL_SENSITIVITY_MAX", 0)  # treat 8 experts as many
    result = pipeline.export_bundle(ckpt.directory, tmp_path / "b",
                                    ExportOptions(precision="auto", accuracy_budget=BUDGET))
    record = result.manifest.policy["auto"]
    experts = len(expert_keys(ckpt))
    assert record["sensitivity_measure"].startswith("local")
    assert set(record["sensitivity"]) == {str(k) for k in expert_keys(ckpt)}
    # baseline + per level (int8, int4) an all-experts try and a binary search over 8: no per-expert runs
    assert result.policy.evaluations == record["evaluations"] <= 1 + 2 * (2 + 3) < 1 + experts + 2 * (2 + 3)
    assert BUDGET.allows(result.policy.error) and len(result.expert_counts()) >= 1


def test_held_out_data_differs_from_calibration(ckpt, tokenizer) -> None:
    cal = calibration_set(tokenizer, "stablelm", ckpt.tower.processor)
    held = calibration_set(tokenizer, "stablelm", ckpt.tower.processor, held_out=True)
    assert not {s.ids for s in cal.samples} & {s.ids for s in held.samples}
    assert cal.describe()["image_samples"] == 2 and cal.describe()["samples"] == 6
    assert synthetic_image("shapes", 3).tobytes() == synthetic_image("shapes", 3).tobytes()  # deterministic


def test_user_calibration_files_and_image_token_cap(ckpt, tokenizer, tmp_path: Path) -> None:
    images, prompts = tmp_path / "images", tmp_path / "prompts.txt"
    images.mkdir()
    for i, kind in enumerate(("noise", "gradient", "stripes")):
        synthetic_image(kind, i, size=(64, 48)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    prompts.write_text("# a comment\nWhat is a bicycle?\n\nName three colours.\n")
    cset = calibration_set(tokenizer, "stablelm", ckpt.tower.processor, images_dir=images, prompts_file=prompts)
    assert [s.name for s in cset.samples] == ["image:0.png", "image:1.png", "image:2.png", "text:0", "text:1"]
    assert "images from" in cset.source and "prompts from" in cset.source
    full, capped = embed_samples(ckpt, cset), embed_samples(ckpt, cset, max_image_tokens=5)
    n_image = ckpt.tower.vision.num_patches  # CLIP "patch" features: the class token is dropped
    assert full[0].length - capped[0].length == n_image - 5 and full[3].length == capped[3].length
    assert len(full[0].compare) == len(capped[0].compare) == full[0].length - n_image  # text positions only
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeMoEError, match="holds no image files"):
        calibration_set(tokenizer, "stablelm", ckpt.tower.processor, images_dir=empty)
    with pytest.raises(EdgeMoEError, match="cannot read --calibration-prompts"):
        calibration_set(tokenizer, "stablelm", ckpt.tower.processor, prompts_file=tmp_path / "missing.txt")


def test_budget_that_even_int8_misses_says_what_to_do(ckpt, tmp_path: Path) -> None:
    with pytest.raises(QuantError) as info:
        pipeline.export_bundle(ckpt.directory, tmp_path / "b",
                               ExportOptions(precision="auto", accuracy_budget=AccuracyBudget(0.98, 1e-9)))
    message = str(info.value)
    assert "already misses the accuracy budget" in message and "--precision fp32" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []
