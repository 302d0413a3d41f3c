import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from core.data import SCHEMAS, DataError, causal_mask_from_segments, load_rows, pack, tokenize_sft
from core.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer, load_tokenizer, save_tokenizer

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "<think>1 + 2 = 3</think> <answer>3</answer>",
        "  leading and trailing  ",
        "tabs\tand\nnew lines\r\n",
        "<answer></answer><think>",
        DEFAULT_ALPHABET,
        "<eos><pad><bos>x",
        "a . b , c ? d ! e 's f n't g 're",  # what clean_up_tokenization_spaces would rewrite
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_special_tokens_are_matched_whole(tok):
    ids = tok.encode("<think>1+2</think>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<think>", "1", "+", "2", "</think>"]
    for t in TAGS + ["<pad>", "<bos>", "<eos>"]:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t


def test_vocab_is_small_and_one_token_per_char(tok):
    assert len(tok) <= 110
    ids = tok.encode(DEFAULT_ALPHABET, add_special_tokens=False)
    assert len(ids) == len(DEFAULT_ALPHABET) == len(set(ids))
    assert tok.pad_token == "<pad>" and tok.bos_token == "<bos>" and tok.eos_token == "<eos>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_default_encoding_prepends_bos(tok):
    assert tok("ab")["input_ids"] == [tok.bos_token_id, *tok.encode("ab", add_special_tokens=False)]


