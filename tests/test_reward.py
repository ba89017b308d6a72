"""Reward-model judges (PickScore, HPS v2.1, ImageReward, aesthetic): tiny random models of each
architecture, official pickle layouts converted to safetensors, scores against reference formulas
written here from the official definitions, gradients, bad folders."""
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_poe.experts import PIXEL
from comfy_poe.experts.reward import (
    AESTHETIC, HPS, IMAGEREWARD, MARKER, PICKSCORE, RewardFolderError, RewardJudge, convert_reward, detect_kind,
    load_pickle_state_dict, load_reward_model, open_clip_to_hf, preprocess,
)

_spec = importlib.util.spec_from_file_location("reward_tiny", Path(__file__).with_name("reward_tiny.py"))
reward_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("reward_tiny", reward_tiny)
_spec.loader.exec_module(reward_tiny)

PROMPT = "a photo of a cat"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def quantised_images(n, h=32, w=32, seed=0):
    """uint8-exact images: the PIL processors and the tensor path see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g).float() / 255


def pil(images):
    return [Image.fromarray((x * 255).round().byte().numpy()) for x in images]


def convert(kind, source, out, base=None, **kw):
    with pytest.warns(UserWarning, match="pickle"):
        return convert_reward(kind, source, out, base=base, allow_pickle=True, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    out = {PICKSCORE: reward_tiny.build_clip(root / "PickScore_v1", seed=0)}
    pt, base = reward_tiny.build_hps(root)
    out[HPS] = convert(HPS, pt, root / "HPSv2.1", base=base).folder
    out["hps_sources"] = (pt, base)
    pth, base = reward_tiny.build_aesthetic(root)
    out[AESTHETIC] = convert(AESTHETIC, pth, root / "aesthetic-v2", base=base).folder
    out["aesthetic_sources"] = (pth, base)
    pt, base = reward_tiny.build_imagereward(root)
    out[IMAGEREWARD] = convert(IMAGEREWARD, pt, root / "ImageReward", base=base).folder
    out["imagereward_sources"] = (pt, base)
    out["root"] = root
    return out


def clip_reference(folder, images, prompt):
    """(f̂, ĝ, τ) from transformers' CLIPModel and the PIL CLIPProcessor (the official PickScore code path)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=pil(images), return_tensors="pt")["pixel_values"]
        text = processor.tokenizer([prompt] * len(images), padding=True, return_tensors="pt")
        f = model.get_image_features(pixel_values=pixels)
        g = model.get_text_features(**text)
        f, g = getattr(f, "pooler_output", f), getattr(g, "pooler_output", g)
    return F.normalize(f, dim=-1), F.normalize(g, dim=-1), model.logit_scale.exp()


def mlp(sd, x, prefix=""):
    """The published head: Linear layers 0, 2, 4, 6, 7 applied in turn, no activation."""
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"{prefix}layers.{i}.weight"].T + sd[f"{prefix}layers.{i}.bias"]
    return x[:, 0]


def reference_scores(kind, folders, images):
    if kind == PICKSCORE:
        f, g, tau = clip_reference(folders[PICKSCORE], images, PROMPT)
        return tau * (f * g).sum(-1)
    if kind == HPS:
        f, g, _ = clip_reference(folders["hps_sources"][1], images, PROMPT)
        return 100 * (f * g).sum(-1)
    if kind == AESTHETIC:
        pth, base = folders["aesthetic_sources"]
        f, _, _ = clip_reference(base, images, PROMPT)
        return mlp(torch.load(pth), f)
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    pt, base = folders["imagereward_sources"]
    model, tok = BlipForImageTextRetrieval.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    pixels = (images.permute(0, 3, 1, 2) - mean) / std  # 32² = the tiny model's size: no resize, no crop
    tokens = tok([PROMPT] * len(images), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        h = model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               encoder_hidden_states=image_embeds,
                               encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long)
                               ).last_hidden_state[:, 0]
    return (mlp(torch.load(pt), h, "mlp.") - 0.16717362830052426) / 1.0333394966054072


KINDS = [PICKSCORE, HPS, IMAGEREWARD, AESTHETIC]


