"""ComfyUI V3 node layer (thin): adapts MODEL / CONDITIONING / LATENT / VAE to the engine.

Only imported inside ComfyUI (by the root ``comfy_entrypoint``). Every module in this folder that
defines ``NODES`` (a list of ``io.ComfyNode`` classes) is collected; one file per feature.
"""
import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __package__)
        nodes.extend(getattr(module, "NODES", []))
    return nodes


class PoEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()
