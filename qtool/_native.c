/* qtool._native: the per-element passes that dominate `quantize` and `merge-lora`, each fused into one sweep over
 * memory, and GPTQ's column loop. qtool/native.py is the only caller: it checks shapes, dtypes and contiguity and passes raw
 * data pointers; every function here releases the GIL, so worker threads run them side by side.
 *
 * The arithmetic is the one torch runs on the CPU for the same ops, bit for bit: a bf16/fp16 op is computed in
 * float32 and rounded to nearest-even once, divisions and products are never fused (build with
 * -ffp-contract=off), round() is half-to-even. tests/test_native.py checks every function against the torch
 * path it replaces.
 *
 * dtype codes: 0 float32, 1 bfloat16, 2 float16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <unistd.h>
#define HAVE_PWRITE 1
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build runs everywhere; machines with AVX2 get 8-wide loops (no FMA: results do not change) */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

INLINE uint16_t f32_to_bf16(float f) {  /* nearest-even; NaN -> 0x7fc0 as c10::BFloat16 does */
    uint32_t u = f32_bits(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)r;
}

INLINE float f16_to_f32(uint16_t h) {  /* exact, subnormals included */
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t e = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (e == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;  /* Inf/NaN */
    } else if (e == 0) {
        o = f32_bits(bits_f32(o + (1u << 23)) - bits_f32(113u << 23));  /* subnormal: renormalise */
    }
    return bits_f32(o | (((uint32_t)h & 0x8000u) << 16));
}

