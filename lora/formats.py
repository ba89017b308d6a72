"""LoRA key formats: read kohya / diffusers-PEFT / ComfyUI-native state dicts into one canonical form.

A LoRA patches a weight W (out, in, *kernel) by  ΔW = (alpha / r) · up @ down  with
up (out, r[, 1, 1]) and down (r, in[, kh, kw]).  The same module is spelled differently by trainers:

    kohya          lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    diffusers/PEFT unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
    ComfyUI-native diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight

Merge identity.  Every module gets ``identity = "<component>:<flat>"`` where component is the model part
(``unet`` for the diffusion model, ``te1``/``te2``/``te3`` for text encoders, ``transformer`` for diffusers
DiT naming) and ``flat`` is the module path with dots replaced by underscores (kohya's own spelling).
kohya's underscore flattening is lossy (``to_q`` vs ``to.q``), but the *flat* form is not: two files name
the same module iff their flat forms agree, so merging never needs to guess.  The only thing flat names
cannot see is that SD-family UNets have two path schemes (diffusers ``down_blocks…`` in kohya/PEFT files,
LDM ``input_blocks…`` in ComfyUI-native files); :func:`unet_naming_scheme` detects that mix, and the
ComfyUI node resolves every module against the real model instead (see ``merge.merge_loras(resolve=…)``).

Output spelling (``key_format="auto"``).  ComfyUI's ``diffusion_model.<path>`` is the *model's own*
state-dict path, which for SD UNets is the LDM path — so writing a diffusers path behind
``diffusion_model.`` would be silently dropped ("lora key not loaded").  Each merged module therefore keeps
a spelling one of its inputs already used and ComfyUI maps: native if any input was native, else kohya;
PEFT ``unet.…to_q`` (which ComfyUI drops unless spelled ``…processor.to_q``) is rewritten to kohya.
Suffixes are always ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------------------------- suffixes
# (suffix, role); a module prefix is the key with its suffix removed.
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    (".alpha", "alpha"),
)
# Adapters ComfyUI can load but that are not a low-rank product (or not linear in the factors): they are
# reported and never merged as if they were plain LoRA.
UNSUPPORTED_SUFFIX = re.compile(
    r"\.(dora_scale|diff|diff_b|w_norm|b_norm|set_weight|reshape_weight|hada_\w+|lokr_\w+|oft_\w+|"
    r"lora_B\.bias|bias)$")

# ---------------------------------------------------------------------------------------- key prefixes
KOHYA_PREFIX = re.compile(r"^lora_(unet|te[1-9]?|transformer|prior_unet|prior_te)_(.+)$")
KOHYA_COMPONENT = {"unet": "unet", "te": "te1", "te1": "te1", "te2": "te2", "te3": "te3",
                   "te4": "te4", "transformer": "transformer", "prior_unet": "prior_unet",
                   "prior_te": "prior_te"}
COMPONENT_KOHYA = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_",
                   "te4": "lora_te4_", "transformer": "lora_transformer_", "prior_unet": "lora_prior_unet_",
                   "prior_te": "lora_prior_te_", "lycoris": "lycoris_"}
# ComfyUI-native text-encoder names (text_encoders.<name>.transformer.<path>) ↔ kohya te index.
NATIVE_TE_COMPONENT = {"clip_l": "te1", "clip_h": "te1", "clip_g": "te2"}
COMPONENT_NATIVE_TE = {"te1": "clip_l", "te2": "clip_g"}
PEFT_PREFIXES = (("unet.", "unet"), ("transformer.", "transformer"), ("text_encoder_2.", "te2"),
                 ("text_encoder.", "te1"), ("base_model.model.", "transformer"))
DIFFUSERS_UNET_BLOCKS = ("down_blocks_", "up_blocks_", "mid_block_", "conv_in", "conv_out",
                         "time_embedding_", "add_embedding_", "conv_norm_out")
LDM_UNET_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


@dataclass(frozen=True)
class ModuleName:
    """Where one LoRA module applies, in every spelling this package can derive.

    component: ``unet`` | ``transformer`` | ``te1`` | ``te2`` | ``te3`` | ``te:<name>`` | ``lycoris`` | ``other``
    flat:      module path with dots → underscores (the merge identity inside the component)
    path:      dotted module path when the source spelled it (None for kohya)
    scheme:    ``kohya`` | ``peft`` | ``native`` | ``other``
    key:       the prefix exactly as written in the file
    """
    component: str
    flat: str
    path: str | None
    scheme: str
    key: str

    @property
    def identity(self) -> str:
        return f"{self.component}:{self.flat}"


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _normalise_peft_path(path: str) -> str:
    """diffusers attention-processor spelling → module path (``attn1.processor.to_out`` → ``attn1.to_out.0``)."""
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out") or path == "to_out":
        path += ".0"
    return path


def parse_module_prefix(prefix: str) -> ModuleName:
    """Canonical :class:`ModuleName` of a module prefix in any supported spelling."""
    m = KOHYA_PREFIX.match(prefix)
    if m:
        return ModuleName(KOHYA_COMPONENT[m.group(1)], m.group(2), None, "kohya", prefix)
    if prefix.startswith("lycoris_"):
        return ModuleName("lycoris", prefix[len("lycoris_"):], None, "kohya", prefix)
    if prefix.startswith("diffusion_model."):
        path = prefix[len("diffusion_model."):]
        return ModuleName("unet", _flat(path), path, "native", prefix)
    if prefix.startswith("text_encoders."):
        rest = prefix[len("text_encoders."):]
        encoder, sep, path = rest.partition(".transformer.")
        if sep and "." not in encoder:
            component = NATIVE_TE_COMPONENT.get(encoder, f"te:{encoder}")
            return ModuleName(component, _flat(path), path, "native", prefix)
        return ModuleName("te:raw", _flat(rest), rest, "native", prefix)
    for peft_prefix, component in PEFT_PREFIXES:
        if prefix.startswith(peft_prefix):
            path = prefix[len(peft_prefix):]
            if path.startswith("base_model.model."):
                path = path[len("base_model.model."):]
            path = _normalise_peft_path(path)
            return ModuleName(component, _flat(path), path, "peft", prefix)
    return ModuleName("other", _flat(prefix), prefix, "other", prefix)


def split_key(key: str) -> tuple[str, str] | None:
    """(module prefix, role) of a LoRA factor/alpha key, or None if the suffix is not plain LoRA."""
    for suffix, role in FACTOR_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


# ------------------------------------------------------------------------ kohya flat → dotted resolver
# Module-name segments that themselves contain underscores, across diffusers UNets, LDM UNets, CLIP, T5,
# Flux / SD3 (native and diffusers).  A flat name resolves iff it splits uniquely-best into these words,
# integers and the single-word names below.
COMPOUND_WORDS = frozenset("""
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks proj_in proj_out to_q to_k to_v
to_out time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
add_embedding input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection
time_embed label_emb text_model self_attn q_proj k_proj v_proj out_proj final_layer_norm layer_norm1
layer_norm2 token_embedding position_embedding text_projection double_blocks single_blocks img_attn
txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in vector_in guidance_in final_layer in_layer
out_layer adaLN_modulation query_norm key_norm joint_blocks x_block context_block x_embedder
context_embedder t_embedder y_embedder pos_embed add_q_proj add_k_proj add_v_proj to_add_out ff_context
norm1_context proj_mlp time_text_embed timestep_embedder text_embedder guidance_embedder norm_out wi_0
wi_1 DenseReluDense shared_embed relative_attention_bias
""".split())
SINGLE_WORDS = frozenset("""
attentions resnets downsamplers upsamplers transformer_blocks attn attn1 attn2 norm norm1 norm2 norm3
ff net proj conv conv1 conv2 op encoder layers mlp fc1 fc2 linear linear1 linear2 qkv lin modulation
block layer SelfAttention EncDecAttention q k v o wo embeddings model decoder lm_head
""".split())


def resolve_flat(flat: str) -> str | None:
    """Dotted module path of a kohya flat name, or None when it cannot be split unambiguously.

    Dynamic programme over the underscore-separated tokens: each segment must be an integer, a known
    single word or a known compound word; among valid splits the one with fewest segments wins, and a
    tie between different splits is ambiguous (None).
    """
    tokens = flat.split("_")
    n = len(tokens)
    best: list[tuple[int, int, list[str]] | None] = [None] * (n + 1)  # (segments, #ways, split)
    best[0] = (0, 1, [])
    for i in range(n):
        if best[i] is None:
            continue
        cost, ways, split = best[i]
        for j in range(i + 1, n + 1):
            word = "_".join(tokens[i:j])
            if not (word in COMPOUND_WORDS or (j == i + 1 and (word.isdigit() or word in SINGLE_WORDS))):
                continue
            cand = (cost + 1, ways, split + [word])
            cur = best[j]
            if cur is None or cand[0] < cur[0]:
                best[j] = cand
            elif cand[0] == cur[0] and cand[2] != cur[2]:
                best[j] = (cur[0], cur[1] + ways, cur[2])
    if best[n] is None or best[n][1] != 1:
        return None
    return ".".join(best[n][2])


def dotted_path(name: ModuleName) -> str | None:
    return name.path if name.path is not None else resolve_flat(name.flat)


def unet_naming_scheme(name: ModuleName) -> str | None:
    """``diffusers`` / ``ldm`` for SD-family UNet module names, else None (DiT and others)."""
    if name.component != "unet":
        return None
    if name.flat.startswith(DIFFUSERS_UNET_BLOCKS):
        return "diffusers"
    if name.flat.startswith(LDM_UNET_BLOCKS):
        return "ldm"
    return None


def kohya_key(name: ModuleName) -> str | None:
    if name.scheme == "kohya":
        return name.key
    prefix = COMPONENT_KOHYA.get(name.component)
    return prefix + name.flat if prefix else None


def native_key(name: ModuleName) -> str | None:
    """ComfyUI-native spelling, or None when this module has no model path ComfyUI would map."""
    if name.scheme == "native":
        return name.key
    path = dotted_path(name)
    if path is None:
        return None
    if name.component == "unet":
        # diffusers UNet paths are not the model's own paths: ComfyUI would drop them.
        return None if unet_naming_scheme(name) == "diffusers" else f"diffusion_model.{path}"
    encoder = COMPONENT_NATIVE_TE.get(name.component)
    if encoder is None and name.component.startswith("te:") and name.component != "te:raw":
        encoder = name.component[3:]
    return f"text_encoders.{encoder}.transformer.{path}" if encoder else None


def comfy_lookup_spellings(name: ModuleName) -> list[str]:
    """Spellings to try, in order, in ComfyUI's LoRA key map (``comfy.lora.model_lora_keys_*``)."""
    out = [name.key]
    for key in (kohya_key(name), native_key(name)):
        if key and key not in out:
            out.append(key)
    if name.component == "unet" and (path := dotted_path(name)):
        peft = "unet." + path.replace(".to_", ".processor.to_")
        out.append(peft[:-2] if peft.endswith(".to_out.0") else peft)
    if name.component == "te1" and (path := dotted_path(name)):
        out.append(f"text_encoder.{path}")
    if name.component == "te2" and (path := dotted_path(name)):
        out.append(f"text_encoder_2.{path}")
    return out


