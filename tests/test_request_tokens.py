"""EditRequest validation and the one token policy (leading spaces, BOS, padding) on three tokenizer styles."""

from __future__ import annotations

import pytest
import torch

from lmedit.errors import RequestError
from lmedit.models import tokens
from lmedit.request import EditRequest, as_requests, check_against_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def gpt2_style_tok():
    """A GPT-2-style tokenizer (byte-level BPE, 'Ġ' spaces, no BOS, no pad token), trained here offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [
        PROMPT + " Paris.",
        "The Colosseum is located in the city of Rome.",
        "Rome Paris Tokyo Berlin",
    ] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(params=["gemma", "smol", "gpt2"])
def tok(request, gemma_tok, smol_tok, gpt2_style_tok):
    return {"gemma": gemma_tok, "smol": smol_tok, "gpt2": gpt2_style_tok}[request.param]


def test_request_forms_and_leading_space():
    a = EditRequest(PROMPT, "Eiffel Tower", "Rome", "Paris")
    b = EditRequest("The {} is located in the city of", "Eiffel Tower", " Rome", " Paris")
    assert a.prompt_text == b.prompt_text == PROMPT
    assert a.target_new == b.target_new == " Rome" and a.target_true == " Paris"
    assert a.subject_span == b.subject_span == (4, 16)
    assert a.template == "The {} is located in the city of"
    assert EditRequest.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=PROMPT, subject="Louvre", target_new="Rome"), "subject"),
        (dict(prompt=PROMPT, subject="Eiffel Tower", target_new="  "), "target_new"),
        (dict(prompt=PROMPT, subject="Eiffel Tower", target_new="Paris", target_true=" Paris"), "target_new"),
        (dict(prompt=42, subject="Eiffel Tower", target_new="Rome"), "prompt"),
        (dict(prompt=PROMPT, subject="Eiffel Tower", target_new=["Rome"]), "target_new"),
        (dict(prompt=PROMPT, subject="Eiffel Tower", target_new="Rome", rephrase="not a list"), "rephrase"),
        (
            dict(prompt=PROMPT, subject="Eiffel Tower", target_new="Rome", locality=[("only prompt",)]),
            "locality[0]",
        ),
        (dict(prompt="{} and {}", subject="Eiffel Tower", target_new="Rome"), "prompt"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field):
    with pytest.raises(RequestError) as e:
        EditRequest(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(field)


def test_from_dict_errors_carry_the_index():
    with pytest.raises(RequestError, match=r"request\[1\]\.subject"):
        as_requests(
            [
                {"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome"},
                {"prompt": PROMPT, "target_new": "x"},
            ]
        )
    with pytest.raises(RequestError, match="unknown field"):
        as_requests({"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome", "traget": 1})


def test_join_target_moves_whitespace():
    assert tokens.join_target("city of", "Rome") == ("city of", " Rome")
    assert tokens.join_target("city of ", "Rome") == ("city of", " Rome")
    assert tokens.join_target("city of ", " Rome") == ("city of", " Rome")
    assert tokens.join_target("city of", " Rome") == ("city of", " Rome")


def test_positions_and_padding(tok):
    enc = tokens.encode_pair(tok, PROMPT, "Rome")
    prompt_ids, _ = tokens.encode_prompt(tok, PROMPT)
    assert enc.ids[: enc.prompt_len] == prompt_ids, "prompt part must be what generation sees"
    assert tok.decode(enc.ids[enc.prompt_len :]).strip() == "Rome"
    # the prompt starts with exactly the tokenizer's own special prefix (BOS for Gemma, none for BPE)
    assert enc.ids[: len(tokens.special_prefix(tok))] == tokens.special_prefix(tok)
    assert (tokens.special_prefix(tok) != []) == (tok.bos_token == "<bos>")
    i = tokens.subject_last_index(tok, PROMPT, 4, 16)
    assert "Tower" in tok.convert_ids_to_tokens(prompt_ids[i]).replace("Ġ", " ").replace("▁", " ")
    # trailing space in the prompt gives the same tokens as a leading space in the target
    assert tokens.encode_pair(tok, PROMPT + " ", "Rome").ids == enc.ids
    batch = tokens.pair_batch(tok, [PROMPT, "Hi"], [" Rome", " there friend"])
    for row, (p, t) in enumerate([(PROMPT, " Rome"), ("Hi", " there friend")]):
        e = tokens.encode_pair(tok, p, t)
        n = len(e.ids)
        assert batch.input_ids[row, :n].tolist() == e.ids
        assert batch.attention_mask[row].sum() == n
        assert batch.target_mask[row].sum() == e.target_len
        assert batch.target_ids[row][batch.target_mask[row]].tolist() == e.ids[e.prompt_len :]
        assert not batch.target_mask[row, n - 1 :].any(), "pad positions and the last token never count"
    ids, mask = tokens.left_padded(tok, [PROMPT, "Hi"])
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and ids.shape == mask.shape


def test_check_against_model_context_length(smol_tok):
    r = EditRequest(PROMPT + " and then" * 50, "Eiffel Tower", "Rome")
    with pytest.raises(RequestError, match="longer than the model's context of 64"):
        check_against_model([r], smol_tok, max_positions=64)
    check_against_model([r], smol_tok, max_positions=None)


def test_pair_batch_dtype(smol_tok):
    b = tokens.pair_batch(smol_tok, [PROMPT], [" Rome"])
    assert b.input_ids.dtype == torch.long and b.target_mask.dtype == torch.bool
