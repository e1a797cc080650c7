"""The ways a QuantLinear multiplies, one class per path, and which one a layer takes.

A path owns the layout a layer's codes are held in (buffers on the QuantLinear; `weight_scale`, `weight_shape` and
`weight_zero_point` stay there in compressed-tensors' own form). It knows how to build that layout from the
compressed-tensors `weight_packed` words, how to give those words back (state_dict and export rebuild them on
demand, so the codes are never held twice), how to read exact row tiles of codes for everything its kernel cannot
do (other input dtypes, the backward pass, DoRA's row norms, dequantize()), and, for the kernel paths, how to
multiply an input with torch's own weight-only kernel.

  path       kernel (torch.ops.aten)                              when
  cpu-int4   _weight_int4pack_mm_for_cpu on the layout of          CPU with AVX2/AVX-512, bfloat16, out % 16 == 0,
             _convert_weight_to_int4pack_for_cpu                   groups (or in) a multiple of 32
  cpu-int8   _weight_int8pack_mm on int8 codes [out, in]           CPU with AVX2/AVX-512, bfloat16, symmetric
                                                                   per channel/tensor, in % 16 == 0
  cuda-int4  _weight_int4pack_mm on the tensor-core layout of      CUDA, bfloat16, out % 8 == 0, groups (or in)
             _convert_weight_to_int4pack                           a multiple of 32
  tiled      none: row tiles dequantized exactly as compressed-tensors does, multiplied in a dense GEMM (see
             tile_dtype); every scheme, shape, dtype and device

"bfloat16" is the layer's compute dtype (the model's dtype; default the scale's dtype). The layout is chosen once,
when the tensors are installed; a kernel path also multiplies by tiles of its own layout an input of another
dtype, or a batch above MAX_KERNEL_BATCH rows (where a dense GEMM on dequantized tiles is faster).

What the kernels compute (torch's sources: aten/src/ATen/native/cpu/int4mm_kernel.cpp, cpu/int8mm_kernel.cpp,
cuda/int4mm.cu; the tests check each fact):
  int4: w[n, k] = (u[n, k] - 8)·s[k/g, n] + z[k/g, n] for the unsigned nibble u, s and z in the input dtype,
        g in {32, 64, 128, 256}. compressed-tensors stores u = q + 8, so s is the scale and z = -zp·s
        (0 when symmetric); a scale per larger group, per channel or per tensor is repeated over g-wide groups.
        CPU: w is one float32 fma, the products are summed in float32 and the output rounded once; only the
        bfloat16 kernel is vectorised (float16/float32 run a scalar loop, 20-60x slower: measured).
        CUDA: bfloat16 only, w is a bfloat16 fma (one rounding), tensor-core products summed in float32.
  int8: w[n, k] = q[n, k]·s[n] in float32 (exact for a bfloat16 scale), float32 sums, output rounded once;
        symmetric per channel only. The AVX-512 loop reads 16 columns at a time with aligned loads, so
        in % 16 == 0 and 32-byte aligned input rows are required (other widths read out of bounds: it
        segfaults at in = 8, 70 or 248).

Error bound against y_ref = x·Ŵᵀ + b computed exactly, Ŵ compressed-tensors' dequantized weight. With
A_n = |b_n| + Σ_k |x_k|·(|Ŵ_nk| + |zp_nk·s_nk|), u the input dtype's unit roundoff (2^-8 bfloat16,
2^-11 float16, 2^-24 float32) and K = in_features:
  kernel paths:  |y_n - y_ref_n| ≤ (4u + K·2^-24)·A_n   (the kernel's weight differs from Ŵ by at most
                 u·(2|Ŵ| + |zp·s|): Ŵ's own rounding, a scale not stored in the input dtype, z's rounding;
                 then float32 sums, one rounding of x·wᵀ and one of the bias add)
  tiled, products in float32 (CPU, see tile_dtype):
                 |y_n - y_ref_n| ≤ (u + K·2^-24)·A_n    (bit-identical weights, float32 sums, one rounding)
  tiled, products in the input dtype (GPU; bfloat16 on a CPU with native bfloat16 GEMMs): the kernel paths'
                 bound (the weight cast to the input dtype when the scale is wider, the GEMM's sums, the bias)
The kernel paths are as exact as a dense layer in the input dtype; only the order of the sums differs.
"""
from __future__ import annotations

