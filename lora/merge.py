"""Merging LoRAs of any rank: exact concatenation, QR-SVD compression, task arithmetic, TIES, DARE.

Every method merges the per-module deltas  ΔW_i = (alpha_i / r_i) · B_i A_i  with per-LoRA weights w_i
(times optional per-block weights):

* ``concat``      exact — ΔW = Σ w_i ΔW_i stored as one LoRA of rank Σ r_i:
                  B = [w_1 s_1 B_1 | … | w_N s_N B_N],  A = [A_1; …; A_N],  alpha = Σ r_i (scale 1).
                  This is the SELMA merge (Li et al., NeurIPS 2024, §3.3); averaging A and B separately
                  would not be (B_1 A_1 + B_2 A_2 ≠ (B_1 + B_2)(A_1 + A_2)).
* ``svd``         the same sum re-factorised to a target rank, computed from the factors: B = Q_B R_B,
                  Aᵀ = Q_A R_A, SVD of the small core R_B R_Aᵀ = U S Vᵀ, so ΔW = (Q_B U) S (Q_A V)ᵀ without
                  ever forming the out × in matrix.  Truncation to k keeps the Eckart–Young optimum;
                  retained energy Σ_{i≤k} s_i² / Σ s_i² is reported per module.
* ``arithmetic``  task arithmetic (Ilharco et al., ICLR 2023): ΔW = Σ w_i ΔW_i built densely, then SVD.
                  Same result as ``svd`` (kept as the dense reference that ``ties``/``dare`` extend).
* ``ties``        TIES-Merging (Yadav et al., NeurIPS 2023): trim each ΔW_i to its top-``density``
                  magnitudes, elect a sign per entry  γ = sgn(Σ_i w_i τ̂_i),  disjoint mean over the
                  inputs agreeing with γ.
* ``dare``        DARE (Yu et al., ICML 2024): drop each entry with probability 1 - density, rescale the
                  kept ones by 1/density, then task arithmetic.  Seeded per module.
* ``dare_ties``   DARE's drop-and-rescale followed by TIES's sign election and disjoint mean.

The dense methods need each module's ΔW (out × in·kh·kw); they process one module at a time and free it
before the next, so peak memory is a few copies of the largest layer, not of the model.  Their result is
generally full-rank, so it is re-factorised by SVD to the target rank (energy reported).

``rank = 0`` means "Σ r_i of the inputs of that module" (exact for ``concat``/``svd``/``arithmetic``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import formats
from .formats import LoraModule, ModuleName, ParsedLora, module_state_dict, output_key, parse_state_dict
from .io import RECIPE_KEY, LoraFileError, atomic_write_safetensors, check_overwrite, load_lora_file

METHODS = ("concat", "svd", "arithmetic", "ties", "dare", "dare_ties")
DENSE_METHODS = ("arithmetic", "ties", "dare", "dare_ties")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# kohya fields that describe the network shape or a hash of one input: never copied to a merge.
NON_INHERITED_SS = {"ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
                    "ss_network_module", "ss_session_id", "ss_training_started_at", "ss_training_finished_at"}


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the module / input / option."""


# ---------------------------------------------------------------------------------- pure tensor maths
def concat_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """B = [w_1 B_1 | … | w_N B_N], A = [A_1; …; A_N]  ⇒  B A = Σ w_i B_i A_i exactly (rank Σ r_i)."""
    b = torch.cat([w * bi for (bi, _), w in zip(factors, weights)], dim=1)
    a = torch.cat([ai for _, ai in factors], dim=0)
    return b, a


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-k factors (U_k √S_k, √S_k V_kᵀ) — balanced so fp16 storage loses little — and the retained
    energy Σ_{i≤k} s_i² / Σ_i s_i²."""
    k = max(1, min(rank, s.shape[0]))
    total = float((s * s).sum())
    energy = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], energy


def svd_from_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation of B A (Eckart–Young) via two thin QRs and an SVD of the small core."""
    qb, rb = torch.linalg.qr(b)      # (out, m) (m, R)
    qa, ra = torch.linalg.qr(a.T)    # (in, n)  (n, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return split_singular(qb @ u, s, vh @ qa.T, rank)


