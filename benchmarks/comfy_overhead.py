"""Overhead of the PoE SMC sampler inside ComfyUI versus a plain KSampler doing the same model work.

    python benchmarks/comfy_overhead.py                                   # tiny checkpoint, own CPU server
    python benchmarks/comfy_overhead.py --server http://127.0.0.1:8188 \\
        --ckpt v1-5-pruned-emaonly.safetensors --width 512 --height 512 --steps 20 --particles 4

Protocol (issue 3). One expert with CFG, so every model call evaluates cond + uncond, exactly like
KSampler with that cfg. Each row compares two prompts that make the same number of model
evaluations on the same checkpoint, size, cfg and scheduler:

  PoE Sample, L particles, S steps, mcmc_steps 0     vs  KSampler (euler_ancestral), batch L, S steps
  PoE Sample, L particles, S steps, mcmc_steps 1     vs  KSampler (euler_ancestral), batch L, 2·S steps
  PoE Combine + PoE SMC Sampler + SamplerCustomAdvanced (mcmc_steps 0)   vs  the first KSampler row

Time = the server's own execution_start → execution_success timestamps from /history (loader and
text encoders are cached; the seed changes every repeat so the sampler always re-runs), median of R
interleaved repeats after one warm-up run of each prompt. For a server on this machine (the default,
or --server-pid) the ComfyUI process's CPU seconds per prompt are reported too: on a shared, busy
CPU they are far less noisy than wall time. The SMC arms' "model calls per particle"
come from the PoE Sample report, to confirm the evaluation counts match. Target: ratio ≤ 1.10.

Without --server the script starts ComfyUI (``COMFY_POE_COMFYUI_DIR`` / ``COMFY_POE_COMFYUI_PYTHON``,
as for the integration tests) on CPU with the tiny random checkpoint: those numbers measure Python
and ComfyUI overhead around a cheap model, not GPU throughput. For GPU numbers start ComfyUI
yourself with this pack installed and pass --server and a real checkpoint.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFTEST = REPO_ROOT / "tests" / "integration" / "conftest.py"
TARGET_RATIO = 1.10


def _pack_module(name: str):
    """A stdlib-only module of the pack root (cli, fileio) by path: this script also runs as a plain file."""
    spec = importlib.util.spec_from_file_location(f"comfy_poe_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli, fileio = _pack_module("cli"), _pack_module("fileio")


def load_harness():
    """The integration tests' ComfyServer and helpers (tests/integration/conftest.py), by path."""
    spec = importlib.util.spec_from_file_location("comfy_poe_integration_harness", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- prompts


def _common(a) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": a.ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": a.prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": a.negative, "clip": ["1", 1]}},
    }


def _latent(a, batch: int) -> dict:
    return {"class_type": "EmptyLatentImage", "inputs": {"width": a.width, "height": a.height, "batch_size": batch}}


def _smc_options(a, mcmc_steps: int) -> dict:
    return {"particles": a.particles, "mcmc_steps": mcmc_steps, "mcmc": "mala", "step_scale": 0.1,
            "fk_correction": "full", "weighting": "incremental", "resampling": "systematic", "ess_threshold": 0.5,
            "selection": "auto", "eta": 1.0, "judge_sigma_max": 1000.0, "judge_sigma_min": 0.0,
            "tempering": "capped", "twist": False, "chunk_size": 0}


def _expert(a) -> dict:
    return {"class_type": "PoEExpert", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "cfg": a.cfg, "weight": 1.0, "feather": 1.0, "name": "bench"}}


def ksampler_prompt(a, steps: int, seed: int) -> dict:
    p = _common(a)
    p["4"] = _latent(a, a.particles)
    p["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
        "steps": steps, "cfg": a.cfg, "sampler_name": "euler_ancestral", "scheduler": a.scheduler, "denoise": 1.0}}
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "poe_bench/ksampler"}}
    return p


