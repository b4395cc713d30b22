"""frontend/logprobs.py's token strings against vLLM's own (its engine's LogprobsProcessor: single-id decode
plus the U+FFFD correction from preceding tokens), on the default model's tokenizer and on a SentencePiece
(Metaspace) tokenizer built here, for texts whose characters span several byte tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_lite.frontend.logprobs import SequenceLogprobs, TokenStrings
from dynamo_lite.protocol.messages import TokenLogprob
from dynamo_lite.runtime.models import default_model_path

TEXTS = ["Hello, world! The café serves crème brûlée.", "日本語のテキスト、絵文字 🙂🎉 and ünïcödé",
         "  leading spaces\tand\nnewlines <|im_end|>"]


def vllm_strings(tokenizer_dir: str, token_ids: list[int]) -> list[str]:
    """vLLM's decoded_token of each sampled token of a sequence, as its engine computes it."""
    from vllm.tokenizers import get_tokenizer
    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens
    from vllm.v1.engine.logprobs import LogprobsProcessor

    tokenizer = get_tokenizer(tokenizer_dir)
    processor = LogprobsProcessor(tokenizer=tokenizer, logprobs=[], prompt_logprobs=None,
                                  cumulative_logprob=0.0, num_logprobs=0, num_prompt_logprobs=None)
    out = []
    for token_id in token_ids:
        context = processor._get_sampled_context_ids(processor.logprobs)
        decoded = convert_ids_list_to_tokens(tokenizer, [token_id])
        [text] = processor._verify_tokens(decoded, [token_id], context)
        out.append(text)
        processor.logprobs.append({token_id: None})
    return out


def ours(tokenizer: Tokenizer, token_ids: list[int]) -> list[str]:
    sequence = SequenceLogprobs(TokenStrings(tokenizer))
    return [p.token for p in sequence.add([TokenLogprob(token_id=t, logprob=-1.0, rank=1, top=[(t, -1.0)])
                                           for t in token_ids])]


def test_default_model_token_strings_equal_vllms():
    folder = default_model_path()
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    split = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected = vllm_strings(folder, ids)
        assert ours(tokenizer, ids) == expected, text
        split += expected.count("")
    assert split, "no character spanned tokens: the correction was not exercised"


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory) -> str:
    """A SentencePiece-style BPE tokenizer with byte fallback, trained here on the test texts."""
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  initial_alphabet=[c for c in "abcdefghijklmnopqrstuvwxyz▁"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, *TEXTS], trainer)
    folder = tmp_path_factory.mktemp("metaspace")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", '
        '"eos_token": "</s>"}')
    return str(folder)


def test_metaspace_token_strings_keep_their_leading_space_like_vllms(metaspace_dir):
    tokenizer = Tokenizer.from_file(str(Path(metaspace_dir) / "tokenizer.json"))
    for text in ["the lazy fox", "crème brûlée 🙂", "über quick"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ours(tokenizer, ids) == vllm_strings(metaspace_dir, ids), text
