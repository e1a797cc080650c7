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


@pytest.mark.skipif(not (SAMPLES / "tiny-llama").is_dir() or not (SAMPLES / "tiny-llama-lora").is_dir(),
                    reason="samples not generated (scripts/make_samples.py)")
def test_finetune_example_closes_the_loop_in_under_a_minute(tmp_path, capsys):
    """samples/finetune_example.py as shipped: quantize, fine-tune the sample adapter on the int4 base, save,
    merge into the dense base, quantize the merge."""
    spec = importlib.util.spec_from_file_location("finetune_example", SAMPLES / "finetune_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--out", str(tmp_path)])
    assert out["loss_after"] < out["loss_before"] - 0.5  # a few steps lower the loss on the sample text
    assert out["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert out["trainable"] == 38912  # the sample adapter's r=8 factors on 7 projections x 2 layers, nothing else
    assert (tmp_path / "merged-int4" / "config.json").is_file() and out["merged_quantized"]["rel_error_max"] < 0.5
    assert out["seconds"] < 60
    assert "loss" in capsys.readouterr().out
