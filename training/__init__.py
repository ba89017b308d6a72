"""comfy_poe.training"""
