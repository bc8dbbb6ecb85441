"""Tests for fedtune.data: readers, cleaning, label maps, tokenization, demo rows, site loading."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedtune.config import DataConfig
from fedtune.data import (
    DataError,
    LabelMap,
    clean_rows,
    encode_causal,
    encode_classification,
    encode_prompt_response,
    generate_demo_rows,
    load_site_data,
    pad_collate,
    read_table,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = "what is two plus four the answer hello world good bad movie great".split()


@pytest.fixture(scope="module")
def tok():
    """A word-level fast tokenizer with an EOS token, built offline in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- readers


EXPECTED = pd.DataFrame({"text": ['say "hi"', "b\\c", ""], "label": ["1", "10", "2"]})


def test_each_format_loads_as_strings(tmp_path):
    files = {
        "a.csv": 'text,label\n"say ""hi""",1\nb\\c,10\n,2\n',
        "a.tsv": 'text\tlabel\nsay "hi"\t1\nb\\c\t10\n\t2\n',  # unquoted: quotes are literal
        "a.tab": 'text\tlabel\nsay "hi"\t1\nb\\c\t10\n\t2\n',
        "a.jsonl": '{"text": "say \\"hi\\"", "label": 1}\n\n{"text": "b\\\\c", "label": "10"}\n{"text": null, "label": 2}\n',
        "a.ndjson": '{"text": "say \\"hi\\"", "label": 1}\n{"text": "b\\\\c", "label": 10}\n{"label": 2}\n',
    }
    for name, text in files.items():
        df = read_table(write(tmp_path / name, text))
        pd.testing.assert_frame_equal(df.astype(object), EXPECTED.astype(object), obj=name)
    pq_path = tmp_path / "a.parquet"
    pd.DataFrame({"text": ['say "hi"', "b\\c", None], "label": [1, 10, 2]}).to_parquet(pq_path)
    pd.testing.assert_frame_equal(read_table(pq_path).astype(object), EXPECTED.astype(object))


def test_json_array_file_loads(tmp_path):
    path = write(tmp_path / "a.json", '[{"text": "hi", "label": 1}, {"text": "yo", "extra": true}]')
    assert read_table(path).to_dict("records") == [
        {"text": "hi", "label": "1", "extra": ""},
        {"text": "yo", "label": "", "extra": "True"},
    ]


def test_explicit_format_overrides_extension(tmp_path):
    path = write(tmp_path / "data.txt", "text\tlabel\nhello\tgood\n")
    assert read_table(path, "tsv").to_dict("records") == [{"text": "hello", "label": "good"}]


def test_unknown_extension_lists_supported(tmp_path):
    path = write(tmp_path / "data.xlsx", "x")
    with pytest.raises(DataError, match=r"data\.xlsx: cannot tell the format .*\.csv, \.tsv.*\.parquet"):
        read_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_table(tmp_path / "nope.csv")


