"""comfy_poe.benchmarks"""
