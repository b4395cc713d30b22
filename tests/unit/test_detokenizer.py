"""Incremental detokenization and stop strings (frontend), on a tiny byte-level tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_lite.frontend.detokenizer import IncrementalDetokenizer, StopMatcher


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (so every multi-byte character and every stop string spans several
    tokens), plus two special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_tokenizer()


def stream_tokens(detok: IncrementalDetokenizer, ids: list[int], frame_size: int = 1) -> list[str]:
    out = []
    for start in range(0, len(ids), frame_size):
        text, stopped = detok.push(ids[start:start + frame_size])
        out.append(text)
        if stopped:
            break
    out.append(detok.flush())
    return out


# ---------------------------------------------------------------- StopMatcher


def test_stop_string_split_across_pieces_is_cut_and_never_leaks():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("Hello S") == ("Hello ", False)  # "S" held back: could start "STOP"
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("OP and more") == ("", True)


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART") == ("START", False)


def test_earliest_of_several_stops_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)


def test_include_stop_keeps_the_earliest_stop_string_and_nothing_after():
    matcher = StopMatcher(["world", "lo w"], include_stop=True)
    assert matcher.feed("Hel") == ("He", False)  # "l" may start "lo w": held back
    assert matcher.feed("lo world, more") == ("llo w", True)


def test_flush_releases_a_partial_match_at_the_end():
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("42 </ans") == ("42 ", False)
    assert matcher.flush() == "</ans"


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


# ---------------------------------------------------------------- IncrementalDetokenizer


@pytest.mark.parametrize("frame_size", [1, 2, 3, 64])
def test_deltas_join_to_the_full_decode(tokenizer, frame_size):
    text = "Héllo wörld, 日本語 🙂 done"
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream_tokens(detok, ids, frame_size)
    assert "".join(deltas) == text
    assert detok.token_count == len(ids)
    # No delta ever holds half a character (each one is valid, complete text).
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_is_emitted_once_complete(tokenizer):
    ids = tokenizer.encode("日").ids
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i])[0] for i in ids] == ["", "", "日"]


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("The answer is 4.\nUser: next question").ids
    detok = IncrementalDetokenizer(tokenizer, stops=["\nUser:"])
    deltas = stream_tokens(detok, ids)
    assert "".join(deltas) == "The answer is 4."
    assert detok.stopped
    # Tokens are counted up to the one that completed the stop string, not beyond.
    assert detok.token_count == len(tokenizer.encode("The answer is 4.\nUser:").ids)
    # Once stopped, further tokens produce nothing.
    assert detok.push(ids[-3:]) == ("", True)


def test_stop_string_inside_one_frame(tokenizer):
    ids = tokenizer.encode("abc STOP def").ids
    detok = IncrementalDetokenizer(tokenizer, stops=["STOP"])
    assert detok.push(ids) == ("abc ", True)
    assert detok.flush() == ""


def test_partial_stop_at_end_of_generation_is_released(tokenizer):
    ids = tokenizer.encode("value: ST").ids
    detok = IncrementalDetokenizer(tokenizer, stops=["STOP"])
    assert "".join(stream_tokens(detok, ids)) == "value: ST"
    assert not detok.stopped


def test_special_tokens_are_skipped(tokenizer):
    end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("hi").ids + [end]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(stream_tokens(detok, ids)) == "hi"
    assert detok.token_count == 3


def test_prompt_context_does_not_appear_in_output(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n").ids
    ids = tokenizer.encode("Paris").ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream_tokens(detok, ids)) == "Paris"