def output_key(names: list[ModuleName], key_format: str = "auto") -> tuple[str, str | None]:
    """Key prefix to write one merged module under, plus a note when the requested format was impossible.

    ``auto``: a spelling some input already used that ComfyUI maps (native > kohya > diffusers DiT /
    text-encoder PEFT > other); PEFT ``unet.`` is rewritten to kohya.  ``kohya`` / ``native``: convert.
    """
    first = names[0]
    if key_format == "kohya":
        key = kohya_key(first)
        return (key, None) if key else (first.key, f"{first.key}: no kohya spelling, kept as read")
    if key_format == "native":
        for n in names:
            if key := native_key(n):
                return key, None
        fallback = kohya_key(first) or first.key
        return fallback, f"{first.key}: no ComfyUI-native path known, written as {fallback}"
    if key_format != "auto":
        raise ValueError(f"key_format must be 'auto', 'kohya' or 'native', got {key_format!r}")
    by_scheme = {n.scheme: n for n in reversed(names)}  # first input of each scheme wins
    if "native" in by_scheme:
        return by_scheme["native"].key, None
    if "kohya" in by_scheme:
        return by_scheme["kohya"].key, None
    if "peft" in by_scheme:
        peft = by_scheme["peft"]
        return (kohya_key(peft) if peft.component == "unet" else peft.key), None
    return first.key, None


