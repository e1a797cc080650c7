"""pack_int32/unpack_int32 must reproduce compressed-tensors' pack_to_int32 layout bit for bit."""
import pytest
import torch

from qtool.quant.pack import pack_int32, packed_len, unpack_int32

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def codes(bits, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g).to(torch.int8)


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("shape", [(16, 64), (24, 12), (9, 33), (40, 7)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_ct(bits, shape, dim):
    q = codes(bits, shape)
    ours = pack_int32(q, bits, dim=dim)
    theirs = ct_helpers.pack_to_int32(q, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    n = shape[dim]
    assert ours.shape[dim] == packed_len(n, bits)
    back = unpack_int32(ours, bits, shape, dim=dim)
    assert back.dtype == torch.int8 and torch.equal(back, q)
    assert torch.equal(ct_helpers.unpack_from_int32(theirs, bits, torch.tensor(shape), packed_dim=dim), back)


def test_documented_word():
    # reference §1.4: q[0:8] = [4, 7, -3, -8, -5, 3, -5, -1] -> 0x73b305fc
    q = torch.tensor([[4, 7, -3, -8, -5, 3, -5, -1]], dtype=torch.int8)
    word = pack_int32(q, 4)
    assert word.shape == (1, 1)
    assert word.item() & 0xFFFFFFFF == 0x73B305FC
    assert bytes(word.numpy().tobytes()) == bytes([0xFC, 0x05, 0xB3, 0x73])


def test_int8_extremes_and_padding():
    q = torch.tensor([[-128, 127, 0, -1, 5]], dtype=torch.int8)
    p = pack_int32(q, 8)
    assert p.shape == (1, 2)
    assert p[0, 0].item() & 0xFFFFFFFF == (0x7F << 24) | (0x80 << 16) | (0xFF << 8) | 0x00
    assert p[0, 1].item() == 5 + 128  # padding codes are 0 (before offset removal)
    assert torch.equal(unpack_int32(p, 8, (1, 5)), q)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(2, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="does not match"):
        unpack_int32(torch.zeros(2, 1, dtype=torch.int32), 4, (2, 16))


@pytest.mark.parametrize("bits", [4, 8])
def test_int4_int8_unpack_on_bytes_only(bits, monkeypatch):
    """4- and 8-bit codes unpack from the words' bytes; the generic int64 shift path (which int8 used to run after
    computing, and throwing away, the byte result) must not run for them."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 13), generator=g, dtype=torch.int8)
    packed = pack_int32(q, bits, dim=1)

    def no_shift_path(*args, **kwargs):
        raise AssertionError("the generic shift-and-mask path ran")

    monkeypatch.setattr(torch, "arange", no_shift_path)
    got = unpack_int32(packed, bits, q.shape, dim=1)
    assert got.dtype == torch.int8 and torch.equal(got, q)
