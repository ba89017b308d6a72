"""comfy-poe: Product-of-Experts sampling and alignment for ComfyUI.

The repository root is both the ComfyUI custom-node folder and the ``comfy_poe`` Python package.
Importing it needs only torch: the engine (``experts``, ``samplers``) never imports ComfyUI, and the
ComfyUI V3 node layer in ``nodes`` is imported lazily by :func:`comfy_entrypoint`.
"""
__version__ = "0.1.0"

# Served by ComfyUI at /extensions/<folder name>/; the frontend reads each node's help page from
# web/docs/<node id>.md there (see web/build_help.py).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension listing every comfy-poe node."""
    from .nodes import PoEExtension

    return PoEExtension()
