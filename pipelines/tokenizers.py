"""Tokenizers built offline for tiny and bundled pipelines.

Nothing here touches the network:

- `build_clip_tokenizer` rebuilds OpenAI's CLIP BPE tokenizer from the vocabulary file that ships inside
  `open_clip`, so its ids are the real CLIP ids.
- `build_t5_tokenizer` builds a small T5-style Unigram tokenizer in memory from a word list.

Both return ordinary `transformers` tokenizers that diffusers pipelines accept and that round-trip through
`save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import string
from collections.abc import Iterable
from functools import lru_cache

from transformers import CLIPTokenizer, T5Tokenizer

__all__ = ["DEFAULT_T5_WORDS", "build_clip_tokenizer", "build_t5_tokenizer"]

# ---------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------

_CLIP_NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI's CLIP uses; the file holds a few more
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_bpe_path() -> str:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open_clip package.

    Found without importing open_clip, which would pull in torch and timm (seconds).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "build_clip_tokenizer needs the CLIP vocabulary from open_clip: pip install open_clip_torch"
        )
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and BPE merges, in the same id order as open_clip's `SimpleTokenizer`."""
    with gzip.open(_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = (
        byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [_CLIP_BOS, _CLIP_EOS]
    )
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77, *, pad_token: str = "!") -> CLIPTokenizer:
    """Build the real CLIP tokenizer (vocabulary 49408, BOS 49406, EOS 49407) without downloading anything.

    Token ids match open_clip's `SimpleTokenizer` for ordinary prompts. The default `pad_token="!"` (id 0)
    pads like open_clip and the Stable Diffusion 2 tokenizers; pass `pad_token="<|endoftext|>"` to pad with
    EOS like the OpenAI / Stable Diffusion 1 tokenizers. Special tokens typed in a prompt are tokenized as
    text (as open_clip does), so a literal "!" never turns into the pad id.
    """
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
        split_special_tokens=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------------------------

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_SPACE = "▁"  # SentencePiece word-start marker
_WORD_SCORE = -5.0  # a known word always beats spelling it out ...
_CHAR_SCORE = -12.0  # ... letter by letter
_SPACE_SCORE = -14.0

