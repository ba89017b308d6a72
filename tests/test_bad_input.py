"""Bad input gets a clear error and nothing is written: LoRA merge CLI and engine, output paths, CLI value checks,
help texts (issue 16 part 4). Each case asserts the message names what to change and that no file appeared."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_poe import cli, fileio
from comfy_poe.lora.__main__ import main as lora_main
from comfy_poe.lora.__main__ import parse_input_spec
from comfy_poe.lora.io import LoraFileError
from comfy_poe.lora.merge import LoraInput, MergeError, merge_loras

PREFIX = "lora_unet_double_blocks_0_img_attn_qkv"
ROOT = Path(__file__).resolve().parents[1]


def lora_file(path, seed=0, rank=4, poison=None, alpha=None):
    """A one-module kohya LoRA; ``poison`` = (role, value) puts one NaN/inf into that factor."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"{PREFIX}.lora_down.weight": torch.randn(rank, 48, generator=g),
          f"{PREFIX}.lora_up.weight": torch.randn(64, rank, generator=g),
          f"{PREFIX}.alpha": torch.tensor(float(rank) if alpha is None else alpha)}
    if poison:
        role, value = poison
        sd[f"{PREFIX}.lora_{role}.weight"][0, 1] = value
    save_file(sd, str(path))
    return path


def no_new_files(folder: Path, before: set) -> bool:
    return {p.name for p in folder.iterdir()} == before


