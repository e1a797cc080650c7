#!/usr/bin/env python
"""Check that every peer in the bench venv imports and runs, on qtool's bundled tiny Llama (samples/tiny-llama).

    bench/_work/peers-venv/bin/python bench/peers/smoke.py [--out bench/_work/peers-smoke]

llm-compressor: W4A16 RTN (QuantizationModifier, data-free), GPTQ and AWQ (oneshot on 16 lines of
samples/calib.txt, sequential pipeline); auto-round: W4A16 with 2 tuning steps, exported in llm-compressor's
format; each output is loaded back by transformers (compressed-tensors decompresses it) and its logits on
samples/eval.txt are compared with the bf16 source's. gguf: Q4_0 and Q8_0 of one weight (gguf-py's numpy
quantizers), written to a .gguf file and read back. Prints one line per peer; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
MODEL = REPO / "samples" / "tiny-llama"


def lines(name: str, n: int) -> list[str]:
    return [ln.strip() for ln in (REPO / "samples" / name).read_text().splitlines() if ln.strip()][:n]


def logits(model_dir: Path, tok) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = tok(lines("eval.txt", 8), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def calib_dataset(tok, n: int = 16, seq: int = 64):
    from datasets import Dataset

    enc = tok(lines("calib.txt", n), truncation=True, max_length=seq)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def llmc(recipe, out: Path, tok, data: bool) -> str:
    import cpu_fixes
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    cpu_fixes.apply()  # AWQ pins memory, which a CPU-only torch refuses
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")
    kw = dict(dataset=calib_dataset(tok), num_calibration_samples=16, max_seq_length=64,
              shuffle_calibration_samples=False, pipeline="sequential") if data else {}
    oneshot(model=model, recipe=recipe, **kw)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return "compressed-tensors " + __import__("json").loads((out / "config.json").read_text())[
        "quantization_config"]["format"]


def autoround(out: Path, tok) -> str:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")
    # auto-round drops samples shorter than seqlen (and exits when none is left): 64-token windows of the text
    ids = tok(" ".join(lines("calib.txt", 128)), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    data = [ids[i:i + 64][None] for i in range(0, 16 * 64, 64)]
    ar = AutoRound(model, tok, scheme="W4A16", dataset=data, iters=2, nsamples=16, seqlen=64, batch_size=4,
                   device_map="cpu", seed=0)
    ar.quantize_and_save(str(out), format="llm_compressor")
    folder = next(p.parent for p in out.rglob("config.json"))
    if folder != out:  # some versions add a sub-folder: keep the checked path the one reported
        shutil.copytree(folder, out, dirs_exist_ok=True)
    return "llm_compressor format"


def gguf_check(out: Path) -> str:
    import gguf
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(next(MODEL.glob("*.safetensors"))), "pt") as f:
        name = next(n for n in f.keys() if n.endswith("mlp.down_proj.weight"))
        w = f.get_tensor(name).float().numpy()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    errs = {}
    for qt in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        q = gguf.quants.quantize(w, qt)
        errs[qt.name] = float(np.linalg.norm(gguf.quants.dequantize(q, qt) - w) / np.linalg.norm(w))
        writer.add_tensor(f"{name}.{qt.name}", q, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert back.shape == w.shape, (t.name, back.shape)
    assert errs["Q8_0"] < 0.02 < errs["Q4_0"] < 0.3, errs
    return f"{len(reader.tensors)} tensors read back; rel error Q4_0 {errs['Q4_0']:.4f}, Q8_0 {errs['Q8_0']:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "_work" / "peers-smoke")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    from importlib.metadata import version

    from transformers import AutoTokenizer

    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    tok = AutoTokenizer.from_pretrained(MODEL)
    ref = logits(MODEL, tok)
    shutil.rmtree(a.out, ignore_errors=True)
    scheme = dict(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    jobs = {
        f"llmcompressor {version('llmcompressor')} RTN W4A16": lambda o: llmc(QuantizationModifier(**scheme), o, tok, False),
        f"llmcompressor {version('llmcompressor')} GPTQ W4A16": lambda o: llmc(GPTQModifier(**scheme), o, tok, True),
        f"llmcompressor {version('llmcompressor')} AWQ W4A16": lambda o: llmc([AWQModifier(), QuantizationModifier(**scheme)], o, tok,
                                                                          True),
        f"auto-round {version('auto-round')} W4A16 (2 iters)": lambda o: autoround(o, tok),
    }
    failed = 0
    results = []  # also printed as they come: auto-round exits the process on some errors
    for i, (label, job) in enumerate(jobs.items()):
        out = a.out / f"job{i}"
        t0 = time.perf_counter()
        try:
            what = job(out)
            err = rel(logits(out, tok), ref)
            assert 0 < err < 0.5, f"logits rel error {err}"
            results.append(f"ok    {label}: {what}, loads in transformers, logits rel error {err:.4f} "
                           f"({time.perf_counter() - t0:.1f} s)")
        except Exception:
            failed += 1
            results.append(f"FAIL  {label}:\n{traceback.format_exc()}")
        print(results[-1], file=sys.stderr, flush=True)
    try:
        results.append(f"ok    gguf {version('gguf')}: {gguf_check(a.out / 'gguf')}")
    except Exception:
        failed += 1
        results.append(f"FAIL  gguf:\n{traceback.format_exc()}")
    print("\n".join(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
