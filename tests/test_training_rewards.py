"""Rewards and judges with weights in the diffusers trainer (python -m comfy_poe.training), on tiny random models
built from configs: the [reward] / judge config is checked before any model loads, a rollout run records the
reward model's score of its own chains (against each chain's prompt), Dual-Process backpropagates a tiny VLM's
answer likelihood (and a reward model's score) through the VAE decoder into the LoRA, and a 2-process DAG-KL run
with a reward model equals the 1-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reward_tiny  # noqa: E402
from diffusers_tiny import build_tiny_sd  # noqa: E402
from test_training_diffusers import _free_port  # noqa: E402

from comfy_poe.training.launch import main, parse_config, read_config, run  # noqa: E402
from comfy_poe.training.rewards import JudgeSpec  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a blue circle", "a red square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from comfy_poe.experts.reward import convert_reward

    root = tmp_path_factory.mktemp("tiny_judges")
    build_tiny_sd(root / "model")
    reward_tiny.build_clip(root / "pickscore", seed=0)
    pth, base = reward_tiny.build_aesthetic(root / "src")
    with pytest.warns(UserWarning, match="pickle"):
        convert_reward("aesthetic", pth, root / "aesthetic", base=base, allow_pickle=True)
    reward_tiny.vlm_tiny.build_tiny_vlm("qwen2_vl", root / "vlm")
    return root


def rollout_config(method="ddpo", **changes) -> dict:
    cfg = {"method": method, "model": "model", "output": "out", "resolution": 8, "prompts": PROMPTS,
           "reward": {"kind": "pickscore", "path": "pickscore"}, "sampling_steps": 2,
           "lora": {"rank": 2, "alpha": 2, "targets": "attention"}, "loop": {"steps": 1, "seed": 3},
           "rollout": {"batch_size": 2, "flow_channels": [8, 16], "flow_emb_dim": 16, "reward_exp": 1.0}}
    cfg.update(changes)
    return cfg


def dual_process_config(judge, **changes) -> dict:
    cfg = {"method": "dual-process", "model": "model", "output": "out_dp", "resolution": 8, "prompt": "a red square",
           "judge": judge, "sampling_steps": 2, "lora": {"rank": 2, "alpha": 2, "targets": "attention"},
           "loop": {"steps": 3, "lr": 1e-2, "seed": 4},
           "dual_process": {"batch_size": 1, "noise_pool": 1, "pixel_range": "clamp"}}
    cfg.update(changes)
    return cfg


def test_reward_config_is_checked_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    config = parse_config(rollout_config(), tiny)
    assert config.reward == (JudgeSpec("pickscore", path=str(tiny / "pickscore")),)
    # the string form still works and keeps its fingerprint (old checkpoints resume)
    config = parse_config(rollout_config(reward="jpeg_compressibility"), tiny)
    assert config.reward == (JudgeSpec("jpeg-compressibility"),) and config.reward[0].fingerprint() == "jpeg-compressibility"
    several = parse_config(rollout_config(reward=[{"kind": "aesthetic", "path": "aesthetic", "weight": 0.5},
                                                  {"kind": "brightness", "weight": 2}]), tiny)
    assert [(s.kind, s.weight) for s in several.reward] == [("aesthetic", 0.5), ("brightness", 2.0)]
    clip = parse_config(rollout_config(reward={"kind": "clip", "path": "pickscore", "negatives": ["a blur", " "]}), tiny)
    assert clip.reward[0].negatives == ("a blur",) and clip.reward[0].prompt == ""
    vlm = parse_config(rollout_config(reward={"kind": "vlm", "path": "vlm", "question": "Is it {prompt}?"}), tiny)
    assert vlm.reward[0].questions == "Is it {prompt}? | Yes | 1" and vlm.reward[0].mode == "yes_no"
    bad = {
        "missing": ({"kind": "pickscore", "path": "nowhere"}, r"\[reward\] \(kind pickscore\).*nowhere.*does not exist"),
        "no path": ({"kind": "imagereward"}, r"kind imagereward needs path"),
        "wrong kind": ({"kind": "imagereward", "path": "aesthetic"},
                       r"kind is imagereward, but the folder .*aesthetic' holds a aesthetic model"),
        "hps alias": ({"kind": "HPS", "path": "pickscore"}, r"kind is hpsv2, but the folder .* holds a pickscore model"),
        "unknown kind": ({"kind": "clipscore", "path": "x"}, r"kind must be one of brightness.*vlm, clip, got 'clipscore'"),
        "unknown key": ({"kind": "pickscore", "path": "pickscore", "questoin": "x"}, r"unknown key\(s\) questoin"),
        "vlm on a reward folder": ({"kind": "vlm", "path": "aesthetic", "question": "x"},
                                   r"\(kind vlm\).*model_type 'clip', which is not supported"),
        "vlm without question": ({"kind": "vlm", "path": "vlm"}, r"\(kind vlm\): questions: write at least one"),
        "vlm no alternative": ({"kind": "vlm", "path": "vlm", "question": "Colour?", "answer": "red"},
                               r"no alternative answer.*mode = 'dual_process'"),
        "question to a reward model": ({"kind": "pickscore", "path": "pickscore", "question": "x"},
                                       r"question do not apply to kind pickscore"),
        "prompt to a vlm": ({"kind": "vlm", "path": "vlm", "prompt": "x"}, r"prompt do not apply to kind vlm"),
        "clip on a vlm folder": ({"kind": "clip", "path": "vlm", "prompt": "x"},
                                 r"\(kind clip\): CLIP model folder .* has model_type 'qwen2_vl'"),
        "clip negatives": ({"kind": "clip", "path": "pickscore", "negatives": [1]}, r"negatives must be a list of str"),
        "weight": ({"kind": "pickscore", "path": "pickscore", "weight": "heavy"}, r"weight must be a number"),
        "model-free with a path": ({"kind": "brightness", "path": "x"}, r"path do not apply to the model-free"),
    }
    for name, (reward, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_config(rollout_config(reward=reward), tiny)
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save({"w": torch.zeros(1)}, pickles / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"pickle checkpoint.*convert-reward"):
        parse_config(rollout_config(reward={"kind": "imagereward", "path": str(pickles)}), tiny)
    # Dual-Process: the judge must be differentiable; the VLM's default mode is the paper's loss
    with pytest.raises(ValueError, match=r"\[judge\]: kind must be one of brightness, pickscore.*not differentiable"):
        parse_config(dual_process_config("jpeg-compressibility"), tiny)
    dp = parse_config(dual_process_config({"kind": "vlm", "path": "vlm", "question": "Is there a cat?", "answer": "yes"}),
                      tiny)
    assert dp.judge[0].mode == "dual_process" and dp.judge[0].questions == "Is there a cat? | yes | 1"
    # the TOML spellings of docs/scale_out.md: an inline judge table, [[reward]] tables; paths from the config's folder
    (tiny / "dp.toml").write_text('method = "dual-process"\nmodel = "model"\noutput = "o"\nresolution = 8\n'
                                  'prompt = "a cat"\njudge = {kind = "vlm", path = "vlm", question = "Is there a cat?", '
                                  'answer = "Yes"}\n')
    assert parse_config(read_config(tiny / "dp.toml"), tiny).judge[0].path == str(tiny / "vlm")
    (tiny / "ddpo.toml").write_text('method = "ddpo"\nmodel = "model"\noutput = "o"\nresolution = 8\nprompts = ["a"]\n'
                                    '[[reward]]\nkind = "imagereward"\npath = "nowhere"\n'
                                    '[[reward]]\nkind = "brightness"\n')
    with pytest.raises(ValueError, match=r"config \[reward #1\] \(kind imagereward\).*nowhere"):
        parse_config(read_config(tiny / "ddpo.toml"), tiny)
    import comfy_poe.experts.reward
    import comfy_poe.experts.vlm
    import comfy_poe.training.diffusers_model

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for module, name in ((comfy_poe.training.diffusers_model, "load_diffusers_sd"),
                         (comfy_poe.experts.reward, "load_reward_model"), (comfy_poe.experts.vlm, "load_vlm")):
        monkeypatch.setattr(module, name, no_loading)
    assert main(["--config", str(tiny / "ddpo.toml")]) == 2  # the command line: exit 2, the message, nothing written
    assert "error: config [reward #1] (kind imagereward)" in capsys.readouterr().err and not (tiny / "o").exists()


def test_rollout_records_the_reward_models_score_of_its_chains(tiny):
    from comfy_poe.experts.reward import load_reward_model
    from comfy_poe.training.alignment import ROLLOUT_STREAM
    from comfy_poe.training.diffusers_model import load_diffusers_sd
    from comfy_poe.training.loop import step_generator
    from comfy_poe.training.rollout import Policy, rollout

    cfg = rollout_config(output="out_ddpo_pickscore")
    result = run(parse_config(cfg, tiny), log=lambda *a, **k: None)
    recorded = result.history[0]["reward"]
    lora = load_file(str(tiny / "out_ddpo_pickscore" / "lora.safetensors"))
    assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith("lora_up.weight")) > 1e-5
    # step 1 samples with the LoRA still at zero: the base model's chains, scored against step 1's prompt
    model = load_diffusers_sd(tiny / "model")
    policy = Policy(model, model.sampling_sigmas(2), (4, 4, 4), negative=model.encode_prompt(""))
    traj = rollout(policy, model.encode_prompt(PROMPTS[0]), 2, step_generator(3, 1, ROLLOUT_STREAM))
    scorer = load_reward_model(tiny / "pickscore")
    with torch.no_grad():
        images = model.decode_latents(traj.final)
        right, wrong = (float(scorer.score(images, [p] * 2).mean()) for p in PROMPTS)
    print("PickScore of step 1's chains: recorded", recorded, "own prompt", right, "other prompt", wrong)
    assert recorded == pytest.approx(right, rel=1e-5, abs=1e-6)
    assert abs(right - wrong) > 1e-3  # the prompt matters, so the check above tells which prompt was used


def test_vlm_reward_asks_about_each_chains_prompt(tiny):
    from comfy_poe.training.rewards import JudgeLoader

    spec = parse_config(rollout_config(reward={"kind": "vlm", "path": "vlm", "question": "Does it show {prompt}?"}),
                        tiny).reward
    judge = JudgeLoader(spec).judges("a cat | a dog")[0].fn  # the prompt's text is kept whole, '|' included
    assert [(q.text, q.answer, q.opposite) for q in judge.questions] == [("Does it show a cat | a dog?", "Yes", "No")]
    result = run(parse_config(rollout_config(output="out_ddpo_vlm", reward={"kind": "vlm", "path": "vlm",
                                                                           "question": "Does it show {prompt}?"}),
                              tiny), log=lambda *a, **k: None)
    reward = result.history[0]["reward"]
    print("yes_no VLM reward of step 1", reward)
    assert -20 < reward < 0  # log p(Yes) normalised against No: a log-probability
    lora = load_file(str(tiny / "out_ddpo_vlm" / "lora.safetensors"))
    assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith("lora_up.weight")) > 1e-5


@pytest.mark.parametrize("judge", [
    {"kind": "vlm", "path": "vlm", "question": "Is there a cat in the image?", "answer": "Yes"},
    {"kind": "pickscore", "path": "pickscore"},
    {"kind": "clip", "path": "pickscore", "negatives": ["a blurry photo"]},
], ids=["vlm", "pickscore", "clip"])
def test_dual_process_backpropagates_the_judge_into_the_lora(tiny, judge):
    name = f"out_dp_{judge['kind']}"
    result = run(parse_config(dual_process_config(judge, output=name), tiny), log=lambda *a, **k: None)
    history = result.history
    print(judge["kind"], "dual-process", [(round(r["loss"], 4), round(r["grad_norm"], 6)) for r in history])
    assert len(history) == 3
    assert all(r["grad_norm"] > 1e-8 for r in history)  # the judge's gradient reached the LoRA every step
    assert all(abs(r["loss"] + r["score"]) < 1e-5 for r in history)  # loss = −score (batch of 1)
    # one fixed noise, fixed seeds: measured 6.047 → 6.035 (VLM), 0.039 → −0.168 (PickScore), transformers 5.25
    assert history[-1]["loss"] < history[0]["loss"]
    lora = load_file(str(tiny / name / "lora.safetensors"))
    assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith("lora_up.weight")) > 1e-5
    state = json.loads((tiny / name / "state.json").read_text())
    assert state["fingerprint"]["judges"] == [judge["kind"]]


def one_and_two_processes(root: Path, name: str, cfg: dict) -> dict:
    """Run ``cfg`` on 1 process and on 2 (torchrun, gloo); check the LoRAs agree; return both histories."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    loras, histories = {}, {}
    for count in (1, 2):
        launcher = [] if count == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        out = f"out_{name}_{count}"
        (root / f"{name}_{count}.json").write_text(json.dumps({**cfg, "output": out}))
        proc = subprocess.run([sys.executable, *launcher, "-m", "comfy_poe.training", "--config",
                               str(root / f"{name}_{count}.json")], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loras[count] = load_file(str(root / out / "lora.safetensors"))
        histories[count] = json.loads((root / out / "state.json").read_text())["history"]
    a, b = loras[1], loras[2]
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_up.weight")) > 1e-5  # it trained
    assert sorted(a) == sorted(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(name, "2 processes vs 1: LoRA max |difference|", diff)
    assert diff < 1e-5  # float summation order only
    return histories


def test_reward_model_two_processes_equal_one(tiny):
    """Each rank loads the reward model and scores its own chains; DAG-KL's lookahead rewards too."""
    cfg = rollout_config("dag-kl", loop={"steps": 2, "seed": 3},
                         reward={"kind": "pickscore", "path": "pickscore", "weight": 0.5})
    histories = one_and_two_processes(tiny, "dagkl_pickscore", cfg)
    for r1, r2 in zip(histories[1], histories[2]):
        assert r1["reward"] == pytest.approx(r2["reward"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)


def test_vlm_dual_process_two_processes_equal_one(tiny):
    """Each rank loads the VLM judge and backpropagates it on its own noises; the averaged gradient gives the
    one-process LoRA (global batch 2, pixel_range clamp)."""
    judge = {"kind": "vlm", "path": "vlm", "question": "Is there a cat in the image?", "answer": "Yes"}
    cfg = dual_process_config(judge, loop={"steps": 2, "lr": 1e-2, "seed": 4},
                              dual_process={"batch_size": 2, "noise_pool": 4, "pixel_range": "clamp"})
    histories = one_and_two_processes(tiny, "dp_vlm", cfg)
    for r1, r2 in zip(histories[1], histories[2]):  # the recorded loss, score and grad norm are the whole batch's
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["score"] == pytest.approx(r2["score"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)
