"""Hostile and mistaken usage through the real command line (a subprocess, no terminal): outputs never touch
inputs, --overwrite replaces only what qtool could have written, one writer per OUT, signals, side files,
malformed inputs, permissions and partial files (issue 10).

Every refusal asserts its exit code, exactly one stderr line naming the problem, every input byte-identical
afterwards (hashed before and after) and nothing new beside OUT (no OUT, no temporary folder, no lock file).
Runs that must stop part-way are frozen with SIGSTOP at the point under test (found by polling the files the run
creates), so the point is exact rather than a guess of timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import SAMPLES, llama_config, llama_state, write_folder

LEFTOVER = (".qtool-tmp", ".qtool-lock")


# -- helpers ------------------------------------------------------------------------------------------------

def _cmd(args) -> list[str]:
    return [sys.executable, "-m", "qtool", *map(str, args)]


def qtool(*args, umask: int | None = None, fsize: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    def pre():
        if umask is not None:
            os.umask(umask)
        if fsize is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run(_cmd(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=pre if (umask is not None or fsize is not None) else None)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(_cmd(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def tree_hash(path: Path) -> dict:
    """Every file's bytes (sha256), every link's target and every folder of `path`, by relative name."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(path).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(e for e in os.listdir(folder) if e.endswith(LEFTOVER))


def refused(args, *parts: str, inputs=(), out: Path | None = None, code: int = 1, **kw) -> str:
    """Run a command that must fail: the exit code, one stderr line holding `parts`, inputs unchanged, nothing
    new beside OUT (an OUT that existed before is among `inputs` and so is checked byte for byte)."""
    before = {Path(p): tree_hash(p) for p in inputs}
    beside = sorted(os.listdir(out.parent)) if out is not None and out.parent.exists() else None
    r = qtool(*args, **kw)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    for p, h in before.items():
        assert tree_hash(p) == h, f"{p} changed"
    if beside is not None:
        assert sorted(os.listdir(out.parent)) == beside, sorted(os.listdir(out.parent))
    return lines[0]


def poll(cond, proc: subprocess.Popen, what: str, timeout: float = 120):
    """Wait (1 ms steps) until cond() is true while `proc` runs; SIGSTOP it at once; returns cond()'s value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            proc.send_signal(signal.SIGSTOP)
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.001)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def temps(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".qtool-tmp"))


def resume(proc: subprocess.Popen, sig: int | None = None) -> tuple[int, str]:
    if sig is not None:
        proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


# -- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture
def work(tmp_path) -> Path:
    shutil.copytree(SAMPLES / "tiny-llama", tmp_path / "src")
    shutil.copytree(SAMPLES / "tiny-llama-lora", tmp_path / "lora")
    return tmp_path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "int4"
    r = qtool("quantize", SAMPLES / "tiny-llama", "-o", out, "-q", "--method", "rtn")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A ~26 MB float32 Llama: its quantize writes long enough (a few hundred ms) to be stopped mid-write."""
    cfg = dict(hidden=384, inter=1024, layers=4, vocab=256)
    return write_folder(tmp_path_factory.mktemp("big") / "big", llama_state(**cfg, dtype=torch.float32),
                        llama_config(**cfg, dtype="float32"))


# -- 1. outputs never touch inputs --------------------------------------------------------------------------

def test_output_is_the_source(work):
    src = work / "src"
    refused(["quantize", src, "-o", src, "--overwrite"], f"{src}: the output is the input {src}", inputs=[src], out=src)


def test_output_inside_the_source(work):
    src = work / "src"
    refused(["quantize", src, "-o", src / "int4"], "the output lies inside the input", inputs=[src], out=src / "int4")


def test_output_containing_the_source(work):
    (work / "p").mkdir()
    shutil.move(work / "src", work / "p" / "src")
    (work / "p" / "unrelated.txt").write_text("keep me")
    p = work / "p"
    refused(["quantize", p / "src", "-o", p, "--overwrite"], "the output contains the input", inputs=[p], out=p)


