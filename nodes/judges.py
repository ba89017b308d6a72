"""Model-free judges as nodes: colour palette, image statistics, region constraint, proximity to a reference.

Thin ComfyUI layer over ``experts.image_judges``. Every node outputs ``POE_JUDGES`` (a Python list of
DiscriminativeExpert) and appends its judge to the optional incoming list, so judges chain like the
VLM / CLIP judges and plug into the PoE SMC sampler and VLM Score / Rank.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..experts import LATENT, PIXEL
from ..experts.image_judges import (
    REGION_MODES, palette_judge, parse_hex_colors, proximity_judge, region_judge, statistics_judge,
)

from ._types import PoEJudges
STAT_OFF = -1.0  # statistics target value meaning "not constrained"


def _chain(judges, expert) -> list:
    return list(judges or []) + [expert]


def _weight_input():
    return io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                          tooltip="Weight γ of this judge: the sampler multiplies the target by exp(γ · score).")


def _judges_input():
    return PoEJudges.Input("judges", optional=True,
                           tooltip="Judges to chain with (this judge is appended to the list).")


def _single_mask(mask, name: str = "mask"):
    """First mask of a MASK batch of one; a batch of several is ambiguous, so refuse it."""
    if mask is None:
        return None
    if mask.ndim == 3 and mask.shape[0] != 1:
        raise ValueError(f"{name}: connect a single mask (got a batch of {mask.shape[0]})")
    return mask


def _palette_error(colors):
    try:
        parse_hex_colors(colors, "colors")
    except ValueError as err:
        return str(err)
    return None


class PoEPaletteJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEPaletteJudge",
            display_name="PoE Palette Judge",
            category="poe/judges",
            description="Pixels should use these colours: mean log-likelihood of each pixel under a mixture of "
                        "Gaussians at the palette colours (differentiable, no model needed).",
            inputs=[
                io.String.Input("colors", default="#1f3b73, #f2c14e, #f5f5f5",
                                tooltip="Palette as hex colours separated by commas or spaces, e.g. "
                                        "'#ff0000, #00ff00' (#rgb shorthand allowed)."),
                io.Float.Input("sharpness", default=20.0, min=0.1, max=1000.0, step=0.5,
                               tooltip="How strictly pixels must match a palette colour: each colour is a "
                                       "Gaussian with variance 1/(2·sharpness) in RGB [0, 1] units."),
                _weight_input(),
                _judges_input(),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def validate_inputs(cls, colors):
        if colors is None:  # linked from another node: checked in execute
            return True
        return _palette_error(colors) or True

    @classmethod
    def execute(cls, colors, sharpness, weight, judges=None) -> io.NodeOutput:
        return io.NodeOutput(_chain(judges, palette_judge(colors, weight=weight, sharpness=sharpness)))


class PoEImageStatisticsJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        def target(name, default, what):
            return io.Float.Input(name, default=default, min=STAT_OFF, max=1.0, step=0.01,
                                  tooltip=f"Target {what} in [0, 1]; a negative value leaves it unconstrained.")

        return io.Schema(
            node_id="PoEImageStatisticsJudge",
            display_name="PoE Image Statistics Judge",
            category="poe/judges",
            description="Global brightness / contrast / saturation near targets: a Gaussian penalty "
                        "−½((stat − target)/tolerance)² per constrained statistic.",
            inputs=[
                target("brightness", 0.5, "brightness (mean BT.601 luma)"),
                target("contrast", STAT_OFF, "contrast (RMS contrast = standard deviation of luma)"),
                target("saturation", STAT_OFF, "saturation (mean HSV saturation)"),
                io.Float.Input("tolerance", default=0.1, min=0.001, max=1.0, step=0.005,
                               tooltip="Allowed deviation from the targets (the Gaussian's standard deviation)."),
                _weight_input(),
                _judges_input(),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def validate_inputs(cls, brightness, contrast, saturation):
        # naming these inputs skips the server's own min/max check, so do it here
        values = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        for name, value in values.items():
            if value is not None and value > 1.0:
                return f"{name}: target {value} is above 1 (statistics lie in [0, 1]; negative = off)"
        if all(v is not None and v < 0 for v in values.values()):
            return "brightness, contrast, saturation: set at least one target (all are negative = off)"
        return True

    @classmethod
    def execute(cls, brightness, contrast, saturation, tolerance, weight, judges=None) -> io.NodeOutput:
        def on(v):
            return None if v < 0 else v

        judge = statistics_judge(on(brightness), on(contrast), on(saturation), tolerance=tolerance, weight=weight)
        return io.NodeOutput(_chain(judges, judge))


class PoERegionJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoERegionJudge",
            display_name="PoE Region Judge",
            category="poe/judges",
            description="A masked area should be dark, bright or empty (flat, or close to a fill colour), "
                        "e.g. to keep room for a title. The mask is resized to the image.",
            inputs=[
                io.Mask.Input("mask", tooltip="Area to constrain (1 = constrained, soft edges allowed); any "
                                              "resolution, resized bilinearly to the decoded image."),
                io.Combo.Input("mode", options=list(REGION_MODES), default="dark",
                               tooltip="dark: pixels near black. bright: near white. empty: flat (low colour "
                                       "variance), or close to fill_color when one is given."),
                io.Float.Input("tolerance", default=0.1, min=0.001, max=1.0, step=0.005,
                               tooltip="Allowed per-pixel deviation (luma for dark/bright, RGB distance for empty)."),
                io.String.Input("fill_color", default="",
                                tooltip="Only for mode 'empty': hex colour the area should be filled with, "
                                        "e.g. '#ffffff'. Empty: any flat colour."),
                _weight_input(),
                _judges_input(),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def validate_inputs(cls, mode, fill_color):
        if mode is not None and mode not in REGION_MODES:
            return f"mode: {mode!r} is not one of {', '.join(REGION_MODES)}"
        if fill_color:
            if mode is not None and mode != "empty":
                return f"fill_color: only used with mode 'empty' (mode is {mode!r}); clear it"
            try:
                if len(parse_hex_colors(fill_color, "fill_color")) != 1:
                    return "fill_color: give exactly one hex colour"
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(cls, mask, mode, tolerance, fill_color, weight, judges=None) -> io.NodeOutput:
        if mode not in REGION_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(REGION_MODES)}")
        fill = parse_hex_colors(fill_color, "fill_color") if fill_color.strip() else None
        if fill is not None and len(fill) != 1:
            raise ValueError("fill_color: give exactly one hex colour")
        judge = region_judge(_single_mask(mask), mode, weight=weight, tolerance=tolerance, fill_color=fill)
        return io.NodeOutput(_chain(judges, judge))


class PoEProximityJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEProximityJudge",
            display_name="PoE Proximity Judge",
            category="poe/judges",
            description="Gaussian expert around a reference (the paper's graphics-engine / simulator expert): "
                        "score −mean‖x − reference‖² over the (masked) positions, times weight.",
            inputs=[
                io.Image.Input("reference_image", optional=True,
                               tooltip="Reference IMAGE (e.g. a render or sketch) at the generated size; compared "
                                       "with the decoded images. Connect this or reference_latent."),
                io.Latent.Input("reference_latent", optional=True,
                                tooltip="Reference LATENT (e.g. VAE Encode of a render) at the generated size; "
                                        "compared with the sampler's latent prediction (cheaper: no decoding). "
                                        "The PoE samplers hand latent judges latents in this same LATENT scale."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the reference applies (1 = follow it); resized to the compared "
                                      "resolution. Unconnected: everywhere."),
                _weight_input(),
                _judges_input(),
            ],
            outputs=[PoEJudges.Output(display_name="judges")],
        )

    @classmethod
    def execute(cls, weight, reference_image=None, reference_latent=None, mask=None,
                judges=None) -> io.NodeOutput:
        if (reference_image is None) == (reference_latent is None):
            raise ValueError("connect exactly one of reference_image or reference_latent")
        if reference_image is not None:
            judge = proximity_judge(reference_image, weight=weight, mask=_single_mask(mask), space=PIXEL,
                                    name="proximity_image")
        else:
            judge = proximity_judge(reference_latent["samples"].float(), weight=weight, mask=_single_mask(mask), space=LATENT,
                                    name="proximity_latent")
        return io.NodeOutput(_chain(judges, judge))


NODES = [PoEPaletteJudge, PoEImageStatisticsJudge, PoERegionJudge, PoEProximityJudge]