def svd_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of a dense ΔW (out, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return split_singular(u, s, vh, rank)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ⌊density · n⌋ entries of largest magnitude, zero the rest."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta
    flat = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    if k > 0:
        idx = delta.abs().flatten().topk(k).indices
        flat[idx] = delta.flatten()[idx]
    return flat.view_as(delta)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """TIES step 2: γ = sgn(Σ_i τ_i) per entry (ties → +1)."""
    return torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES step 3: mean over the inputs whose (non-zero) entry agrees with the elected sign."""
    agree = stacked.sign() == sign
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    stacked = torch.stack([w * magnitude_trim(d, density) for d, w in zip(deltas, weights)])
    return disjoint_mean(stacked, elect_sign(stacked))


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density (E[result] = delta).
    The mask is drawn on the CPU generator so results do not depend on the device."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep.to(delta.device) / density


def dare_merge(deltas, weights, density, generators) -> torch.Tensor:
    return sum(w * dare_drop(d, density, g) for d, w, g in zip(deltas, weights, generators))


def dare_ties_merge(deltas, weights, density, generators) -> torch.Tensor:
    stacked = torch.stack([w * dare_drop(d, density, g) for d, w, g in zip(deltas, weights, generators)])
    return disjoint_mean(stacked, elect_sign(stacked))


def module_generator(seed: int, identity: str, index: int) -> torch.Generator:
    """Per (seed, module, input) generator: a module's random draw does not depend on which other
    modules or files are in the merge, or on their order."""
    digest = hashlib.sha256(f"{seed}\0{identity}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------- block weights
def parse_block_weights(text: str | None) -> list[tuple[str, float]]:
    """``"unet:*down_blocks_0*=0.5, te1:=0"`` → [(pattern, weight), …].

    A pattern with ``*``/``?`` is a glob on a module's labels (identity ``component:flat_name``, its key
    as written, its model key); otherwise a substring.  The last matching rule wins.
    """
    rules = []
    for item in (text or "").replace(";", ",").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        pattern, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not pattern.strip() or not math.isfinite(weight):
            raise MergeError(f"block_weights: cannot read {item!r}; expected PATTERN=WEIGHT, "
                             "e.g. 'down_blocks_0=0.5, te1:=0'")
        rules.append((pattern.strip(), weight))
    return rules


def block_factor(rules: list[tuple[str, float]], labels: list[str]) -> float:
    factor = 1.0
    for pattern, weight in rules:
        glob = any(c in pattern for c in "*?[")
        if any(fnmatch.fnmatchcase(l, pattern) if glob else pattern in l for l in labels):
            factor = weight
    return factor


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class LoraInput:
    """One LoRA to merge: its parsed modules, weight and provenance."""
    name: str
    parsed: ParsedLora
    weight: float = 1.0
    sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    te_weight: float | None = None  # weight of text-encoder modules (None: same as ``weight``)

    @classmethod
    def from_file(cls, path: str | os.PathLike, weight: float = 1.0, name: str | None = None,
                  te_weight: float | None = None, allow_nonfinite: bool = False) -> "LoraInput":
        """Read and parse one LoRA; LoraFileError (naming the file and tensor) if its tensors cannot be a
        LoRA or hold NaN/inf (unless ``allow_nonfinite``)."""
        data = load_lora_file(path)
        label = name or data.path.name
        try:
            parsed = parse_state_dict(data.tensors, f"LoRA file '{label}'", allow_nonfinite=allow_nonfinite)
        except ValueError as e:
            raise LoraFileError(str(e)) from None
        return cls(label, parsed, float(weight), data.sha256, data.metadata,
                   None if te_weight is None else float(te_weight))

    def weight_for(self, name: ModuleName) -> float:
        """Per-LoRA weight of one module: text-encoder modules use ``te_weight`` when given (the
        model/clip strength pair of a LORA_STACK)."""
        if self.te_weight is not None and name.component.startswith("te"):
            return self.te_weight
        return self.weight


@dataclass
class MergedModule:
    identity: str
    key: str
    up: torch.Tensor
    down: torch.Tensor
    sources: list[tuple[int, int]]  # (input index, input rank)
    energy: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class MergeResult:
    modules: list[MergedModule]
    inputs: list[LoraInput]
    recipe: dict
    notes: list[str]
    unmatched: list[str]  # modules that match no layer of the given model (resolve mode)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for m in self.modules:
            sd.update(module_state_dict(m.key, m.up, m.down, m.rank))  # alpha = rank ⇒ scale 1
        return sd

    @property
    def skipped(self) -> dict[str, dict[str, str]]:
        return {inp.name: inp.parsed.skipped for inp in self.inputs if inp.parsed.skipped}

    @property
    def energies(self) -> dict[str, float]:
        return {m.identity: m.energy for m in self.modules if m.energy is not None}

    def metadata(self, output_name: str | None = None) -> dict[str, str]:
        """safetensors metadata: ``ss_*`` fields all inputs agree on, the new network shape, the recipe."""
        meta: dict[str, str] = {}
        if self.inputs:
            common = set.intersection(*(set(i.metadata) for i in self.inputs))
            for k in sorted(common):
                values = {i.metadata[k] for i in self.inputs}
                if k.startswith("ss_") and k not in NON_INHERITED_SS and len(values) == 1:
                    meta[k] = values.pop()
        ranks = [m.rank for m in self.modules] or [0]
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                     "ss_network_alpha": str(max(ranks)), RECIPE_KEY: json.dumps(self.recipe, sort_keys=True)})
        if output_name:
            meta["ss_output_name"] = output_name
        return meta

    def report(self, max_skipped: int = 30) -> str:
        r = self.recipe
        size = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        lines = [f"LoRA merge: method={r['method']} rank={r['rank'] or 'auto'}"
                 + (f" density={r['density']}" if r['method'] in ('ties', 'dare', 'dare_ties') else "")
                 + (f" seed={r['seed']}" if r['method'] in ('dare', 'dare_ties') else "")
                 + f" -> {len(self.modules)} modules, {size / 2**20:.2f} MiB ({r['dtype']})", "inputs:"]
        for i, (inp, rec) in enumerate(zip(self.inputs, r["inputs"]), 1):
            ranks = sorted({m.rank for m in inp.parsed.modules.values()})
            lines.append(f"  [{i}] {inp.name}  weight {inp.weight:g}  modules {len(inp.parsed.modules)}  "
                         f"ranks {ranks}  format {rec['formats']}  sha256 {(inp.sha256 or '-')[:12]}")
        if self.energies:
            e = self.energies
            worst = min(e, key=e.get)
            lines.append(f"retained energy: mean {sum(e.values()) / len(e):.4f}  min {e[worst]:.4f} ({worst})")
        partial = sum(1 for m in self.modules if len(m.sources) < len(self.inputs))
        if partial:
            lines.append(f"{partial} modules are present in only some inputs (merged from those)")
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} modules match no layer of the given model "
                         f"(kept in the file; ComfyUI will not load them): " + ", ".join(self.unmatched[:10])
                         + (" ..." if len(self.unmatched) > 10 else ""))
        for name, skipped in self.skipped.items():
            lines.append(f"NOT MERGED from {name}: {len(skipped)} keys")
            for k, why in list(skipped.items())[:max_skipped]:
                lines.append(f"    {k}: {why}")
            if len(skipped) > max_skipped:
                lines.append(f"    ... and {len(skipped) - max_skipped} more")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("modules:")
        for m in self.modules:
            src = " + ".join(f"[{i + 1}]r{r_}" for i, r_ in m.sources)
            energy = f"  energy {m.energy:.4f}" if m.energy is not None else ""
            lines.append(f"  {m.key}  rank {m.rank} <- {src}{energy}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- merge
Resolver = Callable[[ModuleName], "str | None"]


def _group_modules(inputs: list[LoraInput], resolve: Resolver | None, notes: list[str]):
    """{group id: (target key or None, [(input index, module)])} in first-seen order."""
    groups: dict[str, tuple[str | None, list[tuple[int, LoraModule]]]] = {}
    for i, inp in enumerate(inputs):
        for identity, module in inp.parsed.modules.items():
            target = resolve(module.name) if resolve else None
            target, members = groups.setdefault(target or identity, (target, []))
            if any(j == i for j, _ in members):
                notes.append(f"{inp.name}: {module.name.key} names the same layer as another of its modules; "
                             "only the first was merged (ComfyUI would also load only one)")
                continue
            members.append((i, module))
    if resolve is None:
        schemes = {}
        for _, members in groups.values():
            for i, m in members:
                if (s := formats.unet_naming_scheme(m.name)):
                    schemes.setdefault(s, inputs[i].name)
        if len(schemes) > 1:
            raise MergeError(
                "the inputs name UNet layers in two schemes (diffusers 'down_blocks…' in "
                f"{schemes['diffusers']}, LDM 'input_blocks…' in {schemes['ldm']}); without the model the "
                "same layer cannot be matched across them. Merge in ComfyUI (the LoRA Merge node resolves "
                "names against the loaded model) or convert one file first.")
    return groups


def _merge_module(method: str, members, weights: list[float], target_rank: int, seed: int, density: float,
                  names: list[ModuleName], device) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(B, A, retained energy or None) of one module's merge."""
    if method == "concat":
        return (*concat_factors([m.factors(device) for _, m in members], weights), None)
    if method == "svd":
        return svd_from_factors(*concat_factors([m.factors(device) for _, m in members], weights), target_rank)
    deltas = [m.delta(device) for _, m in members]
    if method == "arithmetic":
        combined = sum(w * d for d, w in zip(deltas, weights))
    elif method == "ties":
        combined = ties_merge(deltas, weights, density)
    else:
        gens = [module_generator(seed, names[0].identity, i) for i, _ in members]
        combined = (dare_merge if method == "dare" else dare_ties_merge)(deltas, weights, density, gens)
    del deltas
    return svd_dense(combined, target_rank)