INLINE uint16_t f32_to_f16(float x) {  /* nearest-even, overflow to Inf, subnormals rounded */
    uint32_t f = f32_bits(x);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t o;
    if (f >= ((uint32_t)(127 + 16) << 23)) {
        o = f > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (f < (113u << 23)) {
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = (uint16_t)(f32_bits(bits_f32(f) + bits_f32(magic)) - magic);
    } else {
        uint32_t mant_odd = (f >> 13) & 1u;
        f += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        f += mant_odd;
        o = (uint16_t)(f >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

INLINE float load(const void *p, Py_ssize_t i, int dt) {
    if (dt == F32) return ((const float *)p)[i];
    if (dt == BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

INLINE void store(void *p, Py_ssize_t i, float v, int dt) {
    if (dt == F32) ((float *)p)[i] = v;
    else if (dt == BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((uint16_t *)p)[i] = f32_to_f16(v);
}

/* the value a float32 result takes once stored in dtype dt (what a torch op in that dtype returns) */
INLINE float round_to(float v, int dt) {
    if (dt == F32) return v;
    if (dt == BF16) return bf16_to_f32(f32_to_bf16(v));
    return f16_to_f32(f32_to_f16(v));
}

/* half-to-even for |v| < 2^22 (codes are clamped to [-128, 127] first); vectorises where rintf may not */
INLINE float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

/* ---- 8-wide vectors (GCC/Clang vector extensions: AVX2 registers where the clone allows, SSE pairs
 * otherwise); each vector function is the lane-wise twin of the scalar one above it -------------------- */

#define VL 8
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
typedef int8_t vb __attribute__((vector_size(8)));

INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
INLINE vu splatu(uint32_t x) { return (vu){x, x, x, x, x, x, x, x}; }
INLINE vu sel(vi m, vu a, vu b) { return ((vu)m & a) | (~(vu)m & b); }   /* m ? a : b, lane-wise */
INLINE vf self(vi m, vf a, vf b) { return (vf)sel(m, (vu)a, (vu)b); }
INLINE vf vmax(vf a, vf b) { return self(a > b, a, b); }
INLINE vf vmin(vf a, vf b) { return self(a < b, a, b); }
INLINE vf vabs(vf a) { return (vf)((vu)a & splatu(0x7fffffffu)); }

INLINE vf vf16_to_f32(vu h) {
    const vu shifted_exp = splatu(0x7c00u << 13);
    vu o = (h & splatu(0x7fffu)) << 13;
    vu e = shifted_exp & o;
    o += splatu((uint32_t)(127 - 15) << 23);
    o = sel(e == shifted_exp, o + splatu((uint32_t)(128 - 16) << 23), o);
    vu sub = (vu)((vf)(o + splatu(1u << 23)) - (vf)splatu(113u << 23));
    o = sel(e == splatu(0), sub, o);
    return (vf)(o | ((h & splatu(0x8000u)) << 16));
}

INLINE vu vf32_to_f16(vf x) {
    vu f = (vu)x;
    const vu sign = f & splatu(0x80000000u);
    f ^= sign;
    const vu magic = splatu((uint32_t)((127 - 15) + (23 - 10) + 1) << 23);
    vu big = sel(f > splatu(0x7f800000u), splatu(0x7e00), splatu(0x7c00));
    vu small = (vu)((vf)f + (vf)magic) - magic;
    vu normal = (f + splatu(((uint32_t)(15 - 127) << 23) + 0xfffu) + ((f >> 13) & splatu(1))) >> 13;
    vu o = sel(f >= splatu((uint32_t)(127 + 16) << 23), big, sel(f < splatu(113u << 23), small, normal));
    return (o | (sign >> 16)) & splatu(0xffffu);
}

INLINE vu vf32_to_bf16(vf x) {
    vu u = (vu)x;
    vu r = (u + splatu(0x7fffu) + ((u >> 16) & splatu(1))) >> 16;
    return sel((u & splatu(0x7fffffffu)) > splatu(0x7f800000u), splatu(0x7fc0), r);
}

INLINE vf vload(const void *p, Py_ssize_t i, int dt) {
    if (dt == F32) { vf v; memcpy(&v, (const float *)p + i, sizeof v); return v; }
    vh h; memcpy(&h, (const uint16_t *)p + i, sizeof h);
    vu u = __builtin_convertvector(h, vu);
    return dt == BF16 ? (vf)(u << 16) : vf16_to_f32(u);
}

INLINE void vstore(void *p, Py_ssize_t i, vf v, int dt) {
    if (dt == F32) { memcpy((float *)p + i, &v, sizeof v); return; }
    vh h = __builtin_convertvector(dt == BF16 ? vf32_to_bf16(v) : vf32_to_f16(v), vh);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}

/* bf16 nearest-even as float32 bits with the low half cleared (no NaN special case: see the callers) */
INLINE vu vf32_bits_rounded_bf16(vf v) {
    vu u = (vu)v;
    return (u + splatu(0x7fffu) + ((u >> 16) & splatu(1))) & splatu(0xffff0000u);
}

INLINE vf vround_to(vf v, int dt) {
    if (dt == F32) return v;
    if (dt == BF16) return (vf)vf32_bits_rounded_bf16(v);  /* the NaNs arithmetic makes here stay NaN */
    return vf16_to_f32(vf32_to_f16(v));
}

INLINE vf vround_even(vf v) { return (v + splat(12582912.0f)) - splat(12582912.0f); }

/* Elements ahead to prefetch in streaming loops: weights come from the page cache in 4 KiB pages, where the
 * hardware prefetchers stop at every page boundary. */
#define PREFETCH 4096

/* Partial sums run in float32 lanes over at most BLOCK elements, then go into float64 totals. */
#define BLOCK 256

typedef double vd __attribute__((vector_size(8 * VL)));

/* lane reductions as a shuffle tree (three steps), not eight scalar extractions */
#if defined(__clang__)
#define SWAP(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SWAP(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
#endif
INLINE float hmax(vf v) {
    v = vmax(v, SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = vmax(v, SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5));
    return vmax(v, SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6))[0];
}
INLINE float hmin(vf v) {
    v = vmin(v, SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = vmin(v, SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5));
    return vmin(v, SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6))[0];
}
INLINE float hsumf(vf v) {
    v = v + SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v = v + SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5);
    return (v + SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6))[0];
}
INLINE double hsum(vf v) { return hsumf(v); }
INLINE double hsumd(vd v) { double s = 0.0; for (int l = 0; l < VL; l++) s += v[l]; return s; }
INLINE vd widen(vf v) { return __builtin_convertvector(v, vd); }

/* ---- per-group min and max ------------------------------------------------------------------------ */

INLINE void minmax_body(const void *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym,
                        float *mn, float *mx) {
    const Py_ssize_t ng = cols / gw;
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t g = 0; g < ng; g++) {
            const Py_ssize_t base = r * cols + g * gw;
            float h, l;
            int n = 0;
            Py_ssize_t c = 0;
            if (sym) {
                /* |x| as bits orders like |x|, and every NaN's bits exceed Inf's: one unsigned max finds both */
                vu hb = splatu(0);
                for (; c + VL <= gw; c += VL) {
                    if (((base + c) & 31) == 0)
                        __builtin_prefetch((const char *)w + (base + c + PREFETCH) * (dt == F32 ? 4 : 2));
                    vu u = (vu)vload(w, base + c, dt) & splatu(0x7fffffffu);
                    hb = sel(u > hb, u, hb);
                }
                uint32_t m = 0;
                for (int k = 0; k < VL; k++) m = hb[k] > m ? hb[k] : m;
                for (; c < gw; c++) {
                    uint32_t u = f32_bits(load(w, base + c, dt)) & 0x7fffffffu;
                    m = u > m ? u : m;
                }
                n = m > 0x7f800000u;
                h = bits_f32(m);
                l = -h;
            } else {
                vf lo = splat(INFINITY), hi = splat(-INFINITY);
                vi nan = {0};
                for (; c + VL <= gw; c += VL) {
                    if (((base + c) & 31) == 0)
                        __builtin_prefetch((const char *)w + (base + c + PREFETCH) * (dt == F32 ? 4 : 2));
                    vf v = vload(w, base + c, dt);
                    nan |= v != v;
                    hi = vmax(v, hi);
                    lo = vmin(v, lo);
                }
                h = hmax(hi), l = hmin(lo);
                for (int k = 0; k < VL; k++) n |= nan[k];
                for (; c < gw; c++) {
                    float v = load(w, base + c, dt);
                    n |= v != v;
                    h = v > h ? v : h;
                    l = v < l ? v : l;
                }
            }
            if (n) l = h = NAN;  /* as torch.amax/amin propagate NaN */
            mn[r * ng + g] = l;
            mx[r * ng + g] = h;
        }
    }
}

HOT static void minmax_any(const void *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym,
                           float *mn, float *mx) {
    if (dt == F32) minmax_body(w, F32, rows, cols, gw, sym, mn, mx);
    else if (dt == BF16) minmax_body(w, BF16, rows, cols, gw, sym, mn, mx);
    else minmax_body(w, F16, rows, cols, gw, sym, mn, mx);
}

static PyObject *py_minmax(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, mn, mx;
    int dt, sym;
    Py_ssize_t rows, cols, gw;
    if (!PyArg_ParseTuple(args, "KinnniKK", &w, &dt, &rows, &cols, &gw, &sym, &mn, &mx)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    minmax_any((const void *)w, dt, rows, cols, gw, sym, (float *)mn, (float *)mx);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- quantize + pack + error sums ----------------------------------------------------------------- */

typedef struct { double ww, wd, dd; float max_abs; } Sums;

/* One row: codes into `codes` (int8, cols), error sums into *acc. Scale and w share the dtype dt (compressed-
 * tensors keeps scales in the weight's dtype): q = clamp(round_dt(round_dt(w / s) + zp)) rounded half-even,
 * ŵ = round_dt((q - zp) * s), d = w - ŵ in float32. */
INLINE void quantize_row(const void *w, int dt, Py_ssize_t off, Py_ssize_t cols, Py_ssize_t gw,
                         const void *scale, Py_ssize_t soff, const int8_t *zp, Py_ssize_t zoff,
                         float qmin, float qmax, int8_t *codes, Sums *acc) {
    /* float32 lane sums over at most one block, then float64 lanes for the row: one reduction per row */
    vd dww = {0}, dwd = {0}, ddd = {0};
    vf ma = splat(0.f);
    double sww = 0.0, swd = 0.0, sdd = 0.0;
    float sma = 0.f;
    for (Py_ssize_t g0 = 0; g0 < cols; g0 += gw) {
        const float s = load(scale, soff + g0 / gw, dt);
        const float z = zp ? (float)zp[zoff + g0 / gw] : 0.0f;
        const vf vs = splat(s), vz = splat(z), vlo = splat(qmin), vhi = splat(qmax);
        for (Py_ssize_t b0 = g0; b0 < g0 + gw; b0 += BLOCK) {
            const Py_ssize_t b1 = b0 + BLOCK < g0 + gw ? b0 + BLOCK : g0 + gw;
            vf ww = splat(0.f), wd = splat(0.f), dd = splat(0.f);
            Py_ssize_t c = b0;
            for (; c + VL <= b1; c += VL) {
                vf x = vload(w, off + c, dt);
                vf q = vround_to(x / vs, dt);
                if (zp) q = vround_to(q + vz, dt);
                q = vround_even(vmin(vmax(q, vlo), vhi));
                vb code = __builtin_convertvector(__builtin_convertvector(q, vi), vb);
                memcpy(codes + c, &code, VL);
                vf d = x - vround_to((zp ? q - vz : q) * vs, dt);
                ww += x * x; wd += x * d; dd += d * d;
                ma = vmax(vabs(d), ma);
            }
            dww += widen(ww); dwd += widen(wd); ddd += widen(dd);
            for (; c < b1; c++) {
                float x = load(w, off + c, dt);
                float q = round_to(x / s, dt);
                if (zp) q = round_to(q + z, dt);
                q = round_even(fminf(fmaxf(q, qmin), qmax));
                codes[c] = (int8_t)q;
                float d = x - round_to((zp ? q - z : q) * s, dt);
                sww += x * x; swd += x * d; sdd += d * d;
                sma = fabsf(d) > sma ? fabsf(d) : sma;
            }
        }
    }
    acc->ww += sww + hsumd(dww); acc->wd += swd + hsumd(dwd); acc->dd += sdd + hsumd(ddd);
    sma = hmax(ma) > sma ? hmax(ma) : sma;
    acc->max_abs = sma > acc->max_abs ? sma : acc->max_abs;
}

/* compressed-tensors' pack_to_int32 of one row: code i at bit (i*bits) % 32 of word i*bits/32, as q + 2^(bits-1),
 * words little-endian (native.py checks the byte order). 8 codes at a time as one 64-bit lane:
 * (q mod 2^bits) xor 2^(bits-1) is the offset code, then 4-bit nibbles are squeezed together. */
INLINE void pack_row(const int8_t *codes, Py_ssize_t cols, int bits, uint32_t *out) {
    const Py_ssize_t full = cols / 8;
    if (bits == 8) {
        for (Py_ssize_t k = 0; k < full; k++) {
            uint64_t x;
            memcpy(&x, codes + 8 * k, 8);
            x ^= 0x8080808080808080ull;
            memcpy(out + 2 * k, &x, 8);
        }
    } else {
        for (Py_ssize_t k = 0; k < full; k++) {
            uint64_t x;
            memcpy(&x, codes + 8 * k, 8);
            x = (x & 0x0f0f0f0f0f0f0f0full) ^ 0x0808080808080808ull;
            x = (x | (x >> 4)) & 0x00ff00ff00ff00ffull;
            x = (x | (x >> 8)) & 0x0000ffff0000ffffull;
            x = (x | (x >> 16)) & 0x00000000ffffffffull;
            out[k] = (uint32_t)x;
        }
    }
    if (full * 8 < cols) {  /* the row's last, partial word(s), zero-padded */
        const int per = 32 / bits;
        const uint32_t mask = (1u << bits) - 1u, offset = 1u << (bits - 1);
        for (Py_ssize_t i = full * 8; i < cols; i++) {
            Py_ssize_t k = i / per;
            if (i % per == 0) out[k] = 0;
            out[k] |= (((uint32_t)(int32_t)codes[i] + offset) & mask) << ((i % per) * bits);
        }
    }
}

HOT static void quantize_pack_any(const void *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw,
                                  const void *scale, Py_ssize_t s_stride, const int8_t *zp, Py_ssize_t z_stride,
                                  int bits, uint32_t *out, Py_ssize_t out_stride, int8_t *codes, Sums *acc) {
    const float qmin = -(float)(1 << (bits - 1)), qmax = (float)((1 << (bits - 1)) - 1);
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (dt == F32)
            quantize_row(w, F32, r * cols, cols, gw, scale, r * s_stride, zp, r * z_stride, qmin, qmax, codes, acc);
        else if (dt == BF16)
            quantize_row(w, BF16, r * cols, cols, gw, scale, r * s_stride, zp, r * z_stride, qmin, qmax, codes, acc);
        else
            quantize_row(w, F16, r * cols, cols, gw, scale, r * s_stride, zp, r * z_stride, qmin, qmax, codes, acc);
        pack_row(codes, cols, bits, out + r * out_stride);
    }
}

static PyObject *py_quantize_pack(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, scale, zp, out;
    int dt, bits;
    Py_ssize_t rows, cols, gw, s_stride, z_stride, out_stride;
    if (!PyArg_ParseTuple(args, "KinnnKnKniKn", &w, &dt, &rows, &cols, &gw, &scale, &s_stride, &zp, &z_stride,
                          &bits, &out, &out_stride))
        return NULL;
    int8_t *codes = (int8_t *)malloc(cols > 0 ? (size_t)cols : 1);
    if (!codes) return PyErr_NoMemory();
    Sums acc = {0.0, 0.0, 0.0, 0.0f};
    Py_BEGIN_ALLOW_THREADS
    quantize_pack_any((const void *)w, dt, rows, cols, gw, (const void *)scale, s_stride, (const int8_t *)zp,
                      z_stride, bits, (uint32_t *)out, out_stride, codes, &acc);
    Py_END_ALLOW_THREADS
    free(codes);
    return Py_BuildValue("dddd", acc.ww, acc.wd, acc.dd, (double)acc.max_abs);
}

/* ---- mse scale search (qtool/quant/search.py's algorithm, group by group) ---------------------------- */

/* Σ wx·L and Σ (L·wt)·L for the codes L of one candidate (scale s, zero point z) over a group's float32 values */
INLINE void candidate_sums(const float *x, const float *wx, const float *wt, Py_ssize_t n, float s, float z,
                           int has_z, float qmin, float qmax, double *sxl, double *sll) {
    const float inv = 1.0f / s;  /* a candidate's codes need not be bit-exact: multiply, as search.py does */
    const vf vinv = splat(inv), vz = splat(z), vlo = splat(qmin), vhi = splat(qmax);
    vf a = splat(0.f), b = splat(0.f);
    Py_ssize_t i = 0;
    for (; i + VL <= n; i += VL) {
        vf xv, wxv; memcpy(&xv, x + i, sizeof xv); memcpy(&wxv, wx + i, sizeof wxv);
        vf q = xv * vinv;
        if (has_z) q = q + vz;
        vf L = vround_even(vmin(vmax(q, vlo), vhi));
        if (has_z) L = L - vz;
        vf Lw = L;
        if (wt) { vf wv; memcpy(&wv, wt + i, sizeof wv); Lw = L * wv; }
        a += wxv * L; b += Lw * L;
    }
    double sa = hsum(a), sb = hsum(b);
    for (; i < n; i++) {
        float q = x[i] * inv;
        if (has_z) q = q + z;
        float L = round_even(fminf(fmaxf(q, qmin), qmax));
        if (has_z) L = L - z;
        sa += wx[i] * L; sb += (wt ? L * wt[i] : L) * L;
    }
    *sxl = sa; *sll = sb;
}

/* Σ wt·(ŵ − x)² with the quantizer's own dtype semantics (what quantize_row stores), for one group */
INLINE double exact_error(const void *w, int dt, Py_ssize_t off, const float *x, const float *wt, Py_ssize_t n,
                          float s, float z, int has_z, float qmin, float qmax) {
    const vf vs = splat(s), vz = splat(z), vlo = splat(qmin), vhi = splat(qmax);
    vf e = splat(0.f);
    Py_ssize_t i = 0;
    for (; i + VL <= n; i += VL) {
        vf xv = vload(w, off + i, dt);
        vf q = vround_to(xv / vs, dt);
        if (has_z) q = vround_to(q + vz, dt);
        q = vround_even(vmin(vmax(q, vlo), vhi));
        vf d = vround_to((has_z ? q - vz : q) * vs, dt) - xv;
        d = d * d;
        if (wt) { vf wv; memcpy(&wv, wt + i, sizeof wv); d = d * wv; }
        e += d;
    }
    double se = hsum(e);
    for (; i < n; i++) {
        float xv = x[i];
        float q = round_to(xv / s, dt);
        if (has_z) q = round_to(q + z, dt);
        q = round_even(fminf(fmaxf(q, qmin), qmax));
        float d = round_to((has_z ? q - z : q) * s, dt) - xv;
        d = d * d;
        se += wt ? d * wt[i] : d;
    }
    return se;
}

/* For each group: the best candidate by refit gain (llama.cpp's make_qx_quants step), its refitted scale rounded to
 * dt, kept only if its exact error beats min-max's (so never worse than rtn). scale/zp hold min-max's on entry and
 * the result on return. */
INLINE void mse_body(const void *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym, int bits,
                     const float *wt_all, const float *grid, int n_grid, const float *mn, const float *mx,
                     void *scale, int8_t *zp, float *x, float *wx) {
    const float qmin = -(float)(1 << (bits - 1)), qmax = (float)((1 << (bits - 1)) - 1), qrange = qmax - qmin;
    const Py_ssize_t ng = cols / gw;
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t g = 0; g < ng; g++) {
            const Py_ssize_t off = r * cols + g * gw, k = r * ng + g;
            const float *wt = wt_all ? wt_all + g * gw : NULL;
            for (Py_ssize_t i = 0; i < gw; i++) {
                x[i] = load(w, off + i, dt);
                wx[i] = wt ? x[i] * wt[i] : x[i];
            }
            float best_gain = 0.f, best_s = 0.f, best_z = 0.f;
            int first = 1;
            const int n_cand = sym ? n_grid : n_grid * n_grid;
            for (int c = 0; c < n_cand; c++) {
                float s, z = 0.f;
                if (sym) {
                    float amax = fmaxf(mx[k], -mn[k]);
                    s = fmaxf((amax * grid[c]) / (qrange / 2), 1e-30f);
                } else {
                    float lo = fminf(mn[k], 0.f), hi = fmaxf(mx[k], 0.f);
                    float cl = lo * grid[c / n_grid], ch = hi * grid[c % n_grid];
                    s = fmaxf((ch - cl) / qrange, 1e-30f);
                    z = round_even(fminf(fmaxf(qmin - cl / s, qmin), qmax));
                }
                double sxl, sll;
                candidate_sums(x, wx, wt, gw, s, z, !sym, qmin, qmax, &sxl, &sll);
                float fxl = (float)sxl, fll = (float)sll;
                float gain = fll > 0.f ? fxl * fxl / fmaxf(fll, 1e-30f) : 0.f;
                float fit = (fll > 0.f && fxl > 0.f) ? fxl / fmaxf(fll, 1e-30f) : s;
                if (first || gain > best_gain) { best_gain = gain; best_s = fit; best_z = z; first = 0; }
            }
            const float s_mm = load(scale, k, dt);
            const float z_mm = sym ? 0.f : (float)zp[k];
            float s_new = round_to(best_s, dt);
            if (!(s_new > 0.f)) s_new = s_mm;
            double e_mm = exact_error(w, dt, off, x, wt, gw, s_mm, z_mm, !sym, qmin, qmax);
            double e_new = exact_error(w, dt, off, x, wt, gw, s_new, best_z, !sym, qmin, qmax);
            if (e_new < e_mm) {
                store(scale, k, s_new, dt);
                if (!sym) zp[k] = (int8_t)best_z;
            }
        }
    }
}