def test_dequantize_onto_itself(work, quantized):
    q = work / "q"
    shutil.copytree(quantized, q)
    refused(["dequantize", q, "-o", q, "--overwrite"], "the output is the input", inputs=[q], out=q)


def test_merge_onto_the_adapter(work):
    refused(["merge-lora", work / "src", work / "lora", "-o", work / "lora", "--overwrite"],
            "the output is the input", str(work / "lora"), inputs=[work / "src", work / "lora"], out=work / "lora")


def test_merge_into_the_base(work):
    refused(["merge-lora", work / "src", work / "lora", "-o", work / "src" / "merged"],
            "the output lies inside the input", inputs=[work / "src", work / "lora"], out=work / "src" / "merged")


def test_calibrate_onto_its_data(work):
    shutil.copy(SAMPLES / "calib.txt", work / "calib.txt")
    refused(["calibrate", work / "src", "--calib", work / "calib.txt", "-o", work / "calib.txt", "--overwrite"],
            "the output is the input", inputs=[work / "src", work / "calib.txt"], out=work / "calib.txt")


def test_report_onto_the_source_config(work):
    refused(["quantize", work / "src", "-o", work / "q", "--report", work / "src" / "config.json"],
            "config.json: the output lies inside the input", inputs=[work / "src"], out=work / "q")


def test_output_through_a_symlink_to_the_source(work):
    (work / "link").symlink_to(work / "src")
    refused(["quantize", work / "src", "-o", work / "link", "--overwrite"], "the output is the input",
            inputs=[work / "src"], out=work / "link")


def test_output_holding_the_files_a_source_links_to(work):
    """A hub snapshot links its files into the cache's blobs: OUT = the blobs folder contains an input."""
    blobs, snap = work / "blobs", work / "snapshot"
    shutil.move(work / "src", blobs)
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    refused(["quantize", snap, "-o", blobs, "--overwrite"], "the output contains the input",
            inputs=[blobs, snap], out=blobs)


def test_output_containing_the_statistics_input(work):
    (work / "q").mkdir()
    from qtool.calib.stats import save_stats
    save_stats(work / "q" / "stats.safetensors", {}, {})
    refused(["quantize", work / "src", "-o", work / "q", "--calib", work / "q" / "stats.safetensors", "--overwrite"],
            "the output contains the input", inputs=[work / "src", work / "q"], out=work / "q")


def test_report_inside_the_output(work):
    refused(["quantize", work / "src", "-o", work / "q", "--report", work / "q" / "r.json"],
            "lies inside the other output", inputs=[work / "src"], out=work / "q")


# -- 2. --overwrite replaces only what qtool could have written ---------------------------------------------

def test_overwrite_refuses_a_folder_with_unrelated_files(work, quantized):
    out = work / "out"
    shutil.copytree(quantized, out)
    (out / "notes.txt").write_text("mine")
    refused(["quantize", work / "src", "-o", out, "--overwrite"], "holds 'notes.txt', which is not part of a checkpoint",
            inputs=[work / "src", out], out=out)


def test_overwrite_refuses_a_folder_with_a_subfolder(work, quantized):
    out = work / "out"
    shutil.copytree(quantized, out)
    (out / "data").mkdir()
    (out / "data" / "rows.csv").write_text("1,2")
    refused(["quantize", work / "src", "-o", out, "--overwrite"], "holds 'data/rows.csv'", inputs=[work / "src", out], out=out)


def test_overwrite_refuses_a_folder_without_weights(work):
    out = work / "out"
    out.mkdir()
    (out / "README.md").write_text("my project")
    refused(["quantize", work / "src", "-o", out, "--overwrite"], "holds no weights", inputs=[work / "src", out], out=out)


def test_overwrite_refuses_a_file_in_place_of_a_folder(work):
    (work / "out").write_text("a file")
    refused(["quantize", work / "src", "-o", work / "out", "--overwrite"], "'-o' / '--out'", "is a file",
            inputs=[work / "src", work / "out"], out=work / "out", code=2)  # Click's own check: a usage error
    from qtool import QtoolError, quantize
    with pytest.raises(QtoolError, match="exists and is not a folder; refusing to replace it"):
        quantize(work / "src", work / "out", overwrite=True)
    assert (work / "out").read_text() == "a file"


