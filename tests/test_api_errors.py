"""The Python API raises qtool.QtoolError for every error a user can cause, and its messages name the arguments the
caller passed (overwrite=True), where the command line names its options (--overwrite) for the same mistake."""
from __future__ import annotations

import shutil

import pytest

import qtool
from qtool.errors import ArgumentError

from .conftest import SAMPLES, run_cli


@pytest.fixture
def src(tmp_path):
    shutil.copytree(SAMPLES / "tiny-llama", tmp_path / "src")
    shutil.copytree(SAMPLES / "tiny-llama-lora", tmp_path / "lora")
    return tmp_path / "src"


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 3}, "bits: must be 4 or 8, not 3"),
    ({"group_size": -2}, "group_size: must be N > 0, -1 (per channel) or 0 (per tensor), not -2"),
    ({"method": "hqq"}, "method: must be one of rtn, mse, gptq, awq, awq+gptq, not 'hqq'"),
    ({"symmetric": "yes"}, "symmetric: must be True or False, not 'yes'"),
])
def test_quantspec_refuses_bad_values_as_qtool_errors(kwargs, message):
    with pytest.raises(qtool.QtoolError) as e:
        qtool.QuantSpec(**kwargs)
    assert str(e.value) == message and isinstance(e.value, ValueError) and e.value.exit_code == 2


@pytest.mark.parametrize("call,message", [
    (lambda s, o: qtool.quantize(s, o, max_rel_error=-1), "max_rel_error: must be at least 0, not -1"),
    (lambda s, o: qtool.quantize(s, o, max_rel_error=float("nan")), "max_rel_error: must be a number, not nan"),
    (lambda s, o: qtool.quantize(s, o, device="tpu"), "device: 'tpu' is not a device"),
    (lambda s, o: qtool.quantize(s, o, max_shard_bytes=0), "max_shard_bytes: must be an integer of at least 1, not 0"),
    (lambda s, o: qtool.quantize(s, o, spec={"bits": 4}), "spec: must be a qtool.QuantSpec, not dict"),
    (lambda s, o: qtool.quantize(s, o, exclude="*"), "exclude: must be a list of glob strings, not '*'"),
    (lambda s, o: qtool.quantize(None, o), "source: must be a path"),
    (lambda s, o: qtool.quantize(s, o, calib_samples=0), "calib_samples: must be an integer of at least 1, not 0"),
    (lambda s, o: qtool.merge_lora(s, [s.parent / "lora"], o, weights=[1.0, 2.0]), "weights: got 2 weights for 1 adapters"),
    (lambda s, o: qtool.merge_lora(s, [s.parent / "lora"], o, weights=[float("nan")]), "weights: must be a finite number"),
    (lambda s, o: qtool.merge_lora(s, str(s.parent / "lora"), o), "adapters: must be a non-empty list of paths"),
    (lambda s, o: qtool.inspect(s, max_rel_error=-2), "max_rel_error: must be at least 0, not -2"),
    (lambda s, o: qtool.quantize(s, o, nonsense=1), "quantize: got an unexpected keyword argument 'nonsense'"),
])
def test_bad_arguments_are_argument_errors(src, tmp_path, call, message):
    with pytest.raises(ArgumentError) as e:
        call(src, tmp_path / "out")
    assert message in str(e.value) and isinstance(e.value, qtool.QtoolError)
    assert not (tmp_path / "out").exists()


def test_messages_name_arguments_from_python_and_options_from_the_cli(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"x")
    cases = [
        ({}, [], "already exists; pass overwrite=True to replace it", "already exists; pass --overwrite to replace it"),
        ({"spec": qtool.QuantSpec(method="gptq"), "out": tmp_path / "o2"}, ["--method", "gptq", "-o", tmp_path / "o2"],
         "method='gptq' needs calibration data: pass calib=DATA", "--method gptq needs calibration data: pass --calib DATA"),
        ({"exclude": ["*"], "out": tmp_path / "o3"}, ["--exclude", "*", "-o", tmp_path / "o3"],
         "nothing to quantize: exclude=['*'] leaves no linear weight", "nothing to quantize: --exclude '*' leaves no linear"),
        ({"spec": qtool.QuantSpec(group_size=7), "out": tmp_path / "o4"}, ["--group-size", "7", "-o", tmp_path / "o4"],
         "pass exclude=['model.layers.0.mlp.down_proj'] to keep it unquantized, or choose another group_size",
         "pass --exclude 'model.layers.0.mlp.down_proj' to keep it unquantized, or choose another --group-size"),
    ]
    for kwargs, cli_args, python_words, cli_words in cases:
        kwargs = {"out": tmp_path / "out", **kwargs}
        with pytest.raises(qtool.QtoolError) as e:
            qtool.quantize(src, **kwargs)
        assert python_words in str(e.value) and "--" not in e.value.problem, str(e.value)
        args = cli_args if "-o" in cli_args else [*cli_args, "-o", tmp_path / "out"]
        r = run_cli("quantize", src, *args)
        assert r.exit_code == 1 and cli_words in r.stderr, r.stderr


def test_a_device_that_is_not_here_is_named_as_the_argument(src, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    with pytest.raises(qtool.QtoolError, match=r"^device: cuda was asked for but torch sees no cuda device"):
        qtool.quantize(src, tmp_path / "out", device="cuda")
    r = run_cli("quantize", src, "-o", tmp_path / "out", "--device", "cuda")
    assert r.exit_code == 1 and r.stderr.startswith("error: --device: cuda was asked for")