def merge_loras(inputs: list[LoraInput], method: str = "concat", rank: int = 0, *, seed: int = 0,
                density: float = 0.5, block_weights: str = "", resolve: Resolver | None = None,
                key_format: str = "auto", dtype: str = "fp16", device=None,
                progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge LoRAs module by module (see the module docstring for the methods).

    resolve: optional ``ModuleName -> output key`` (the ComfyUI node maps every spelling to the model's
    own layer and writes ComfyUI-native keys); modules it returns None for are kept under their own
    spelling and listed in ``MergeResult.unmatched``.
    """
    if method not in METHODS:
        raise MergeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not inputs:
        raise MergeError("no LoRAs to merge: the stack is empty")
    if not isinstance(rank, int) or rank < 0:
        raise MergeError(f"rank must be an integer >= 0 (0 = sum of input ranks); got {rank!r}")
    if method in ("ties", "dare", "dare_ties") and not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1] for {method}; got {density}")
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for inp in inputs:
        if not all(math.isfinite(w) for w in (inp.weight, inp.te_weight or 0.0)):
            raise MergeError(f"weight of {inp.name} is not a finite number")
    rules = parse_block_weights(block_weights)
    notes: list[str] = []
    if method == "concat" and rank:
        notes.append(f"concat is exact and keeps rank = sum of input ranks; rank={rank} ignored "
                     "(use svd to compress)")
    groups = _group_modules(inputs, resolve, notes)
    out_dtype = DTYPES[dtype]
    merged: list[MergedModule] = []
    unmatched: list[str] = []
    for n_done, (gid, (target, members)) in enumerate(groups.items()):
        names = [m.name for _, m in members]
        shapes = {m.weight_shape for _, m in members}
        if len(shapes) > 1:
            detail = ", ".join(f"{inputs[i].name} {m.weight_shape}" for i, m in members)
            raise MergeError(f"module {names[0].identity}: the LoRAs patch different weight shapes ({detail}) "
                             "— are they for different base models?")
        shape = shapes.pop()
        labels = [gid, *(n.identity for n in names), *(n.key for n in names)]
        factor = block_factor(rules, labels)
        weights = [inputs[i].weight_for(m.name) * factor for i, m in members]
        if all(w == 0 for w in weights):
            notes.append(f"{names[0].key}: total weight 0, not written")
            continue
        input_ranks = [m.rank for _, m in members]
        target_rank = rank or sum(input_ranks)
        try:
            b, a, energy = _merge_module(method, members, weights, target_rank, seed, density, names, device)
        except torch.linalg.LinAlgError as e:
            sources = ", ".join(inputs[i].name for i, _ in members)
            raise MergeError(f"module {names[0].key} (from {sources}): the SVD of method {method} failed "
                             f"({str(e).splitlines()[0]}); its factors hold NaN/inf or extreme values — fix or drop "
                             "that LoRA, or use method concat (exact, no SVD)") from None
        k = b.shape[1]
        finite = bool(torch.isfinite(b).all() and torch.isfinite(a).all())
        up = b.reshape(shape[0], k, *([1] * (len(shape) - 2))).to("cpu", out_dtype)
        down = a.reshape(k, *shape[1:]).to("cpu", out_dtype)
        if finite and not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise MergeError(f"module {names[0].key}: the merged factors overflow {dtype} (weights too large?); "
                             "use dtype fp32 or bf16, or smaller weights")
        if target:
            key = target
        else:
            key, note = output_key(names, key_format)
            if note:
                notes.append(note)
            if resolve is not None:
                unmatched.append(key)
        merged.append(MergedModule(names[0].identity, key, up, down,
                                   [(i, m.rank) for i, m in members], energy))
        if progress:
            progress(n_done + 1, len(groups))
    keys = [m.key for m in merged]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise MergeError(f"two different modules would be written under the same key: {dupes[:5]}")
    recipe = {
        "method": method, "rank": rank, "seed": seed, "density": density, "block_weights": block_weights or "",
        "key_format": "comfyui-native (resolved against the model)" if resolve else key_format, "dtype": dtype,
        "inputs": [{"name": inp.name, "sha256": inp.sha256, "weight": inp.weight, "te_weight": inp.te_weight,
                    "formats": dict(inp.parsed.schemes), "modules": len(inp.parsed.modules),
                    "skipped_keys": len(inp.parsed.skipped)} for inp in inputs],
        "tool": "comfy-poe lora merge",
    }
    return MergeResult(merged, inputs, recipe, notes, unmatched)


def save_merge(result: MergeResult, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a merge atomically; refuses to replace a file comfy-poe did not write unless ``overwrite``."""
    path = Path(path)
    if not result.modules:
        raise MergeError("the merge produced no modules (all weights 0 or no LoRA modules in the inputs); "
                         "nothing written")
    check_overwrite(path, overwrite)
    atomic_write_safetensors(path, result.state_dict(), result.metadata(path.stem))
    return str(path)
