"""Concept localisation as the backend encodes prompts: inside Z-Image's chat template,
multi-token words, repeated words, case; shuffling; the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from zerase_core.backends.text_encoders import ChatTemplateEncoder
from zerase_core.errors import ZEraseError
from zerase_core.lora_file import load_lora, save_lora
from zerase_core.merge import merge_exact, rerank
from zerase_core.prompts import concept_token_indices, shuffle_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_encoder():
    """A Qwen3-shaped encoder with a WordPiece tokenizer built offline: 'gogh' splits into sub-tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    vocab = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "photo", "of", "van", "go", "##gh",
             "and", "painting", "by", "red", "ball"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()  # offsets still point into the original text
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    config = Qwen3Config(vocab_size=len(vocab) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    return ChatTemplateEncoder(fast, Qwen3Model(config).eval())


def test_concept_tokens_inside_chat_template(chat_encoder):
    (enc,) = chat_encoder.encode(["A photo of Van Gogh and a painting by van gogh"])
    assert enc.spans[0] is None  # "<|im_start|>" belongs to the template
    hits = concept_token_indices(enc, "van gogh")
    covered = {enc.text[enc.spans[i][0]:enc.spans[i][1]].lower() for i in hits}
    assert covered == {"van", "go", "gh"}  # the multi-token word, all sub-tokens
    assert len(hits) == 6  # both occurrences, whatever the case
    assert all(enc.spans[i] is not None for i in hits)
    assert enc.features.shape == (len(enc.spans), 32)


def test_missing_concept_is_a_clear_error(chat_encoder):
    (enc,) = chat_encoder.encode(["a red ball"])
    with pytest.raises(ZEraseError, match="'gogh' does not occur in the prompt 'a red ball'"):
        concept_token_indices(enc, "gogh")
    with pytest.raises(ZEraseError, match="empty"):
        concept_token_indices(enc, " ")
    assert concept_token_indices(enc, "RED") == [i for i, s in enumerate(enc.spans) if s == (2, 5)]


def test_word_shuffling_keeps_multiword_concepts_whole():
    rng = random.Random(0)
    texts = {shuffle_words("an art in the style of van gogh at night", rng, keep="Van Gogh") for _ in range(20)}
    assert len(texts) > 5
    assert all("van gogh" in t for t in texts)
    words = sorted("an art in the style of V at night".split())
    assert all(sorted(t.replace("van gogh", "V").split()) == words for t in texts)


def _cli(capsys, *args):
    from zerase_core.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_inspect_merge(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "--tiny", "--concept", "red", "--template", "a {} car", "--steps", "3",
                        "--out", str(tmp_path / "a"))
    assert code == 0, err
    lora = str(tmp_path / "a" / "erasure_lora.safetensors")
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0
    code, out, _ = _cli(capsys, "inspect", lora)
    meta = json.loads(out)
    assert meta["concept"] == "red" and meta["training"]["steps_done"] == 3
    merged = str(tmp_path / "merged.safetensors")
    code, out, err = _cli(capsys, "merge", lora, lora, "--weights", "0.5", "0.5", "--rank", "2", "--out", merged)
    assert code == 0, err
    report = json.loads(out)
    # A LoRA merged with itself at 0.5 / 0.5 is itself (rank 4); cut to rank 2 it loses what rank 2 cannot hold.
    expected = rerank(merge_exact([load_lora(lora)] * 2, [0.5, 0.5]), 2)[1].relative_error
    assert report["rank"] == 2 and expected > 0.01 and abs(report["relative_error"] - expected) < 1e-6
    assert load_lora(merged).rank == 2
    code, _, err = _cli(capsys, "merge", lora, lora, "--out", merged)
    assert code == 2 and "exists" in err
    # An ungated file (the §3 ablation), which merge refuses, is shown: its gate says why Apply refuses it.
    ungated = str(tmp_path / "ungated.safetensors")
    save_lora(replace(load_lora(lora), scope="all"), ungated)
    code, out, _ = _cli(capsys, "inspect", ungated)
    assert code == 0 and json.loads(out)["gate"]["kind"] == "all-tokens"
    code, _, err = _cli(capsys, "merge", ungated, lora, "--out", str(tmp_path / "m2.safetensors"))
    assert code == 2 and "was trained without the token gate" in err


def test_cli_train_selects_the_x_t_pool(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "--tiny", "--concept", "red", "--template", "a {} car", "--steps", "2",
                        "--xt-source", "pool", "--xt-pool", "2", "--out", str(tmp_path / "p"))
    assert code == 0, err
    code, out, _ = _cli(capsys, "inspect", str(tmp_path / "p" / "erasure_lora.safetensors"))
    training = json.loads(out)["training"]
    assert training["xt_source"] == "pool" and training["xt_pool"] == 2


def test_module_entry_point_reports_user_errors_without_traceback(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"nonsense")
    done = subprocess.run([sys.executable, "-m", "zerase_core", "inspect", str(tmp_path / "junk.safetensors")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


def test_concepts_are_found_as_whole_words_also_in_scripts_without_spaces():
    """Z-Image reads Chinese; a CJK character is a word character, so "whole word" edges are only checked where
    the phrase meets a spaced script on both sides of the edge."""
    from zerase_core.prompts import EncodedPrompt

    def prompt(text):  # one token per character
        return EncodedPrompt(text, torch.zeros(len(text), 4), tuple((i, i + 1) for i in range(len(text))))

    assert concept_token_indices(prompt("一幅梵高风格的画"), "梵高") == [2, 3]
    assert concept_token_indices(prompt("梵高Van Gogh的画"), "van gogh") == list(range(2, 10))
    assert concept_token_indices(prompt("รูปแมวสีดำ"), "แมว") == [3, 4, 5]  # Thai: no spaces between words
    assert concept_token_indices(prompt("a red_ball, red"), "red") == [12, 13, 14]  # not inside red_ball
    assert concept_token_indices(prompt("a Cabora Bora Bora trip"), "bora bora") == list(range(9, 18))  # overlaps
    with pytest.raises(ZEraseError, match="does not occur"):
        concept_token_indices(prompt("a bored cat"), "red")
    shuffled = shuffle_words("一幅 梵高 风格的画 at night", random.Random(0), keep="梵高")
    assert sorted(shuffled.split()) == sorted(["一幅", "梵高", "风格的画", "at", "night"])


def test_a_concept_alone_warns_that_shuffling_cannot_move_it(caplog):
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import erase_texts

    with caplog.at_level("WARNING", logger="zerase_core.prompt_pool"):
        assert erase_texts(TrainConfig(concept="nude", preset="nsfw")) == ["nude"]  # the preset's template is "{}"
    assert "nothing to shuffle" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="zerase_core.prompt_pool"):
        assert len(erase_texts(TrainConfig(concept="nude", preset="nsfw", templates=("a photo of a {} person",)))) > 1
    assert "nothing to shuffle" not in caplog.text


def test_preservation_prompts_never_hold_the_erased_concept(tiny_backend):
    """A template without '{}' names the concept itself: filled "as written" it was also the preservation prompt, so
    L_pr's c_pr term held the very concept L_erase removes (reproduced by a review: c_pr 'a red circle on the left')."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import PromptPool
    from zerase_core.prompts import mentions, preservation_text

    config = TrainConfig(concept="red", templates=("a red circle on the left, RED as fire", "a {} square"),
                         preserve=("blue", "dark green"), shuffle_pool=0)
    keep = [p.text for p in PromptPool.build(tiny_backend, config).keep]
    assert keep == ["a blue circle on the left, blue as fire", "a blue square",
                    "a dark green circle on the left, dark green as fire", "a dark green square"]
    assert not any(mentions(text, "red") for text in keep)
    assert preservation_text("a bored red-haired {}", "red", "blue") == "a bored blue-haired blue"  # 'bored' stays
    assert preservation_text("Van  Gogh's starry night", "van gogh", "Monet") == "Monet's starry night"


def test_shuffled_erase_prompts_keep_a_multi_word_concept_whole():
    """P1: erase_texts shuffles with the concept as one unit; every variant still names 'van gogh'."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import erase_texts
    from zerase_core.prompts import mentions

    texts = erase_texts(TrainConfig(concept="van gogh", templates=("a starry night painted by {} in thick oil",),
                                    shuffle_pool=8, seed=3))
    assert len(texts) > 5
    assert all(mentions(t, "van gogh") for t in texts), texts


def test_a_preservation_concept_around_the_concept_is_put_in_once():
    """P4: the concept's place is taken by the preservation concept once, also when it contains the concept."""
    from zerase_core.prompts import preservation_text

    assert preservation_text("a photo of {}", "cat", "black cat") == "a photo of black cat"


def test_every_prompt_of_the_pool_is_drawn_and_each_template_gets_its_shuffled_variants(tiny_backend):
    """c_er ~ D_er and c_pr ~ D_pr (Algorithm 1): a draw that never reached the last erase prompt, or a pool one
    shuffled variant short of ``shuffle_pool``, would train on less than the settings say (a mutation audit found
    neither tested)."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import PromptPool, erase_texts

    config = TrainConfig(concept="red", preserve=("blue", "green"), templates=("a photo of a {} ball on a table",
                         "a {} car"), shuffle_pool=3, steps=1, height=64, width=64)
    texts = erase_texts(config)
    assert len(texts) == 2 * (1 + 3) and len(set(texts)) == len(texts)  # each template and its 3 shuffled variants
    pool = PromptPool.build(tiny_backend, config)
    rng = random.Random(0)
    drawn = [pool.draw(rng) for _ in range(400)]
    assert {p.text for p, _, _ in drawn} == set(texts)
    assert {k.text for _, _, k in drawn} == {k.text for k in pool.keep} and len(pool.keep) == 4


def test_erase_templates_are_checked_for_the_concept_as_the_token_lookup_reads_them():
    """The text-only check before any model work refuses what PromptPool's token lookup would, in its words: a
    template without the concept as a whole word; and nothing that lookup takes (escaped parentheses read as
    ComfyUI reads them, another Unicode composition of the concept, spaces around it)."""
    from zerase_core.backends.comfy_zimage.clip_prompts import as_tokenized
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import check_erase_templates

    check_erase_templates(TrainConfig(concept="Van Gogh", templates=("{}", "a painting by van gogh", "{} style")))
    check_erase_templates(TrainConfig(concept="cafe\u0301", templates=("a caf\u00e9 at night",)))  # NFD concept
    check_erase_templates(TrainConfig(concept=" cat ", templates=("a {}",)))
    for template, prompt in (("a photo of a pet", "a photo of a pet"), ("{}s", "cats")):
        with pytest.raises(ZEraseError, match=rf"^The concept 'cat' does not occur in the prompt '{prompt}'\. Put"):
            check_erase_templates(TrainConfig(concept="cat", templates=("a {}", template)))
    escaped = TrainConfig(concept=as_tokenized("\\(cat\\)"), templates=("a photo of \\(cat\\)",))  # as the node
    check_erase_templates(escaped, as_tokenized)  # ComfyUI's encoder reads "(cat)": found
    with pytest.raises(ZEraseError, match=r"'\(cat\)' does not occur in the prompt 'a photo of \\\(cat\\\)'"):
        check_erase_templates(escaped)  # read as written (diffusers' encoder), "\(cat\)" is not "(cat)"


def test_the_tiny_models_encoder_reads_a_decomposed_concept_as_the_real_one_does():
    """`train --tiny --concept $'cafe\\u0301'` said "'café' does not occur in the prompt 'A photo of café'": the
    stand-in encoder kept the prompt as typed, where the lookup (and Qwen's tokenizer) read NFC."""
    from zerase_core.backends.text_encoders import HashWordEncoder

    (prompt,) = HashWordEncoder(8).encode(["A photo of cafe\u0301"])
    assert prompt.text == "A photo of caf\u00e9" and concept_token_indices(prompt, "cafe\u0301") == [4]


def test_a_two_word_erase_prompt_gets_its_shuffled_variant(caplog):
    """§4.1's word shuffle applies to every erase prompt of more than one word: "a red" has the variant "red a" (a
    mutation audit: shuffling only prompts of three or more words failed no test; every template the tests used had
    more)."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import erase_texts

    with caplog.at_level("WARNING", logger="zerase_core.prompt_pool"):
        assert erase_texts(TrainConfig(concept="red", templates=("a {}",), shuffle_pool=1)) == ["a red", "red a"]
    assert "nothing to shuffle" not in caplog.text


def test_a_concept_in_the_text_that_no_token_covers_is_refused_not_given_no_columns():
    """An encoder whose tokens all lie outside the prompt (spans None) cannot localise the concept: an attention loss
    on no columns would silently do nothing, so the lookup refuses instead of returning []."""
    from zerase_core.prompts import EncodedPrompt

    prompt = EncodedPrompt("a red cat", torch.zeros(3, 4), (None, None, None))
    with pytest.raises(ZEraseError, match="no token of the encoder covers it"):
        concept_token_indices(prompt, "red")


def test_no_shuffle_warning_when_shuffling_is_switched_off(caplog):
    """shuffle_pool=0 asks for no shuffled variants: the erase prompts then staying put is what was asked, not a
    problem to warn about."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import erase_texts

    with caplog.at_level("WARNING", logger="zerase_core.prompt_pool"):
        assert erase_texts(TrainConfig(concept="red", templates=("a {} car",), shuffle_pool=0)) == ["a red car"]
    assert "nothing to shuffle" not in caplog.text


def test_the_first_erase_text_is_the_first_template_filled_unshuffled():
    """The Train node encodes first_erase_text for its preview: the first template, as erase_texts puts it first."""
    from zerase_core.config import TrainConfig
    from zerase_core.prompt_pool import erase_texts, first_erase_text

    config = TrainConfig(concept="red", templates=("a {} car", "a painting of {} apples"), shuffle_pool=2)
    assert first_erase_text(config) == "a red car" == erase_texts(config)[0]


def test_the_chat_encoder_reads_prompts_up_to_its_length_and_gives_the_penultimate_hidden_state(chat_encoder):
    """A prompt of exactly ``max_length`` tokens in the template is read (the pipeline cuts only past it); the features
    are the text model's penultimate hidden state, as Z-Image's pipeline takes them."""
    from zerase_core.backends.text_encoders import CHAT_PREFIX, CHAT_SUFFIX

    prompt = "a red ball"
    tok = chat_encoder.tokenizer(CHAT_PREFIX + prompt + CHAT_SUFFIX, return_tensors="pt")
    n = tok["input_ids"].shape[1]
    (enc,) = ChatTemplateEncoder(chat_encoder.tokenizer, chat_encoder.text_model, max_length=n).encode([prompt])
    with pytest.raises(ZEraseError, match=f"is {n} tokens in Z-Image's chat template; its text encoder reads at most"):
        ChatTemplateEncoder(chat_encoder.tokenizer, chat_encoder.text_model, max_length=n - 1).encode([prompt])
    with torch.no_grad():
        hidden = chat_encoder.text_model(**tok, output_hidden_states=True).hidden_states
    torch.testing.assert_close(enc.features, hidden[-2][0].float())
    assert not torch.allclose(enc.features, hidden[-1][0].float())


def test_the_chat_encoders_length_refusal_tells_to_shorten_the_prompt_and_training_its_parts(chat_encoder):
    """compare encodes prompts that no template made: the refusal says to shorten the prompt, and names the template
    and the concept only for training (it told a compare user to shorten a template there was none of)."""
    with pytest.raises(ZEraseError, match=r"its text encoder reads at most 2\. Shorten it \(in training: the template "
                                          r"or the concept\)\.$"):
        ChatTemplateEncoder(chat_encoder.tokenizer, chat_encoder.text_model, max_length=2).encode(["a red ball"])
