"""LoRA file safety: corrupted / truncated / pickle inputs, atomic writes, confined save names, metadata, CLI."""
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_poe.lora import io as lora_io
from comfy_poe.lora.__main__ import main as cli_main
from comfy_poe.lora.io import LoraFileError, load_lora_file, resolve_save_path
from comfy_poe.lora.merge import LoraInput, merge_loras, save_merge



def small_lora(path, seed, rank, metadata=None, prefix="lora_unet_double_blocks_0_img_attn_qkv"):
    g = torch.Generator().manual_seed(seed)
    save_file({f"{prefix}.lora_down.weight": torch.randn(rank, 48, generator=g),
               f"{prefix}.lora_up.weight": torch.randn(64, rank, generator=g),
               f"{prefix}.alpha": torch.tensor(float(rank) / 2)}, str(path), metadata=metadata)
    return path


def test_truncated_corrupted_and_pickle_files_fail_clearly(tmp_path):
    good = small_lora(tmp_path / "good.safetensors", 0, 8)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors.*truncated"):
        load_lora_file(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:40])
    with pytest.raises(LoraFileError, match=r"head\.safetensors.*truncated"):
        load_lora_file(tmp_path / "head.safetensors")
    bad = bytearray(data)
    bad[8:20] = b"\xff" * 12
    (tmp_path / "garbage.safetensors").write_bytes(bytes(bad))
    with pytest.raises(LoraFileError, match=r"garbage\.safetensors.*corrupted"):
        load_lora_file(tmp_path / "garbage.safetensors")
    torch.save({"x": torch.ones(2)}, tmp_path / "model.safetensors")   # a pickle with the wrong extension
    with pytest.raises(LoraFileError, match="pickle"):
        load_lora_file(tmp_path / "model.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(LoraFileError, match="refused"):
        load_lora_file(tmp_path / "old.ckpt")


def test_valid_file_whose_header_length_looks_like_pickle_magic(tmp_path):
    """A 640-byte header starts the file with 80 02 — also pickle protocol 2's opcode; still valid."""
    header = json.dumps({"lora_unet_x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}).encode()
    blob = struct.pack("<Q", 640) + header.ljust(640, b" ") + struct.pack("<f", 3.0)
    assert blob[:2] == b"\x80\x02"
    (tmp_path / "x.safetensors").write_bytes(blob)
    assert float(load_lora_file(tmp_path / "x.safetensors").tensors["lora_unet_x.alpha"]) == 3.0


def test_cli_on_truncated_input_errors_and_writes_nothing(tmp_path, capsys):
    a = small_lora(tmp_path / "a.safetensors", 0, 8)
    b = small_lora(tmp_path / "b.safetensors", 1, 4)
    b.write_bytes(b.read_bytes()[:-10])
    out = tmp_path / "out" / "merged.safetensors"
    assert cli_main(["merge", f"{a}:1.0", f"{b}:0.5", "--out", str(out)]) == 2
    assert "b.safetensors" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../evil", "sub/../../evil", "/etc/passwd", "C:/Windows/x", "..\\..\\x",
                                  "~/x", "", "  ", "a/..", "nul\x00byte"])
def test_save_name_traversal_refused(tmp_path, name):
    with pytest.raises(LoraFileError):
        resolve_save_path(tmp_path, name)


def test_save_name_sanitised_and_confined(tmp_path):
    assert resolve_save_path(tmp_path, "merged") == Path(os.path.realpath(tmp_path)) / "merged.safetensors"
    p = resolve_save_path(tmp_path, "poe/my merge:v2?.safetensors")
    assert p == Path(os.path.realpath(tmp_path)) / "poe" / "my merge_v2_.safetensors"
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(LoraFileError, match="outside"):
        resolve_save_path(tmp_path, "link/x")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(lora_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        lora_io.atomic_write_safetensors(target, {"x": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_only_own_files(tmp_path):
    a = small_lora(tmp_path / "a.safetensors", 0, 8)
    result = merge_loras([LoraInput.from_file(a)], "concat")
    foreign = small_lora(tmp_path / "foreign.safetensors", 5, 2)
    before = foreign.read_bytes()
    with pytest.raises(LoraFileError, match="not written by a comfy-poe merge"):
        save_merge(result, foreign)
    assert foreign.read_bytes() == before
    own = tmp_path / "own.safetensors"
    save_merge(result, own)
    save_merge(merge_loras([LoraInput.from_file(a, 0.5)], "concat"), own)   # replacing our own output is fine
    # the trainers' save node asks for its own metadata key: a merge output is not a trainer's file
    with pytest.raises(LoraFileError, match="not written by a comfy-poe trainer"):
        lora_io.check_overwrite(own, False, key="comfy_poe.training", writer="trainer")
    lora_io.atomic_write_safetensors(foreign, {"x": torch.ones(3)}, {"comfy_poe.training": "{}"})
    lora_io.check_overwrite(foreign, False, key="comfy_poe.training", writer="trainer")
    lora_io.check_overwrite(foreign, True)  # overwrite=True always passes
    save_merge(result, foreign, overwrite=True)


def test_metadata_records_recipe_and_keeps_common_ss_fields(tmp_path):
    common = {"ss_base_model_version": "sd_v1", "ss_resolution": "(512, 512)", "ss_network_dim": "8"}
    a = small_lora(tmp_path / "a.safetensors", 0, 8, {**common, "ss_output_name": "a", "ss_seed": "1"})
    b = small_lora(tmp_path / "b.safetensors", 1, 4, {**common, "ss_output_name": "b", "ss_seed": "2"})
    result = merge_loras([LoraInput.from_file(a, 1.0), LoraInput.from_file(b, 0.25)], "svd", 6)
    out = tmp_path / "m.safetensors"
    save_merge(result, out)
    meta = load_lora_file(out).metadata
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_resolution"] == "(512, 512)"
    assert "ss_seed" not in meta                      # differs between inputs
    assert meta["ss_network_dim"] == "6" and meta["ss_output_name"] == "m"
    recipe = json.loads(meta[lora_io.RECIPE_KEY])
    assert recipe["method"] == "svd" and recipe["rank"] == 6
    assert [(i["name"], i["weight"], i["sha256"]) for i in recipe["inputs"]] == [
        ("a.safetensors", 1.0, hashlib.sha256(a.read_bytes()).hexdigest()),
        ("b.safetensors", 0.25, hashlib.sha256(b.read_bytes()).hexdigest())]


def test_cli_merge_and_inspect_end_to_end(tmp_path):
    a = small_lora(tmp_path / "a.safetensors", 0, 64)
    b = small_lora(tmp_path / "b.safetensors", 1, 32)
    out = tmp_path / "merged.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "comfy_poe.lora", "merge", f"{a}:1.0", f"{b}:0.5",
                          "--method", "svd", "--rank", "16", "--dtype", "fp32", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "retained energy" in run.stdout and "rank 16" in run.stdout
    sd = load_lora_file(out).tensors
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (64, 16) and up.dtype == torch.float32
    run_inspect = subprocess.run([sys.executable, "-m", "comfy_poe.lora", "inspect", str(out), "--json"],
                                       capture_output=True, text=True, env=env, timeout=120)
    assert run_inspect.returncode == 0, run_inspect.stderr
    (info,) = json.loads(run_inspect.stdout)
    assert info["modules"] == 1 and info["ranks"] == {"16": 1} and info["formats"] == {"kohya": 1}