def poe_sample_prompt(a, mcmc_steps: int, seed: int) -> dict:
    p = _common(a)
    p["4"] = _latent(a, 1)
    p["5"] = _expert(a)
    p["6"] = {"class_type": "PoESample", "inputs": {
        "experts": ["5", 0], "latent": ["4", 0], "seed": seed, "steps": a.steps, "scheduler": a.scheduler,
        "denoise": 1.0, **_smc_options(a, mcmc_steps)}}
    p["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "poe_bench/poe_sample"}}
    return p


def poe_custom_prompt(a, seed: int) -> dict:
    p = _common(a)
    p["4"] = _latent(a, 1)
    p["5"] = _expert(a)
    p["6"] = {"class_type": "PoECombine", "inputs": {"experts": ["5", 0]}}
    p["7"] = {"class_type": "PoESMCSampler", "inputs": _smc_options(a, 0)}
    p["8"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": a.scheduler,
                                                          "steps": a.steps, "denoise": 1.0}}
    p["9"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    p["10"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["9", 0], "guider": ["6", 0], "sampler": ["7", 0], "sigmas": ["8", 0], "latent_image": ["4", 0]}}
    p["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "poe_bench/poe_custom"}}
    return p


# --------------------------------------------------------------------------- measuring


def execution_seconds(entry: dict) -> float:
    """execution_start → execution_success from the history entry's status messages (ms stamps)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        raise RuntimeError(f"no execution timestamps in {entry['status']}")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def report_calls(entry: dict) -> int | None:
    """'model calls per particle N' from a PoE Sample's report text, if the prompt has one."""
    for out in entry.get("outputs", {}).values():
        for text in out.get("text", []):
            match = re.search(r"model calls per particle (\d+)", str(text))
            if match:
                return int(match.group(1))
    return None


def process_cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU time of a local process (all its threads), from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_once(server, prompt: dict, timeout: float, pid: int | None) -> dict:
    cpu0, t0 = process_cpu_seconds(pid), time.perf_counter()
    entry = server.run(prompt, timeout=timeout)
    wall, cpu1 = time.perf_counter() - t0, process_cpu_seconds(pid)
    return {"exec": execution_seconds(entry), "wall": wall,
            "cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0, "calls": report_calls(entry)}


def measure(server, arms: dict, repeats: int, timeout: float, log, pid: int | None = None) -> dict:
    """Warm up every arm once, then ``repeats`` interleaved rounds; per arm: lists of times and calls."""
    results = {name: {"exec": [], "wall": [], "cpu": [], "calls": None} for name in arms}
    for name, make in arms.items():
        log(f"warm-up {name} ...")
        run_once(server, make(10_000), timeout, pid)
    for r in range(repeats):
        for name, make in arms.items():
            run = run_once(server, make(1 + r), timeout, pid)
            for key in ("exec", "wall", "cpu"):
                if run[key] is not None:
                    results[name][key].append(run[key])
            results[name]["calls"] = run["calls"] if run["calls"] is not None else results[name]["calls"]
            cpu = f", server CPU {run['cpu']:.3f} s" if run["cpu"] is not None else ""
            log(f"round {r + 1}/{repeats} {name}: {run['exec']:.3f} s{cpu}")
    return results


def markdown(a, results: dict, rows: list[tuple[str, str, str, int]], device: str) -> str:
    med = {name: statistics.median(r["exec"]) for name, r in results.items()}
    has_cpu = all(r["cpu"] for r in results.values())
    cpu = {name: statistics.median(r["cpu"]) for name, r in results.items()} if has_cpu else {}
    lines = [
        f"ComfyUI overhead benchmark — checkpoint `{a.ckpt}`, {a.width}×{a.height}, L={a.particles} particles "
        f"(KSampler batch {a.particles}), S={a.steps} steps, cfg {a.cfg}, scheduler {a.scheduler}, "
        f"median of R={a.repeats}, device: {device}",
        "",
        "| comparison | model calls per particle (KSampler / SMC) | KSampler time (s) | SMC time (s) | time ratio"
        + (" | KSampler server CPU (s) | SMC server CPU (s) | CPU ratio" if has_cpu else "") + " |",
        "|---|---|---|---|---|" + ("---|---|---|" if has_cpu else ""),
    ]
    for label, base, smc, base_calls in rows:
        smc_calls = results[smc]["calls"]
        line = (f"| {label} | {base_calls} / {smc_calls if smc_calls is not None else '—'} | {med[base]:.3f} | "
                f"{med[smc]:.3f} | {med[smc] / med[base]:.3f} |")
        if has_cpu:
            line += f" {cpu[base]:.3f} | {cpu[smc]:.3f} | {cpu[smc] / cpu[base]:.3f} |"
        lines.append(line)
    lines += ["", f"Target: ratio ≤ {TARGET_RATIO:.2f}. Time = server execution_start → execution_success; "
                  "server CPU = user+system CPU seconds of the ComfyUI process during the prompt "
                  "(robust to other load on the machine; only for a local server)."]
    lines.append("Per-run execution seconds: " + "; ".join(
        f"{name}: " + ", ".join(f"{s:.3f}" for s in r["exec"]) for name, r in results.items()))
    if has_cpu:
        lines.append("Per-run server CPU seconds: " + "; ".join(
            f"{name}: " + ", ".join(f"{s:.3f}" for s in r["cpu"]) for name, r in results.items()))
    if "cpu" in device.lower():
        lines += ["", "Note: CPU run. With the tiny random checkpoint these numbers measure the Python / "
                      "ComfyUI overhead of the SMC sampler around a cheap model, not GPU throughput; the ratio "
                      "on a real checkpoint on a GPU is what the target is about (use --server and --ckpt)."]
    return "\n".join(lines)


def device_name(server) -> str:
    try:
        stats = server.get_json("/system_stats")
        dev = stats["devices"][0]
        return f"{dev.get('name', '?')} ({dev.get('type', '?')}), torch {stats['system'].get('pytorch_version', '?')}"
    except Exception as err:  # informational only
        return f"unknown ({err})"


# --------------------------------------------------------------------------- server


class RemoteServer:
    """An already running ComfyUI (any device) driven with the harness's HTTP helpers."""

    def __init__(self, harness, url: str):
        self._server = harness.ComfyServer.__new__(harness.ComfyServer)
        self._server.url = url.rstrip("/")
        self._server.client_id = "comfy-poe-benchmark"
        self._server.process = None
        self._server.log_path = Path(os.devnull)

    def __getattr__(self, name):
        return getattr(self._server, name)


def start_local(harness, a):
    comfy_dir = harness._comfy_dir_from_env()
    if comfy_dir is None:
        sys.exit(f"set {harness.COMFY_DIR_ENV} (a ComfyUI checkout; see docs/contributing.md, section Tests) or pass --server URL")
    python = os.environ.get(harness.COMFY_PYTHON_ENV, "").strip() or sys.executable
    custom_nodes = comfy_dir / "custom_nodes"
    link, created = harness.find_pack_link(custom_nodes), None
    if link is None:
        link = custom_nodes / harness.PACK_LINK_NAME
        if link.exists() or link.is_symlink():
            sys.exit(f"{link} exists but is not a link to {harness.REPO_ROOT}")
        link.symlink_to(harness.REPO_ROOT, target_is_directory=True)
        created = link
    work = Path(tempfile.mkdtemp(prefix="comfy_poe_bench_"))
    server = harness.ComfyServer(comfy_dir, python, harness.free_loopback_port(), work, link,
                                 shlex.split(os.environ.get(harness.COMFY_ARGS_ENV, "")))
    server.start(timeout=float(os.environ.get(harness.START_TIMEOUT_ENV, "180")))
    return server, created


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_poe.benchmarks.comfy_overhead",
                                     description=cli.plain_help(__doc__.split("\n\n")[0]))
    parser.add_argument("--server", help="URL of a running ComfyUI with this pack (default: start one on CPU)")
    parser.add_argument("--ckpt", default=None, help="checkpoint name as ComfyUI lists it (default: the tiny one)")
    parser.add_argument("--width", type=cli.multiple_of_8, default=64)
    parser.add_argument("--height", type=cli.multiple_of_8, default=64)
    parser.add_argument("--particles", type=cli.positive_int, default=4, help="L: SMC particles = KSampler batch size")
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="S: noise levels")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="R: timed rounds (median)")
    parser.add_argument("--cfg", type=cli.nonnegative_float, default=5.0)
    parser.add_argument("--scheduler", default="karras")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--negative", default="blurry")
    parser.add_argument("--timeout", type=cli.positive_float, default=900.0, help="seconds per prompt")
    parser.add_argument("--skip-mcmc", action="store_true", help="leave out the mcmc_steps 1 row")
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--server-pid", type=cli.positive_int, help="PID of the --server process, if it runs on this machine: "
                                                      "also report its CPU time per prompt")
    a = parser.parse_args(argv)
    if a.output is not None:
        try:  # before the server starts: the table would be lost after minutes of measuring
            fileio.check_output_file(a.output, "--output")
        except ValueError as e:
            parser.error(str(e))

    harness = load_harness()
    created_link = None
    if a.server:
        server = RemoteServer(harness, a.server)
    else:
        print("starting ComfyUI on CPU ...", file=sys.stderr)
        server, created_link = start_local(harness, a)
    try:
        if a.ckpt is None:
            spec = server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
            names = harness.combo_options(spec)
            if harness.TINY_CHECKPOINT not in names:
                sys.exit(f"no {harness.TINY_CHECKPOINT} on the server; pass --ckpt NAME (one of {names[:10]})")
            a.ckpt = harness.TINY_CHECKPOINT
        arms = {
            "KSampler S": lambda seed: ksampler_prompt(a, a.steps, seed),
            "PoE Sample K=0": lambda seed: poe_sample_prompt(a, 0, seed),
            "PoE SMC via SamplerCustomAdvanced K=0": lambda seed: poe_custom_prompt(a, seed),
        }
        rows = [("PoE Sample (mcmc_steps 0) vs KSampler, S steps", "KSampler S", "PoE Sample K=0", a.steps),
                ("PoE Combine + PoE SMC Sampler + SamplerCustomAdvanced (mcmc_steps 0) vs KSampler, S steps",
                 "KSampler S", "PoE SMC via SamplerCustomAdvanced K=0", a.steps)]
        if not a.skip_mcmc:
            arms["KSampler 2S"] = lambda seed: ksampler_prompt(a, 2 * a.steps, seed)
            arms["PoE Sample K=1"] = lambda seed: poe_sample_prompt(a, 1, seed)
            rows.append(("PoE Sample (mcmc_steps 1) vs KSampler, 2·S steps", "KSampler 2S", "PoE Sample K=1",
                         2 * a.steps))
        pid = a.server_pid if a.server else server.process.pid
        results = measure(server, arms, a.repeats, a.timeout, lambda msg: print(msg, file=sys.stderr, flush=True), pid)
        table = markdown(a, results, rows, device_name(server))
    finally:
        if not a.server:
            server.stop()
        if created_link is not None and created_link.is_symlink():
            created_link.unlink()
    print(table)
    if a.output:
        fileio.atomic_write_text(a.output, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