def test_overwrite_refuses_a_json_that_is_not_a_report(work):
    (work / "r.json").write_text('{"mine": 1}')
    refused(["quantize", work / "src", "-o", work / "q", "--report", work / "r.json", "--overwrite"],
            "exists and is not a qtool report", inputs=[work / "src", work / "r.json"], out=work / "q")


def test_overwrite_refuses_a_file_that_is_not_a_statistics_file(work):
    (work / "stats.safetensors").write_bytes(b"not statistics")
    shutil.copy(SAMPLES / "calib.txt", work / "calib.txt")
    refused(["calibrate", work / "src", "--calib", work / "calib.txt", "-o", work / "stats.safetensors", "--overwrite"],
            "exists and is not a qtool statistics file", inputs=[work / "src", work / "stats.safetensors"],
            out=work / "stats.safetensors")


def test_existing_output_needs_overwrite(work, quantized):
    out = work / "out"
    shutil.copytree(quantized, out)
    refused(["quantize", work / "src", "-o", out], "already exists; pass --overwrite", inputs=[work / "src", out], out=out)


def test_overwrite_replaces_a_checkpoint_folder_and_a_report(work, quantized):
    out = work / "out"
    shutil.copytree(quantized, out)
    r = qtool("quantize", work / "src", "-o", work / "first", "-q", "--report", work / "r.json")
    assert r.returncode == 0, r.stderr
    before = tree_hash(work / "src")
    r = qtool("quantize", work / "src", "-o", out, "-q", "--bits", "8", "--report", work / "r.json", "--overwrite")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert json.loads((work / "r.json").read_text())["quantization"]["bits"] == 8
    assert tree_hash(work / "src") == before and leftovers(work) == []


# -- 3. one writer per OUT ----------------------------------------------------------------------------------

def test_a_second_writer_fails_at_once(work, big):
    out = work / "out"
    first = start("quantize", big, "-o", out, "-q")
    poll(lambda: temps(work, "out"), first, "the first run's temporary folder")
    try:
        refused(["quantize", big, "-o", out, "-q"], f"{out}: another qtool process is writing it",
                inputs=[big])
        refused(["quantize", big, "-o", out, "-q", "--overwrite"], "another qtool process is writing it", inputs=[big])
    finally:
        code, err = resume(first)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and leftovers(work) == []


def test_an_output_that_appears_during_the_run_is_never_replaced(work, big):
    out = work / "out"
    run = start("quantize", big, "-o", out, "-q")
    poll(lambda: temps(work, "out"), run, "the temporary folder")
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's")
    code, err = resume(run)
    assert code == 1 and err.strip().splitlines() == [f"error: {out}: appeared while this run was writing it; "
                                                      "it was left as it was and nothing was written"]
    assert tree_hash(out) == {"model.safetensors": hashlib.sha256(b"someone else's").hexdigest()}
    assert leftovers(work) == []


def test_with_overwrite_an_appearing_output_is_still_checked(work, big):
    out = work / "out"
    run = start("quantize", big, "-o", out, "-q", "--overwrite")
    poll(lambda: temps(work, "out"), run, "the temporary folder")
    out.mkdir()
    (out / "diary.txt").write_text("private")
    code, err = resume(run)
    assert code == 1 and "holds 'diary.txt', which is not part of a checkpoint" in err, err
    assert (out / "diary.txt").read_text() == "private" and leftovers(work) == []


# -- 4. signals ---------------------------------------------------------------------------------------------

def _lock(folder: Path, name: str):
    return (folder / f".{name}.qtool-lock").exists()


def _mid_write(folder: Path, name: str):
    for t in temps(folder, name):
        shard = t / "model.safetensors"
        if shard.is_file() and shard.stat().st_size > 2**20:
            return True
    return False