# ------------------------------------------------------------------------------------ non-finite tensors
@pytest.mark.parametrize("poison", [("up", float("nan")), ("down", float("inf")), ("alpha", float("nan"))])
def test_nonfinite_factor_or_alpha_refused_naming_file_and_tensor(tmp_path, capsys, poison):
    role, value = poison
    if role == "alpha":
        bad = lora_file(tmp_path / "bad.safetensors", alpha=value)
        tensor = f"{PREFIX}.alpha"
    else:
        bad = lora_file(tmp_path / "bad.safetensors", poison=poison)
        tensor = f"{PREFIX}.lora_{role}.weight"
    good = lora_file(tmp_path / "good.safetensors", seed=1)
    with pytest.raises(LoraFileError, match=rf"bad\.safetensors.*{tensor}.*NaN/inf"):
        LoraInput.from_file(bad)
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "merged.safetensors"
    assert lora_main(["merge", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and tensor in err and "--allow-nonfinite" in err and "Traceback" not in err
    assert no_new_files(tmp_path, before)


def test_allow_nonfinite_opts_in_and_svd_failure_names_the_module(tmp_path, capsys):
    bad = lora_file(tmp_path / "bad.safetensors", poison=("up", float("nan")))
    # the explicit opt-in reads the file; the exact concat merge then carries the NaN (the user asked for it)
    assert lora_main(["merge", str(bad), "--allow-nonfinite", "--out", str(tmp_path / "c.safetensors")]) == 0
    capsys.readouterr()
    # an SVD of a NaN factor fails: an error naming the module and the way out, no traceback, nothing written
    before = {p.name for p in tmp_path.iterdir()}
    for method in ("svd", "ties"):
        rc = lora_main(["merge", str(bad), "--allow-nonfinite", "--method", method,
                        "--out", str(tmp_path / f"{method}.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and PREFIX in err and "SVD" in err and "concat" in err and "Traceback" not in err, err
    assert no_new_files(tmp_path, before)
    with pytest.raises(MergeError, match=rf"module {PREFIX}.*bad\.safetensors.*SVD"):
        merge_loras([LoraInput.from_file(bad, allow_nonfinite=True)], "svd", 2)


def test_inspect_describes_a_damaged_file_instead_of_refusing_it(tmp_path, capsys):
    bad = lora_file(tmp_path / "bad.safetensors", poison=("down", float("nan")))
    assert lora_main(["inspect", str(bad)]) == 0
    assert f"DAMAGED: 1 tensors hold NaN/inf" in capsys.readouterr().out


def test_fp16_overflow_is_an_error_not_an_inf_file(tmp_path, capsys):
    big = lora_file(tmp_path / "big.safetensors")
    before = {p.name for p in tmp_path.iterdir()}
    assert lora_main(["merge", f"{big}:1e6", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "overflow fp16" in capsys.readouterr().err and no_new_files(tmp_path, before)


# ------------------------------------------------------------------------------------ FILE:WEIGHT, --out
def test_file_weight_specs(tmp_path):
    a = lora_file(tmp_path / "a.safetensors")
    assert parse_input_spec(f"{a}:0.5") == (str(a), 0.5)
    assert parse_input_spec(f"{a}:-1") == (str(a), -1.0)
    assert parse_input_spec(str(a)) == (str(a), 1.0)
    odd = lora_file(tmp_path / "odd:name.safetensors")  # a colon inside an existing file name
    assert parse_input_spec(str(odd)) == (str(odd), 1.0)
    for spec in (f"{a}:-x", f"{a}:", f"{a}:nan", f"{a}:inf", "missing.safetensors:abc"):
        with pytest.raises(LoraFileError, match="bad weight"):
            parse_input_spec(spec)


def test_cli_bad_weight_is_not_reported_as_not_found(tmp_path, capsys):
    a = lora_file(tmp_path / "a.safetensors")
    assert lora_main(["merge", f"{a}:-x", "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bad weight '-x'" in err and "not found" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_out_paths_checked_before_any_work(tmp_path, capsys):
    a = lora_file(tmp_path / "a.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    cases = {
        str(tmp_path / "dir.safetensors"): "is a directory",
        str(tmp_path / "a.safetensors" / "m.safetensors"): "is a file, not a folder",
        str(tmp_path / "m.txt"): "must end in .safetensors",
    }
    for out, message in cases.items():
        for extra in ([], ["--force"]):
            assert lora_main(["merge", str(a), "--out", out, *extra]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (out, err)
    # --report under a file, bad --block-weights: refused before the merge (no output file)
    for args, message in ((["--report", str(tmp_path / "a.safetensors" / "r.txt")], "--report"),
                          (["--block-weights", "down_blocks=abc"], "PATTERN=WEIGHT")):
        assert lora_main(["merge", str(a), "--out", str(tmp_path / "m.safetensors"), *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--rank", "-1"], "--rank: must be >= 0"), (["--rank", "two"], "--rank: must be a whole number"),
    (["--density", "0"], "--density: must be a number in (0, 1]"), (["--density", "nan"], "--density"),
])
def test_cli_option_values_are_argparse_errors(tmp_path, capsys, args, message):
    a = lora_file(tmp_path / "a.safetensors")
    with pytest.raises(SystemExit) as exc:
        lora_main(["merge", str(a), "--out", str(tmp_path / "m.safetensors"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_malformed_lora_shapes_are_a_file_error(tmp_path, capsys):
    save_file({f"{PREFIX}.lora_down.weight": torch.randn(4, 48), f"{PREFIX}.lora_up.weight": torch.randn(64, 3)},
              str(tmp_path / "bad.safetensors"))
    assert lora_main(["merge", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "do not form a LoRA" in capsys.readouterr().err
    assert lora_main(["inspect", str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ shared checks
def test_output_path_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(fileio.OutputPathError, match="is a directory"):
        fileio.check_output_file(tmp_path / "d")
    with pytest.raises(fileio.OutputPathError, match="is a file, not a folder"):
        fileio.check_output_file(tmp_path / "f" / "deeper" / "x.bin")
    with pytest.raises(fileio.OutputPathError, match="existing file"):
        fileio.check_output_dir(tmp_path / "f")
    with pytest.raises(fileio.OutputPathError, match="is a file, not a folder"):
        fileio.check_output_dir(tmp_path / "f" / "sub")
    assert fileio.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert fileio.check_output_file(tmp_path / "d" / "x.bin") == tmp_path / "d" / "x.bin"
    assert not (tmp_path / "new").exists()  # a check creates nothing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(fileio.OutputPathError, match="not writable"):
            fileio.check_output_file(locked / "x.safetensors")
        with pytest.raises(fileio.OutputPathError, match="not writable"):
            fileio.check_output_dir(locked / "out")
    finally:
        locked.chmod(0o700)


def test_cli_value_checks_say_what_to_change():
    assert cli.positive_int("3") == 3 and cli.fraction("1") == 1.0 and cli.seed("0") == 0
    for parse, text, message in ((cli.positive_int, "0", ">= 1"), (cli.positive_int, "x", "whole number"),
                                 (cli.positive_float, "inf", "finite"), (cli.fraction, "1.5", r"\(0, 1\]"),
                                 (cli.seed, "-1", "from 0"), (cli.int_in(0, 9), "10", "from 0 to 9")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert cli.plain_help("use ``--x`` and :func:`comfy_poe.a.b`") == "use --x and comfy_poe.a.b"


def _help(*cmd: str) -> str:
    env = dict(os.environ, COLUMNS="120")
    done = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_names_the_program_as_invoked_and_has_no_rst():
    text = _help(sys.executable, "-m", "comfy_poe", "--help")
    assert text.startswith("usage: python -m comfy_poe") and "``" not in text
    script = Path(sys.executable).with_name("comfy-poe")
    if script.exists():  # the console script of an installed pack
        text = _help(str(script), "--help")
        assert text.startswith("usage: comfy-poe ") and "``" not in text
        assert _help(str(script), "demo", "--help").startswith("usage: comfy-poe demo")
    assert "``" not in _help(sys.executable, "-m", "comfy_poe.lora", "--help")


@pytest.mark.parametrize("module, args, message", [
    ("benchmarks.digits", ["--samples", "15"], "multiple of the FK-SMC population size"),
    ("benchmarks.digits", ["--threads", "0"], "--threads: must be a whole number >= 1"),
    ("benchmarks.digits", ["--attribute-weight", "nan"], "finite number > 0"),
    ("benchmarks.gmm", ["--budgets", "60", "-5"], "--budgets: must be a whole number >= 1"),
    ("benchmarks.dual_process_digits", ["--classes", "3", "12"], "from 0 to 9"),
    ("benchmarks.selma_digits", ["--sigma-range", "20", "0.05"], "LOW < HIGH"),
    ("benchmarks.selma_digits", ["--lr", "-1"], "--lr: must be a finite number > 0"),
    ("benchmarks.alignment", ["--seeds", "0,-1"], "--seeds: must be a whole number from 0"),
    ("benchmarks.alignment", ["--methods", "ddpo,ppo"], "choose from dag-kl, dag-db, ddpo"),
    ("benchmarks.alignment", ["--fraction", "2"], "--fraction: must be a number in (0, 1]"),
    ("benchmarks.alignment", ["--json", "{file}/rows.json"], "is a file, not a folder"),
    ("benchmarks.alignment", ["--targets", "time_emb_proj$("], "not a valid regular expression"),
    ("benchmarks.alignment", ["--checkpoints", "100"], "positive multiples of --batch"),
    ("digits.train", ["--out", "{file}"], "is an existing file"),
])
def test_benchmark_and_training_clis_refuse_bad_values_before_work(tmp_path, capsys, module, args, message):
    import importlib

    (tmp_path / "file").write_text("x")
    main = importlib.import_module(f"comfy_poe.{module}").main
    with pytest.raises(SystemExit) as exc:
        main([a.format(file=tmp_path / "file") for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and f"python -m comfy_poe.{module}" in err, err


def test_comfy_overhead_options_checked_before_a_server_starts(tmp_path):
    (tmp_path / "file").write_text("x")
    script = ROOT / "benchmarks" / "comfy_overhead.py"
    for args, message in ((["--width", "60"], "multiple of 8"),
                          (["--output", str(tmp_path / "file" / "t.md")], "is a file, not a folder")):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