@pytest.mark.parametrize("kind", KINDS)
def test_scores_equal_reference_formula(folders, kind):
    model = load_reward_model(folders[kind])
    assert model.kind == kind and detect_kind(folders[kind])[0] == kind
    x = quantised_images(3, seed=1)
    got = RewardJudge(model, PROMPT, batch_size=2)(x)
    want = reference_scores(kind, folders, x)
    torch.testing.assert_close(got, want.float(), atol=2e-4, rtol=2e-4)
    assert got.std() > 1e-4, "different images, different rewards"


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_pixels_and_expert(folders, kind):
    judge = RewardJudge(load_reward_model(folders[kind]), PROMPT, batch_size=2)
    x = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    scores = judge(x)
    torch.testing.assert_close(scores.detach(), torch.cat([judge(x[i:i + 1]).detach() for i in range(3)]),
                               atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    expert = judge.expert(2.0)
    assert expert.space == PIXEL and expert.differentiable and expert.weight == 2.0 and expert.name == kind


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_under_inference_mode_stays_differentiable(folders, kind):
    """ComfyUI runs nodes under inference_mode; the trainers then differentiate the judge outside it."""
    with torch.inference_mode():
        model = load_reward_model(folders[kind])
    assert not any(p.is_inference() for p in model.parameters())
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.rand(1, 40, 40, 3).requires_grad_(True)
        RewardJudge(model, PROMPT)(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_prompt_matters_and_is_required(folders):
    model = load_reward_model(folders[PICKSCORE])
    x = quantised_images(2)
    assert (RewardJudge(model, "a red car")(x) - RewardJudge(model, PROMPT)(x)).abs().max() > 1e-5
    with pytest.raises(ValueError, match="write the prompt"):
        RewardJudge(model, "  ")
    RewardJudge(load_reward_model(folders[AESTHETIC]), "")  # the aesthetic predictor needs none


def test_preprocess_matches_the_pil_clip_processor():
    import transformers as T

    CLIPImageProcessorPil = reward_tiny.vlm_tiny.pil_class(T, "CLIPImageProcessor")
    coarse = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    smooth = F.interpolate(coarse, size=(40, 56), mode="bilinear", align_corners=True)
    x = (smooth.permute(0, 2, 3, 1) * 255).round() / 255  # a smooth photo-like image, uint8-exact
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = ip(images=pil(x), return_tensors="pt")["pixel_values"]
    got = preprocess(x.permute(0, 3, 1, 2), 32, 32, OPENAI_MEAN, OPENAI_STD)
    assert got.shape == want.shape
    assert (got - want).abs().mean() < 0.03  # antialiased bicubic vs PIL bicubic: same image, tiny differences


def test_converter_round_trips_the_official_layouts(folders):
    from safetensors.torch import load_file

    pt, _ = folders["hps_sources"]
    original = load_pickle_state_dict(pt, allow_pickle=True)
    converted = load_file(str(folders[HPS] / "model.safetensors"))
    back = reward_tiny.hf_to_open_clip(converted)
    assert set(back) == set(original)
    for k in original:
        torch.testing.assert_close(back[k], original[k], atol=0, rtol=0)
    assert set(open_clip_to_hf(original)) <= set(converted)
    pt, _ = folders["imagereward_sources"]
    original = torch.load(pt)
    head = load_file(str(folders[IMAGEREWARD] / "imagereward_head.safetensors"))
    model = load_file(str(folders[IMAGEREWARD] / "model.safetensors"))
    back = reward_tiny.hf_to_imagereward({k: v for k, v in model.items()}, head)
    unused = ("blip.vision_proj", "blip.text_proj", "blip.itm_head")  # not part of ImageReward's score
    for k, v in original.items():
        if not k.startswith(unused):
            torch.testing.assert_close(back[k], v, atol=0, rtol=0)
    pth, _ = folders["aesthetic_sources"]
    head = load_file(str(folders[AESTHETIC] / "aesthetic_head.safetensors"))
    for k, v in torch.load(pth).items():
        torch.testing.assert_close(head[k], v, atol=0, rtol=0)


def test_converter_result_reports_the_check(folders, tmp_path):
    pth, base = folders["aesthetic_sources"]
    result = convert(AESTHETIC, pth, tmp_path / "again", base=base)
    assert result.max_abs_error < 1e-5 and len(result.scores) == 3
    assert "match" in result.summary()


def test_pickles_are_refused_by_default(folders, tmp_path):
    pt, base = folders["hps_sources"]
    with pytest.raises(RewardFolderError, match="allow-pickle"):
        convert_reward(HPS, pt, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()
    only_pickle = tmp_path / "ImageReward"
    only_pickle.mkdir()
    (only_pickle / "ImageReward.pt").write_bytes(Path(folders["imagereward_sources"][0]).read_bytes())
    with pytest.raises(RewardFolderError, match="convert-reward"):
        load_reward_model(only_pickle)


def test_bad_folders_give_clear_errors(folders, tmp_path):
    import shutil

    with pytest.raises(RewardFolderError, match="does not exist"):
        load_reward_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardFolderError, match="not a reward model folder"):
        load_reward_model(empty)
    wrong = tmp_path / "wrong_arch"
    shutil.copytree(folders[PICKSCORE], wrong)
    (wrong / MARKER).write_text('{"kind": "imagereward"}')
    with pytest.raises(RewardFolderError, match="wrong architecture"):
        load_reward_model(wrong)
    no_head = tmp_path / "no_head"
    shutil.copytree(folders[PICKSCORE], no_head)
    (no_head / MARKER).write_text('{"kind": "aesthetic"}')
    with pytest.raises(RewardFolderError, match="aesthetic_head.safetensors is missing"):
        load_reward_model(no_head)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(folders[AESTHETIC], mismatch)
    from safetensors.torch import save_file

    save_file(reward_tiny.random_head_state_dict(24), str(mismatch / "aesthetic_head.safetensors"))
    with pytest.raises(RewardFolderError, match="24-d"):
        load_reward_model(mismatch)
    no_processor = tmp_path / "PickScore_v1_weights_only"  # what the PickScore_v1 repository ships
    shutil.copytree(folders[PICKSCORE], no_processor)
    for name in ("tokenizer.json", "processor_config.json", "preprocessor_config.json"):
        (no_processor / name).unlink(missing_ok=True)
    with pytest.raises(RewardFolderError, match="laion/CLIP-ViT-H-14"):
        load_reward_model(no_processor)
    bad_marker = tmp_path / "bad_marker"
    shutil.copytree(folders[PICKSCORE], bad_marker)
    (bad_marker / MARKER).write_text('{"kind": "clipscore"}')
    with pytest.raises(RewardFolderError, match="not one of"):
        load_reward_model(bad_marker)


def test_converter_refuses_wrong_inputs(folders, tmp_path):
    pt, hps_base = folders["hps_sources"]
    ir_pt, blip_base = folders["imagereward_sources"]
    with pytest.raises(RewardFolderError, match="not part of"):  # an ImageReward file converted as HPS
        convert(HPS, ir_pt, tmp_path / "a", base=hps_base)
    with pytest.raises(RewardFolderError, match="wrong architecture"):  # HPS onto a BLIP base
        convert(HPS, pt, tmp_path / "b", base=blip_base)
    with pytest.raises(RewardFolderError, match="--base"):
        convert(HPS, pt, tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RewardFolderError, match="not empty"):
        convert_reward(HPS, pt, tmp_path / "full", base=hps_base, allow_pickle=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no half-written folder is left"


def test_pickscore_from_pickle_folder(folders, tmp_path):
    import shutil

    from transformers import CLIPModel

    src = tmp_path / "PickScore_bin"
    shutil.copytree(folders[PICKSCORE], src)
    torch.save(CLIPModel.from_pretrained(src).state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(RewardFolderError, match="convert-reward"):
        load_reward_model(src)
    result = convert(PICKSCORE, src, tmp_path / "PickScore_safe")
    x = quantised_images(2)
    torch.testing.assert_close(RewardJudge(load_reward_model(result.folder), PROMPT)(x),
                               RewardJudge(load_reward_model(folders[PICKSCORE]), PROMPT)(x), atol=1e-5, rtol=1e-5)


def test_open_clip_format_says_which_extra_to_install(folders, tmp_path):
    if importlib.util.find_spec("open_clip") is not None:
        pytest.skip("open_clip is installed")
    folder = tmp_path / "hps_open_clip"
    folder.mkdir()
    (folder / MARKER).write_text('{"kind": "hpsv2", "format": "open_clip"}')
    with pytest.raises(RewardFolderError, match=r"'hps' extra.*missing: open-clip-torch.*\[hps\].*convert-reward"):
        load_reward_model(folder)


def test_reward_judge_steers_smc_towards_higher_reward(folders):
    """A reward judge as the potential of the SMC sampler: the selected particle has the best final reward."""
    from comfy_poe.samplers.smc import SMCReport, sample_poe_smc

    judge = RewardJudge(load_reward_model(folders[AESTHETIC]), "")
    expert = judge.expert(5.0)
    decode = lambda z: torch.sigmoid(z.permute(0, 2, 3, 1))  # noqa: E731 - latent (N, 3, H, W) → IMAGE

    def model(x, sigma, **kw):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)  # exact denoiser of N(0, I) data

    sigmas = torch.linspace(5, 0, 11)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 5
    report = SMCReport()
    out = sample_poe_smc(model, x, sigmas, particles=4, judges=[expert], decode=decode, weighting="max", seed=0,
                         report=report)
    assert out.shape == (1, 3, 32, 32)
    final = report.final_potentials[:, 0]
    torch.testing.assert_close(final.max().float(), 5.0 * judge(decode(out)).float()[0], atol=1e-4, rtol=1e-4)


def test_convert_reward_command(folders, tmp_path, capsys):
    from comfy_poe.__main__ import main

    pth, base = folders["aesthetic_sources"]
    args = ["convert-reward", "aesthetic", "--source", str(pth), "--base", str(base), "--out", str(tmp_path / "aes")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and not (tmp_path / "aes").exists()
    assert main(args + ["--allow-pickle"]) == 0
    captured = capsys.readouterr()
    assert "match" in captured.out and "warning:" in captured.err
    assert detect_kind(tmp_path / "aes")[0] == AESTHETIC


def _open_clip_tiny(open_clip, tmp_path):
    """A tiny open_clip ViT registered as architecture 'poe-tiny-vit' (open_clip's own tokenizer vocabulary)."""
    import json

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = tmp_path / "poe-tiny-vit.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(4)
    model = open_clip.create_model("poe-tiny-vit", pretrained=None).eval()
    with torch.no_grad():  # open_clip initialises some weights to zero / tiny values: spread them for the test
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_clip_tokenizer_from_open_clip(folder: Path):
    """A transformers CLIPTokenizer with open_clip's BPE vocabulary (what laion/CLIP-ViT-H-14 ships)."""
    import gzip
    import json

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def test_hps_conversion_matches_the_real_open_clip(tmp_path):
    """HPS v2.1 through both paths against open_clip itself (skipped without the optional open_clip_torch)."""
    open_clip = pytest.importorskip("open_clip")
    import transformers as T

    model = _open_clip_tiny(open_clip, tmp_path)
    pt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, pt)
    x = quantised_images(3, seed=5)
    tokens = open_clip.get_tokenizer("poe-tiny-vit")([PROMPT] * 3)
    with torch.no_grad():
        pixels = (x.permute(0, 3, 1, 2) - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
        want = 100 * (F.normalize(model.encode_image(pixels), dim=-1) * F.normalize(model.encode_text(tokens), dim=-1)).sum(-1)
    # open_clip format (the converter's own check compares it with open_clip_reference_embeds)
    result = convert(HPS, pt, tmp_path / "hps_open_clip", fmt="open_clip", arch="poe-tiny-vit")
    got = RewardJudge(load_reward_model(result.folder), PROMPT)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # transformers format from a CLIP base folder with the same dimensions and open_clip's vocabulary
    base = tmp_path / "clip_base"
    base.mkdir()
    tok = _hf_clip_tokenizer_from_open_clip(base)
    assert tok(PROMPT)["input_ids"] == [i for i in tokens[0].tolist() if i], "same tokens as open_clip"
    config = T.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    T.CLIPModel(config).save_pretrained(base)
    ip = reward_tiny.vlm_tiny.pil_class(T, "CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    T.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(base)
    result = convert(HPS, pt, tmp_path / "hps_hf", base=base)
    got = RewardJudge(load_reward_model(result.folder), PROMPT)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
