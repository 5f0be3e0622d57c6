"""JSONL readers: the accepted formats, padding/label alignment, and `file:line: what is wrong` errors."""
import json

import pytest
import torch

from rlhf_fast import data
from rlhf_fast.data import DataError
from rlhf_fast.default_task import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_sft_prompt_response_and_labels(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "user : copy a b assistant :", "response": "a b"},
                            "", {"prompt": "user : sort c a assistant :", "response": "sure , a c"}])
    ex = data.load_sft(path, tok, max_len=64)
    assert len(ex) == 2  # the blank line is not an example
    assert ex[0].prompt_len == 7 and ex[0].input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex[1].input_ids[ex[1].prompt_len:], skip_special_tokens=True) == "sure , a c"
    ids, labels = data.sft_batch(ex, tok.pad_token_id)
    assert ids.shape == (2, 12) and labels.shape == (2, 11)
    # labels[b, t] is the token at t + 1, kept only on response tokens (eos included), never on padding
    for b, e in enumerate(ex):
        kept = labels[b][labels[b] != -100].tolist()
        assert kept == e.input_ids[e.prompt_len:]
        assert (labels[b, : e.prompt_len - 1] == -100).all()


def test_sft_messages_through_chat_template(tok, tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "copy a b"},
                                          {"role": "assistant", "content": "a b"}]}])
    (ex,) = data.load_sft(path, tok, max_len=64)
    assert tok.decode(ex.input_ids[: ex.prompt_len]) == "user : copy a b assistant :"
    tok_nt = build_tokenizer(tmp_path / "t2")
    tok_nt.chat_template = None
    with pytest.raises(DataError, match=r"d.jsonl:1: 'messages' needs a tokenizer with a chat template"):
        data.load_sft(path, tok_nt, max_len=64)


def test_rm_rankings_and_pairs(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "user : copy a assistant :", "completions": ["a", "b", "a a"],
                             "ranks": [0, 2, 1]},
                            {"prompt": "user : copy b assistant :", "chosen": "b", "rejected": "c"}])
    ex = data.load_rm(path, tok, max_len=64)
    assert ex[0].ranks == [0, 2, 1] and len(ex[0].completions) == 3
    assert ex[1].ranks == [0, 1] and ex[1].completions[0] == [tok.convert_tokens_to_ids("b"), tok.eos_token_id]


def test_prompts_and_texts(tok, tmp_path):
    prompts = data.load_prompts(write(tmp_path, [{"prompt": "user : copy a b assistant :"}]), tok, max_len=3)
    assert prompts[0].ids == tok("user : :")["input_ids"]  # the middle is cut: the start and the end stay
    texts = data.load_texts(write(tmp_path, [{"text": "copy a b"}], "t.jsonl"), tok, max_len=2)
    assert texts == [tok("copy a")["input_ids"]]


BAD = [
    ("sft", '{"prompt": "copy a"', "d.jsonl:2: invalid JSON"),
    ("sft", "[1, 2]", "d.jsonl:2: expected a JSON object, got list"),
    ("sft", {"prompt": "copy a"}, "d.jsonl:2: missing key 'response'"),
    ("sft", {"prompt": 3, "response": "a"}, "d.jsonl:2: 'prompt' must be a string, got int"),
    ("sft", {"text": "a"}, "d.jsonl:2: expected {'prompt', 'response'} or {'messages'}"),
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "d.jsonl:2: the last message must be the assistant's"),
    ("rm", {"prompt": "a", "completions": ["a", "b"], "ranks": [0]}, "d.jsonl:2: 2 completions but 1 ranks"),
    ("rm", {"prompt": "a", "completions": ["a"], "ranks": [0]}, "d.jsonl:2: need 2..9 completions, got 1"),
    ("rm", {"prompt": "a", "completions": ["a"] * 10, "ranks": list(range(10))}, "need 2..9 completions, got 10"),
    ("rm", {"prompt": "a", "completions": ["a", "b"], "ranks": [1, 1]}, "d.jsonl:2: all ranks are equal"),
    ("rm", {"prompt": "a", "completions": ["a", "b"], "ranks": [0, "1"]}, "'ranks' must be a list of integers"),
    ("rm", {"prompt": "a", "chosen": "a"}, "d.jsonl:2: missing key 'rejected'"),
    ("rm", {"prompt": "a", "better": "a"}, "d.jsonl:2: expected 'completions' and 'ranks'"),
    ("ppo", {"text": "a"}, "d.jsonl:2: missing key 'prompt'"),
    ("ppo", {"prompt": " "}, "d.jsonl:2: 'prompt' is empty"),
    ("ptx", {"text": "a"}, "d.jsonl:2: 'text' is a single token"),
]


@pytest.mark.parametrize("kind, line, message", BAD)
def test_malformed_line_names_file_and_line(tok, tmp_path, kind, line, message):
    good = {"sft": {"prompt": "copy a", "response": "a"}, "rm": {"prompt": "a", "chosen": "a", "rejected": "b"},
            "ppo": {"prompt": "a"}, "ptx": {"text": "copy a"}}[kind]
    path = write(tmp_path, [good, line])
    load = {"sft": data.load_sft, "rm": data.load_rm, "ppo": data.load_prompts, "ptx": data.load_texts}[kind]
    with pytest.raises(DataError) as e:
        load(path, tok, 8)
    assert message in str(e.value)
    assert str(e.value).startswith(str(path))


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_sft(tmp_path / "none.jsonl", tok, 8)
    with pytest.raises(DataError, match="no examples"):
        data.load_sft(write(tmp_path, [""]), tok, 8)


def test_epoch_batches_deterministic_cover_and_bucket():
    lengths = [int(x) for x in torch.randint(1, 50, (103,))]
    a = data.epoch_batches(lengths, 8, seed=3, epoch=1, bucket_size=4)
    assert a == data.epoch_batches(lengths, 8, seed=3, epoch=1, bucket_size=4)
    assert a != data.epoch_batches(lengths, 8, seed=3, epoch=2, bucket_size=4)
    assert sorted(i for b in a for i in b) == list(range(103))
    plain = data.epoch_batches(lengths, 8, seed=3, epoch=1)

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < padding(plain)