import functools

import torch

from ..quant.pack import bytes_to_words, words_to_bytes, pack_int32, packed_len, unpack_int32
from ..quant.spec import QuantSpec

# Rows per chunk when a layout is built or read whole (bounds the temporaries of a large layer).
_CHUNK_ELEMS = 1 << 21
_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernels take, largest (fewest scales) first
_VECTOR_CPUS = ("AVX512", "AVX2")    # capabilities with vectorised bfloat16 int4/int8 kernels


# Largest batch (rows of x) a kernel path multiplies itself; above it dequantized tiles in a dense GEMM are faster
# (measured by bench/nn_bench.py on the MLP shapes, 1 thread). With native bfloat16 GEMMs (AMX, AVX-512 BF16) the
# tiles are multiplied in bfloat16, else in float32.
MAX_KERNEL_BATCH = {("cpu-int4", True): 96, ("cpu-int8", True): 48, ("cpu-int4", False): 256,
                    ("cpu-int8", False): 256}


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX-512 BF16, through oneDNN)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16")) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def tile_dtype(x_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype tiles are multiplied in: the input's on a GPU, and bfloat16 on a CPU that multiplies it
    natively; otherwise float32 (low-precision CPU GEMMs without native support are several times slower than
    float32 and sum in float32 anyway), the output rounded once to the input's dtype."""
    if device.type != "cpu" or (x_dtype == torch.bfloat16 and native_bf16()):
        return x_dtype
    return torch.float32


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _cpu_vectorised() -> bool:
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get is not None and get() in _VECTOR_CPUS


def kernel_group(spec: QuantSpec, in_f: int) -> int | None:
    """The int4 kernels' group size for a scheme: the largest of 256..32 dividing both the scheme's scale
    width and `in_f` (each stored scale then covers whole kernel groups); None if there is none."""
    width = spec.group_size if spec.group_size > 0 else in_f
    return next((g for g in _KERNEL_GROUPS if width % g == 0 and in_f % g == 0), None)


