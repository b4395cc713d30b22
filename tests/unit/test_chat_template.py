"""The frontend renders chat templates exactly as transformers' apply_chat_template does.

transformers is only imported here (the frontend itself must not need it). The default model's
folder is used when it exists; a tiny tokenizer with a template exercising the helpers
(raise_exception, tojson, special tokens, loop controls) runs everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_lite.frontend.tokenizer import ModelTokenizer
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.runtime.models import default_model_path

transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(default_model_path())

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about <tags> & \"quotes\" — ünïcödé 日本"}],
]

TINY_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(extra_tokens: Sequence[str] = (), merges: Sequence[tuple[str, str]] = ()) -> Tokenizer:
    """A byte-level BPE over the whole byte alphabet, plus `extra_tokens` made by `merges`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({token: len(alphabet) + i for i, token in enumerate(extra_tokens)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def tiny_tokenizer() -> Tokenizer:
    tok = bpe_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    return tok


def lowercasing_tiny_tokenizer() -> Tokenizer:
    """tiny_tokenizer with a normalizer: a structure the fast encode path refuses."""
    from tokenizers import normalizers

    tok = tiny_tokenizer()
    tok.normalizer = normalizers.Lowercase()
    return tok


@pytest.fixture(scope="module")
def tiny_pair():
    tok = tiny_tokenizer()
    ours = ModelTokenizer(tok, {"bos_token": "<s>", "eos_token": "</s>"}, TINY_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), bos_token="<s>",
                                                  eos_token="</s>")
    theirs.chat_template = TINY_TEMPLATE
    return ours, theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_template_matches_transformers(tiny_pair, conversation, add_generation_prompt):
    ours, theirs = tiny_pair
    expected = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(conversation, add_generation_prompt) == expected


def test_tiny_template_tools_use_transformers_tojson(tiny_pair):
    ours, theirs = tiny_pair
    tools = [{"type": "function", "function": {"name": "f<x>", "description": "ü & co"}}]
    expected = theirs.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False,
                                          add_generation_prompt=True)
    rendered = ours.render_chat(CONVERSATIONS[0], True, tools=tools)
    assert rendered == expected
    assert '"f<x>"' in rendered and "ü" in rendered  # not HTML-escaped, not ASCII-escaped


def test_raise_exception_in_template_is_a_400(tiny_pair):
    ours, _ = tiny_pair
    with pytest.raises(InvalidRequestError) as info:
        ours.render_chat([{"role": "robot", "content": "x"}])
    assert info.value.status == 400 and "bad role robot" in info.value.message


def test_template_from_tokenizer_config_file():
    files = {"tokenizer.json": tiny_tokenizer().to_str().encode(),
             "tokenizer_config.json": b'{"chat_template": "{{ messages[0][\'content\'] }}!", '
                                      b'"eos_token": {"content": "</s>", "special": true}}',
             "generation_config.json": b'{"eos_token_id": [1, 3]}'}
    loaded = ModelTokenizer.from_files(files)
    assert loaded.render_chat([{"role": "user", "content": "hey"}]) == "hey!"
    # EOS ids: generation_config's list, plus the tokenizer's eos_token id.
    assert loaded.eos_token_ids == [1, 3, loaded.tokenizer.token_to_id("</s>")]
    # chat_template.jinja takes precedence over tokenizer_config's template (transformers v5 layout).
    loaded = ModelTokenizer.from_files({**files, "chat_template.jinja": b"J{{ messages | length }}"})
    assert loaded.render_chat([{"role": "user", "content": "hey"}]) == "J1"


@pytest.fixture(scope="module")
def default_model():
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip(f"default model folder {MODEL_DIR} not prepared (scripts/prepare_model.py)")
    theirs = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    return ModelTokenizer.from_folder(MODEL_DIR), theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_default_model_prompt_matches_transformers(default_model, conversation):
    ours, theirs = default_model
    text = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(conversation, True) == text
    ids = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode_chat(conversation) == list(ids)


def test_default_model_eos_and_plain_encoding(default_model):
    ours, theirs = default_model
    assert theirs.eos_token_id in ours.eos_token_ids
    text = "The capital of France is"
    assert ours.encode(text) == theirs(text)["input_ids"]


# ---------------------------------------------------------------- fast encode path (fast_bpe)

FUZZ_ALPHABET = (list("abcXYZ019'’-_.,;:!?()[]{}<>/\\\"#@$%^&*+=|~`") + [" ", "  ", "\t", "\n", "\r\n", "\u00a0",
                 "\u2009", "\u3000", "\x0b", "\x0c", "\x85", "\u200b", "é", "ß", "日本", "한", "🙂", "👍🏽", "٣",
                 "Ⅻ", "²", "𝔘", "\u0301", "'s", "'ll", "'D", "<|im_start|>", "<|im_end|>", "<|im_", "|>"])


def fuzz_texts(count: int, seed: int = 1234) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def assert_fast_path_exact(ours: ModelTokenizer, reference: Tokenizer, texts: list[str]) -> None:
    assert ours._fast_encoder is not None, "the fast encode path should be enabled for this tokenizer"
    for text in texts:
        for special in (False, True):
            assert ours.encode(text, special) == reference.encode(text, add_special_tokens=special).ids, repr(text)