def test_unknown_char_becomes_unk(tok):
    ids = tok.encode("a\u00e9b\u4e2d", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["a", "<unk>", "b", "<unk>"]
    assert tok.decode(ids) == "a<unk>b<unk>"


def test_skip_special_tokens_keeps_reasoning_tags(tok):
    # vLLM decodes with skip_special_tokens=True; the format reward needs the tags.
    ids = tok("<think>x</think><answer>y</answer>")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think><answer>y</answer>"


def test_save_and_load(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = " <think>a b , c .</think>\n<answer>42</answer>\u00e9"
    for loaded in (AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        assert len(loaded) == len(tok)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
            tok.pad_token_id,
            tok.bos_token_id,
            tok.eos_token_id,
            tok.unk_token_id,
        )
        assert loaded.decode(loaded.encode(text[:-1], add_special_tokens=False)) == text[:-1]


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------- loading


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_schemas_documented():
    import core.data

    for kind, fields in SCHEMAS.items():  # every kind and its fields are in the module's docstring
        line = next((x for x in core.data.__doc__.splitlines() if f'``"{kind}"``' in x), "")
        assert all(f"``{f}``" in line for f in fields), kind
    assert SCHEMAS["preference"] == ("prompt", "chosen", "rejected")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_load_jsonl(tmp_path, suffix):
    path = write_jsonl(
        tmp_path / f"d{suffix}",
        [{"prompt": "1+1?", "answer": "2", "id": 7}, "", "   ", {"prompt": "2+2?", "answer": "4"}],
    )
    assert load_rows(path, "prompt") == [{"prompt": "1+1?", "answer": "2", "id": 7}, {"prompt": "2+2?", "answer": "4"}]


def test_load_parquet(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"prompt": ["p1", "p2"], "response": ["r1", "r2"], "n": [1, 2]})
    assert load_rows(path, "sft") == [
        {"prompt": "p1", "response": "r1", "n": 1},
        {"prompt": "p2", "response": "r2", "n": 2},
    ]


def test_load_text_kind(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    assert load_rows(path, "text") == [{"text": "hello world"}]


GOOD = {"prompt": "1+1?", "answer": "2"}

JSONL_BAD = [
    # (lines, kind, required fragments of the message)
    ([GOOD, '{"prompt": "a", answer}'], "prompt", ["line 2", "invalid JSON"]),
    ([GOOD, GOOD, "[1, 2]"], "prompt", ["line 3", "JSON object", "list"]),
    (['"just a string"'], "prompt", ["line 1", "JSON object", "str"]),
    ([GOOD, {"prompt": "a"}], "prompt", ["line 2", "'answer'", "missing"]),
    ([GOOD, {"prompt": "a", "answer": None}], "prompt", ["line 2", "'answer'", "null"]),
    ([GOOD, GOOD, {"prompt": "a", "answer": ["2"]}], "prompt", ["line 3", "'answer'", "must be a string", "list"]),
    ([{"prompt": "a", "answer": 2}], "prompt", ["line 1", "'answer'", "int"]),
    ([{"prompt": "", "answer": "2"}], "prompt", ["line 1", "'prompt'", "empty"]),
    ([{"prompt": " \n", "answer": "2"}], "prompt", ["line 1", "'prompt'", "empty"]),
    (["", "", {"prompt": "a"}], "prompt", ["line 3", "'answer'"]),  # blank lines still count
    ([{"prompt": "a", "answer": "b"}], "sft", ["line 1", "'response'"]),
    ([{"txt": "a"}], "text", ["line 1", "'text'"]),
]


@pytest.mark.parametrize("lines,kind,fragments", JSONL_BAD)
def test_bad_jsonl(tmp_path, lines, kind, fragments):
    path = write_jsonl(tmp_path / "bad_rows.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_rows(path, kind)
    msg = str(err.value)
    for frag in ["bad_rows.jsonl", *fragments]:
        assert frag in msg, (frag, msg)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"enc\.jsonl line 2: not valid UTF-8"):
        load_rows(path, "prompt")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_rows(path, "prompt") == [GOOD]


PARQUET_BAD = [
    ({"prompt": ["a", "b"], "answer": ["1", None]}, ["row 1", "'answer'", "null"]),
    ({"prompt": ["a", "b"]}, ["row 0", "'answer'", "missing"]),
    ({"prompt": ["a", "b"], "answer": [["1"], ["2"]]}, ["row 0", "'answer'", "list"]),
    ({"prompt": ["a", "b"], "answer": [1, 2]}, ["row 0", "'answer'", "int"]),
    ({"prompt": ["a", ""], "answer": ["1", "2"]}, ["row 1", "'prompt'", "empty"]),
]


@pytest.mark.parametrize("columns,fragments", PARQUET_BAD)
def test_bad_parquet(tmp_path, columns, fragments):
    path = write_parquet(tmp_path / "bad_rows.parquet", columns)
    with pytest.raises(DataError) as err:
        load_rows(path, "prompt")
    msg = str(err.value)
    for frag in ["bad_rows.parquet", *fragments]:
        assert frag in msg, (frag, msg)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_rows(tmp_path / "missing.jsonl", "prompt")

    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\na,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown extension '\.csv'.*\.jsonl"):
        load_rows(csv, "prompt")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows.*\"answer\""):
        load_rows(empty, "prompt")

    empty_pq = write_parquet(
        tmp_path / "empty.parquet", {"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}
    )
    with pytest.raises(DataError, match=r"empty\.parquet: no rows"):
        load_rows(empty_pq, "prompt")

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: could not read as parquet"):
        load_rows(corrupt, "prompt")

    with pytest.raises(ValueError, match="unknown data kind"):
        load_rows(csv, "rl")


# ---------------------------------------------------------------- SFT tokenization


def test_tokenize_sft_masks(tok):
    rows = [{"prompt": "1+2=", "response": "<think>add</think><answer>3</answer>"}, {"prompt": "q", "response": " a "}]
    out = tokenize_sft(rows, tok, max_len=64)
    for row, sample in zip(rows, out):
        ids, mask = sample["input_ids"], sample["loss_mask"]
        assert len(ids) == len(mask)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        prompt_part = [t for t, m in zip(ids, mask) if m == 0]
        response_part = [t for t, m in zip(ids, mask) if m == 1]
        assert tok.decode(prompt_part) == "<bos>" + row["prompt"]
        assert tok.decode(response_part) == row["response"] + "<eos>"
        # mask is 0...0 1...1: the response is one contiguous suffix
        assert mask == sorted(mask)


def test_tokenize_sft_too_long(tok):
    rows = [{"prompt": "ab", "response": "cd"}, {"prompt": "abc", "response": "defghij"}]
    with pytest.raises(DataError, match=r"sft row 1: 12 tokens > max_len=8"):
        tokenize_sft(rows, tok, max_len=8)
    out = tokenize_sft(rows, tok, max_len=8, truncate=True)
    assert len(out[0]["input_ids"]) == 6
    assert len(out[1]["input_ids"]) == 8 and out[1]["loss_mask"] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(DataError, match=r"sft row 0: prompt alone"):
        tokenize_sft([{"prompt": "abcdefgh", "response": "x"}], tok, max_len=8, truncate=True)


def test_tokenize_sft_validates_rows(tok):
    with pytest.raises(DataError, match=r"sft row 1: .*'response'"):
        tokenize_sft([{"prompt": "a", "response": "b"}, {"prompt": "a"}], tok, max_len=8)


# ---------------------------------------------------------------- packing


def make_samples(lengths, seed=0):
    rng = random.Random(seed)
    samples = []
    for n in lengths:
        ids = [rng.randrange(1, 100) for _ in range(n)]
        mask = [rng.randrange(2) for _ in range(n)]
        samples.append({"input_ids": ids, "loss_mask": mask})
    return samples


def segments(packed):
    """Yield (row, segment, slice) for every packed sample."""
    for r, seg_row in enumerate(packed["segment_ids"]):
        for seg in sorted(set(seg_row.tolist()) - {-1}):
            idx = (seg_row == seg).nonzero().flatten()
            # contiguous
            assert idx.tolist() == list(range(idx[0].item(), idx[-1].item() + 1))
            yield r, seg, slice(idx[0].item(), idx[-1].item() + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_invariants(seed):
    rng = random.Random(seed)
    seq_len = 16
    samples = make_samples([rng.randint(1, seq_len) for _ in range(25)], seed)
    p = pack(samples, seq_len=seq_len, pad_id=0)
    n_rows = p["tokens"].shape[0]
    for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert p[key].shape == (n_rows, seq_len), key
    assert p["tokens"].dtype == p["labels"].dtype == p["position_ids"].dtype == torch.long
    assert p["loss_mask"].dtype == torch.float

    found = []
    for r, seg, sl in segments(p):
        toks = p["tokens"][r, sl]
        n = len(toks)
        found.append(toks.tolist())
        assert p["position_ids"][r, sl].tolist() == list(range(n))
        # labels are next tokens of the same sample; the last one has no target
        assert p["labels"][r, sl].tolist() == toks[1:].tolist() + [-100]
    # every sample appears exactly once, whole (none split, none dropped)
    assert sorted(found) == sorted(s["input_ids"] for s in samples)

    pad = p["segment_ids"] == -1
    assert (p["tokens"][pad] == 0).all() and (p["labels"][pad] == -100).all() and (p["loss_mask"][pad] == 0).all()
    assert (p["loss_mask"][p["labels"] == -100] == 0).all()
    assert p["loss_mask"].sum().item() == sum(sum(s["loss_mask"][1:]) for s in samples)
    # the packing is not wasteful: total tokens need at least this many rows, first-fit stays close
    assert n_rows <= 2 * -(-sum(len(s["input_ids"]) for s in samples) // seq_len)


def test_pack_greedy_first_fit():
    p = pack(make_samples([5, 5, 3, 3]), seq_len=8, pad_id=0)
    assert p["tokens"].shape[0] == 2
    assert p["segment_ids"].tolist() == [[0] * 5 + [1] * 3, [0] * 5 + [1] * 3]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] * 2


def test_pack_loss_mask_shift():
    p = pack([{"input_ids": [10, 11, 12, 13], "loss_mask": [0, 0, 1, 1]}], seq_len=6, pad_id=9)
    assert p["tokens"].tolist() == [[10, 11, 12, 13, 9, 9]]
    assert p["labels"].tolist() == [[11, 12, 13, -100, -100, -100]]
    # position t predicts token t+1, so it is trained iff token t+1 is
    assert p["loss_mask"].tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]


def test_pack_default_mask_is_all_ones():
    p = pack([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}], seq_len=8, pad_id=0)
    assert p["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]


def test_pack_errors():
    with pytest.raises(DataError, match=r"sample 2 has 9 tokens > seq_len=8"):
        pack(make_samples([3, 8, 9]), seq_len=8, pad_id=0)
    with pytest.raises(DataError, match=r"sample 1 is empty"):
        pack([{"input_ids": [1]}, {"input_ids": []}], seq_len=8, pad_id=0)
    with pytest.raises(DataError, match=r"sample 0 has 2 input_ids but 1 loss_mask"):
        pack([{"input_ids": [1, 2], "loss_mask": [1]}], seq_len=8, pad_id=0)


def test_causal_mask_blocks_other_samples():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    m = causal_mask_from_segments(seg)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    allowed = ~m[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_packed_attention_equals_per_sample_attention():
    torch.manual_seed(0)
    samples = make_samples([4, 7, 3, 5, 6])
    p = pack(samples, seq_len=12, pad_id=0)
    n, s, h, d = p["tokens"].shape[0], 12, 2, 8
    emb = torch.randn(100, h * d)
    x = emb[p["tokens"]].view(n, s, h, d).transpose(1, 2)  # [n, h, s, d]
    mask = causal_mask_from_segments(p["segment_ids"])
    # SDPA's bool mask means "may attend", the opposite of megatron's convention
    out = F.scaled_dot_product_attention(x, x, x, attn_mask=~mask)
    assert not out.isnan().any()
    for r, _, sl in segments(p):
        xs = x[r : r + 1, :, sl]
        alone = F.scaled_dot_product_attention(xs, xs, xs, is_causal=True)
        torch.testing.assert_close(out[r : r + 1, :, sl], alone)


def test_end_to_end_sft_pipeline(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": f"{i}+{i}=", "response": f"<think>double</think><answer>{2 * i}</answer>"} for i in range(6)],
    )
    samples = tokenize_sft(load_rows(path, "sft"), tok, max_len=40)
    p = pack(samples, seq_len=40, pad_id=tok.pad_token_id)
    trained = p["labels"][p["loss_mask"].bool()]
    assert tok.decode(trained).count("<eos>") == 6
    assert "double" in tok.decode(trained) and "+" not in tok.decode(trained)