POINTS = {"claimed": _lock, "temporary folder made": lambda f, n: bool(temps(f, n)), "mid-write": _mid_write}


# Every signal, and every point of a run, at least once (each case costs a run of the big model).
SIGNAL_CASES = [(signal.SIGTERM, 143, "claimed"), (signal.SIGTERM, 143, "temporary folder made"),
                (signal.SIGTERM, 143, "mid-write"), (signal.SIGINT, 130, "mid-write"),
                (signal.SIGHUP, 129, "temporary folder made"), (signal.SIGHUP, 129, "claimed")]


@pytest.mark.parametrize("sig,code,point", SIGNAL_CASES, ids=[f"{s.name}-{p}" for s, _, p in SIGNAL_CASES])
def test_signal_cleans_up_and_keeps_an_existing_output(work, big, quantized, sig, code, point):
    out = work / "out"
    existing = point != "claimed"  # with --overwrite over an earlier output, which must survive byte for byte
    if existing:
        shutil.copytree(quantized, out)
    before = tree_hash(out), tree_hash(big)
    run = start("quantize", big, "-o", out, "-q", *(["--overwrite"] if existing else []))
    poll(lambda: POINTS[point](work, "out"), run, point)
    rc, err = resume(run, sig)
    name = signal.Signals(sig).name
    assert rc == code, (rc, err)
    assert err.strip().splitlines() == [f"error: {out}: interrupted by {name}; nothing was written or replaced"]
    assert (tree_hash(out), tree_hash(big)) == before
    assert sorted(os.listdir(work)) == sorted(["src", "lora"] + (["out"] if existing else []))


def test_a_killed_runs_leftovers_are_removed_by_the_next_run_but_a_live_runs_never(work, big):
    killed = start("quantize", big, "-o", work / "killed", "-q")
    poll(lambda: _mid_write(work, "killed"), killed, "mid-write")
    killed.kill()
    killed.wait()
    assert temps(work, "killed") and _lock(work, "killed")  # SIGKILL: nothing could clean up
    live = start("quantize", big, "-o", work / "live", "-q")
    poll(lambda: temps(work, "live"), live, "the live run's temporary folder")
    try:
        r = qtool("quantize", work / "src", "-o", work / "next", "-q")
        assert r.returncode == 0, r.stderr
        assert temps(work, "killed") == [] and not _lock(work, "killed")
        assert temps(work, "live") and _lock(work, "live")  # its owner runs: untouched
    finally:
        code, err = resume(live)
    assert code == 0, err
    assert (work / "live" / "model.safetensors").is_file() and leftovers(work) == []
    assert sorted(os.listdir(work)) == ["live", "lora", "next", "src"]


# -- 5. side files ------------------------------------------------------------------------------------------

def test_only_the_checkpoints_own_files_are_copied(work):
    src = work / "src"
    for name, text in {"README.md": "card", "LICENSE": "terms", "chat_template.jinja": "{{ messages }}",
                       "notes.txt": "private", "model.gguf": "other format", "train.log": "log"}.items():
        (src / name).write_text(text)
    for sub in ("onnx", "original", "int4-earlier", ".out.abc12345.qtool-tmp"):
        (src / sub).mkdir()
        (src / sub / "model.safetensors").write_bytes(b"x")
    r = qtool("quantize", src, "-o", work / "q", "-q", "--report", work / "r.json")
    assert r.returncode == 0, r.stderr
    expected = ["LICENSE", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(work / "q")) == sorted(expected + ["model.safetensors"])
    assert json.loads((work / "r.json").read_text())["copied_files"] == expected
    for name in expected[:3]:
        assert (work / "q" / name).read_bytes() == (src / name).read_bytes()


# -- 6. hostile and malformed inputs ------------------------------------------------------------------------

def _deep(d=50_000):
    return "[" * d + "]" * d


def test_deeply_nested_safetensors_header(work):
    shard = work / "src" / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = "DEEP"
    new = json.dumps(header).replace('"DEEP"', _deep()).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    refused(["quantize", work / "src", "-o", work / "q"], "model-00001-of-00002.safetensors: the safetensors header is "
            "not valid: JSON nested too deeply", inputs=[work / "src"], out=work / "q")


