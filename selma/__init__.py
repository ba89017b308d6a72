"""comfy_poe.selma"""
