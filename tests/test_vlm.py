"""VLM-Judge engine: tiny random-weight models of every family, built in-test, saved with save_pretrained
and loaded through the real loader (comfy_poe.experts.vlm.load_vlm)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_poe.experts import PIXEL, DiscriminativeExpert, evaluate_potentials
from comfy_poe.experts.vlm import VLMFolderError, check_model_folder, load_vlm, resolve_dtype, supported_model_types
from comfy_poe.experts.vlm_families import family_for_model_type, qwen_patchify, smart_resize
from comfy_poe.experts.vlm_judge import Question, VLMJudge, VLMView, parse_questions

_spec = importlib.util.spec_from_file_location("vlm_tiny", Path(__file__).with_name("vlm_tiny.py"))
vlm_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vlm_tiny", vlm_tiny)
_spec.loader.exec_module(vlm_tiny)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "idefics2", "llava", "llava_onevision",
            "gemma3", "paligemma"]
NEEDS_TORCHVISION = pytest.mark.skipif(vlm_tiny.SMOLVLM_NEEDS_TORCHVISION,
                                       reason="transformers 4.x imports SmolVLM's processor only with torchvision")
TESTED_FAMILIES = [pytest.param(f, marks=NEEDS_TORCHVISION) if f == "smolvlm" else f for f in FAMILIES]
# Qwen's tiny processor fixes a 56² grid; the other tiny models use 32² inputs.
NATIVE = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 56}
QUESTIONS = [Question("Is there a cat in the image?"), Question("Is the sky red?", "No", 0.5)]



@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlm_tiny.build_tiny_vlm(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def bundles(tiny_folders):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_vlm(tiny_folders(family), dtype="float32")
        return cache[family]

    return get


def images(n, size, seed=0):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def quantised(size, seed):
    """A random image exactly representable as 8-bit (what a PIL processor sees), as IMAGE and PIL."""
    pixels = (images(1, size, seed)[0] * 255).round().to(torch.uint8).numpy()
    return torch.from_numpy(pixels).float()[None] / 255, Image.fromarray(pixels)


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_family_judge_scores_batches_and_gradients(bundles, family):
    bundle = bundles(family)
    assert bundle.model_type == family
    assert not any(p.requires_grad for p in bundle.model.parameters())
    judge = VLMJudge(bundle, QUESTIONS, batch_size=2)
    x = images(3, NATIVE.get(family, 32) - 8)  # off-size: the judge resizes
    scores = judge(x)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # yes/no scores are log-probabilities of a two-way choice: strictly negative
    assert (judge.question_scores(x) < 0).all()
    # batched (chunks of 2) equals one image at a time
    single = torch.cat([judge(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, single, atol=2e-5, rtol=1e-5)
    # weighted sum of the two questions
    per_q = judge.question_scores(x)
    torch.testing.assert_close(scores, per_q[0] + 0.5 * per_q[1], atol=1e-6, rtol=1e-6)
    # yes/no normalisation: p(Yes) + p(No) = 1 once each is normalised against the other
    yes = VLMJudge(bundle, [Question("Is there a cat in the image?", "Yes")])(x)
    no = VLMJudge(bundle, [Question("Is there a cat in the image?", "No")])(x)
    torch.testing.assert_close(yes.exp() + no.exp(), torch.ones(3), atol=1e-5, rtol=0)
    # gradients reach the input pixels, the model stays frozen
    xg = x.clone().requires_grad_(True)
    judge(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert xg.grad.abs().sum() > 1e-6
    assert all(p.grad is None for p in bundle.model.parameters())


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_differentiable_pixels_equal_processor_at_target_size(bundles, family):
    bundle = bundles(family)
    view = VLMView(bundle)
    side = NATIVE.get(family, 32)
    size = bundle.family.target_size(bundle.image_processor, side, side)
    image, pil = quantised(size[0], seed=3)
    reference = bundle.processor(text=[view.prompt_text("What is it?")], images=[pil], return_tensors="pt",
                                 **bundle.family.processor_kwargs)
    inputs = view.model_inputs(image, "What is it?")
    torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"].float(), atol=1e-5, rtol=0)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "pixel_attention_mask", "image_sizes"):
        if key in reference:
            assert torch.equal(inputs[key].cpu(), reference[key]), key


def test_dual_process_score_is_the_shifted_answer_token_likelihood(bundles):
    """Dual-Process loss = mean CE over answer tokens with the one-token shift; compare with transformers'
    own causal-LM loss (labels = answer tokens, everything else ignored)."""
    bundle = bundles("qwen2_vl")
    answer = "red blue green"
    judge = VLMJudge(bundle, [Question("What colour is it?", answer)], mode="dual_process")
    x = images(2, 56, seed=5)
    scores = judge(x)
    tokens = judge.answer_tokens(answer)
    assert len(tokens) > 1
    inputs = judge._with_answer(judge.model_inputs(x, judge.questions[0].prompt()), tokens)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -len(tokens):] = inputs["input_ids"][:, -len(tokens):]
    for i in range(2):
        one = {k: (v[i:i + 1] if k != "pixel_values" else v[i * v.shape[0] // 2:(i + 1) * v.shape[0] // 2])
               for k, v in inputs.items()}
        with torch.no_grad():
            loss = bundle.model(**one, labels=labels[i:i + 1]).loss
        assert scores[i].item() == pytest.approx(-loss.item(), abs=1e-5)
    assert (scores < 0).all()


def test_multi_token_answers_normalise_against_their_alternative(bundles):
    bundle = bundles("idefics3")
    x = images(2, 32, seed=7)
    a = VLMJudge(bundle, [Question("What colour is it?", "red blue", 1.0, "green")])(x)
    b = VLMJudge(bundle, [Question("What colour is it?", "green", 1.0, "red blue")])(x)
    torch.testing.assert_close(a.exp() + b.exp(), torch.ones(2), atol=1e-4, rtol=0)


def test_yes_no_score_uses_both_spellings(bundles):
    """p(Yes) is the sum over 'Yes' and ' Yes' (logsumexp of the two token log-probs)."""
    bundle = bundles("llava")
    judge = VLMJudge(bundle, [Question("Is there a cat in the image?")])
    x = images(2, 32, seed=1)
    inputs = judge.model_inputs(x, judge.questions[0].prompt())
    with torch.no_grad():
        logp = torch.log_softmax(bundle.model(**inputs).logits[:, -1].float(), dim=-1)
    tok = bundle.tokenizer
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes", "No", " No")]
    yes = torch.logsumexp(logp[:, ids[:2]], 1)
    no = torch.logsumexp(logp[:, ids[2:]], 1)
    torch.testing.assert_close(judge(x), yes - torch.logaddexp(yes, no), atol=1e-5, rtol=0)


def test_overlays_reach_the_judge_but_not_the_image(bundles):
    bundle = bundles("qwen2_vl")
    from comfy_poe.experts.overlays import parse_visual_prompt

    overlays = parse_visual_prompt("palette: #ff0000 #00ff00 blue\nhline: 0.5; vline: 0.25\npoint: A 0.3 0.3")
    assert len(overlays) == 4
    plain = VLMJudge(bundle, QUESTIONS)
    marked = VLMJudge(bundle, QUESTIONS, overlays=overlays)
    x = images(2, 56, seed=2)
    before = x.clone()
    view = marked.judge_view(x)
    s_marked = marked(x)
    assert torch.equal(x, before), "overlays must not touch the caller's image"
    assert not torch.equal(view, x)
    assert (s_marked - plain(x)).abs().max() > 1e-6, "the judge must see the visual prompt"
    # painted pixels carry no gradient, the rest does
    xg = x.clone().requires_grad_(True)
    marked(xg).sum().backward()
    painted = (view != x).any(-1)
    assert xg.grad[painted[..., None].expand_as(xg)].abs().max() == 0
    assert xg.grad[~painted[..., None].expand_as(xg)].abs().sum() > 0


def test_overlay_drawings():
    from comfy_poe.experts.overlays import glyph_mask, guide_lines, labelled_points, palette_strip

    x = torch.full((1, 64, 64, 3), 0.5)
    strip = palette_strip(x, [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)], fraction=0.25)
    assert torch.equal(strip[0, 48:, :32], torch.tensor([1.0, 0.0, 0.0]).expand(16, 32, 3))
    assert torch.equal(strip[0, 48:, 32:], torch.tensor([0.0, 0.0, 1.0]).expand(16, 32, 3))
    assert torch.equal(strip[0, :48], x[0, :48])
    lines = guide_lines(x, horizontal=[0.5], thickness=2)
    red_rows = (lines[0] == torch.tensor([1.0, 0.0, 0.0])).all(-1).all(-1).nonzero().flatten().tolist()
    assert red_rows == [31, 32]
    points = labelled_points(x, [(0.25, 0.5, "A")], radius=4)
    assert torch.equal(points[0, 32, 16], torch.tensor([1.0, 0.0, 0.0]))
    assert (points[0] == 1.0).all(-1).any(), "label glyph drawn in white"
    assert glyph_mask("A1", 2).shape == (10, 14)
    with pytest.raises(ValueError, match="palette"):
        from comfy_poe.experts.overlays import parse_visual_prompt
        parse_visual_prompt("palette: notacolour")


def test_judge_is_a_pixel_space_differentiable_expert(bundles):
    bundle = bundles("idefics3")
    judge = VLMJudge(bundle, QUESTIONS)
    expert = judge.expert(weight=2.0, name="cat")
    assert isinstance(expert, DiscriminativeExpert)
    assert expert.space == PIXEL and expert.differentiable
    latents = torch.randn(2, 4, 4, 4)
    pixels = images(2, 32, seed=4)
    total = evaluate_potentials([expert], latents, decode=lambda z: pixels)
    torch.testing.assert_close(total.float(), 2.0 * judge(pixels), atol=1e-5, rtol=0)


def test_ask_returns_text(bundles):
    answer = VLMView(bundles("gemma3")).ask(images(1, 32), "Describe the image.", max_new_tokens=3)
    assert isinstance(answer, str)


def test_parse_questions():
    qs = parse_questions("# comment\nIs it red?\nIs there a dog? | No | 2\nWhat colour? | red | 0.5 | blue\n")
    assert qs == [Question("Is it red?"), Question("Is there a dog?", "No", 2.0),
                  Question("What colour?", "red", 0.5, "blue")]
    assert qs[0].prompt() == "Is it red? Answer with Yes or No."
    assert qs[1].prompt() == "Is there a dog? Answer with Yes or No."
    assert qs[2].prompt() == "What colour? Answer with red or blue."
    with pytest.raises(ValueError, match="weight"):
        parse_questions("Is it red? | Yes | heavy")
    with pytest.raises(ValueError, match="at least one"):
        parse_questions("\n# nothing\n")


def test_free_answer_needs_an_alternative_in_yes_no_mode(bundles):
    with pytest.raises(ValueError, match="alternative"):
        VLMJudge(bundles("llava"), [Question("What colour?", "red")])
    VLMJudge(bundles("llava"), [Question("What colour?", "red")], mode="dual_process")


# ---- loader safety -------------------------------------------------------------------------------

def _copy_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_loader_refuses_missing_folder(tmp_path):
    with pytest.raises(VLMFolderError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VLMFolderError, match="config.json"):
        load_vlm(tmp_path / "empty")


def test_loader_refuses_pickle_only_weights(tiny_folders, tmp_path):
    folder = _copy_config(tiny_folders("qwen2_vl"), tmp_path / "pickled")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(VLMFolderError, match="pickle"):
        load_vlm(folder)
    assert check_model_folder(folder, allow_pickle=True)["model_type"] == "qwen2_vl"
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(VLMFolderError, match="no weights"):
        check_model_folder(folder, allow_pickle=True)


def test_loader_refuses_remote_code_without_opt_in(tiny_folders, tmp_path):
    folder = _copy_config(tiny_folders("qwen2_vl"), tmp_path / "remote",
                          auto_map={"AutoModelForImageTextToText": "modeling_evil.Model"})
    (folder / "model.safetensors").write_bytes((tiny_folders("qwen2_vl") / "model.safetensors").read_bytes())
    with pytest.raises(VLMFolderError, match="trust_remote_code"):
        load_vlm(folder)
    assert check_model_folder(folder, trust_remote_code=True)["model_type"] == "qwen2_vl"


def test_loader_lists_supported_families_for_unknown_architectures(tiny_folders, tmp_path):
    folder = _copy_config(tiny_folders("llava"), tmp_path / "other", model_type="blip-2")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(VLMFolderError) as info:
        check_model_folder(folder)
    message = str(info.value)
    for model_type in ("qwen2_5_vl", "smolvlm", "idefics3", "llava_onevision", "gemma3", "paligemma"):
        assert model_type in message
    with pytest.raises(ValueError, match="qwen2_vl"):
        family_for_model_type("blip-2")
    assert set(FAMILIES) <= set(supported_model_types())


def test_dtype_choice(tiny_folders):
    assert resolve_dtype("auto", {"dtype": "bfloat16"}) == torch.bfloat16
    assert resolve_dtype("auto", {}) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", {})
    bundle = load_vlm(tiny_folders("llava"), dtype="bfloat16")
    assert bundle.dtype == torch.bfloat16
    scores = VLMJudge(bundle, QUESTIONS)(images(2, 32))
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


# ---- pure helpers ----------------------------------------------------------------------------------

def test_smart_resize_matches_the_qwen_rule():
    assert smart_resize(512, 512, 28, 56 * 56, 28 * 28 * 1280) == (504, 504)
    h, w = smart_resize(1000, 3000, 28, 56 * 56, 28 * 28 * 256)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 256 and abs(w / h - 3) < 0.35


def test_qwen_patchify_matches_the_processor_layout():
    """Reference: Qwen2VLImageProcessor's reshape/transpose of one (T, C, H, W) frame stack."""
    x = torch.randn(2, 3, 56, 84)
    got = qwen_patchify(x, patch=14, merge=2, temporal=2)
    for i in range(2):
        frames = np.repeat(x[i].numpy()[None], 2, axis=0)
        t, gh, gw = 1, 4, 6
        ref = frames.reshape(t, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        ref = ref.reshape(t * gh * gw, 3 * 2 * 14 * 14)
        np.testing.assert_allclose(got[i * 24:(i + 1) * 24].numpy(), ref, atol=0)
    assert math.prod(got.shape) == x.numel() * 2


@pytest.mark.skipif(not vlm_tiny.SMOLVLM_NEEDS_TORCHVISION, reason="SmolVLM's processor imports here")
def test_smolvlm_without_torchvision_on_transformers_4_says_what_to_install(tmp_path):
    from comfy_poe.experts.vlm import processor_class

    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor"}))
    with pytest.raises(VLMFolderError, match="torchvision"):
        processor_class(tmp_path, "smolvlm")
