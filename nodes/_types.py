"""Socket types shared by the pack's nodes (ComfyUI matches custom types by name)."""
from comfy_api.latest import io

PoEExperts = io.Custom("POE_EXPERTS")
PoEJudges = io.Custom("POE_JUDGES")
