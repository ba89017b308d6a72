"""Tiny random-weight vision-language models of every supported family, built offline for tests.

Each builder trains a ~400-token byte-level BPE tokenizer in-process, makes the family's PIL image
processor and processor, builds the model from a tiny config with a fixed seed and saves everything
with ``save_pretrained`` (safetensors) into a folder, exactly like a user's downloaded model folder.
Recipe: shared/reference/tiny_models_offline.md.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

TEXT_HIDDEN = 64
VISION_HIDDEN = 32
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{IMAGE}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Is there a cat in the image? Answer with Yes or No.",
    "Is the sky red? Is the picture bright? Does the image show a dog? Is it dark?",
    "Yes No yes no Yes. No. red blue green white black a the picture photo image colour",
    "user assistant system Describe the image. What colour is it?",
]
# Special tokens every family template may use; unused ones are harmless extra vocabulary.
COMMON_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<pad>", "<unk>", "<s>", "</s>"]


def _tokenizer(specials: list[str], image_token: str, extra_attrs: dict | None = None, template_image: str = "",
               wrap_bos_eos: bool = False):
    """Byte-level BPE trained on CORPUS with the family's special tokens; 'Yes' and 'No' single tokens.
    ``wrap_bos_eos`` adds <s> … <|im_end|> around every text (CLIP pools at the end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    all_specials = list(dict.fromkeys(COMMON_SPECIALS + specials))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=all_specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if wrap_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A <|im_end|>", special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "<|im_end|>")])
    extra = {"image_token": image_token}
    extra.update(extra_attrs or {})
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=extra,
    )
    fast.chat_template = CHAT_TEMPLATE.replace("{IMAGE}", template_image)
    for word in ("Yes", "No", " Yes", " No") if not wrap_bos_eos else ():
        assert len(fast.encode(word, add_special_tokens=False)) == 1, word
    return fast


def pil_class(transformers_module, name: str):
    """The PIL-backed image processor class: ``<name>Pil`` in transformers 5.x, ``<name>`` in 4.x (whose
    default image processors are the PIL ones)."""
    return getattr(transformers_module, name + "Pil", None) or getattr(transformers_module, name)


TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5
# transformers 4.x imports SmolVLM's processor only with torchvision (ComfyUI always has it; CPU test venvs may not)
SMOLVLM_NEEDS_TORCHVISION = TRANSFORMERS_4 and importlib.util.find_spec("torchvision") is None


def _rope(**parameters) -> dict:
    """RoPE settings under the config key of the installed transformers (5.x: rope_parameters)."""
    return {"rope_scaling" if TRANSFORMERS_4 else "rope_parameters": parameters}


def _family_tokenizer(processor_cls, tok):
    """transformers 4.x processors accept only their family's tokenizer class (e.g. Qwen2TokenizerFast):
    re-load the in-test tokenizer as that class. 5.x processors take any tokenizer."""
    import transformers as T

    names = getattr(processor_cls, "tokenizer_class", None)
    if not TRANSFORMERS_4 or not isinstance(names, tuple) or names[-1] is None:
        return tok
    with tempfile.TemporaryDirectory() as scratch:
        tok.save_pretrained(scratch)
        return getattr(T, names[-1]).from_pretrained(scratch)


def _no_video(processor_cls):
    from comfy_poe.experts.vlm import processor_class_without_video

    return processor_class_without_video(processor_cls)


def _save(folder: Path, model, processor, seed_note: str):
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "TINY_RANDOM_MODEL.txt").write_text(f"random weights for tests ({seed_note})\n")
    return folder