HOT static void mse_any(const void *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym, int bits,
                        const float *wt, const float *grid, int n_grid, const float *mn, const float *mx,
                        void *scale, int8_t *zp, float *x, float *wx) {
    if (dt == F32) mse_body(w, F32, rows, cols, gw, sym, bits, wt, grid, n_grid, mn, mx, scale, zp, x, wx);
    else if (dt == BF16) mse_body(w, BF16, rows, cols, gw, sym, bits, wt, grid, n_grid, mn, mx, scale, zp, x, wx);
    else mse_body(w, F16, rows, cols, gw, sym, bits, wt, grid, n_grid, mn, mx, scale, zp, x, wx);
}

static PyObject *py_mse_search(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, wt, grid, mn, mx, scale, zp;
    int dt, sym, bits, n_grid;
    Py_ssize_t rows, cols, gw;
    if (!PyArg_ParseTuple(args, "KinnniiKKiKKKK", &w, &dt, &rows, &cols, &gw, &sym, &bits, &wt, &grid, &n_grid,
                          &mn, &mx, &scale, &zp))
        return NULL;
    float *buf = (float *)malloc(2 * (size_t)(gw > 0 ? gw : 1) * sizeof(float));
    if (!buf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    mse_any((const void *)w, dt, rows, cols, gw, sym, bits, (const float *)wt, (const float *)grid, n_grid,
            (const float *)mn, (const float *)mx, (void *)scale, (int8_t *)zp, buf, buf + gw);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* ---- whole weights, row by row: min-max → CT's scale and zero point → (mse search) → quantize + pack -------- */

/* compressed-tensors' calculate_qparams for one group, in its dtypes: the range widened to hold 0, scale computed
 * and rounded in dt, zero point from the unrounded-to-eps scale, eps where the scale is 0, NaN propagated as torch's
 * minimum/maximum do (qtool/quant/core.py::qparams_from_minmax is the same in torch ops). */
INLINE void ct_qparams(float mn, float mx, int sym, int bits, int dt, float *scale, float *zp) {
    const float bit_min = -(float)(1 << (bits - 1)), bit_max = (float)((1 << (bits - 1)) - 1);
    const float range = round_to(bit_max - bit_min, dt);
    const float lo = (mn < 0.f || mn != mn) ? mn : 0.f, hi = (mx > 0.f || mx != mx) ? mx : 0.f;
    float s, z = 0.f;
    if (sym) {
        float a = fabsf(lo), b = fabsf(hi);
        float amax = (a > b || a != a) ? a : b;
        s = round_to(amax / round_to(range / 2.f, dt), dt);
    } else {
        s = round_to(round_to(hi - lo, dt) / range, dt);
        z = round_to(bit_min - round_to(lo / s, dt), dt);
        z = z < bit_min ? bit_min : (z > bit_max ? bit_max : z);  /* NaN stays NaN */
        z = z != z ? 0.f : round_even(z);
    }
    if (s == 0.f) s = dt == F32 ? 1.1920929e-07f : (dt == BF16 ? 0.0078125f : 0.0009765625f);  /* finfo(dt).eps */
    *scale = s;
    *zp = z;
}

INLINE void quantize_rows_body(const char *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym,
                               int bits, int search, const float *wt, const float *grid, int n_grid, char *scale,
                               int8_t *zp, uint32_t *out, Py_ssize_t out_stride, int8_t *codes, float *x, float *wx,
                               float *mn, float *mx, Sums *acc) {
    const Py_ssize_t ng = cols / gw, esz = dt == F32 ? 4 : 2;
    const float qmin = -(float)(1 << (bits - 1)), qmax = (float)((1 << (bits - 1)) - 1);
    for (Py_ssize_t r = 0; r < rows; r++) {
        const char *wr = w + r * cols * esz;      /* one row: a few kB, in cache for all three steps */
        char *sr = scale + r * ng * esz;
        int8_t *zr = sym ? NULL : zp + r * ng;
        minmax_body(wr, dt, 1, cols, gw, sym, mn, mx);
        for (Py_ssize_t g = 0; g < ng; g++) {
            float s, z;
            ct_qparams(mn[g], mx[g], sym, bits, dt, &s, &z);
            store(sr, g, s, dt);
            if (zr) zr[g] = (int8_t)z;
        }
        if (search) mse_body(wr, dt, 1, cols, gw, sym, bits, wt, grid, n_grid, mn, mx, sr, zr, x, wx);
        quantize_row(wr, dt, 0, cols, gw, sr, 0, zr, 0, qmin, qmax, codes, acc);
        pack_row(codes, cols, bits, out + r * out_stride);
    }
}

HOT static void quantize_rows_any(const char *w, int dt, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t gw, int sym,
                                  int bits, int search, const float *wt, const float *grid, int n_grid, char *scale,
                                  int8_t *zp, uint32_t *out, Py_ssize_t out_stride, int8_t *codes, float *x,
                                  float *wx, float *mn, float *mx, Sums *acc) {
#define ROWS_CASE(D) quantize_rows_body(w, D, rows, cols, gw, sym, bits, search, wt, grid, n_grid, scale, zp, out, \
                                        out_stride, codes, x, wx, mn, mx, acc)
    if (dt == F32) ROWS_CASE(F32);
    else if (dt == BF16) ROWS_CASE(BF16);
    else ROWS_CASE(F16);
#undef ROWS_CASE
}

static PyObject *py_quantize_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, wt, grid, scale, zp, out;
    int dt, sym, bits, search, n_grid;
    Py_ssize_t rows, cols, gw, out_stride;
    if (!PyArg_ParseTuple(args, "KinnniiiKKiKKKn", &w, &dt, &rows, &cols, &gw, &sym, &bits, &search, &wt, &grid,
                          &n_grid, &scale, &zp, &out, &out_stride))
        return NULL;
    const Py_ssize_t ng = gw > 0 ? cols / gw : 1;
    /* scratch: codes (cols bytes), a group's values and weighted values, a row's mins and maxes */
    const size_t fl = ((size_t)cols + 64) & ~(size_t)63;  /* floats start 64-byte aligned after the codes */
    char *buf = (char *)malloc(fl + sizeof(float) * (2 * (size_t)gw + 2 * (size_t)ng));
    if (!buf) return PyErr_NoMemory();
    float *f = (float *)(buf + fl);
    Sums acc = {0.0, 0.0, 0.0, 0.0f};
    Py_BEGIN_ALLOW_THREADS
    quantize_rows_any((const char *)w, dt, rows, cols, gw, sym, bits, search, (const float *)wt, (const float *)grid,
                      n_grid, (char *)scale, (int8_t *)zp, (uint32_t *)out, out_stride, (int8_t *)buf, f, f + gw,
                      f + 2 * gw, f + 2 * gw + ng, &acc);
    Py_END_ALLOW_THREADS
    free(buf);
    return Py_BuildValue("dddd", acc.ww, acc.wd, acc.dd, (double)acc.max_abs);
}

