"""SELMA engine: ROUGE-L and pool deduplication, the self-instruct prompt loop (fake and real tiny LLMs),
safe LLM folder loading, and the resumable skill dataset folder."""
from __future__ import annotations

import json
import random
import time

import pytest
import torch

from comfy_poe.experts import DiscriminativeExpert
from comfy_poe.experts.vlm import VLMFolderError
from comfy_poe.selma import RougePool, deduplicate, lcs_length, list_presets, load_preset, rouge_l, tokenize
from comfy_poe.selma.dataset import (DatasetError, SkillDataset, build_dataset, image_to_png_bytes, item_seed,
                                     load_png)
from comfy_poe.selma.presets import PresetError, SkillPreset, override, preset_from_dict
from comfy_poe.selma.prompts import (LLMGenerator, build_instruction, check_llm_folder, generate_skill_prompts,
                                     load_llm, mentioned_counts, parse_numbered, read_prompt_file, rule_violation,
                                     save_prompts)

# --------------------------------------------------------------------------------------- ROUGE-L


def dp_lcs(a, b):
    """Textbook O(mn) dynamic programme (Cormen et al. §15.4), the reference for the bit-parallel LCS."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_tokenize_matches_rouge_score_rules():
    assert tokenize("Two Cats, on-the  SOFA!") == ["two", "cats", "on", "the", "sofa"]
    assert tokenize("3 apples & 2 pears") == ["3", "apples", "2", "pears"]
    assert tokenize("Café crème") == ["caf", "cr", "me"]  # non-ASCII letters are separators in rouge_score
    assert tokenize("...") == []


@pytest.mark.parametrize("a, b, expected", [
    # [a cat on a mat] vs [the cat sat on the mat]: LCS "cat on mat" = 3, P = 3/5, R = 3/6
    ("a cat on a mat", "the cat sat on the mat", 2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6)),
    ("Two Cats, on-the SOFA!", "two cats on the sofa", 1.0),
    # word order matters: LCS of the swapped halves is 2 of 6 tokens
    ("red ball left of blue box", "blue box left of red ball", 2 / 6),
    # repeated tokens: LCS([a a a b], [a b a]) = 2 -> P = 2/4, R = 2/3
    ("a a a b", "a b a", 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),
    ("a dog", "the sky", 0.0),
    ("", "a cat", 0.0),
    ("!!!", "", 0.0),
])
def test_rouge_l_equals_hand_computed_lcs_f1(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(b, a) == pytest.approx(expected, abs=1e-12)


def test_bit_parallel_lcs_equals_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        alphabet = rng.randint(1, 6)
        a = [rng.randrange(alphabet) for _ in range(rng.randint(0, 90))]  # > 64 tokens: multi-word integers
        b = [rng.randrange(alphabet) for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == dp_lcs(a, b)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS example


def test_pool_best_match_equals_brute_force_despite_pruning():
    rng = random.Random(1)
    words = "a red blue cat dog on under the table two three big small house tree car".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(120)]
    pool = RougePool(threshold=0.8)
    for t in texts[:80]:
        pool.add(t)
    for t in texts[80:]:
        match = pool.best_match(t)
        brute = max(rouge_l(t, p) for p in texts[:80])
        assert match.score == pytest.approx(brute, abs=1e-12)
        assert rouge_l(t, match.text) == pytest.approx(brute, abs=1e-12)


def test_dedup_rejects_near_duplicates_and_keeps_distinct_prompts():
    seeds = ["Two red apples and one green pear on a wooden kitchen table."]
    candidates = [
        "Two red apples and one green pear on a wooden table.",        # 11 of 12 tokens shared: F1 = 22/23
        "two red apples AND one green pear, on a wooden kitchen table!",  # same tokens: F1 = 1
        "A cat sleeping on a windowsill in the sun.",                   # distinct
        "Three ducks swimming in a pond next to a small boat.",         # distinct
        "Three ducks swimming in a pond next to a little boat.",        # near-duplicate of the kept one above
        "a b c d e",
        "a b c d f",   # F1 = 0.8 exactly (4 of 5): kept, only strictly greater is a duplicate
    ]
    assert rouge_l(candidates[0], seeds[0]) == pytest.approx(22 / 23)
    assert rouge_l(candidates[5], candidates[6]) == pytest.approx(0.8)
    kept = deduplicate(candidates, threshold=0.8, pool=seeds)
    assert kept == [candidates[2], candidates[3], candidates[5], candidates[6]]
    # a stricter threshold also drops the 0.8 pair
    assert deduplicate(candidates[5:], threshold=0.79) == [candidates[5]]
    with pytest.raises(ValueError, match="threshold"):
        RougePool(threshold=1.5)


def test_dedup_scales_to_a_thousand_prompt_pool():
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.sample(vocab, 15)) for _ in range(1000)]
    t0 = time.perf_counter()
    kept = deduplicate(texts + [texts[10] + " again"], threshold=0.8)
    elapsed = time.perf_counter() - t0
    assert kept == texts, "distinct random prompts are all kept; the appended near-copy is rejected"
    print(f"dedup of 1001 prompts against a growing pool: {elapsed:.2f} s")


# --------------------------------------------------------------------------------------- parsing and rules


def test_parse_numbered_lines():
    answer = ('Sure! Here are more:\n4. Two cats on a sofa.\n5) "Three birds on a wire."\n'
              "   6.   A dog under a table.  \nnot numbered\n7.\n8. **One red kite.**\n")
    assert parse_numbered(answer) == ["Two cats on a sofa.", "Three birds on a wire.", "A dog under a table.",
                                      "One red kite."]


def test_rules_length_and_counts():
    count = load_preset("count")
    assert count.max_count == 3 and count.require_count and count.max_words == 30
    assert mentioned_counts("Two cats and 3 dogs, a pair of shoes") == [2, 3, 2]
    assert rule_violation("Two cats and one dog on a red sofa.", count) is None
    assert rule_violation("Four cats on a red sofa.", count) == "count_too_large"
    assert rule_violation("12 eggs in a basket.", count) == "count_too_large"
    assert rule_violation("A cat on a red sofa.", count) == "no_count"
    assert rule_violation("Two cats.", count) == "too_short"
    assert rule_violation(" ".join(["two"] + ["cats"] * 28), count) is None        # 29 words: < 30
    assert rule_violation(" ".join(["two"] + ["cats"] * 29), count) == "too_long"  # 30 words
    long = load_preset("long_prompts")
    assert long.max_words == 50
    assert rule_violation(" ".join(["word"] * 45), long) is None


def test_presets_ship_valid_seeds_and_are_editable(tmp_path):
    assert set(list_presets()) >= {"count", "spatial", "text_rendering", "long_prompts", "commonsense_defying"}
    for name in list_presets():
        preset = load_preset(name)
        assert len(preset.examples) >= 3 and preset.description and preset.rules
        for example in preset.examples:
            assert rule_violation(example, preset) is None, (name, example)
        assert deduplicate(preset.examples) == list(preset.examples), "seed examples are not near-duplicates"
    # a user folder overrides a shipped preset and adds new ones
    (tmp_path / "count.json").write_text(json.dumps({"description": "mine", "examples": ["One cat on a mat."]}))
    (tmp_path / "colour.json").write_text(json.dumps({"description": "colours", "examples": ["A red cup."],
                                                      "max_words": 20}))
    assert load_preset("count", extra_dirs=[tmp_path]).description == "mine"
    assert "colour" in list_presets(extra_dirs=[tmp_path])
    (tmp_path / "bad.json").write_text(json.dumps({"description": "x", "examples": "not a list"}))
    with pytest.raises(PresetError, match="examples"):
        load_preset("bad", extra_dirs=[tmp_path])
    with pytest.raises(PresetError, match="min_words"):
        preset_from_dict({"description": "x", "examples": ["a b c"], "max_words": 3, "min_words": 3})
    with pytest.raises(PresetError, match="not found"):
        load_preset("nope")
    edited = override(load_preset("spatial"), rules="- Only animals.\n- Use left or right.", examples="")
    assert edited.rules == ("Only animals.", "Use left or right.") and edited.examples == load_preset("spatial").examples
    custom = override(None, description="Food on plates", examples="1. A pie on a plate.\n2. Two eggs in a pan.")
    assert custom.name == "custom" and custom.examples == ("A pie on a plate.", "Two eggs in a pan.")
    with pytest.raises(PresetError, match="seed example"):
        override(None, description="Food")


# --------------------------------------------------------------------------------------- self-instruct loop


class ScriptedLLM:
    """A deterministic fake LLM: returns the scripted answers in order and records every request."""

    uses_chat = True

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, text):
        self.requests.append(text)
        return self.answers[(len(self.requests) - 1) % len(self.answers)]


def shown_examples(request: str) -> list[str]:
    return parse_numbered(request.split("List of image descriptions:")[1])


def test_prompt_loop_parses_filters_and_dedups_exactly():
    preset = load_preset("count")
    llm = ScriptedLLM([
        "Here you go:\n4. Two dogs playing with one ball in a park.\n"
        "5. Two dogs playing with one ball in the park.\n"          # near-duplicate of 4 (same answer)
        "6. Five cats on a roof.\n"                                 # more than 3
        "7. A lonely tree on a hill at night.\n"                    # no count
        "8. Two red apples and one green pear on a wooden kitchen table.\n",  # copy of a seed
        "4. One boat and two swans on a calm lake at dawn.\n5. " + "two " + "words " * 40 + "\n"
        "6. Three lanterns hanging above one small wooden door.\n",
    ])
    run = generate_skill_prompts(preset, llm, target=3, seed=0)
    assert run.prompts == ["Two dogs playing with one ball in a park.", "One boat and two swans on a calm lake at dawn.",
                           "Three lanterns hanging above one small wooden door."]
    assert run.attempts == 2 and run.candidates == 8
    assert run.rejected == {"near_duplicate": 2, "count_too_large": 1, "no_count": 1, "too_long": 1}
    assert all(r.rouge_max <= 0.8 for r in run.records)


def test_prompt_loop_examples_come_from_the_growing_pool_and_are_seeded():
    preset = load_preset("spatial")
    fresh = ["A lamp behind a green sofa.", "A bird above a red roof.", "A shoe under an oak bed.",
             "A vase inside a glass cabinet.", "A kite over two tall trees.", "A mug right of a laptop.",
             "A fox beside a snowy fence.", "A boat below an old bridge."]
    fresh = [f"4. {text}" for text in fresh]
    answers = [fresh[i] for i in range(len(fresh))]  # one new prompt per request
    llm = ScriptedLLM(answers)
    run = generate_skill_prompts(preset, llm, target=8, seed=3, n_examples=3)
    assert len(run.prompts) == 8 and run.attempts == 8
    pool = list(preset.examples)
    saw_generated = False
    for request, accepted in zip(llm.requests, run.prompts):
        shown = shown_examples(request)
        assert len(shown) == 3 and len(set(shown)) == 3
        assert set(shown) <= set(pool), "in-context examples come from seeds + accepted prompts so far"
        saw_generated |= bool(set(shown) - set(preset.examples))
        assert request.rstrip().endswith("4."), "the request ends where the list continues"
        pool.append(accepted)
    assert saw_generated, "accepted prompts are drawn as examples later on"
    again = ScriptedLLM(answers)
    generate_skill_prompts(preset, again, target=8, seed=3)
    other = ScriptedLLM(answers)
    generate_skill_prompts(preset, other, target=8, seed=4)
    assert again.requests == llm.requests and other.requests != llm.requests


def test_prompt_loop_stops_at_max_attempts_and_saves_files(tmp_path):
    preset = load_preset("spatial")
    llm = ScriptedLLM(["4. A cup on top of a red book on a desk.\n"])  # always the same answer
    run = generate_skill_prompts(preset, llm, target=5, seed=0, max_attempts=4)
    assert run.prompts == ["A cup on top of a red book on a desk."] and run.attempts == 4
    assert run.rejected == {"near_duplicate": 3}
    txt, jsonl = save_prompts(run, tmp_path / "out" / "spatial")
    assert txt.read_text() == "A cup on top of a red book on a desk.\n"
    assert read_prompt_file(txt) == run.prompts == read_prompt_file(jsonl)
    meta = json.loads(jsonl.read_text().splitlines()[0])["meta"]
    assert meta["attempts"] == 4 and meta["rejected"] == {"near_duplicate": 3}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "no temp files left"
    with pytest.raises(ValueError, match="count"):
        generate_skill_prompts(preset, llm, target=0)


def test_completion_models_get_the_list_number_back():
    preset = load_preset("spatial")
    llm = ScriptedLLM([" A lamp behind a green sofa in a room.\n5. A bird above a red roof at noon.\n"])
    llm.uses_chat = False  # a plain completion model continues after "4."
    run = generate_skill_prompts(preset, llm, target=2, seed=0)
    assert run.prompts == ["A lamp behind a green sofa in a room.", "A bird above a red roof at noon."]


# --------------------------------------------------------------------------------------- tiny local LLM

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_SKILL = SkillPreset(name="tiny", description="Animals on furniture.", rules=("Be short.",),
                         examples=("A cat on a chair.", "A dog under a bed.", "A bird on a lamp."), max_words=12)
# What the programmed tiny LLM answers: one added token per line, so the answer is a fixed chain.
TINY_ANSWER = ["4. Two frogs on a sofa.\n", "5. Two small frogs on a sofa.\n", "6. A fox under a desk.\n"]


def build_tiny_llm(folder, answer_lines=None, seed: int = 0):
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained in-process, saved with
    save_pretrained (safetensors), random weights.

    With ``answer_lines`` the weights are programmed instead of trained: attention and MLP outputs are
    zeroed, so the hidden state is the current token's embedding and the model is a bigram table, and the
    output rows chain "end of the chat prompt" → line 1 → line 2 → … → end-of-text (each line is one
    added token), with logit margins so large that sampling at temperature 1 follows the chain.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [build_instruction(TINY_SKILL, list(TINY_SKILL.examples), 20), "user assistant"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    if answer_lines:
        fast.add_tokens([AddedToken(line, normalized=False) for line in answer_lines])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if answer_lines:
        prompt_end = fast.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)[-1]
        chain = [prompt_end] + fast.convert_tokens_to_ids(list(answer_lines)) + [fast.eos_token_id]
        assert len(set(chain[:-1])) == len(chain) - 1, "each step of the chain needs its own token"
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            emb = model.model.embed_tokens.weight
            for prev, nxt in zip(chain, chain[1:]):
                model.lm_head.weight[nxt] = 20.0 * emb[prev] / emb[prev].norm()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def programmed_llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny_llama", TINY_ANSWER)


def test_tiny_llm_writes_prompts_end_to_end(programmed_llm, tmp_path):
    assert not list(programmed_llm.glob("*.bin")) and list(programmed_llm.glob("*.safetensors"))
    bundle = load_llm(programmed_llm)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    llm = LLMGenerator(bundle, seed=0, max_new_tokens=48)  # temperature 1.0, chat template of the folder
    assert llm.uses_chat and llm.temperature == 1.0
    assert llm(build_instruction(TINY_SKILL, list(TINY_SKILL.examples), 20)) == "".join(TINY_ANSWER)
    run = generate_skill_prompts(TINY_SKILL, llm, target=2, seed=0, max_attempts=3)
    assert run.prompts == ["Two frogs on a sofa.", "A fox under a desk."], run.summary()
    assert run.rejected == {"near_duplicate": 1} and run.attempts == 1
    txt, _ = save_prompts(run, tmp_path / "tiny")
    assert read_prompt_file(txt) == run.prompts


def test_sampling_loop_matches_transformers_greedy_generate(tmp_path):
    folder = build_tiny_llm(tmp_path / "random_llama")
    bundle = load_llm(folder)
    prompt = build_instruction(TINY_SKILL, list(TINY_SKILL.examples), 5)
    ours = LLMGenerator(bundle, temperature=0.0, max_new_tokens=16, chat=False)
    ids = ours.encode(prompt)
    reference = bundle.model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                      eos_token_id=None, pad_token_id=bundle.tokenizer.pad_token_id)
    expected = bundle.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    ours.eos = set()  # compare all 16 tokens, as generate() with eos disabled
    assert ours(prompt) == expected
    seeded = [LLMGenerator(bundle, seed=s, max_new_tokens=24)(prompt) for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]


def test_unsafe_or_wrong_llm_folders_are_refused(tmp_path):
    good = build_tiny_llm(tmp_path / "llm")
    with pytest.raises(VLMFolderError, match="does not exist"):
        load_llm(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(VLMFolderError, match="pickle"):
        check_llm_folder(pickled)
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((good / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    (remote / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(VLMFolderError, match="trust_remote_code"):
        load_llm(remote)
    vision = tmp_path / "clip"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (vision / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(VLMFolderError, match="causal LM"):
        check_llm_folder(vision)
    assert check_llm_folder(good)["model_type"] == "llama"


# --------------------------------------------------------------------------------------- dataset folder


def seeded_images(prompts, seeds, size=8):
    """Fake generator: each image depends only on its seed (like a sampler with per-item noise)."""
    return torch.stack([torch.rand(size, size, 3, generator=torch.Generator().manual_seed(s)) for s in seeds])


def quantised(image):
    return torch.round(image.clamp(0, 1) * 255) / 255


PROMPTS = ["Two cats on a sofa.", "A red cup left of a blue plate.", "Three birds on a wire.",
           "A sign that reads \"Open\".", "One dog under a table."]


def test_dataset_round_trip(tmp_path):
    root = tmp_path / "ds"
    report = build_dataset(root, PROMPTS, seeded_images, seed=11, images_per_prompt=2, batch_size=3)
    assert (report.generated, report.accepted, report.skipped) == (10, 10, 0)
    ds = SkillDataset(root, create=False)
    assert [r.index for r in ds.records] == list(range(10))
    assert [r.key for r in ds.records] == [(p, k) for p in PROMPTS for k in range(2)]
    for record in ds.records:
        assert record.seed == item_seed(11, record.prompt, record.sample)
        expected = quantised(seeded_images([record.prompt], [record.seed])[0])
        assert torch.allclose(ds.load_image(record), expected, atol=1e-6)
        assert (root / record.caption).read_text(encoding="utf-8") == record.prompt + "\n"
    assert [c for _, c in ds.pairs()] == [p for p in PROMPTS for _ in range(2)]
    assert len(ds.info["runs"]) == 1 and ds.info["runs"][0]["seed"] == 11
    assert not [p for p in root.rglob(".*")], "no temp files left"
    # PNG round trip of one image is exact at 8 bits
    png = tmp_path / "x.png"
    png.write_bytes(image_to_png_bytes(expected))
    assert torch.equal(load_png(png), expected)


def test_dataset_resumes_after_an_interruption_without_duplicates(tmp_path):
    calls = {"n": 0}

    def flaky(prompts, seeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("interrupted")
        return seeded_images(prompts, seeds)

    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_dataset(root, PROMPTS, flaky, seed=5, images_per_prompt=2, batch_size=2)
    partial = SkillDataset(root, create=False)
    assert len(partial.records) == 4 and len(list((root / "images").glob("*.png"))) == 4
    report = build_dataset(root, PROMPTS, seeded_images, seed=5, images_per_prompt=2, batch_size=2)
    assert report.skipped == 4 and report.generated == 6
    resumed = SkillDataset(root, create=False)
    keys = [r.key for r in resumed.records]
    assert len(keys) == len(set(keys)) == 10 and [r.index for r in resumed.records] == list(range(10))
    assert sorted(p.name for p in (root / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(10)]
    # identical to an uninterrupted run with another batch size (seeds depend on (seed, prompt, sample) only)
    build_dataset(tmp_path / "ref", PROMPTS, seeded_images, seed=5, images_per_prompt=2, batch_size=4)
    ref = SkillDataset(tmp_path / "ref", create=False)
    by_key = {r.key: r for r in ref.records}
    for record in resumed.records:
        assert torch.equal(resumed.load_image(record), ref.load_image(by_key[record.key]))
    # a third run has nothing to do; extending adds only what is new
    assert build_dataset(root, PROMPTS, seeded_images, seed=5, images_per_prompt=2).generated == 0
    more = build_dataset(root, PROMPTS + ["A kite above a house."], seeded_images, seed=5, images_per_prompt=3)
    assert more.generated == 5 + 3 and len(SkillDataset(root).records) == 18
    assert len(SkillDataset(root).info["runs"]) == 4


def test_dataset_torn_manifest_line_is_dropped_and_damage_is_reported(tmp_path):
    root = tmp_path / "ds"
    build_dataset(root, PROMPTS[:2], seeded_images)
    manifest = root / "manifest.jsonl"
    good = manifest.read_bytes()
    manifest.write_bytes(good + b'{"index": 2, "prompt": "Thr')  # a crash mid-append
    ds = SkillDataset(root)
    assert len(ds.records) == 2 and manifest.read_bytes() == good
    build_dataset(root, PROMPTS[:3], seeded_images)
    assert [r.index for r in SkillDataset(root).records] == [0, 1, 2]
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], "{broken", lines[2]]) + "\n")
    with pytest.raises(DatasetError, match="manifest.jsonl:2"):
        SkillDataset(root)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a SELMA dataset"):
        build_dataset(foreign, PROMPTS, seeded_images)
    with pytest.raises(DatasetError, match="expected an IMAGE batch"):
        build_dataset(tmp_path / "bad", PROMPTS, lambda p, s: torch.zeros(1, 8, 8, 3), batch_size=2)
    with pytest.raises(ValueError, match="prompts"):
        build_dataset(tmp_path / "empty", ["  ", ""], seeded_images)


def test_dataset_judge_filter_keeps_images_above_threshold(tmp_path):
    def brightness(images):
        return images.mean(dim=(1, 2, 3)).log()

    judge = DiscriminativeExpert(brightness, weight=2.0, space="pixel", name="bright")

    def graded(prompts, seeds):  # image i is uniformly grey at a level set by its seed
        return torch.stack([torch.full((4, 4, 3), 0.1 + 0.8 * (s % 1000) / 999) for s in seeds])

    root = tmp_path / "ds"
    threshold = 2.0 * torch.tensor(0.5).log().item()
    report = build_dataset(root, PROMPTS, graded, seed=1, images_per_prompt=4, judges=[judge], threshold=threshold)
    ds = SkillDataset(root)
    assert report.generated == 20 and 0 < report.accepted < 20
    for record in ds.records:
        level = 0.1 + 0.8 * (record.seed % 1000) / 999
        assert record.score == pytest.approx(2.0 * torch.tensor(level, dtype=torch.float32).log().item(), abs=1e-5)
        assert record.accepted == (record.score >= threshold)
        assert (record.image is not None) == record.accepted
    assert len(list((root / "images").glob("*.png"))) == report.accepted == len(ds.pairs())
    # scores without a threshold are stored, everything kept
    report = build_dataset(tmp_path / "all", PROMPTS, graded, judges=[judge])
    assert report.accepted == 5 and all(r.score is not None for r in SkillDataset(tmp_path / "all").records)
    with pytest.raises(ValueError, match="no judges"):
        build_dataset(tmp_path / "x", PROMPTS, graded, threshold=0.0)
    latent = DiscriminativeExpert(brightness, space="latent", name="lat")
    with pytest.raises(ValueError, match="pixel"):
        build_dataset(tmp_path / "y", PROMPTS, graded, judges=[latent])