# --------------------------------------------------------------------------------------------- modules
@dataclass
class LoraModule:
    """One low-rank patch ΔW = scale · up @ down (a Tucker ``mid`` is already folded into ``down``)."""
    name: ModuleName
    up: torch.Tensor    # (out, r) or (out, r, 1, 1, ...)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw, ...)
    alpha: float | None
    scale: float        # alpha / r as ComfyUI computes it (1 when the file has no alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the patched weight (out, in, *kernel)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float32 with ΔW.flatten(1) = B @ A; the per-module scale is folded into B."""
        b = self.up.reshape(self.up.shape[0], -1).to(device=device, dtype=torch.float32) * self.scale
        a = self.down.reshape(self.down.shape[0], -1).to(device=device, dtype=torch.float32)
        return b, a

    def delta(self, device=None) -> torch.Tensor:
        """Dense ΔW (out, in·kh·kw), float32."""
        b, a = self.factors(device)
        return b @ a


@dataclass
class ParsedLora:
    """A LoRA state dict in canonical form: modules by identity, and everything that was not merged."""
    modules: dict[str, LoraModule] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # key → reason (reported, never dropped silently)

    @property
    def schemes(self) -> Counter:
        return Counter(m.name.scheme for m in self.modules.values())


def _fold_mid(up, down, mid, prefix):
    """LoCon/Tucker: ΔW = up · mid ∘ down  →  down'[a,i,h,w] = Σ_s mid[a,s,h,w] · down[s,i]  (as ComfyUI)."""
    if mid.ndim < 3 or down.shape[0] != mid.shape[1] or up.shape[1] != mid.shape[0]:
        raise ValueError(f"{prefix}: lora_mid {tuple(mid.shape)} does not fit up {tuple(up.shape)} / "
                         f"down {tuple(down.shape)}")
    folded = torch.einsum("as...,si->ai...", mid.float(), down.reshape(down.shape[0], -1).float())
    return folded.to(down.dtype)