/* ---- LoRA merge: out = cast(w + d * s) ---------------------------------------------------------- */

/* finite: every stored value is finite (a float32 sum that overflows the output dtype counts as Inf) */
typedef struct { double ww; int finite; } MergeSums;

/* the smallest float32 magnitude a store in dtype dt turns into Inf (float32 itself: anything above FLT_MAX) */
INLINE float overflow_at(int dt) {
    if (dt == BF16) return bits_f32(0x7f7f8000u);  /* halfway above bf16's largest: rounds (to even) up to Inf */
    if (dt == F16) return 65520.0f;
    return bits_f32(0x7f800000u);
}

/* out = cast(w + d·s): ‖ΔW‖ comes from the factors (qtool/lora/merge.py), so only Σw² is summed here. A result
 * that is not finite is flagged and the job stops, so bf16 stores round without the NaN special case. */
INLINE void merge_body(const void *w, int wdt, const float *d, float s, Py_ssize_t n, void *out, int odt,
                       MergeSums *acc) {
    const float lim = overflow_at(odt);
    const vf vs = splat(s), big = splat(lim);
    vd dww = {0};
    vi ok = ~(vi){0};
    double sww = 0.0;
    int fin = 1;
    for (Py_ssize_t b0 = 0; b0 < n; b0 += BLOCK) {
        const Py_ssize_t b1 = b0 + BLOCK < n ? b0 + BLOCK : n;
        vf ww = splat(0.f);
        Py_ssize_t i = b0;
        for (; i + VL <= b1; i += VL) {
            if ((i & 31) == 0) __builtin_prefetch((const char *)w + (i + PREFETCH) * (wdt == F32 ? 4 : 2));
            vf x = vload(w, i, wdt);
            vf dv; memcpy(&dv, d + i, sizeof dv);
            vf m = x + dv * vs;   /* PEFT: weight (upcast) + (B @ A) * scaling, in float32, rounded once below */
            ok &= vabs(m) < big;  /* NaN compares false */
            ww += x * x;
            if (odt == BF16) {
                vh h = __builtin_convertvector((vf32_bits_rounded_bf16(m)) >> 16, vh);
                memcpy((uint16_t *)out + i, &h, sizeof h);
            } else {
                vstore(out, i, m, odt);
            }
        }
        dww += widen(ww);
        for (; i < b1; i++) {
            float x = load(w, i, wdt);
            float m = x + d[i] * s;
            fin &= fabsf(m) < lim;
            sww += x * x;
            store(out, i, m, odt);
        }
    }
    for (int l = 0; l < VL; l++) fin &= ok[l] != 0;
    acc->ww += sww + hsumd(dww);
    if (!fin) acc->finite = 0;
}