class TiledPath:
    """The tiled path on compressed-tensors' own words (`weight_packed`, kept as the persistent buffer).

    Its row tiles use a compute layout: unpacking int4 back into column order (a strided write that interleaves
    the two nibbles of every byte) is the slowest step, so a tile holds, per block of input columns (a group, or
    the whole padded row), first the low nibbles then the high ones, and the input's columns are put in that same
    order once per call. Each weight is still exactly (q - zp)·scale; only the order of the sum changes.
    """

    name = "tiled"
    row_align = 1       # tile rows start at multiples of this
    keeps_words = True  # holds the weight_packed tensor it is built from (a kernel path builds its own layout)

    def build(self, m, packed: torch.Tensor) -> None:
        m.register_buffer("weight_packed", packed)

    def packed(self, m) -> torch.Tensor:
        return m.weight_packed

    def codes(self, m, r0: int, r1: int) -> torch.Tensor:
        """int8 codes q [r1 - r0, in] of rows r0:r1, natural column order."""
        return unpack_int32(m.weight_packed[r0:r1], m.spec.bits, (r1 - r0, m.in_features))

    def serves(self, x2: torch.Tensor) -> bool:
        """Whether this path's kernel multiplies x2 (a kernel path also has `mm`)."""
        return False

    # ---- the tiled matmul's column order ----------------------------------------------------------------
    def _block(self, m) -> int | None:
        """Columns per block of the int4 compute layout (None: columns stay in their natural order)."""
        if m.spec.bits != 4:
            return None
        if m.spec.group_size > 0:
            return m.spec.group_size if m.spec.group_size % 2 == 0 else None
        return 4 * m.weight_packed.shape[1] * 2  # channel/tensor: the whole row, padding included

    def width(self, m) -> int:
        """Columns of a tile (the padded row for channel/tensor int4)."""
        blk = self._block(m)
        return m.in_features if blk is None or m.spec.group_size > 0 else blk

    def to_cols(self, m, x2: torch.Tensor) -> torch.Tensor:
        """[n, in] input columns -> the tile's column order [n, width]."""
        blk = self._block(m)
        if blk is None:
            return x2
        width = self.width(m)
        if width != x2.shape[1]:
            x2 = torch.nn.functional.pad(x2, (0, width - x2.shape[1]))
        return x2.reshape(x2.shape[0], -1, blk // 2, 2).transpose(-1, -2).reshape(x2.shape[0], width)

    def from_cols(self, m, g2: torch.Tensor) -> torch.Tensor:
        """Inverse of to_cols (for the input gradient)."""
        blk = self._block(m)
        if blk is None:
            return g2
        g2 = g2.reshape(g2.shape[0], -1, 2, blk // 2).transpose(-1, -2).reshape(g2.shape[0], -1)
        return g2[:, : m.in_features]

    def tile_codes(self, m, r0: int, r1: int) -> torch.Tensor:
        """int8 codes of rows r0:r1 in the tile's column order."""
        blk = self._block(m)
        rows = r1 - r0
        b = m.weight_packed[r0:r1].view(torch.uint8)  # the words' bytes, little-endian on every torch device
        if m.spec.bits == 8:  # one code per byte, stored as q + 128
            return (b[:, : m.in_features] ^ 0x80).view(torch.int8)
        if blk is None:
            return self.codes(m, r0, r1)
        width = self.width(m)
        # q + 8 in a nibble; xor 8 turns it into q as a 4-bit two's complement, and arithmetic shifts
        # sign-extend each nibble into an int8
        c = (b[:, : width // 2] ^ 0x88).view(torch.int8).view(rows, -1, blk // 2)
        out = torch.empty(rows, c.shape[1], 2, blk // 2, dtype=torch.int8, device=b.device)
        torch.bitwise_left_shift(c, 4, out=out[:, :, 0])
        out[:, :, 0] >>= 4
        torch.bitwise_right_shift(c, 4, out=out[:, :, 1])
        return out.view(rows, width)


class _KernelPath(TiledPath):
    """A kernel's layout: natural column order for tiles; the words rebuilt from the layout on demand."""

    keeps_words = False

    def __init__(self, compute_dtype: torch.dtype):
        self.dtype = compute_dtype
        self.max_batch = MAX_KERNEL_BATCH.get((self.name, native_bf16()), 1 << 62)

    def serves(self, x2: torch.Tensor) -> bool:
        return x2.dtype == self.dtype and 0 < x2.shape[0] <= self.max_batch

    def width(self, m) -> int:
        return m.in_features

    def to_cols(self, m, x2):
        return x2

    def from_cols(self, m, g2):
        return g2

    def tile_codes(self, m, r0, r1):
        return self.codes(m, r0, r1)

    def packed(self, m) -> torch.Tensor:
        out = torch.empty(m.out_features, packed_len(m.in_features, m.spec.bits), dtype=torch.int32,
                          device=m.weight_shape.device)
        for r0, r1 in _row_chunks(m.out_features, m.in_features, self.row_align):
            out[r0:r1] = pack_int32(self.codes(m, r0, r1), m.spec.bits)
        return out


class _Int4Path(_KernelPath):
    """Shared by the CPU and CUDA int4 kernels: scales and zeros as [in/g, out, 2] in the compute dtype."""

    def __init__(self, compute_dtype: torch.dtype, group: int):
        super().__init__(compute_dtype)
        self.group = group

    def scale_zeros(self, m) -> torch.Tensor:
        out_f, in_f = m.out_features, m.in_features
        groups = in_f // self.group
        s = m.weight_scale.to(self.dtype)
        s = s.expand(out_f, 1) if s.dim() == 1 else s  # tensor strategy: one scale
        s = s.repeat_interleave(groups // s.shape[1], dim=1)  # each stored scale over its kernel groups
        if m.weight_zero_point is None:
            z = torch.zeros_like(s)
        else:
            zp = m.zero_point_rows(0, out_f).to(torch.float32)
            zp = zp.expand(out_f, 1) if zp.dim() == 1 else zp
            # z rounded once, from the scale the kernel multiplies by: w = q·s' + z' ≈ (q - zp)·s'
            z = (-zp.repeat_interleave(groups // zp.shape[1], dim=1) * s.to(torch.float32)).to(self.dtype)
        return torch.stack((s, z), dim=-1).transpose(0, 1).contiguous()


class CpuInt4(_Int4Path):
    name = "cpu-int4"

    @classmethod
    def fits(cls, spec: QuantSpec, out_f: int, in_f: int, device: torch.device, dtype: torch.dtype):
        group = kernel_group(spec, in_f)
        if (device.type != "cpu" or spec.bits != 4 or dtype != torch.bfloat16 or group is None or out_f % 16
                or not _cpu_vectorised() or not _has("_weight_int4pack_mm_for_cpu")):
            return None
        layout = cpu_int4_layout()
        if layout is None or layout.slots(out_f % layout.block) is None:
            return None
        path = cls(dtype, group)
        path.layout, path.row_align = layout, layout.block
        return path

    def build(self, m, packed):
        out_f, in_f = m.out_features, m.in_features
        w = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
        for r0, r1 in _row_chunks(out_f, in_f, self.row_align):
            b = words_to_bytes(packed[r0:r1])  # compressed-tensors' nibbles are already u = q + 8
            u = torch.empty(r1 - r0, in_f // 2, 2, dtype=torch.uint8)
            torch.bitwise_and(b, 15, out=u[..., 0])
            torch.bitwise_right_shift(b, 4, out=u[..., 1])
            # rows r0:r1 of the [out, in/2] result are exactly these rows' blocks (blocks are row-major)
            w[r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.view(r1 - r0, in_f).to(torch.int32), 1)
        m.register_buffer("int4_packed", w, persistent=False)
        m.register_buffer("int4_scale_zeros", self.scale_zeros(m), persistent=False)

    def codes(self, m, r0, r1):
        return self.layout.unpack(m.int4_packed, m.out_features, m.in_features, r0, r1)

    def mm(self, m, x2):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), m.int4_packed, self.group,
                                                          m.int4_scale_zeros)


class CpuInt8(_KernelPath):
    name = "cpu-int8"

    @classmethod
    def fits(cls, spec: QuantSpec, out_f: int, in_f: int, device: torch.device, dtype: torch.dtype):
        if (device.type != "cpu" or spec.bits != 8 or not spec.symmetric or spec.strategy == "group"
                or dtype != torch.bfloat16 or in_f % 16 or not _cpu_vectorised() or not _has("_weight_int8pack_mm")):
            return None
        return cls(dtype)

    def build(self, m, packed):
        # the codes are the words' bytes less the offset 128: the same bytes, once
        m.register_buffer("int8_codes", (words_to_bytes(packed) ^ 0x80).view(torch.int8), persistent=False)
        s = m.weight_scale.reshape(-1).to(self.dtype)  # a view of the stored scale when it is bfloat16
        m.register_buffer("int8_scale", s.expand(m.out_features).contiguous() if s.numel() == 1 else s,
                          persistent=False)

    def packed(self, m):
        return bytes_to_words(m.int8_codes.view(torch.uint8) ^ 0x80)

    def codes(self, m, r0, r1):
        return m.int8_codes[r0:r1]

    def mm(self, m, x2):
        x2 = x2.contiguous()
        if x2.data_ptr() % 64:  # the AVX-512 loop uses aligned loads: a view into a larger tensor may not be
            x2 = x2.clone()
        return torch.ops.aten._weight_int8pack_mm(x2, m.int8_codes, m.int8_scale)


class CudaInt4(_Int4Path):
    """Not run on this project's machines (no GPU): built from torch's CUDA source; its codes are read back
    through the kernel itself (codes_by_identity), which does not depend on the tensor-core layout."""

    name = "cuda-int4"
    row_align = 8  # the layout's leading dimension is blocks of 8 output rows

    @classmethod
    def fits(cls, spec: QuantSpec, out_f: int, in_f: int, device: torch.device, dtype: torch.dtype):
        group = kernel_group(spec, in_f)
        if (device.type != "cuda" or spec.bits != 4 or dtype != torch.bfloat16 or group is None or out_f % 8
                or not _has("_weight_int4pack_mm")):
            return None
        path = cls(dtype, group)
        path.inner = next(t for t in (8, 4, 2) if in_f % (16 * t) == 0)  # k-tiles per innermost load
        return path

    def build(self, m, packed):
        b = words_to_bytes(packed)  # compressed-tensors: even columns in the low nibble; CUDA's input: the high
        b = (b << 4) | (b >> 4)
        m.register_buffer("int4_packed", torch.ops.aten._convert_weight_to_int4pack(b.contiguous(), self.inner),
                          persistent=False)
        m.register_buffer("int4_scale_zeros", self.scale_zeros(m), persistent=False)

    def codes(self, m, r0, r1):
        w = m.int4_packed[r0 // 8: -(-r1 // 8)]
        u = codes_by_identity(torch.ops.aten._weight_int4pack_mm, w, r1 - r0, m.in_features, self.group,
                              self.dtype, w.device)
        return u.view(torch.int8).sub_(8)

    def mm(self, m, x2):
        return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), m.int4_packed, self.group, m.int4_scale_zeros)


PATHS = (CudaInt4, CpuInt4, CpuInt8)


def pick(spec: QuantSpec, out_f: int, in_f: int, device: torch.device, dtype: torch.dtype,
         kernels: bool = True) -> TiledPath:
    """The fastest exact-enough path for a layer: the first kernel path that fits, else tiled."""
    if kernels:
        for cls in PATHS:
            path = cls.fits(spec, out_f, in_f, device, dtype)
            if path is not None:
                return path
    return TiledPath()


def _row_chunks(rows: int, cols: int, align: int):
    step = max(align, _CHUNK_ELEMS // max(cols, 1) // align * align)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def codes_by_identity(mm, w: torch.Tensor, rows: int, in_f: int, group: int, dtype: torch.dtype, device,
                      chunk: int = 1024) -> torch.Tensor:
    """Unsigned codes u [rows, in] of an int4 kernel layout `w`, read back through the kernel `mm` itself.

    With scale 1 and zero 8 every weight is its own code u, and a row of the identity picks one column; both,
    and a sum with one non-zero term, are exact in bfloat16 and float32 (torch's inductor unpacks the same way).
    """
    unit = torch.tensor([1.0, 8.0], dtype=dtype, device=device).expand(in_f // group, rows, 2).contiguous()
    out = torch.empty(rows, in_f, dtype=torch.uint8, device=device)
    for k0 in range(0, in_f, chunk):
        k1 = min(in_f, k0 + chunk)
        eye = torch.zeros(k1 - k0, in_f, dtype=dtype, device=device)
        idx = torch.arange(k1 - k0, device=device)
        eye[idx, idx + k0] = 1
        out[:, k0:k1] = mm(eye, w, group, unit).t().to(torch.uint8)
    return out


# ---- the CPU int4 layout ----------------------------------------------------------------------------------
class CpuInt4Layout:
    """Where _convert_weight_to_int4pack_for_cpu puts each code, learned from torch's own packing.

    The layout (int4mm_kernel.cpp, weight_to_int4pack_kernel) is blocks of `block` output rows (64 with AVX-512,
    32 with AVX2), row-major; a block holds, per input column, block/2 bytes whose two nibbles are two of its rows
    (AVX-512 pairs rows d and d+32, d+16 and d+48); a last block of fewer rows pairs them in its own way. Which row
    each nibble holds is read from packing probes that spell every row's number, then checked on random codes.
    """

    def __init__(self, block: int):
        self.block = block
        self._slots: dict[int, torch.Tensor | None] = {}

    def slots(self, rows: int) -> torch.Tensor | None:
        """For a block of `rows` rows: the row whose code sits in each nibble slot (slot j < rows/2: low nibble
        of byte j; else the high nibble of byte j - rows/2), as the inverse map row -> slot; None if unknown."""
        rows = rows or self.block
        if rows not in self._slots:
            self._slots[rows] = None
            if rows % 16 == 0 and rows <= self.block:
                self._slots[rows] = _learn_slots(rows)
                if self._slots[rows] is not None and not self._check(rows):
                    self._slots[rows] = None
        return self._slots[rows]

    def _check(self, rows: int) -> bool:
        """Random codes of two full blocks and a last block of `rows` rows, packed by torch, read back here."""
        n = 2 * self.block + (rows % self.block)
        u = torch.randint(0, 16, (n, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        return (torch.equal(self.unpack(w, n, 96, 0, n).to(torch.int32), u - 8)
                and torch.equal(self.unpack(w, n, 96, self.block, n).to(torch.int32), u[self.block:] - 8))

    def unpack(self, w: torch.Tensor, out_f: int, in_f: int, r0: int, r1: int) -> torch.Tensor:
        """Signed codes q = u - 8 (int8 [r1 - r0, in]) of rows r0:r1 (r0 a multiple of the block)."""
        full = out_f - out_f % self.block
        parts = []
        if r0 < min(r1, full):
            parts.append(self._unblock(w[r0:min(r1, full)], in_f, self.block))
        if r1 > full:
            parts.append(self._unblock(w[full:r1], in_f, r1 - full))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _unblock(self, b: torch.Tensor, in_f: int, rows: int) -> torch.Tensor:
        b = b.reshape(-1, in_f, rows // 2)
        # u ^ 8 is q as a 4-bit two's complement; arithmetic shifts sign-extend each nibble into an int8
        c = (b ^ 0x88).view(torch.int8)
        lo, hi = torch.bitwise_left_shift(c, 4).bitwise_right_shift_(4), c >> 4
        slots = self.slots(rows)
        out = torch.empty(b.shape[0], rows, in_f, dtype=torch.int8, device=b.device)
        half = rows // 2
        if torch.equal(slots, torch.arange(rows)):  # AVX-512 full blocks: low nibbles rows 0..31, high 32..63
            out[:, :half] = lo.transpose(1, 2)
            out[:, half:] = hi.transpose(1, 2)
        elif torch.equal(slots, torch.arange(rows).view(2, half).t().reshape(-1)):  # row pairs in a byte
            out[:, 0::2] = lo.transpose(1, 2)
            out[:, 1::2] = hi.transpose(1, 2)
        else:
            out = torch.cat((lo, hi), dim=2).transpose(1, 2).index_select(1, slots)
        return out.reshape(-1, in_f)


def _pack_probe(rows: int) -> torch.Tensor:
    """torch's packing of a [rows, 2] probe whose two columns spell each row's number (< 256) in nibbles."""
    r = torch.arange(rows, dtype=torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.stack((r & 15, r >> 4), 1), 1).reshape(-1)


def _slot_rows(b: torch.Tensor, rows: int) -> torch.Tensor:
    """The row number held in each nibble slot of one probe block's bytes ([column 0 | column 1])."""
    c0, c1 = b[: rows // 2], b[rows // 2:]
    return torch.cat((c0 & 15, c0 >> 4)).long() + 16 * torch.cat((c1 & 15, c1 >> 4)).long()


def _learn_slots(rows: int) -> torch.Tensor | None:
    held = _slot_rows(_pack_probe(rows), rows)
    if not torch.equal(held.sort().values, torch.arange(rows)):
        return None
    return torch.argsort(held)


@functools.lru_cache(maxsize=None)
def cpu_int4_layout() -> CpuInt4Layout | None:
    """The CPU int4 layout of this process's torch (None when it cannot be learned or fails its check)."""
    if not _has("_convert_weight_to_int4pack_for_cpu"):
        return None
    probe = _pack_probe(256)
    for block in (256, 128, 64, 32, 16):
        first = _slot_rows(probe[:block], block)
        ok = torch.equal(first.sort().values, torch.arange(block)) and all(
            torch.equal(_slot_rows(probe[i * block:(i + 1) * block], block), first + i * block)
            for i in range(1, 256 // block))
        if ok:
            layout = CpuInt4Layout(block)
            return layout if layout.slots(block) is not None else None
    return None