@pytest.mark.parametrize("field,value,problem", [("dtype", ["F32"], "unknown dtype ['F32']"),
                                                 ("shape", "128", "invalid shape '128'"),
                                                 ("data_offsets", {"a": 1}, "invalid data offsets")])
def test_wrong_json_types_in_a_safetensors_header(work, field, value, problem):
    shard = work / "src" / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name][field] = value
    new = json.dumps(header).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    refused(["inspect", work / "src"], problem, inputs=[work / "src"])
    refused(["quantize", work / "src", "-o", work / "q"], problem, inputs=[work / "src"], out=work / "q")


@pytest.mark.parametrize("file,edit,problem", [
    ("config.json", lambda c: c.update(model_type=["llama"]), "config.json: model_type must be a string or null, not a list"),
    ("config.json", lambda c: c.update(quantization_config="int4"), "quantization_config must be an object or null"),
    ("config.json", lambda c: c.update(text_config={"tie_word_embeddings": "yes"}), "text_config.tie_word_embeddings must be"),
    ("config.json", lambda c: c.update(extra=json.loads(_deep(80))), "config.json is not valid: JSON nested 81 levels deep"),
    ("model.safetensors.index.json", lambda c: c.update(weight_map=[1, 2]), "weight_map must be an object, not a list"),
    ("model.safetensors.index.json", lambda c: c["weight_map"].update({"x": "\u0000"}), "is not a usable file name"),
])
def test_malformed_model_json(work, file, edit, problem):
    p = work / "src" / file
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))
    refused(["quantize", work / "src", "-o", work / "q"], problem, inputs=[work / "src"], out=work / "q")


@pytest.mark.parametrize("edit,problem", [
    (lambda c: c.update(r="8"), "adapter_config.json: r must be a positive integer or null, not a string"),
    (lambda c: c.update(lora_alpha=[16]), "lora_alpha must be a number or null, not a list"),
    (lambda c: c.update(base_model_name_or_path=7), "base_model_name_or_path must be a string or null"),
    (lambda c: c.update(target_modules={"q_proj": 1}), "target_modules must be a string or a list of strings or null"),
])
def test_malformed_adapter_config(work, edit, problem):
    p = work / "lora" / "adapter_config.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))
    refused(["inspect", work / "lora"], problem, inputs=[work / "lora"])
    refused(["merge-lora", work / "src", work / "lora", "-o", work / "m"], problem, inputs=[work / "src", work / "lora"],
            out=work / "m")


def test_deeply_nested_adapter_config(work):
    (work / "lora" / "adapter_config.json").write_text('{"r": ' + _deep() + "}")
    refused(["merge-lora", work / "src", work / "lora", "-o", work / "m"], "adapter_config.json is not valid: JSON "
            "nested too deeply", inputs=[work / "src", work / "lora"], out=work / "m")


def test_a_packed_module_missing_a_part(work, quantized):
    """Found by the 5,000-case fuzz: a flipped byte renamed one module's weight_scale."""
    q = work / "q"
    shutil.copytree(quantized, q)
    raw = (q / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].replace(b'"model.layers.1.self_attn.k_proj.weight_scale"', b'"model/layers.1.self_attn.k_proj.weight_scale"')
    (q / "model.safetensors").write_bytes(raw[:8] + head + raw[8 + n:])
    refused(["dequantize", q, "-o", work / "d"], "model.layers.1.self_attn.k_proj: stores weight_packed but no weight_scale",
            inputs=[q], out=work / "d")


@pytest.mark.parametrize("name", ["model.bin", "model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"])
def test_a_text_file_under_a_checkpoints_name(work, name):
    d = work / "m"
    d.mkdir()
    (d / name).write_text("hello, this is not a checkpoint\n" * 3)
    refused(["inspect", d], f"{d / name}: not a", inputs=[d])
    refused(["quantize", d, "-o", work / "q"], f"{d / name}: not a", inputs=[d], out=work / "q")