HOT static void merge_any(const void *w, int wdt, const float *d, float s, Py_ssize_t n, void *out, int odt,
                          MergeSums *acc) {
#define MERGE_CASE(W, O) if (wdt == W && odt == O) { merge_body(w, W, d, s, n, out, O, acc); return; }
    MERGE_CASE(BF16, BF16) MERGE_CASE(F16, F16) MERGE_CASE(F32, F32)
    MERGE_CASE(BF16, F32) MERGE_CASE(F16, F32) MERGE_CASE(F32, BF16) MERGE_CASE(F32, F16)
    MERGE_CASE(BF16, F16) MERGE_CASE(F16, BF16)
#undef MERGE_CASE
}

static PyObject *py_merge(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, d, out;
    int wdt, odt;
    float s;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KiKfnKi", &w, &wdt, &d, &s, &n, &out, &odt)) return NULL;
    MergeSums acc = {0.0, 1};
    Py_BEGIN_ALLOW_THREADS
    merge_any((const void *)w, wdt, (const float *)d, s, n, (void *)out, odt, &acc);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("dO", acc.ww, acc.finite ? Py_True : Py_False);
}

/* ---- positional write of a tensor's bytes, without the GIL and without a Python view per block -------- */

static PyObject *py_pwrite(PyObject *self, PyObject *args) {
    (void)self;
#ifdef HAVE_PWRITE
    int fd;
    unsigned long long addr;
    Py_ssize_t n;
    long long offset;
    if (!PyArg_ParseTuple(args, "iKnL", &fd, &addr, &n, &offset)) return NULL;
    const char *p = (const char *)addr;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (n > 0) {
        ssize_t k = pwrite(fd, p, (size_t)n, (off_t)offset);
        if (k < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        p += k; n -= k; offset += k;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
#else
    (void)args;
    Py_RETURN_FALSE;
#endif
}

/* ---- GPTQ: one lazy block's column loop, row by row ------------------------------------------------- */

/* Given U (the block's rows of the upper Cholesky factor of the damped inverse Hessian) the rows of W are
 * independent: each row's block (nb floats) stays in L1 while its columns a..b-1 are quantized and their errors
 * pushed onto the columns after them. The ops, in order, are qtool/quant/gptq.py's torch loop per element:
 * q = clamp(x / s (+ z)) rounded half-to-even; dq = (q (- z))·s rounded to the scale dtype; err = (x - dq) / U[i,i];
 * w[k] = w[k] - err·U[i,k] for k >= i (product rounded, then the difference). */
/* err·u[k] subtracted from w[k] for k in [i, nb): the update of one row, 8 lanes at a time (same rounding per lane) */
INLINE void row_update(float *restrict w, const float *restrict u, float err, Py_ssize_t i, Py_ssize_t nb) {
    const vf ve = splat(err);
    Py_ssize_t k = i;
    for (; k < nb && (k & (VL - 1)); k++) w[k] = w[k] - err * u[k];
    for (; k + VL <= nb; k += VL) {
        vf wv, uv;
        memcpy(&wv, w + k, sizeof wv);
        memcpy(&uv, u + k, sizeof uv);
        wv = wv - ve * uv;
        memcpy(w + k, &wv, sizeof wv);
    }
    for (; k < nb; k++) w[k] = w[k] - err * u[k];
}

HOT static void gptq_block_rows(float *W, Py_ssize_t rows, Py_ssize_t nb, const float *U, Py_ssize_t a,
                                Py_ssize_t b, const int64_t *cg, const float *S, Py_ssize_t ng, const float *Z,
                                float qmin, float qmax, int sdt, int8_t *Q, Py_ssize_t ldq, float *E) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *restrict w = W + r * nb;
        float *restrict e = E + r * nb;
        const float *s = S + r * ng, *z = Z ? Z + r * ng : NULL;
        int8_t *q = Q + r * ldq;
        for (Py_ssize_t i = a; i < b; i++) {
            const float x = w[i], sc = s[cg[i]];
            float v = x / sc;
            if (z) v = v + z[cg[i]];
            v = v < qmin ? qmin : (v > qmax ? qmax : v);
            v = round_even(v);
            q[i] = (int8_t)v;
            if (z) v = v - z[cg[i]];
            const float dq = round_to(v * sc, sdt);
            const float err = (x - dq) / U[i * nb + i];
            e[i] = err;
            row_update(w, U + i * nb, err, i, nb);
        }
    }
}