# Common words of image prompts; anything else is spelled with single characters.
DEFAULT_T5_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and or in on at to with without from by for into onto over under above below behind near next
    beside between through across around inside outside up down left right top bottom front back middle center
    is are was be being has have its it this that these those there here very more most some many few all no not
    one two three four five six seven eight nine ten zero first second third number numbers digit digits letter
    letters text word sign written handwritten drawn drawing sketch painting painted photo photograph picture
    image portrait illustration render rendering art artwork poster logo icon cartoon anime comic style
    digital oil watercolor pencil ink charcoal pastel acrylic canvas paper realistic photorealistic hyperrealistic
    detailed highly intricate sharp focus blurry bokeh cinematic lighting light lights dark bright shadow shadows
    soft hard dramatic studio natural golden hour sunset sunrise night day morning evening sky clouds cloud sun
    moon stars star rain snow fog mist storm wind fire water ice smoke
    red orange yellow green blue purple pink brown black white gray grey silver gold colorful vibrant pastel
    big small large tiny huge little tall short long round square old young new ancient modern futuristic
    beautiful cute pretty ugly happy sad angry scary funny lonely peaceful quiet busy empty full wet dry hot cold
    warm cool clean dirty wooden metal glass stone plastic paper golden shiny
    man woman men women person people boy girl child children baby kid family friends couple crowd face faces
    eyes eye hair hand hands head body smile smiling king queen prince princess knight warrior soldier wizard
    witch robot alien astronaut pilot chef doctor teacher student artist musician dancer player
    cat cats dog dogs puppy kitten horse horses cow bird birds fish bear lion tiger wolf fox rabbit mouse monkey
    elephant giraffe zebra deer duck chicken owl eagle snake frog turtle butterfly bee dragon unicorn dinosaur
    animal animals pet
    tree trees forest flower flowers rose grass leaf leaves garden field park plant plants mushroom fruit apple
    banana orange lemon cherry strawberry vegetable bread cake pizza burger coffee tea wine beer cup bowl plate
    food breakfast dinner
    house home building buildings city town village street road bridge tower castle church temple palace room
    kitchen bedroom bathroom window door wall floor roof table chair bed sofa desk lamp shelf book books clock
    mirror car cars truck bus train plane airplane boat ship bicycle bike motorcycle rocket spaceship
    mountain mountains hill hills valley river lake sea ocean beach island desert jungle cave waterfall sand
    rock rocks space planet earth galaxy universe world landscape cityscape view scene background
    wearing holding riding sitting standing walking running flying swimming jumping playing eating drinking
    reading looking reflecting floating dancing singing sleeping lying made covered filled surrounded
    hat cap shirt dress suit coat jacket shoes glasses mask helmet armor crown sword shield guitar piano ball
    umbrella bag box bottle phone computer camera screen toy toys
    vintage retro minimalist abstract surreal fantasy magic magical epic award winning masterpiece quality
    resolution professional closeup close shot wide angle aerial macro lens view perspective symmetrical
    high low best 4k 8k hd uhd 3d 2d pixel vector flat
    """.split()
)


def _normalize_words(words: Iterable[str]) -> list[str]:
    """Lowercase, split into word characters, drop duplicates (first occurrence wins)."""
    seen: dict[str, None] = {}
    for item in words:
        for word in re.findall(r"\w+", str(item).lower()):
            seen.setdefault(word, None)
    return list(seen)


def _t5_vocab(words: Iterable[str]) -> list[tuple[str, float]]:
    """Unigram pieces with scores: T5 specials, the space marker, whole words, then single characters."""
    pieces: dict[str, float] = dict.fromkeys(_T5_SPECIALS, 0.0)
    pieces[_SPACE] = _SPACE_SCORE
    for word in _normalize_words(words):
        pieces.setdefault(_SPACE + word, _WORD_SCORE)
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        pieces.setdefault(_SPACE + char, _CHAR_SCORE)
        pieces.setdefault(char, _CHAR_SCORE)
    return list(pieces.items())


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_bytes_field(buf: bytes, field: int) -> bytes:
    """Read one length-delimited field of a serialized protobuf message (no protobuf package needed)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if number == field:
                return buf[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    raise ValueError(f"protobuf field {field} not found")


@lru_cache(maxsize=1)
def _lowercase_charsmap() -> bytes:
    """A SentencePiece precompiled charsmap that lowercases every BMP character.

    T5Tokenizer keeps a `Precompiled` normalizer through save/load (it drops any other normalizer), so
    lowercasing is stored in this form. The blob is ~14 KB.
    """
    import sentencepiece as spm

    rules = [
        (c, c.lower()) for c in map(chr, range(0x10000)) if not "\ud800" <= c <= "\udfff" and c.lower() != c
    ]
    spm.set_min_log_level(2)
    spec = spm.SentencePieceNormalizer(norm_map=rules).serialized_normalizer_spec()
    return _proto_bytes_field(spec, 2)  # NormalizerSpec.precompiled_charsmap


def build_t5_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 64) -> T5Tokenizer:
    """Build a small T5-style Unigram tokenizer in memory.

    Ids follow T5: `<pad>`=0, `</s>`=1, `<unk>`=2, and `</s>` is appended to every sequence. Text is
    lowercased, split on whitespace, and segmented into whole words where known and single characters
    (letters, digits, punctuation) otherwise; other characters map to `<unk>`. `words` (each item may hold
    several words) replaces the built-in `DEFAULT_T5_WORDS`; the vocabulary size is `len(tokenizer)`.
    """
    return T5Tokenizer(
        vocab=_t5_vocab(DEFAULT_T5_WORDS if words is None else words),
        _spm_precompiled_charsmap=_lowercase_charsmap(),
        extra_ids=0,
        model_max_length=model_max_length,
    )
