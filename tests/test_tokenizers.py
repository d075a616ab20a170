"""Offline CLIP and T5 tokenizers: real CLIP ids, T5 conventions, save/load round trips."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer

from diffq.pipelines.tokenizers import DEFAULT_T5_WORDS, build_clip_tokenizer, build_t5_tokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Watercolor PAINTING of a fox, in the snow!",
    "it's 2024: isn't this a 4k, ultra-detailed render?",
    "a handwritten digit 7",
    "  extra   spaces\tand\nnewlines  ",
]
LONG_PROMPT = " ".join(["a red cat on a wooden table"] * 20)


@pytest.fixture(scope="module")
def clip_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def t5_tokenizer() -> T5Tokenizer:
    return build_t5_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    tokenizer = pytest.importorskip("open_clip.tokenizer")
    return tokenizer.SimpleTokenizer()


# --------------------------------------------------------------------------------------------------------------- CLIP


def test_clip_vocabulary(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    special_ids = (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id)
    assert special_ids == (49406, 49407, 0)
    assert clip_tokenizer.model_max_length == 77


@pytest.mark.parametrize("prompt", [*PROMPTS, LONG_PROMPT])
def test_clip_ids_match_open_clip(clip_tokenizer, open_clip_tokenizer, prompt):
    expected = open_clip_tokenizer([prompt])[0].tolist()
    ids = clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == expected
    assert ids[0] == 49406 and 49407 in ids


def test_clip_pad_with_eos():
    tokenizer = build_clip_tokenizer(16, pad_token="<|endoftext|>")
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 16
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert set(ids[4:]) == {49407}


def test_clip_save_load_round_trip(clip_tokenizer, tmp_path):
    clip_tokenizer.save_pretrained(tmp_path)
    for cls in (CLIPTokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path, local_files_only=True)
        assert loaded.pad_token_id == 0 and loaded.model_max_length == 77
        batch = [*PROMPTS, LONG_PROMPT]
        kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert loaded(batch, **kwargs).input_ids == clip_tokenizer(batch, **kwargs).input_ids


# --------------------------------------------------------------------------------------------------------------- T5


def test_t5_conventions(t5_tokenizer):
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    assert t5_tokenizer.model_max_length == 64
    assert len(t5_tokenizer) > len(DEFAULT_T5_WORDS)
    ids = t5_tokenizer("a cat").input_ids
    assert ids[-1] == 1 and len(ids) == 3  # two whole words, then </s>


def test_t5_lowercases_and_splits_punctuation(t5_tokenizer):
    assert t5_tokenizer.tokenize("A Photo of a CAT, at Sunset.") == [
        "▁a", "▁photo", "▁of", "▁a", "▁cat", ",", "▁at", "▁sunset", ".",
    ]  # fmt: skip
    assert t5_tokenizer("Cat").input_ids == t5_tokenizer("cat").input_ids


def test_t5_unknown_words_do_not_crash(t5_tokenizer):
    ids = t5_tokenizer("Qwzx naïve café 😀 1234").input_ids
    assert ids[-1] == 1
    assert 2 in ids  # characters outside the vocabulary become <unk>
    assert t5_tokenizer.tokenize("zebras") == ["▁zebra", "s"]


def test_t5_padding_truncation_and_mask(t5_tokenizer):
    batch = t5_tokenizer(
        ["a cat", LONG_PROMPT],
        padding="max_length",
        max_length=12,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 12)
    assert batch.input_ids[0].tolist()[3:] == [0] * 9
    assert batch.attention_mask[0].tolist() == [1, 1, 1] + [0] * 9
    assert batch.input_ids[1, -1].item() == 1 and batch.attention_mask[1].all()


def test_t5_custom_words():
    tokenizer = build_t5_tokenizer(["a handwritten digit 7", "The number Seven"], model_max_length=16)
    assert tokenizer.tokenize("The handwritten number seven") == ["▁the", "▁handwritten", "▁number", "▁seven"]
    words = [piece for piece in tokenizer.get_vocab() if piece.startswith("▁") and len(piece) > 2]
    assert sorted(words) == sorted(["▁handwritten", "▁digit", "▁the", "▁number", "▁seven"])
    assert tokenizer.model_max_length == 16


def test_t5_save_load_round_trip(t5_tokenizer, tmp_path):
    t5_tokenizer.save_pretrained(tmp_path)
    for cls in (T5Tokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path, local_files_only=True)
        assert isinstance(loaded, T5Tokenizer)
        assert len(loaded) == len(t5_tokenizer) and loaded.model_max_length == 64
        batch = [*PROMPTS, LONG_PROMPT, "Qwzx naïve café 😀"]
        kwargs = {"padding": "max_length", "max_length": 64, "truncation": True}
        assert loaded(batch, **kwargs).input_ids == t5_tokenizer(batch, **kwargs).input_ids
