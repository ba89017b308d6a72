"""LoRA Stack / LoRA Merge / LoRA Inspect nodes (thin layer over ``comfy_poe.lora``).

The merge resolves every input module against the loaded MODEL/CLIP with ComfyUI's own LoRA key map
(``comfy.lora.model_lora_keys_unet/clip``), so kohya, PEFT and ComfyUI-native files of the same model
merge layer by layer whatever their spelling, and the output is written with the model's native keys
(``diffusion_model.*`` / ``text_encoders.*``).  The saved file is then applied through
``comfy.sd.load_lora_for_models`` — the same path as the core LoraLoader.
"""
from __future__ import annotations

import math

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..lora.describe import describe_lora, format_description
from ..lora.formats import ModuleName, comfy_lookup_spellings
from ..lora.io import check_overwrite, load_lora_file, resolve_save_path
from ..lora.merge import DTYPES, METHODS, LoraInput, merge_loras, parse_block_weights, save_merge

LoraStackType = io.Custom("LORA_STACK")


def model_key_resolver(model, clip):
    """``ModuleName -> native output key`` for the layers of this MODEL/CLIP (None: not in the model)."""
    key_map: dict = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)

    def resolve(name: ModuleName) -> str | None:
        for spelling in comfy_lookup_spellings(name):
            target = key_map.get(spelling)
            if isinstance(target, str) and target.endswith(".weight"):  # tuples = fused-slice targets
                stem = target[: -len(".weight")]
                return stem if stem.startswith("diffusion_model.") else f"text_encoders.{stem}"
        return None

    return resolve


def stack_entries(lora_stack) -> list[tuple[str, float, float]]:
    """LORA_STACK as (name, model weight, clip weight); accepts the common (name, strength_model,
    strength_clip) tuples other packs' stacks produce."""
    def weight(value, name: str, which: str) -> float:
        try:
            w = float(value)
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w):
            raise ValueError(f"lora_stack: entry {name!r} has {which} strength {value!r}; give a finite number "
                             "(check the LoRA stack node that produced it)")
        return w

    entries = []
    for item in lora_stack or []:
        name, *strengths = item
        if name in (None, "None", ""):  # empty slots of other packs' stack nodes
            continue
        model_w = weight(strengths[0], name, "model") if strengths else 1.0
        entries.append((name, model_w, weight(strengths[1], name, "clip") if len(strengths) > 1 else model_w))
    return entries


class LoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoELoraStack",
            display_name="LoRA Stack (PoE)",
            category="poe/lora",
            description="Adds one LoRA with a merge weight to a LORA_STACK; chain several for LoRA Merge.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="LoRA file in models/loras (kohya, diffusers/PEFT or ComfyUI-native keys)."),
                io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Merge weight w_i of this LoRA's delta (1.0 = as trained; negative subtracts)."),
                io.Float.Input("clip_weight", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight of this LoRA's text-encoder modules (0 drops them from the merge)."),
                LoraStackType.Input("lora_stack", optional=True,
                                    tooltip="Stack to append to (leave empty to start a new one)."),
                io.String.Input("saved_lora", optional=True, force_input=True,
                                tooltip="Link the lora_name output of a node that saves a LoRA earlier in this graph "
                                        "(e.g. Save Trained LoRA): it replaces lora_name, and the link makes the "
                                        "merge wait until that file is written."),
            ],
            outputs=[LoraStackType.Output(display_name="lora_stack")],
        )

    @classmethod
    def execute(cls, lora_name, weight, clip_weight, lora_stack=None, saved_lora=None) -> io.NodeOutput:
        return io.NodeOutput(list(lora_stack or []) + [(saved_lora or lora_name, weight, clip_weight)])


class LoraMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoELoraMerge",
            display_name="LoRA Merge (PoE)",
            category="poe/lora",
            description="Merges LoRAs of any rank and key format into one file in models/loras and applies it. "
                        "concat is exact (rank = sum of ranks); svd compresses the exact sum to a rank.",
            inputs=[
                io.Model.Input("model", tooltip="Model the merged LoRA is matched against and applied to."),
                LoraStackType.Input("lora_stack", tooltip="LoRAs and weights to merge (from LoRA Stack nodes)."),
                io.Combo.Input("method", options=list(METHODS), default="concat",
                               tooltip="concat: exact, rank = sum of ranks. svd: exact sum compressed to 'rank' "
                                       "(optimal, energy reported). arithmetic: same sum via dense deltas. ties / "
                                       "dare / dare_ties: interference-reducing merges, re-factorised to 'rank'."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="Target rank for svd and the dense methods; 0 = sum of the input ranks. "
                                     "Ignored by concat."),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="ties: fraction of largest-magnitude entries kept per LoRA; dare: keep "
                                       "probability (drop rate = 1 - density)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of dare's random drop (other methods are deterministic)."),
                io.String.Input("save_name", default="merged/poe_merge",
                                tooltip="File name under models/loras (sub-folders allowed, '..' refused); "
                                        ".safetensors is added."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp16",
                               tooltip="Storage precision of the merged factors (fp16 ≈ 2e-4 relative error)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Allow replacing an existing file not written by this node "
                                         "(files this node wrote are always replaced)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text encoder to match and patch; without it text-encoder modules are kept "
                                      "in the file but not applied."),
                io.String.Input("block_weights", default="", multiline=True, optional=True,
                                tooltip="Optional per-block weights, 'PATTERN=WEIGHT' per line, e.g. "
                                        "'input_blocks=0.5' or 'te1:=0'. Last match wins."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                io.String.Output(display_name="lora_name"),
                io.String.Output(display_name="report"),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_name=None, block_weights=None):
        # both are widgets (known before the prompt runs) unless linked: then None, checked in execute
        try:
            if save_name is not None:
                resolve_save_path(folder_paths.get_folder_paths("loras")[0], save_name)
            if block_weights is not None:
                parse_block_weights(block_weights)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, lora_stack, method, rank, density, seed, save_name, dtype, overwrite,
                clip=None, block_weights="") -> io.NodeOutput:
        entries = stack_entries(lora_stack)
        if not entries:
            raise ValueError("LoRA Merge: lora_stack is empty; connect LoRA Stack nodes")
        root = folder_paths.get_folder_paths("loras")[0]
        path = resolve_save_path(root, save_name)  # refuse a bad name before any work
        check_overwrite(path, overwrite)
        parse_block_weights(block_weights or "")
        inputs = [LoraInput.from_file(folder_paths.get_full_path_or_raise("loras", name), w, name=name,
                                      te_weight=clip_w)
                  for name, w, clip_w in entries]
        pbar = comfy.utils.ProgressBar(1)

        def progress(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        result = merge_loras(inputs, method, rank, seed=seed, density=density, block_weights=block_weights or "",
                             resolve=model_key_resolver(model, clip), dtype=dtype,
                             device=comfy.model_management.get_torch_device(), progress=progress)
        save_merge(result, path, overwrite=overwrite)
        lora_name = path.relative_to(root).as_posix()
        lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
        report = result.report() + f"\nsaved: models/loras/{lora_name}"
        return io.NodeOutput(model_out, clip_out, lora_name, report, ui=ui.PreviewText(report))


class LoraInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoELoraInspect",
            display_name="LoRA Inspect (PoE)",
            category="poe/lora",
            description="Shows a LoRA file's key format, modules, ranks, alphas, size and unmergeable keys.",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="LoRA file in models/loras to describe.")],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        text = format_description(describe_lora(load_lora_file(folder_paths.get_full_path_or_raise("loras", lora_name))))
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [LoraStack, LoraMerge, LoraInspect]