def test_a_malicious_pickle_is_refused_without_unsafe_advice(work):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'pwned'}",))
    d = work / "m"
    d.mkdir()
    torch.save({"w": torch.zeros(2), "x": Payload()}, d / "pytorch_model.bin")
    line = refused(["quantize", d, "-o", work / "q"], "refusing to load: not a plain tensor checkpoint",
                   inputs=[d], out=work / "q")
    assert "weights_only" not in line and "GLOBAL" in line
    assert not (work / "pwned").exists()


def test_statistics_from_another_model(work):
    from qtool.calib.stats import save_stats
    other = {"model.layers.0.mlp.down_proj": {"sum_sq": torch.ones(384), "absmax": torch.ones(384), "count": 4}}
    save_stats(work / "stats.safetensors", other, {})
    small = write_folder(work / "small", llama_state(hidden=64, inter=128, layers=1), llama_config(hidden=64, inter=128, layers=1))
    refused(["quantize", small, "-o", work / "q", "--group-size", "32", "--calib", work / "stats.safetensors"],
            "module 'model.layers.0.mlp.down_proj' has 384 input channels in the statistics file but 128 in the model",
            inputs=[small, work / "stats.safetensors"], out=work / "q")
    other = {"encoder.layer.0.attention.self.query": {"sum_sq": torch.ones(64), "absmax": torch.ones(64), "count": 4}}
    (work / "stats.safetensors").unlink()
    save_stats(work / "stats.safetensors", other, {})
    refused(["quantize", small, "-o", work / "q", "--group-size", "32", "--calib", work / "stats.safetensors"],
            "has statistics of module 'encoder.layer.0.attention.self.query', which the model does not have",
            inputs=[small, work / "stats.safetensors"], out=work / "q")


@pytest.mark.parametrize("out", ["", ".", "..", "sub/.", "/"])
def test_unusable_output_names(work, out):
    refused(["quantize", work / "src", "-o", out, "--overwrite"], "is not a usable output name", inputs=[work / "src", work])


# -- 8. permissions and partial files -----------------------------------------------------------------------

