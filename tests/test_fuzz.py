"""Mutation fuzz of the files qtool reads: safetensors headers, index files, config.json, adapter_config.json.

Each case copies a seed checkpoint (the sample model, its quantized copy, the sample adapter), damages one file
(byte flips, truncation, a wrong length prefix, wrong JSON types, deep nesting, overlapping offsets, bad shard
names) and runs inspect, quantize, merge-lora or dequantize on it in this process through the CLI entry point.
Every run must end in exit 0, or in exit 1 with exactly one `error:` line, no traceback and no output left.

QTOOL_FUZZ_N (default 320) cases from QTOOL_FUZZ_SEED (default 20240611); each case is reproducible alone from
its number: QTOOL_FUZZ_N=1 QTOOL_FUZZ_SEED=<seed+i>.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from .conftest import SAMPLES

N = int(os.environ.get("QTOOL_FUZZ_N", "320"))
SEED = int(os.environ.get("QTOOL_FUZZ_SEED", "20240611"))
LEFTOVER_SUFFIXES = (".qtool-tmp", ".qtool-lock")


def build_seeds(root: Path) -> dict[str, Path]:
    shutil.copytree(SAMPLES / "tiny-llama", root / "dense")
    shutil.copytree(SAMPLES / "tiny-llama-lora", root / "adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../dense"
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    import qtool
    qtool.quantize(root / "dense", root / "quantized", qtool.QuantSpec(bits=4, group_size=32, method="rtn"))
    return {"dense": root / "dense", "quantized": root / "quantized", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    return build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


# -- mutations: each takes (rng, path) and damages the file in place ------------------------------------------

def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "bigint", "float", "str", "list", "dict"] if depth < 3 else ["null", "int", "str"]
    k = rng.choice(kinds)
    if k == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if k == "dict":
        return {rng.choice(["a", "dtype", "shape", "weights"]): _random_json(rng, depth + 1)}
    return {"null": None, "bool": rng.random() < 0.5, "int": rng.choice([-1, 0, 1, 7, 2**31, -2**63, 2**64]),
            "bigint": 10**rng.randint(20, 400), "float": rng.choice([0.5, -1e308, 1e-300, float("nan")]),
            "str": rng.choice(["", "F32", "x" * 300, "../../etc/passwd", "\u0000", "é"])}[k]


def _deep(rng: random.Random) -> str:
    d = rng.choice([65, 200, 999, 3000, 100_000])
    return ("[" * d + "]" * d) if rng.random() < 0.5 else ('{"a":' * d + "0" + "}" * d)


def _paths(doc, prefix=()):
    """Every (path to a value) in a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _retype(rng, doc):
    """Replace one value (or the whole document) by a JSON value of another kind; sometimes deeply nested."""
    path = rng.choice(list(_paths(doc)))
    if rng.random() < 0.25:
        marker = "__QTOOL_DEEP__"
        return json.dumps(_set(doc, path, marker)).replace(f'"{marker}"', _deep(rng))
    return json.dumps(_set(doc, path, _random_json(rng)))


def _mutate_json_text(rng, raw: bytes) -> bytes:
    kind = rng.choice(["flip", "truncate", "retype", "retype", "deep"])
    if kind == "flip" and raw:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "truncate":
        return raw[: rng.randrange(len(raw) + 1)]
    if kind == "deep":
        return _deep(rng).encode()
    return _retype(rng, json.loads(raw)).encode()


def mutate_json(rng, path: Path) -> None:
    path.write_bytes(_mutate_json_text(rng, path.read_bytes()))


def _split_safetensors(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def _overlap(rng, header: dict) -> str:
    names = [k for k in header if k != "__metadata__"]
    a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], names[0])
    oa, ob = header[a]["data_offsets"], header[b]["data_offsets"]
    choice = rng.randrange(3)
    if choice == 0:
        header[a]["data_offsets"] = list(ob)                       # two tensors on the same bytes
    elif choice == 1:
        header[a]["data_offsets"] = [ob[0] + 1, ob[0] + 1 + (oa[1] - oa[0])]  # partly on another
    else:
        header[a]["data_offsets"] = [oa[0], oa[1] + rng.choice([-4, 4, 2**40])]
    return json.dumps(header)


