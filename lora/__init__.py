"""comfy_poe.lora — read LoRAs in any key format, merge them exactly or to a chosen rank, write files
ComfyUI's LoraLoader loads.  Plain torch + safetensors; the ComfyUI node layer is nodes/lora_merge.py and
the command line is ``python -m comfy_poe.lora``."""
from .formats import LoraModule, ModuleName, ParsedLora, parse_module_prefix, parse_state_dict, to_state_dict
from .io import LoraFileError, atomic_write_safetensors, load_lora_file, resolve_save_path
from .merge import METHODS, LoraInput, MergeError, MergeResult, merge_loras, save_merge

__all__ = ["LoraModule", "ModuleName", "ParsedLora", "parse_module_prefix", "parse_state_dict",
           "to_state_dict", "LoraFileError", "atomic_write_safetensors", "load_lora_file",
           "resolve_save_path", "METHODS", "LoraInput", "MergeError", "MergeResult", "merge_loras",
           "save_merge"]