def _text_kwargs(vocab: int, **extra):
    kw = dict(
        vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    kw.update(extra)
    return kw


def build_qwen(folder: Path, model_type: str = "qwen2_vl", image_size: int = 56, seed: int = 0) -> Path:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: patch 14, merge 2, temporal patch 2; fixed grid for image_size²."""
    import transformers as T

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, "<|image_pad|>", {"video_token": "<|video_pad|>"},
                     template_image="<|vision_start|><|image_pad|><|vision_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    vocab = len(tok)
    pixels = image_size * image_size
    image_processor = pil_class(T, 'Qwen2VLImageProcessor')(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    head_dim = TEXT_HIDDEN // 4
    token_ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if model_type == "qwen3_vl":
        text = _text_kwargs(vocab, head_dim=head_dim, **token_ids,
                            **_rope(rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True))
        vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        config = T.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                 video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                 vision_end_token_id=ids["<|vision_end|>"])
        model_cls, proc_cls = T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor
    else:
        text = _text_kwargs(vocab, **_rope(rope_type="default", mrope_section=[2, 3, 3]), **token_ids)
        if model_type == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
            config_cls, model_cls, proc_cls = T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
        else:
            vision = dict(depth=2, embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, num_heads=2, mlp_ratio=2,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
            config_cls, model_cls, proc_cls = T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
        config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    processor = _no_video(proc_cls)(image_processor=image_processor, tokenizer=_family_tokenizer(proc_cls, tok),
                                    chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"{model_type} seed {seed}")


def _vision(**extra):
    kw = dict(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)
    kw.update(extra)
    return kw


def build_idefics3(folder: Path, model_type: str = "idefics3", seed: int = 0) -> Path:
    """Idefics3 / SmolVLM: 32² image, patch 8, pixel shuffle ×2 → 4 image tokens, no image splitting."""
    import transformers as T

    specials = ["<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]
    tok = _tokenizer(specials, "<image>", {"fake_image_token": "<fake_token_around_image>",
                                           "end_of_utterance_token": "<end_of_utterance>",
                                           "global_image_token": "<global-img>"}, template_image="<image>")
    vocab = len(tok)
    ip_kwargs = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    text = _text_kwargs(vocab, pad_token_id=tok.pad_token_id)
    if model_type == "smolvlm":
        config = T.SmolVLMConfig(text_config=text, vision_config=_vision(), scale_factor=2,
                                 image_token_id=tok.convert_tokens_to_ids("<image>"))
        model_cls, ip, proc_cls = T.SmolVLMForConditionalGeneration, pil_class(T, 'SmolVLMImageProcessor')(**ip_kwargs), T.SmolVLMProcessor
    else:
        config = T.Idefics3Config(text_config=text, vision_config=_vision(), scale_factor=2,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"))
        model_cls, ip, proc_cls = T.Idefics3ForConditionalGeneration, pil_class(T, 'Idefics3ImageProcessor')(**ip_kwargs), T.Idefics3Processor
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    processor = _no_video(proc_cls)(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"{model_type} seed {seed}")


def build_idefics2(folder: Path, seed: int = 0) -> Path:
    """Idefics2: 32² image, perceiver resampler with 4 latents = 4 image tokens."""
    import transformers as T

    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<end_of_utterance>"], "<image>",
                     {"image_boundary_token": "<fake_token_around_image>", "end_of_utterance_token": "<end_of_utterance>"},
                     template_image="<image>")
    config = T.Idefics2Config(
        text_config=dict(model_type="mistral", **_text_kwargs(len(tok), pad_token_id=tok.pad_token_id)),
        vision_config=_vision(),
        perceiver_config=dict(hidden_size=TEXT_HIDDEN, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16, num_key_value_heads=1),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = T.Idefics2ForConditionalGeneration(config).eval()
    ip = pil_class(T, 'Idefics2ImageProcessor')(size={"shortest_edge": 32, "longest_edge": 32}, do_image_splitting=False)
    processor = T.Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"idefics2 seed {seed}")


def build_llava(folder: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP vision (CLS dropped, 'default' strategy) + Llama; 16 image tokens."""
    import transformers as T

    tok = _tokenizer(["<image>"], "<image>", template_image="<image>")
    config = T.LlavaConfig(
        text_config=dict(model_type="llama", **_text_kwargs(len(tok), pad_token_id=tok.pad_token_id)),
        vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_vision()),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(config).eval()
    ip = pil_class(T, 'CLIPImageProcessor')(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"llava seed {seed}")


def build_llava_onevision(folder: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP vision + Qwen2; any-res with one 32² pin-point → base + 1 tile."""
    import transformers as T

    tok = _tokenizer(["<image>", "<video>"], "<image>", {"video_token": "<video>"}, template_image="<image>")
    config = T.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_kwargs(len(tok), pad_token_id=tok.pad_token_id)),
        vision_config=dict(model_type="siglip_vision_model", **_vision()),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[32, 32]],
    )
    torch.manual_seed(seed)
    model = T.LlavaOnevisionForConditionalGeneration(config).eval()
    ip = pil_class(T, 'LlavaOnevisionImageProcessor')(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]])
    processor = _no_video(T.LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"llava_onevision seed {seed}")


def build_gemma3(folder: Path, seed: int = 0) -> Path:
    """Gemma 3: SigLIP 32² / patch 8 pooled to 4 soft tokens; projector weight re-initialised (zero by default)."""
    import transformers as T

    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = _tokenizer(specials, "<image_soft_token>", {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
                     template_image="<start_of_image>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = _text_kwargs(len(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = T.Gemma3Config(text_config=text, vision_config=dict(model_type="siglip_vision_model", **_vision()),
                            mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"],
                            eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = T.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.copy_(torch.randn(projector.shape) * 0.2)
    ip = pil_class(T, 'Gemma3ImageProcessor')(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    return _save(Path(folder), model, processor, f"gemma3 seed {seed}")


def build_paligemma(folder: Path, seed: int = 0) -> Path:
    """PaliGemma: SigLIP 32² / patch 8 = 16 image tokens + Gemma; prompt is the bare question."""
    import transformers as T

    tok = _tokenizer(["<image>"], "<image>")
    tok.chat_template = None
    ip = pil_class(T, 'SiglipImageProcessor')(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    tok = _family_tokenizer(T.PaliGemmaProcessor, tok)
    processor = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds 1,152 <loc>/<seg> tokens
    vocab = len(tok)
    config = T.PaliGemmaConfig(
        text_config=dict(model_type="gemma", **_text_kwargs(vocab, head_dim=16, pad_token_id=tok.pad_token_id)),
        vision_config=dict(model_type="siglip_vision_model", **_vision()),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=vocab, projection_dim=TEXT_HIDDEN,
        hidden_size=TEXT_HIDDEN,
    )
    torch.manual_seed(seed)
    model = T.PaliGemmaForConditionalGeneration(config).eval()
    return _save(Path(folder), model, processor, f"paligemma seed {seed}")


def build_clip(folder: Path, model_type: str = "clip", seed: int = 0) -> Path:
    """Tiny CLIP or SigLIP dual encoder (32² images, patch 8) with the in-test tokenizer."""
    import transformers as T

    tok = _tokenizer([], "<image>", wrap_bos_eos=True)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if model_type == "siglip":
        config = T.SiglipConfig(text_config=text, vision_config=_vision())
        model = T.SiglipModel(config).eval()
        processor = T.SiglipProcessor(image_processor=pil_class(T, 'SiglipImageProcessor')(size={"height": 32, "width": 32}),
                                      tokenizer=tok)
    else:
        config = T.CLIPConfig(text_config=text, vision_config=_vision(), projection_dim=16)
        model = T.CLIPModel(config).eval()
        ip = pil_class(T, 'CLIPImageProcessor')(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = T.CLIPProcessor(image_processor=ip, tokenizer=tok)
    return _save(Path(folder), model, processor, f"{model_type} seed {seed}")


BUILDERS = {
    "qwen2_vl": lambda folder, **kw: build_qwen(folder, "qwen2_vl", **kw),
    "qwen2_5_vl": lambda folder, **kw: build_qwen(folder, "qwen2_5_vl", **kw),
    "qwen3_vl": lambda folder, **kw: build_qwen(folder, "qwen3_vl", **kw),
    "idefics3": lambda folder, **kw: build_idefics3(folder, "idefics3", **kw),
    "smolvlm": lambda folder, **kw: build_idefics3(folder, "smolvlm", **kw),
    "idefics2": build_idefics2,
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "clip": lambda folder, **kw: build_clip(folder, "clip", **kw),
    "siglip": lambda folder, **kw: build_clip(folder, "siglip", **kw),
}


def build_tiny_vlm(family: str, folder) -> Path:
    """Build and save the tiny model of ``family`` (a key of BUILDERS) into ``folder``."""
    return BUILDERS[family](Path(folder))
