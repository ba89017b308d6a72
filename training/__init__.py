"""comfy_poe.training — LoRA training core (plain torch, no ComfyUI imports).

* :mod:`.lora`: one LoRA representation for UNet and DiT models (forward hooks on plain modules, weight
  wrappers for ComfyUI), ComfyUI-native export;
* :mod:`.loop`: seeded AdamW loop with clipping, autocast, progress / interruption callbacks, atomic
  checkpoints, exact resume, curves as an image, gradient checkpointing;
* :mod:`.dual_process`: Dual-Process tuning (a differentiable judge's loss → decoder → one generator step → LoRA).

The ComfyUI nodes are in ``nodes/training.py``.
"""
from .dual_process import (
    PIXEL_RANGES, DualProcessConfig, Generator, dual_process_step, evaluate, noise_batch, sample, sample_to, tune,
)
from .lora import INITS, TARGET_PRESETS, LoRAAdapter, LoRAConfig, LoRANetwork, create_lora, find_targets
from .loop import (
    CheckpointStore, LoopConfig, StepOutput, TrainingInterrupted, TrainResult, enable_gradient_checkpointing,
    render_curves, step_generator, train,
)

__all__ = [
    "PIXEL_RANGES", "DualProcessConfig", "Generator", "dual_process_step", "evaluate", "noise_batch", "sample",
    "sample_to", "tune", "INITS", "TARGET_PRESETS", "LoRAAdapter", "LoRAConfig", "LoRANetwork", "create_lora",
    "find_targets", "CheckpointStore", "LoopConfig", "StepOutput", "TrainingInterrupted", "TrainResult",
    "enable_gradient_checkpointing", "render_curves", "step_generator", "train",
]