def nonfinite_count(tensor: torch.Tensor) -> int:
    """Number of NaN / ±inf entries (0 for integer tensors)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


DAMAGED_FILE_HINT = ("the file is damaged (re-download or re-train it). To merge it anyway allow non-finite "
                     "values explicitly (CLI --allow-nonfinite)")


def check_finite(label: str, key: str, tensor: torch.Tensor, hint: str = DAMAGED_FILE_HINT) -> None:
    """ValueError naming the file and tensor if ``tensor`` holds NaN or inf (one NaN factor entry turns the
    whole merged module into NaN, and the image into black or noise)."""
    bad = nonfinite_count(tensor)
    if bad:
        raise ValueError(f"{label}: tensor {key} has {bad} NaN/inf value{'s' if bad > 1 else ''} of "
                         f"{tensor.numel()}; {hint}")


def parse_state_dict(sd: dict[str, torch.Tensor], label: str = "LoRA", allow_nonfinite: bool = False) -> ParsedLora:
    """Group a LoRA state dict by module.  Raises ValueError (naming ``label`` and the key) on tensors
    whose shapes cannot be a LoRA, and on NaN/inf in a factor or alpha unless ``allow_nonfinite``;
    unknown, unsupported and incomplete keys go to ``skipped``."""
    parsed = ParsedLora()
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in sd.items():
        if UNSUPPORTED_SUFFIX.search(key):
            parsed.skipped[key] = "not a plain LoRA factor (DoRA/LoHa/LoKr/OFT/full diff/bias): not merged"
            continue
        split = split_key(key)
        if split is None:
            parsed.skipped[key] = "unknown key: not a LoRA factor or alpha"
            continue
        prefix, role = split
        slot = groups.setdefault(prefix, {})
        if role in slot:
            parsed.skipped[key] = f"second {role} for module {prefix} (also {slot[role][0]}): ignored"
            continue
        slot[role] = (key, tensor)

    # Modules whose prefix carries a DoRA/LoHa/... key are not linear in their factors: skip whole.
    unsupported_prefixes = {k.rsplit(".", 1)[0] for k in parsed.skipped if UNSUPPORTED_SUFFIX.search(k)}
    for prefix in sorted(groups):
        slot = groups[prefix]
        keys = [k for k, _ in slot.values()]
        if prefix in unsupported_prefixes:
            for k in keys:
                parsed.skipped[k] = "module also has DoRA/LoHa/LoKr/diff keys: not merged"
            continue
        if "up" not in slot or "down" not in slot:
            missing = "up" if "up" not in slot else "down"
            for k in keys:
                parsed.skipped[k] = f"incomplete module {prefix}: no {missing} factor"
            continue
        up, down = slot["up"][1], slot["down"][1]
        mid = slot["mid"][1] if "mid" in slot else None
        if up.ndim != down.ndim or up.ndim < 2 or up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
            raise ValueError(f"{label}: module {prefix} has up {tuple(up.shape)} and down {tuple(down.shape)}, "
                             "which do not form a LoRA (need up (out, r[,1,1]) and down (r, in[, kh, kw]))")
        if not allow_nonfinite:
            for k, tensor in slot.values():
                check_finite(label, k, tensor)
        rank_for_alpha = down.shape[0]  # ComfyUI divides alpha by the down rank, before folding mid
        if mid is not None:
            down = _fold_mid(up, down, mid, f"{label}: module {prefix}")
        alpha = None
        if "alpha" in slot:
            alpha_t = slot["alpha"][1]
            if alpha_t.numel() != 1:
                raise ValueError(f"{label}: {slot['alpha'][0]} must be a scalar, has shape {tuple(alpha_t.shape)}")
            alpha = float(alpha_t.float().item())
        scale = alpha / rank_for_alpha if alpha is not None else 1.0
        name = parse_module_prefix(prefix)
        module = LoraModule(name, up, down, alpha, scale)
        if name.identity in parsed.modules:
            other = parsed.modules[name.identity].name.key
            for k in keys:
                parsed.skipped[k] = (f"module named twice ({prefix} and {other}); kept {other} "
                                     "(ComfyUI would also load only one)")
            continue
        parsed.modules[name.identity] = module
    return parsed


def module_state_dict(key: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """The three tensors ComfyUI's regular LoRA adapter reads for one module."""
    return {f"{key}.lora_up.weight": up.contiguous(), f"{key}.lora_down.weight": down.contiguous(),
            f"{key}.alpha": torch.tensor(float(alpha))}


def to_state_dict(parsed: ParsedLora, key_format: str = "auto", dtype: torch.dtype | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Write a parsed LoRA back (format conversion); returns (state dict, notes)."""
    sd: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for module in parsed.modules.values():
        key, note = output_key([module.name], key_format)
        if note:
            notes.append(note)
        up, down = module.up, module.down
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        alpha = module.scale * module.rank  # keeps ΔW even for files without alpha (scale 1)
        sd.update(module_state_dict(key, up, down, alpha))
    return sd, notes
