"""Chat data in every stage with a locally trained byte-level BPE tokenizer and a ChatML template: identical prompt
ids in SFT, RM and PPO, one BOS, turns that end like the template ends them, and the truncation policies."""
import pytest

from _chat_models import SYSTEM, build_tokenizer, chat, chat_data, write_jsonl
from rlhf_fast import data
from rlhf_fast.chat import Codec
from rlhf_fast.data import DataError


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tok(request, tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), bos=request.param)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return chat_data(tmp_path_factory.mktemp("chat"))


def test_prompt_ids_identical_in_all_stages_and_one_bos(tok, files):
    sft = data.load_sft(files["sft"], tok, 512)
    rm = data.load_rm(files["rm"], tok, 512)
    ppo = data.load_prompts(files["ppo"], tok, 512)
    for s, r, p in zip(sft, rm, ppo):
        assert s.input_ids[: s.prompt_len] == r.prompt_ids == p.ids
        if tok.bos_token_id is not None:
            assert p.ids[0] == tok.bos_token_id and p.ids.count(tok.bos_token_id) == 1
    # a chat rendered by hand into a plain prompt string (BOS text included) gets no second BOS
    text = tok.apply_chat_template(chat(0), add_generation_prompt=True, tokenize=False)
    (hand,) = data.load_prompts(write_jsonl(files_dir(files) / "hand.jsonl", [{"prompt": text}]), tok, 512)
    assert hand.ids == ppo[0].ids


def files_dir(files):
    from pathlib import Path

    return Path(files["sft"]).parent


def test_assistant_turns_end_like_the_template(tok, files):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id and end in Codec(tok).stop_ids and tok.eos_token_id in Codec(tok).stop_ids
    (s, *_) = data.load_sft(files["sft"], tok, 512)
    assert s.input_ids[-1] == end
    assert tok.decode(s.input_ids[s.prompt_len:]) == "sure a b c<|im_end|>"
    (r, *_) = data.load_rm(files["rm"], tok, 512)
    assert [c[-1] for c in r.completions] == [end, end]
    plain = data.load_sft(write_jsonl(files_dir(files) / "plain.jsonl", [{"prompt": "hello", "response": "fine"}]),
                          tok, 512)
    assert plain[0].input_ids[-1] == tok.eos_token_id  # a plain-string response still ends with eos


def test_every_assistant_turn_is_trained_with_all(tok, files):
    msgs = chat(0, turns=2) + [{"role": "assistant", "content": "a b c"}]
    path = write_jsonl(files_dir(files) / "multi.jsonl", [{"messages": msgs}])
    (last,) = data.load_sft(path, tok, 512)
    (every,) = data.load_sft(path, tok, 512, assistant_turns="all")
    assert every.input_ids == last.input_ids  # the same tokens, more of them trained

    def trained(e):
        ids, labels = data.sft_batch([e], tok.pad_token_id)
        return tok.decode([t for t in labels[0].tolist() if t != -100])

    assert trained(last) == "a b c<|im_end|>"
    assert trained(every) == "sure here is it<|im_end|>a b c<|im_end|>"


def test_long_chat_loses_oldest_turns_keeps_bos_and_system(tok, files):
    msgs = chat(0, turns=4)
    path = write_jsonl(files_dir(files) / "long.jsonl", [{"messages": msgs}])
    full = data.load_prompts(path, tok, 10_000)[0].ids
    short = Codec(tok).prompt([SYSTEM, msgs[-1]], "x")[0]
    cut = data.load_prompts(path, tok, len(short) + 3)
    assert cut.counts.prompts_cut == 1 and len(full) > len(short)
    assert cut[0].ids == short  # the oldest turns went, the system turn and the last user turn stayed
    # a plain prompt longer than the budget loses its middle: BOS / header and the generation prompt stay
    mid = data.load_prompts(path, tok, 24)[0].ids
    assert mid == short[:12] + short[-12:]
    assert tok.decode(mid).startswith(("<s>" if tok.bos_token_id is not None else "") + "<|im_start|>system\n")
    assert tok.decode(mid).endswith("<|im_start|>assistant\n")


def test_sft_cuts_the_prompt_before_the_response(tok, files):
    msgs = chat(0, turns=3) + [{"role": "assistant", "content": "sure a b c"}]
    path = write_jsonl(files_dir(files) / "sftlong.jsonl", [{"messages": msgs}] * 2)
    whole = data.load_sft(path, tok, 10_000)[0]
    resp = whole.input_ids[whole.prompt_len:]
    ex = data.load_sft(path, tok, whole.prompt_len)  # no room for the whole prompt and the response
    assert ex.counts.prompts_cut == 2 and ex.counts.responses_cut == 0
    assert ex[0].input_ids[ex[0].prompt_len:] == resp and len(ex[0].input_ids) <= whole.prompt_len
    with pytest.raises(DataError, match=r"sftlong.jsonl:1: prompt \+ response is \d+ tokens, over the"):
        data.load_sft(path, tok, whole.prompt_len, overlong="error")
    dropped = data.load_sft(path, tok, 10_000, overlong="drop")
    assert len(dropped) == 2 and dropped.counts.dropped == 0
    with pytest.raises(DataError, match="no examples"):
        data.load_sft(path, tok, whole.prompt_len, overlong="drop")


def test_rm_pairs_made_identical_are_dropped_and_counted(tok, files):
    p = [{"role": "user", "content": "hello"}]
    long = "a b c d e f g h a b c d e f g h"
    rows = [{"prompt": p, "completions": [long + " a", long + " b", "hello"], "ranks": [0, 1, 2]},
            {"prompt": p, "chosen": long + " a", "rejected": long + " b"},
            {"prompt": p, "chosen": "hello", "rejected": "fine"}]
    path = write_jsonl(files_dir(files) / "rmcut.jsonl", rows)
    plen = len(Codec(tok).prompt(p, "x")[0])
    ex = data.load_rm(path, tok, plen + 4)  # the prompt keeps half; the two long completions become identical
    assert ex.counts.pairs_dropped == 3 and ex.counts.dropped == 1 and len(ex) == 2
    assert len(ex[0].completions) == 2 and ex[0].ranks == [0, 2]  # merged into the better-ranked copy
    assert ex[0].completions[0] != ex[0].completions[1]
    assert all(len(ex[0].prompt_ids) + len(c) <= plen + 4 for c in ex[0].completions)


def test_ptx_texts_have_their_own_length(tok, files):
    path = write_jsonl(files_dir(files) / "ptx.jsonl", [{"text": "hello how are you fine thanks"}])
    t = data.load_texts(path, tok, 3)
    assert len(t[0]) == 3 and t.counts.responses_cut == 1


def test_non_utf8_and_overlong_lines_name_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        data.load_prompts(bad, tok, 64)
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a"}\n{"prompt": "' + "a " * data.MAX_LINE_BYTES + '"}\n')
    with pytest.raises(DataError, match=r"big.jsonl:2: the line is over 1048576 bytes"):
        data.load_prompts(big, tok, 64)
