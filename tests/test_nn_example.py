"""samples/run_example.py runs end to end on the bundled samples: quantize, load, attach, generate."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.mark.skipif(not (SAMPLES / "tiny-llama").is_dir() or not (SAMPLES / "tiny-llama-lora").is_dir(),
                    reason="samples not generated (scripts/make_samples.py)")
def test_run_example(capsys):
    spec = importlib.util.spec_from_file_location("run_example", SAMPLES / "run_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tokens", "6"])
    assert out["adapter"] == "default"
    assert out["base"] == out["off"]          # set_adapter(None) gives the base back exactly
    assert out["lora"] != out["base"]         # the adapter changes what the model says
    assert out["footprint"]["dtypes"]["int4"]["bytes"] > 0
    assert "+ adapter 'default'" in capsys.readouterr().out