def test_undecodable_bytes_name_line_and_offset(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nfine,1\ncaf\xe9,2\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3: not valid UTF-8 \(byte 0xe9 at offset 21\)"):
        read_table(path)


def test_wrong_field_count_names_line(tmp_path):
    path = write(tmp_path / "bad.tsv", "text\tlabel\nok\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match=r"bad\.tsv: line 3: expected 2 fields \(text, label\), found 3"):
        read_table(path)
    path = write(tmp_path / "short.csv", "text,label\nok,1\n\nonly\n")
    with pytest.raises(DataError, match=r"short\.csv: line 4: expected 2 fields"):
        read_table(path)


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_table(path)
    path = write(tmp_path / "arr.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"arr\.jsonl: line 2: expected a JSON object"):
        read_table(path)


# ---------------------------------------------------------------- cleaning


def test_cleaning_strips_and_drops_with_counts():
    df = pd.DataFrame(
        {
            "text": ["  hello ", "hello", "", "world", "   ", "x", "x"],
            "label": ["a", "a ", "b", "b", "a", "", "c"],
            "other": list("1234567"),
        }
    )
    out, report = clean_rows(df, ["text", "label"], "f.csv")
    assert out.to_dict("records") == [
        {"text": "hello", "label": "a", "_row": 1},
        {"text": "world", "label": "b", "_row": 4},
        {"text": "x", "label": "c", "_row": 7},
    ]
    assert (report.rows_read, report.empty_dropped, report.duplicates_dropped, report.rows_kept) == (7, 3, 1, 3)
    assert report.summary() == "read 7 rows, dropped 3 with an empty value and 1 duplicates, kept 3"


def test_missing_column_lists_columns():
    df = pd.DataFrame({"sentence": ["a"], "label": ["1"]})
    with pytest.raises(DataError, match=r"^f\.tsv: no column 'text'; columns are: sentence, label$"):
        clean_rows(df, ["text", "label"], "f.tsv")


def test_empty_after_cleaning():
    df = pd.DataFrame({"text": ["", " "], "label": ["1", "2"]})
    with pytest.raises(DataError, match=r"f\.csv: no usable rows left after cleaning \(read 2 rows, dropped 2"):
        clean_rows(df, ["text", "label"], "f.csv")


# ---------------------------------------------------------------- labels


def test_integer_labels_order_numerically_else_lexicographically():
    assert LabelMap.from_values(["10", "2", "1", "9", "2"]).labels == ["1", "2", "9", "10"]
    assert LabelMap.from_values(["b", "10", "a", "2"]).labels == ["10", "2", "a", "b"]
    lm = LabelMap.from_values(["World", "Sports", "Business"])
    assert lm.id_of("Sports") == 1 and lm.num_labels == 3
    assert lm.id2label == {0: "Business", 1: "Sports", 2: "World"}
    assert lm.label2id == {"Business": 0, "Sports": 1, "World": 2}


def test_label_map_save_load_round_trip(tmp_path):
    lm = LabelMap.from_values(["0", "1", "10"])
    lm.save(tmp_path / "labels.json")
    assert json.loads((tmp_path / "labels.json").read_text()) == {"labels": ["0", "1", "10"]}
    assert LabelMap.load(tmp_path / "labels.json") == lm
    assert LabelMap.from_json(lm.to_json()).labels == ["0", "1", "10"]


def test_unknown_label_names_file_row_column_value():
    lm = LabelMap.from_values(["a", "b", "c"])
    assert lm.encode(["c", "a"], [1, 2], "f.csv", "label") == [2, 0]
    msg = "f.csv: row 7, column 'label': label 'z' is not in the label map (known: a, b, c)"
    with pytest.raises(DataError) as exc:
        lm.encode(["a", "z"], [3, 7], "f.csv", "label")
    assert str(exc.value) == msg


# ---------------------------------------------------------------- tokenization


def test_classification_items_and_dynamic_padding(tok):
    ds = encode_classification(["hello world", "good movie great great great"], [1, 0], tok, max_length=4)
    ids, mask, label = ds[0]
    assert ids.dtype == mask.dtype == label.dtype == torch.long
    assert ids.shape == (2,) and label.shape == () and ds[1][0].shape == (4,)  # truncated
    x, m, y = pad_collate(tok.pad_token_id)([ds[0], ds[1]])
    assert x.shape == m.shape == (2, 4) and y.tolist() == [1, 0]
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and x[0, 2:].tolist() == [tok.pad_token_id] * 2
    assert pad_collate(0)([ds[0]])[0].shape == (1, 2)  # padded to the batch, not max_length


def test_causal_appends_eos_when_it_fits_and_pads_labels(tok):
    ds = encode_causal(["hello world", "what is two plus four"], tok, max_length=4)
    eos = tok.eos_token_id
    assert ds[0][0].tolist()[-1] == eos and len(ds[0][0]) == 3
    assert len(ds[1][0]) == 4 and ds[1][0].tolist()[-1] != eos  # cut at max_length: no EOS
    assert torch.equal(ds[0][0], ds[0][2])
    x, m, y = pad_collate(tok.pad_token_id)([ds[0], ds[1]])
    assert x.shape == y.shape == (2, 4)
    assert y[0].tolist()[-1] == -100 and m[0].tolist() == [1, 1, 1, 0]


def test_prompt_response_masks_prompt_and_cuts_the_prompt_middle_first(tok):
    prompts = ["what is two plus two", "hello", "what is two plus four the answer", "hello"]
    responses = ["four", "world good", "four", "what is two plus four the answer"]
    ds = encode_prompt_response(prompts, responses, tok, max_length=6)
    ids = tok.convert_tokens_to_ids
    eos = tok.eos_token_id
    assert len(ds) == 4 and ds.dropped == 0 and ds.rows == [1, 2, 3, 4]
    assert (ds.prompts_cut, ds.responses_cut) == (2, 1)
    # 1st: 5 prompt + 2 response tokens > 6: the prompt loses its middle, the response stays whole.
    x, _, y = ds[0]
    assert x.tolist() == ids("what is plus two four".split()) + [eos]
    assert y.tolist() == [-100] * 4 + [ids("four"), eos]
    x, _, y = ds[1]  # fits: unchanged
    assert y.tolist() == [-100, ids("world"), ids("good"), eos]
    assert x.tolist()[1:] == y.tolist()[1:]
    x, _, _ = ds[2]  # the prompt keeps its start and its end (instruction, question)
    assert x.tolist() == ids("what is the answer four".split()) + [eos]
    x, _, y = ds[3]  # a short prompt stays whole; the long response loses its end (and EOS)
    assert x.tolist() == ids("hello what is two plus four".split())
    assert y.tolist()[0] == -100 and eos not in y.tolist()
    assert ds.fit_summary(6) == ("to fit model.max_length = 6: 2 prompts cut in the middle, "
                                 "1 responses cut at the end")
    # A prompt longer than the room keeps at least half of it; no room at all drops the row.
    ds = encode_prompt_response(["what is two plus four the answer"], ["what is two plus four"], tok, max_length=4)
    assert ds[0][0].tolist() == ids("what answer what is".split())
    assert encode_prompt_response(["hello"], ["four"], tok, max_length=1).dropped == 1


# ---------------------------------------------------------------- demo


def test_demo_rows_deterministic_balanced_distinct():
    rows = generate_demo_rows(402, seed=3)
    assert rows == generate_demo_rows(402, seed=3)
    assert rows != generate_demo_rows(402, seed=4)
    counts = pd.Series([r["label"] for r in rows]).value_counts()
    assert sorted(counts.index) == ["account", "billing", "shipping", "technical"]
    assert counts.max() - counts.min() <= 1
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(len(t.split()) >= 4 for t in texts)


# ---------------------------------------------------------------- site


def test_site_demo_holds_out_eval(tok):
    cfg = DataConfig(builtin="demo", builtin_rows=40, eval_fraction=0.25)
    data = load_site_data(cfg, "sequence-classification", tok, max_length=16, seed=1)
    assert data.label_map.labels == ["account", "billing", "shipping", "technical"]
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert set(data.train.rows).isdisjoint(data.eval.rows)
    assert data.reports["train"].held_out == 10 and data.reports["eval"].rows_kept == 10


def test_site_eval_label_outside_train_map(tmp_path, tok):
    write(tmp_path / "train.csv", "text,label\nhello,pos\nworld,neg\n")
    write(tmp_path / "eval.csv", "text,label\nhello,pos\ngood,neutral\n")
    cfg = DataConfig(train=tmp_path / "train.csv", eval=tmp_path / "eval.csv")
    with pytest.raises(DataError, match=r"eval\.csv: row 2, column 'label': label 'neutral' is not in the label map \(known: neg, pos\)"):
        load_site_data(cfg, "sequence-classification", tok, max_length=8)


def test_site_causal_prompt_response(tmp_path, tok):
    write(tmp_path / "t.jsonl", '{"q": "what is two plus two", "a": "four"}\n{"q": "hello", "a": "world"}\n')
    cfg = DataConfig(train=tmp_path / "t.jsonl", eval=tmp_path / "t.jsonl", prompt_column="q", response_column="a")
    data = load_site_data(cfg, "causal-lm", tok, max_length=16)
    assert data.label_map is None and len(data.train) == 2
    assert (data.train[1][2] != -100).sum().item() == 2  # "world" + EOS


def test_shared_real_datasets_load():
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (it sits beside the checkout on CI)")
    sst = read_table(SHARED / "sst2" / "train.tsv")
    assert list(sst.columns) == ["sentence", "label"] and len(sst) == 60_614
    assert LabelMap.from_values(clean_rows(sst, ["sentence", "label"], "sst2")[0]["label"]).labels == ["0", "1"]
    ag_path = SHARED / "agnews" / "train.tsv"
    ag = read_table(ag_path)
    # README says 10,000 rows; the file has 10,001 data lines. Count them independently.
    assert len(ag) == ag_path.read_bytes().count(b"\n") - 1 and len(ag) in (10_000, 10_001)
    assert list(ag.columns) == ["text", "label"]
    assert LabelMap.from_values(ag["label"]).labels == ["Business", "Sci/Tech", "Sports", "World"]
