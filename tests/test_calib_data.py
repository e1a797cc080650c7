"""Calibration data loading, device choice and the statistics file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.calib.data import is_stats_file, load_calibration
from qtool.runtime import resolve_device
from qtool.calib.layerwise import collect_stats
from qtool.calib.stats import load_stats, read_stats
from qtool.checkpoint import open_checkpoint
from qtool.errors import QtoolError
from qtool.jobs.calibrate import calibrate
from qtool.jobs.quantize import quantize
from qtool.plan import plan_quantization
from qtool.quant import mse_qparams
from qtool.quant.spec import QuantSpec

from .test_calib_helpers import reference_stats, samples, save_tiny


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT checkpoint with a real WordPiece tokenizer beside it."""
    from transformers import BertTokenizerFast
    folder = tmp_path_factory.mktemp("bert")
    model = save_tiny("bert", folder)
    words = ["the", "sun", "is", "a", "star", "cat", "sat", "on", "mat", "hot", "day", "night"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder, model, {w: i for i, w in enumerate(vocab)}


def test_text_first_nonempty_lines_with_special_tokens(bert, tmp_path):
    folder, _, v = bert
    p = tmp_path / "c.txt"
    p.write_text("the sun is a star\n\n   \nthe cat sat on the mat\nhot day\n")
    got = load_calibration(p, folder, samples=2, seq_len=6)
    # cut to seq_len by the tokenizer's truncation, which keeps [CLS] and [SEP]
    assert [t.tolist() for t in got] == [[v["[CLS]"], v["the"], v["sun"], v["is"], v["a"], v["[SEP]"]],
                                         [v["[CLS]"], v["the"], v["cat"], v["sat"], v["on"], v["[SEP]"]]]
    assert all(t.dtype == torch.long for t in got)


def test_jsonl_text_field(bert, tmp_path):
    folder, _, v = bert
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "hot day", "id": 1}) + "\n\n" + json.dumps({"text": "night"}) + "\n")
    got = load_calibration(p, folder, samples=8, seq_len=16)
    assert [t.tolist() for t in got] == [[2, v["hot"], v["day"], 3], [2, v["night"], 3]]
    p.write_text('{"txt": "no"}\n')
    with pytest.raises(QtoolError, match="line 1 has no string field 'text'"):
        load_calibration(p, folder)


def test_token_ids_file_with_mask(tmp_path):
    p = tmp_path / "ids.safetensors"
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    save_file({"input_ids": ids, "attention_mask": (ids != 0).long()}, p)
    got = load_calibration(p, None, samples=2, seq_len=2)
    assert [t.tolist() for t in got] == [[5, 6], [8, 9]]
    save_file({"tokens": ids}, p)
    with pytest.raises(QtoolError, match="needs a tensor 'input_ids'"):
        load_calibration(p, None)


def test_data_errors(bert, tmp_path):
    folder, _, _ = bert
    with pytest.raises(QtoolError, match="no such calibration file"):
        load_calibration(tmp_path / "missing.txt", folder)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(QtoolError, match="calibration file is empty"):
        load_calibration(tmp_path / "empty.txt", folder)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(QtoolError, match="no non-empty samples"):
        load_calibration(tmp_path / "blank.txt", folder)
    (tmp_path / "ok.txt").write_text("the sun\n")
    with pytest.raises(QtoolError, match="no usable tokenizer"):
        load_calibration(tmp_path / "ok.txt", tmp_path)


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(QtoolError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(QtoolError, match="no cuda device"):
            resolve_device("cuda:0")


def test_calibrate_writes_stats_file_round_trip(bert, tmp_path):
    folder, model, _ = bert
    data = tmp_path / "c.txt"
    data.write_text("the sun is a star\nthe cat sat on the mat\nhot day and hot night\n")
    out = tmp_path / "stats.safetensors"
    summary = calibrate(str(folder), data, out, calib_samples=8, seq_len=32, device="cpu")
    ids = load_calibration(data, folder, samples=8, seq_len=32)
    tokens = sum(len(t) for t in ids)
    assert summary["layers"] == 12 and summary["blocks"] == 2 and summary["tokens"] == tokens == 7 + 8 + 7  # words + [CLS] + [SEP]
    assert is_stats_file(out) and not is_stats_file(data)
    raw = load_file(out)
    assert len(raw) == 36 and raw["encoder.layer.0.attention.self.query.input_count"].tolist() == [tokens]
    assert raw["encoder.layer.1.output.dense.input_sum_sq"].shape == (128,)
    stats, meta = read_stats(out)
    assert meta == {"format": "qtool-calib-stats", "version": "1", "samples": "3", "tokens": str(tokens),
                    "seq_len": "32", "source": str(folder)}
    ref = reference_stats(model, ids)
    imp = load_stats(out)
    for module, entry in stats.items():
        torch.testing.assert_close(imp[module], ref[module]["sum_sq"] / tokens, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(entry["absmax"], ref[module]["absmax"], rtol=1e-5, atol=1e-7)
    with pytest.raises(QtoolError, match="already exists"):
        calibrate(str(folder), data, out, device="cpu")
    calibrate(str(folder), data, out, calib_samples=1, device="cpu", overwrite=True)
    assert read_stats(out)[1]["samples"] == "1" and not list(tmp_path.glob(".stats*"))
    with pytest.raises(QtoolError, match="is a calibration statistics file, not calibration data"):
        load_calibration(out, folder)


def test_quantize_from_stats_file_uses_importance(bert, tmp_path):
    folder, _, _ = bert
    ckpt = open_checkpoint(folder)
    stats, _ = collect_stats(ckpt, samples(4), samples=4, seq_len=32, device="cpu")
    from qtool.calib.stats import save_stats
    path = tmp_path / "s.safetensors"
    save_stats(path, stats, {"samples": 4, "tokens": 1, "seq_len": 32, "source": "x"})
    spec = QuantSpec(bits=4, group_size=32, method="mse")
    plans = [p for p in plan_quantization(ckpt.tensors.values(), spec, ckpt.config) if p.quantize]
    quantize(str(folder), tmp_path / "q", spec, calib=path, device="cpu")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    imp = load_stats(path)
    # the 12 encoder linears with their statistics; the pooler (outside the encoder blocks) has none: unweighted
    assert len(plans) == 13 and sum(p.module in imp for p in plans) == 12 and "pooler.dense" not in imp
    for p in plans:
        want = mse_qparams(ckpt.get(p.name), spec, importance=imp.get(p.module))[0]
        torch.testing.assert_close(stored[f"{p.module}.weight_scale"], want, rtol=0, atol=0)
    with pytest.raises(QtoolError, match="a statistics file feeds method=.mse. only; method=.gptq. needs calibration data"):
        quantize(str(folder), tmp_path / "g", QuantSpec(bits=4, group_size=32, method="gptq"), calib=path, device="cpu")
    other = {m: {**e, "sum_sq": e["sum_sq"][:64], "absmax": e["absmax"][:64]} if m == "encoder.layer.0.output.dense" else e
             for m, e in stats.items()}
    save_stats(tmp_path / "other.safetensors", other, {"samples": 4, "tokens": 1, "seq_len": 32, "source": "x"})
    with pytest.raises(QtoolError, match="'encoder.layer.0.output.dense' has 64 input channels in the statistics file"):
        quantize(str(folder), tmp_path / "o", spec, calib=tmp_path / "other.safetensors", device="cpu")
    assert not (tmp_path / "o").exists()
