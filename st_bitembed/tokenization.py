"""Tokenizer set-up for last-token pooling: every text must end in the EOS token that the model pools on."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Families whose embedders pool on another token than the tokenizer's (chat) eos_token: Qwen3-Embedding and the
# released BitNet-embedding models append <|endoftext|>, not <|im_end|>.
POOLING_EOS_BY_MODEL_TYPE: dict[str, str] = {
    "qwen2": "<|endoftext|>",
    "qwen2_moe": "<|endoftext|>",
    "qwen3": "<|endoftext|>",
    "qwen3_moe": "<|endoftext|>",
}


def pooling_eos_token(tokenizer: PreTrainedTokenizerBase, model_type: str, eos_token: str | None = None) -> str:
    """The EOS token to append: ``eos_token`` if given, else the family's pooling token, else the tokenizer's EOS.

    Raises:
        ValueError: no EOS token can be found, or the chosen one is not in the vocabulary.
    """
    token = eos_token or POOLING_EOS_BY_MODEL_TYPE.get(model_type) or tokenizer.eos_token
    if token is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}, model type {model_type!r}) has no EOS token, which "
            "last-token pooling needs at the end of every text. Pass eos_token='...' naming the token to append, "
            "or use pooling='mean'."
        )
    if token not in tokenizer.get_vocab():
        raise ValueError(
            f"EOS token {token!r} is not in the vocabulary of {type(tokenizer).__name__}; pass eos_token='...' "
            "naming a token of this tokenizer."
        )
    return token


def append_eos_token(tokenizer: PreTrainedTokenizerBase, eos_token: str) -> None:
    """Make ``tokenizer`` append ``eos_token`` to every text, keeping its BOS behaviour. Saved with the tokenizer.

    Raises:
        ValueError: the tokenizer cannot be made to append the token (e.g. a tokenizer without a post-processor).
    """
    probe = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos_token
    if not hasattr(tokenizer, "update_post_processor"):
        raise ValueError(
            f"{type(tokenizer).__name__} cannot be set up to append {eos_token!r}: st_bitembed needs a fast "
            "(tokenizers-backed) tokenizer for last-token pooling."
        )
    tokenizer.add_bos_token = adds_bos
    tokenizer.add_eos_token = True
    if tokenizer("a")["input_ids"][-1] != tokenizer.convert_tokens_to_ids(eos_token):
        raise ValueError(f"{type(tokenizer).__name__} did not append {eos_token!r} after set-up.")