def mutate_safetensors(rng, path: Path) -> None:
    head, data = _split_safetensors(path)
    kind = rng.choice(["flip", "truncate", "length", "retype", "retype", "overlap", "deep"])
    if kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: rng.randrange(len(raw))])
        return
    if kind == "length":
        n = rng.choice([0, 1, 7, len(head) - 1, len(head) + 1, len(head) + 8, 2**63, rng.randrange(2**64)])
        path.write_bytes(struct.pack("<Q", max(0, min(n, 2**64 - 1))) + head + data)
        return
    if kind == "flip":
        new = _mutate_json_text(random.Random(rng.random()), head) if rng.random() < 0.2 else None
        if new is None:
            b = bytearray(head)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            new = bytes(b)
    elif kind == "overlap":
        new = _overlap(rng, json.loads(head)).encode()
    elif kind == "deep":
        header = json.loads(head)
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        marker = "__QTOOL_DEEP__"
        header[name][field] = marker
        new = json.dumps(header).replace(f'"{marker}"', _deep(rng)).encode()
    else:
        header = json.loads(head)
        name = rng.choice(list(header))
        field = rng.choice(["dtype", "shape", "data_offsets", None]) if name != "__metadata__" else None
        if field is None:
            header[name] = _random_json(rng)
        else:
            header[name][field] = _random_json(rng)
        new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


def mutate_index(rng, path: Path) -> None:
    if rng.random() < 0.3:
        index = json.loads(path.read_text())
        name = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][name] = rng.choice(["../outside.safetensors", "/etc/passwd", "", ".", "\u0000x",
                                                "missing.safetensors", "x" * 5000, "config.json"])
        path.write_text(json.dumps(index))
        return
    mutate_json(rng, path)


# -- the harness -------------------------------------------------------------------------------------------

def _run(args: list) -> tuple[int, str, str, BaseException | None]:
    from qtool.cli import main
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else r.exception
    return r.exit_code, r.stdout, r.stderr, exc


def _leftovers(folder: Path) -> list[str]:
    return sorted(e for e in os.listdir(folder) if e.endswith(LEFTOVER_SUFFIXES))


def run_case(i: int, seeds: dict[str, Path], work: Path) -> list[dict]:
    """Build and run case i: one dict per command run, with its `failure` (None when it behaved)."""
    rng = random.Random(SEED + i)
    target = rng.choice(["dense", "dense", "quantized", "adapter"])
    case = work / f"case{i}"
    shutil.copytree(seeds[target], case / target)
    if target == "adapter":  # merge-lora needs the base beside it (base_model_name_or_path = ../dense)
        shutil.copytree(seeds["dense"], case / "dense")
    folder = case / target
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and "tokenizer" not in p.name)
    victim = folder / rng.choice(files)
    if victim.suffix == ".safetensors":
        mutate_safetensors(rng, victim)
    elif victim.name.endswith(".index.json"):
        mutate_index(rng, victim)
    else:
        mutate_json(rng, victim)
    out = case / "out"
    runs = {
        "dense": [["inspect", folder, "--json"], ["quantize", folder, "-o", out, "-q", "--method", "rtn"]],
        "quantized": [["inspect", folder, "--json", "--against", seeds["dense"]], ["dequantize", folder, "-o", out, "-q"],
                      ["merge-lora", folder, seeds["adapter"], "-o", out, "-q"]],
        "adapter": [["inspect", folder, "--json"], ["merge-lora", case / "dense", folder, "-o", out, "-q"]],
    }[target]
    results = []
    for args in runs:
        code, stdout, stderr, exc = _run(args)
        results.append({"case": i, "file": f"{target}/{victim.name}", "command": args[0], "code": code,
                        "stderr": stderr.strip(), "failure": _failure(args[0], code, stdout, stderr, exc, out, case)})
        if out.exists():
            shutil.rmtree(out)
    shutil.rmtree(case)
    return results


def _failure(command, code, stdout, stderr, exc, out: Path, case: Path) -> str | None:
    lines = stderr.strip().splitlines()
    if exc is not None:
        return f"traceback {type(exc).__name__}: {exc}"
    if code == 0:
        return None
    if code != 1:
        return f"exit {code}: {stderr!r}"
    if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in stderr:
        return f"stderr is not one error line: {stderr!r}"
    if out.exists() or _leftovers(case):
        return f"failed but left {sorted(os.listdir(case))}"
    if command != "inspect" and stdout:
        return f"failed but printed {stdout[:200]!r}"
    if "weights_only=False" in stderr:
        return f"the message advises an unsafe fix: {stderr!r}"
    return None


def test_fuzz_inputs(seeds, tmp_path):
    results = [r for i in range(N) for r in run_case(i, seeds, tmp_path)]
    bad = [f"case {r['case']} (QTOOL_FUZZ_SEED={SEED + r['case']} QTOOL_FUZZ_N=1, {r['file']}) qtool {r['command']}: "
           f"{r['failure']}" for r in results if r["failure"]]
    errors = sum(r["code"] == 1 for r in results)
    print(f"\nfuzz: {N} cases, {len(results)} runs: {errors} refused with one error line, "
          f"{len(results) - errors - len(bad)} ran cleanly, {len(bad)} misbehaved")
    assert not bad, f"{len(bad)} of {len(results)} runs misbehaved:\n" + "\n".join(bad[:30])
    assert errors > len(results) // 3  # the mutations do reach the checks