static PyObject *py_gptq_block(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, u, cg, s, z, q, e;
    Py_ssize_t rows, nb, a, b, ng, ldq;
    float qmin, qmax;
    int sdt;
    if (!PyArg_ParseTuple(args, "KnnKnnKKnKffiKnK", &w, &rows, &nb, &u, &a, &b, &cg, &s, &ng, &z, &qmin, &qmax,
                          &sdt, &q, &ldq, &e))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    gptq_block_rows((float *)w, rows, nb, (const float *)u, a, b, (const int64_t *)cg, (const float *)s, ng,
                    (const float *)z, qmin, qmax, sdt, (int8_t *)q, ldq, (float *)e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"minmax", py_minmax, METH_VARARGS, "minmax(w, dtype, rows, cols, group_width, symmetric, mn, mx)"},
    {"quantize_pack", py_quantize_pack, METH_VARARGS,
     "quantize_pack(w, dtype, rows, cols, group_width, scale, scale_stride, zp, zp_stride, bits, out, out_stride)"
     " -> (sum w*w, sum w*d, sum d*d, max |d|)"},
    {"mse_search", py_mse_search, METH_VARARGS,
     "mse_search(w, dtype, rows, cols, group_width, symmetric, bits, weights, grid, n_grid, mn, mx, scale, zp)"},
    {"quantize_rows", py_quantize_rows, METH_VARARGS,
     "quantize_rows(w, dtype, rows, cols, group_width, symmetric, bits, search, weights, grid, n_grid, scale, zp, out,"
     " out_stride) -> (sum w*w, sum w*d, sum d*d, max |d|)"},
    {"pwrite", py_pwrite, METH_VARARGS, "pwrite(fd, address, nbytes, offset) -> True (False where unsupported)"},
    {"merge", py_merge, METH_VARARGS, "merge(w, w_dtype, d, s, n, out, out_dtype) -> (sum w*w, finite)"},
    {"gptq_block", py_gptq_block, METH_VARARGS,
     "gptq_block(w, rows, nb, u, a, b, col_group, scale, n_groups, zp, qmin, qmax, scale_dtype, q, q_stride, err)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "qtool's fused CPU kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