@pytest.mark.parametrize("umask,folder,file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o002, 0o775, 0o664)])
def test_outputs_honour_the_umask(work, umask, folder, file):
    r = qtool("quantize", work / "src", "-o", work / "q", "-q", "--report", work / "r.json", umask=umask)
    assert r.returncode == 0, r.stderr
    assert (work / "q").stat().st_mode & 0o777 == folder
    assert {oct(p.stat().st_mode & 0o777) for p in (work / "q").iterdir()} == {oct(file)}
    assert (work / "r.json").stat().st_mode & 0o777 == file


def test_statistics_file_honours_the_umask(tmp_path):
    from qtool.calib.stats import save_stats
    old = os.umask(0o027)
    try:
        save_stats(tmp_path / "s.safetensors", {}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o640


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory) -> Path:
    """Many small tensors: shards can be cut smaller than the report."""
    cfg = dict(hidden=32, inter=64, layers=12, vocab=32)
    return write_folder(tmp_path_factory.mktemp("many") / "m", llama_state(**cfg), llama_config(**cfg))


def test_a_report_that_cannot_be_written_completely_leaves_no_file(work, many_layers):
    args = ["quantize", many_layers, "-q", "--group-size", "32", "--max-shard-size", "8KB"]
    r = qtool(*args, "-o", work / "probe", "--report", work / "probe.json")
    assert r.returncode == 0, r.stderr
    report = (work / "probe.json").stat().st_size
    largest = max(p.stat().st_size for p in (work / "probe").iterdir())
    assert largest < report  # the limit below fits every file of the checkpoint, not the report
    limit = (largest + report) // 2
    line = refused([*args, "-o", work / "q", "--report", work / "r.json"], f"{work / 'r.json'}: cannot write the report",
                   "no report file was left", inputs=[many_layers], fsize=limit)
    assert "File too large" in line
    assert not (work / "r.json").exists() and leftovers(work) == []
    assert (work / "q" / "model.safetensors.index.json").is_file()  # the checkpoint itself was complete


def test_a_checkpoint_that_cannot_be_written_completely_leaves_nothing(work, many_layers):
    refused(["quantize", many_layers, "-q", "--group-size", "32", "-o", work / "q"], f"{work / 'q'}: cannot write", inputs=[many_layers],
            out=work / "q", fsize=16 * 1024)


# -- 7. nothing is done silently wrong ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from .test_calib_helpers import save_tiny
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    save_tiny("gpt2", folder)
    return folder


def test_a_run_that_would_quantize_nothing_is_an_error(work, gpt2):
    refused(["quantize", gpt2, "-o", work / "q"], f"{gpt2}: nothing to quantize: GPT-2 Conv1D weights",
            "keep this model dense", inputs=[gpt2], out=work / "q")
    refused(["quantize", work / "src", "-o", work / "q", "--exclude", "*"],
            "nothing to quantize: --exclude '*' leaves no linear weight", inputs=[work / "src"], out=work / "q")


@pytest.mark.parametrize("flag,glob", [("--exclude", "model.layer.*"), ("--include", "lm_head_typo")])
def test_a_glob_that_matches_nothing_is_an_error(work, flag, glob):
    refused(["quantize", work / "src", "-o", work / "q", flag, glob],
            f"{flag} '{glob}' matches no tensor or module name", inputs=[work / "src"], out=work / "q")


def test_including_what_no_consumer_loads_packed_is_refused(work, gpt2):
    refused(["quantize", work / "src", "-o", work / "q", "--include", "model.embed_tokens"],
            "model.embed_tokens.weight: matched by --include 'model.embed_tokens', but it is an embedding",
            "load only nn.Linear weights packed", inputs=[work / "src"], out=work / "q")
    refused(["quantize", gpt2, "-o", work / "q", "--include", "*.mlp.c_fc"],
            "but it is a GPT-2 Conv1D weight, not an nn.Linear one", inputs=[gpt2], out=work / "q")


def test_inspect_gates_every_tensor_that_differs(work):
    r = qtool("merge-lora", work / "src", work / "lora", "-o", work / "merged", "-q")
    assert r.returncode == 0, r.stderr
    line = refused(["inspect", work / "merged", "--against", work / "src", "--max-rel-error", "1e-6"],
                   "quality gate failed", code=3, inputs=[work / "merged", work / "src"])
    assert "over max rel_error 1e-06" in line
    r = qtool("inspect", work / "merged", "--against", work / "src", "--max-rel-error", "10", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["gate"]["passed"] and report["quantization"] is None


@pytest.mark.parametrize("args,part", [
    (["quantize", "SRC", "-o", "OUT", "--max-rel-error", "-0.1"], "'--max-rel-error': must be at least 0, not -0.1"),
    (["quantize", "SRC", "-o", "OUT", "--max-rel-error", "nan"], "'--max-rel-error': must be a number, not nan"),
    (["inspect", "SRC", "--against", "SRC", "--max-rel-error", "nan"], "'--max-rel-error': must be a number, not nan"),
    (["merge-lora", "SRC", "LORA", "-o", "OUT", "--weight", "nan"], "'--weight': must be a finite number, not nan"),
    (["quantize", "SRC", "-o", "OUT", "--device", "tpu"], "'--device': 'tpu' is not a device"),
    (["calibrate", "SRC", "--calib", "SRC/config.json", "-o", "OUT", "--device", "gpu"], "'gpu' is not a device"),
    (["quantize", "SRC", "-o", "OUT", "--max-shard-size", "0"], "'0' is not a size of at least 1 byte"),
])
def test_usage_errors_say_why(work, args, part):
    sub = {"SRC": str(work / "src"), "LORA": str(work / "lora"), "OUT": str(work / "out")}
    args = [sub.get(a, a.replace("SRC", sub["SRC"])) for a in args]
    line = refused(args, part, code=2, inputs=[work / "src", work / "lora"], out=work / "out")
    assert line.endswith("--help')")
