"""The diffusers trainer (python -m comfy_poe.training) on a tiny random SD 1.x folder built from configs:
config validation, a 2-process (torchrun, gloo) run equals the 1-process run with the same global batch, resume
after an interrupted run reproduces the uninterrupted run, every method trains, the LoRA keys are kohya UNet
keys over the model's own layers, and the engine adapter's x̂0 matches the diffusers ε-prediction."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_tiny import build_pairs, build_tiny_sd  # noqa: E402

from comfy_poe.training.launch import parse_config, read_config, run  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_sd(root / "model")
    build_pairs(root / "pairs", n=4, size=16)
    return root


def write_config(root: Path, name: str, **changes) -> Path:
    cfg = {"method": "mapo", "model": "model", "pairs": "pairs", "output": f"out_{name}", "resolution": 16,
           "lora": {"rank": 2, "alpha": 2, "targets": "attention"},
           "loop": {"steps": 3, "lr": 1e-3, "seed": 1, "checkpoint_every": 1}, "preference": {"batch_size": 4}}
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def lora(root: Path, name: str) -> dict:
    return load_file(str(root / f"out_{name}" / "lora.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_config_validation(tmp_path):
    good = {"method": "MaPO", "model": "m", "pairs": "p", "output": "o"}
    config = parse_config(good, tmp_path)
    assert config.method == "mapo" and config.model == str(tmp_path / "m") and config.preference.loop.steps == 100
    with pytest.raises(ValueError, match="unknown key.*colour"):
        parse_config({**good, "colour": 1}, tmp_path)
    with pytest.raises(ValueError, match=r"config \[loop\]: unknown key\(s\) stepz"):
        parse_config({**good, "loop": {"stepz": 3}}, tmp_path)
    with pytest.raises(ValueError, match="needs prompt"):
        parse_config({"method": "dual-process", "model": "m", "output": "o", "resolution": 8}, tmp_path)
    with pytest.raises(ValueError, match=r"\[judge\]: kind must be one of brightness, pickscore"):
        parse_config({"method": "dual-process", "model": "m", "output": "o", "resolution": 8, "prompt": "x",
                      "judge": "jpeg"}, tmp_path)
    with pytest.raises(ValueError, match="do not apply to selma"):
        parse_config({**good, "method": "selma", "dataset": "d"}, tmp_path)
    selma = parse_config({"method": "selma", "model": "m", "output": "o", "dataset": "d", "preset": "tiny",
                          "selma": {"steps": 9}}, tmp_path)
    assert selma.selma.rank == 8 and selma.selma.steps == 9 and selma.dataset == str(tmp_path / "d")
    with pytest.raises(ValueError, match="needs prompts"):
        parse_config({"method": "dag-kl", "model": "m", "output": "o", "resolution": 8}, tmp_path)
    with pytest.raises(ValueError, match="pairs belong to mapo"):
        parse_config({**good, "method": "ddpo", "prompts": ["x"], "resolution": 8}, tmp_path)
    with pytest.raises(ValueError, match="DAG-KL uses leave-one-out advantages"):
        parse_config({"method": "DAG-KL", "model": "m", "output": "o", "resolution": 8, "prompts": ["x"],
                      "rollout": {"batch_size": 1}}, tmp_path)
    rollout = parse_config({"method": "ddpo", "model": "m", "output": "o", "resolution": 8, "prompts": ["x"]}, tmp_path)
    assert rollout.rollout.loop.lr == 3e-4 and rollout.rollout.loop.weight_decay == 1e-4  # the method's defaults
    assert config.preference.loop.lr == 1e-5 and config.preference.loop.weight_decay == 1e-2
    with pytest.raises(ValueError, match="needs pairs"):
        parse_config({**good, "pairs": ""}, tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_config({**good, "dtype": "fp8"}, tmp_path)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        parse_config({**good, "preference": {"batch_size": 0}}, tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text('method = "sft"\nmodel = "m"\npairs = "p"\noutput = "o"\n[loop]\nsteps = 7\n')
    assert parse_config(read_config(toml), tmp_path).preference.loop.steps == 7
    with pytest.raises(ValueError, match="use a .toml or .json"):
        read_config(tmp_path / "run.yaml")


def test_adapter_matches_diffusers_eps(tiny):
    from comfy_poe.training.diffusers_model import load_diffusers_sd

    model = load_diffusers_sd(tiny / "model")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    sigma = model.train_sigmas[t]
    cond = model.encode_prompt("a red square")
    with torch.no_grad():
        denoised = model.denoise(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, [cond])[0]
        abar = 1 / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        z = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # DDPM's q(z_t | x0)
        eps_hat = model.unet(z, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample
    assert torch.equal(model.timesteps(sigma), t)
    torch.testing.assert_close(denoised, x0 + sigma.view(-1, 1, 1, 1) * (eps - eps_hat), rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launcher(kind: str) -> list:
    """The command prefix that starts 2 CPU ranks (gloo). accelerate's GPU launcher (``--multi_gpu``) is
    torch.distributed.run underneath and runs on a machine without GPUs; ``accelerate launch --cpu`` would
    start one process (accelerate's multi-CPU mode goes through MPI)."""
    port = str(_free_port())
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", port]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one(tiny, launcher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not (tiny / "out_one" / "lora.safetensors").exists():
        one = subprocess.run([sys.executable, "-m", "comfy_poe.training", "--config", str(write_config(tiny, "one"))],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        assert "(1 process(es), 3 steps" in one.stdout
    name = f"two_{launcher}"
    two = subprocess.run([*two_process_launcher(launcher), "-m", "comfy_poe.training", "--config",
                          str(write_config(tiny, name))], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 process(es), 3 steps" in two.stdout
    a, b = lora(tiny, "one"), lora(tiny, name)
    moved = max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_up.weight"))
    assert moved > 1e-3  # the LoRA trained (up starts at 0)
    assert max_diff(a, b) < 1e-5  # float summation order only
    history = [json.loads((tiny / f"out_{n}" / "state.json").read_text())["history"] for n in ("one", name)]
    for r1, r2 in zip(*history):  # the recorded loss and grad norm are the whole batch's
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    assert sorted(os.listdir(tiny / f"out_{name}")) == ["lora.safetensors", "state-3.safetensors", "state.json"]


def test_resume_after_interrupt_reproduces_uninterrupted(tiny):
    run(parse_config(read_config(write_config(tiny, "full", loop={"steps": 4})), tiny), log=lambda *a, **k: None)
    # "interrupted" after step 2: the folder holds the step-2 checkpoint; the same run asked for 4 steps resumes
    run(parse_config(read_config(write_config(tiny, "cut", loop={"steps": 2})), tiny), log=lambda *a, **k: None)
    assert json.loads((tiny / "out_cut" / "state.json").read_text())["step"] == 2
    result = run(parse_config(read_config(write_config(tiny, "cut", loop={"steps": 4})), tiny),
                 log=lambda *a, **k: None)
    assert result.resumed_from == 2
    assert max_diff(lora(tiny, "full"), lora(tiny, "cut")) == 0.0  # bitwise, same process layout
    with pytest.raises(ValueError, match="made with other settings"):
        run(parse_config(read_config(write_config(tiny, "cut", loop={"steps": 5, "lr": 2e-3})), tiny),
            log=lambda *a, **k: None)


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_other_preference_methods_train(tiny, method):
    result = run(parse_config(read_config(write_config(tiny, method, method=method, loop={"steps": 2})), tiny),
                 log=lambda *a, **k: None)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    sd = lora(tiny, method)
    assert all(k.startswith("lora_unet_") for k in sd)
    from comfy_poe.training.diffusers_model import load_diffusers_sd

    layers = {name.replace(".", "_") for name, _ in load_diffusers_sd(tiny / "model").unet.named_modules()}
    assert {k[len("lora_unet_"):].split(".")[0] for k in sd} <= layers


def write_rollout_config(root: Path, name: str, method: str) -> Path:
    cfg = {"method": method, "model": "model", "output": f"out_{name}", "resolution": 8,
           "prompts": ["a red square", "a blue circle"], "reward": "brightness", "sampling_steps": 2,
           "lora": {"rank": 2, "alpha": 2, "targets": "attention"}, "loop": {"steps": 2, "seed": 3},
           "rollout": {"batch_size": 2, "flow_channels": [8, 16], "flow_emb_dim": 16, "reward_exp": 10.0}}
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("method", ["dag-kl", "dag-db", "ddpo"])
def test_rollouts_two_processes_equal_one(tiny, method):
    """Each rank samples its own chains (the rows of the one-process batch) and the batch statistics
    (DAG-KL's leave-one-out, DDPO's standardisation) are taken over all ranks' chains."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "comfy_poe.training", "--config",
                          str(write_rollout_config(tiny, f"{method}_one", method))],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "comfy_poe.training", "--config", str(write_rollout_config(tiny, f"{method}_two", method))],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = lora(tiny, f"{method}_one"), lora(tiny, f"{method}_two")
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_up.weight")) > 1e-5
    print(method, "2 processes vs 1: LoRA max |difference|", max_diff(a, b))
    assert max_diff(a, b) < 1e-5
    history = [json.loads((tiny / f"out_{method}_{n}" / "state.json").read_text())["history"] for n in ("one", "two")]
    for r1, r2 in zip(*history):
        assert r1["reward"] == pytest.approx(r2["reward"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)


def test_selma_two_processes_equal_one(tiny):
    from comfy_poe.selma.dataset import SkillDataset

    if not (tiny / "skill").exists():
        data = SkillDataset(tiny / "skill")
        g = torch.Generator().manual_seed(5)
        for i in range(4):
            data.append(["a red square", "a blue circle"][i % 2], i, i, torch.rand(16, 16, 3, generator=g), True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outputs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port())])):
        cfg = {"method": "selma", "model": "model", "dataset": "skill", "output": f"out_selma_{name}", "preset": "tiny",
               "selma": {"rank": 2, "alpha": 2, "steps": 2, "batch_size": 4, "micro_batch": 1, "lr": 1e-3,
                         "eval_samples": 0, "seed": 2}}
        (tiny / f"selma_{name}.json").write_text(json.dumps(cfg))
        command = [sys.executable, *launcher, "-m", "comfy_poe.training", "--config", str(tiny / f"selma_{name}.json")]
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = lora(tiny, f"selma_{name}")
    a, b = outputs["one"], outputs["two"]
    assert all(k.startswith("lora_unet_") for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_up.weight")) > 1e-4
    assert max_diff(a, b) < 1e-5


def test_dual_process_two_processes_equal_one(tiny):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outputs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port())])):
        cfg = {"method": "dual-process", "model": "model", "output": f"out_dp_{name}", "resolution": 8,
               "prompt": "a red square", "judge": "brightness", "sampling_steps": 2, "cfg": 2.0,
               "lora": {"rank": 2, "alpha": 2, "targets": "attention"}, "loop": {"steps": 2, "lr": 1e-3, "seed": 4},
               "dual_process": {"batch_size": 2, "noise_pool": 4, "pixel_range": "clamp"}}
        (tiny / f"dp_{name}.json").write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, *launcher, "-m", "comfy_poe.training", "--config",
                               str(tiny / f"dp_{name}.json")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = lora(tiny, f"dp_{name}")
    a, b = outputs["one"], outputs["two"]
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_up.weight")) > 1e-4
    assert max_diff(a, b) < 1e-5