def test_fast_encode_matches_tokenizers_on_tiny_tokenizer():
    ours = ModelTokenizer.from_files({"tokenizer.json": tiny_tokenizer().to_str().encode()})
    assert_fast_path_exact(ours, tiny_tokenizer(), fuzz_texts(300) + [TINY_TEMPLATE])


def test_fast_encode_matches_tokenizers_on_default_model(default_model):
    ours, _ = default_model
    reference = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    texts = fuzz_texts(1500) + [ours.render_chat(c) for c in CONVERSATIONS]
    assert_fast_path_exact(ours, reference, texts)


def test_fast_encode_matches_tokenizers_on_ascii_text(default_model):
    import random

    ours, _ = default_model
    reference = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    rng = random.Random(11)
    alphabet = [chr(c) for c in range(128)] + ["the ", "Paris", " 2024", "'s ", "\n\n", "<|im_start|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(1500)]
    assert_fast_path_exact(ours, reference, texts)


def test_fast_encode_hands_bytes_the_vocabulary_lacks_to_tokenizers(default_model):
    # SmolLM2 has no token for byte 0x04, nor for 0xf1 (which starts U+40000): tokenizers drops such
    # bytes, which tiktoken cannot do, so these texts take the exact path.
    ours, _ = default_model
    reference = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    texts = ["a\x04b", "!!\x04!!", "x \U00040000 y", "<|im_start|>\x04<|im_end|>", "\x04", "\ud800 lone"]
    for text in texts:
        for special in (False, True):
            try:
                expected = reference.encode(text, add_special_tokens=special).ids
            except Exception as e:  # a lone surrogate is not UTF-8: the same error either way
                with pytest.raises(type(e)):
                    ours.encode(text, special)
                continue
            assert ours.encode(text, special) == expected, repr(text)


def test_fast_encode_matches_tokenizers_on_long_real_text(default_model):
    ours, _ = default_model
    reference = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    repo = Path(__file__).resolve().parents[2]
    files = sorted(repo.glob("docs/*.md")) + sorted(repo.glob("dynamo_lite/**/*.py"))
    text = "\n".join(p.read_text() for p in files)
    assert len(text) > 100_000
    assert ours._fast_encoder._unencodable.search(text) is None  # so the fast path is what is checked
    for special in (False, True):
        assert ours.encode(text, special) == reference.encode(text, add_special_tokens=special).ids


@pytest.mark.parametrize("extra_tokens, merges", [
    # "abc" is made by ab + c, but BPE merges bc first and has no a + bc rule: it never rebuilds "abc",
    # where tiktoken would take the piece "abc" whole and join a + bc in "abcd".
    (["bc", "ab", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")]),
    # "abc" is made by two merges: it has no single rank.
    (["ab", "bc", "abc"], [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]),
])
def test_fast_path_is_off_for_merges_tiktoken_would_apply_differently(extra_tokens, merges):
    tok = bpe_tokenizer(extra_tokens, merges)
    ours = ModelTokenizer.from_files({"tokenizer.json": tok.to_str().encode()})
    assert ours._fast_encoder is None
    for text in ("abc", "abcd", "xabc bcab"):
        assert ours.encode(text) == tok.encode(text).ids


def test_unencodable_characters_are_those_holding_a_missing_byte():
    from dynamo_lite.frontend.fast_bpe import unencodable_characters

    def matches(missing: list[int], text: str) -> bool:
        return unencodable_characters(missing).search(text) is not None

    assert matches([0x04], "a\x04") and not matches([0x04], "a\x05é")
    # 0xE0 starts U+0800..U+0FFF only, 0xF0 U+10000..U+3FFFF only.
    assert not matches([0xE0], "aé\u07ff日") and matches([0xE0], "\u0800") and matches([0xE0], "\u0fff")
    assert not matches([0xF0], "aé日\uffff\U00040000") and matches([0xF0], "\U00010000")
    assert matches([0xF0], "\U0001F642")  # 🙂
    assert matches([0xC3], "é") and not matches([0xC3], "e\u00bf")
    assert matches([0xF4], "\U0010FFFF") and not matches([0xF4], "\U000FFFFF")
    assert matches([], "\ud800") and not matches([0xC0, 0xC1, 0xFF], "any text é 日 🙂")
    with pytest.raises(ValueError):
        unencodable_characters([0x85])  # a continuation byte


def test_encode_without_gil_gives_the_ids_of_encode(default_model):
    # Long prompts are tokenized this way in a thread: by the fast path where it is on (SmolLM2), by
    # Rust's encode_batch where it is off (a normalizer); either way the ids of tokenizers' encode.
    ours, _ = default_model
    reference = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    plain = lowercasing_tiny_tokenizer()
    slow = ModelTokenizer.from_files({"tokenizer.json": plain.to_str().encode()})
    assert slow._fast_encoder is None
    texts = fuzz_texts(300) + [ours.render_chat(c) for c in CONVERSATIONS] + ["word " * 5000]
    for text in texts:
        for special in (False, True):
            expected = reference.encode(text, add_special_tokens=special).ids
            assert ours.encode_without_gil(text, special) == expected
            assert slow.encode_without_gil(text, special) == plain.encode(text, add_special_tokens=special).ids


def test_fast_path_is_off_when_it_would_not_be_exact():
    tok = lowercasing_tiny_tokenizer()
    ours = ModelTokenizer.from_files({"tokenizer.json": tok.to_str().encode()})
    assert ours._fast_encoder is None
    assert ours.encode("HeLLo") == tok.encode("HeLLo").ids
