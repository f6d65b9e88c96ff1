/* Native kernels of the lossless3 codec (docs/format.md section 4.7, design docs/lossless.md).
 *
 * Why C: lossless3 Huffman-codes a 10-bit symbol (the float's exponent and top mantissa bits)
 * per element and bit-packs the rest. Bit-level work like that costs tens of nanoseconds an
 * element in numpy; here it is about one. Everything a chunk needs is done in one call that holds
 * no Python object and runs with the GIL released, so mlcompress.workers threads decode or
 * encode chunks in parallel.
 *
 * Every read of a payload is bounds-checked against the buffer the caller passed, every write
 * stays inside the output buffer, and any inconsistency is reported as a one-line message (the
 * Python side turns it into MrcFormatError): damaged files must never crash the reader.
 *
 * The module also has crc32(), equal to zlib.crc32 but several times faster where the CPU has
 * carry-less multiplication (checked at run time; the wheel is built for baseline x86-64): the
 * container checks a CRC over every payload it reads, and zlib's took as long as decoding.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef _WIN32
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#define HAVE_THREADS 1
#endif

/* Bumped whenever the Python side would need other kernels: lossless3.py refuses a stale build. */
#define KERNEL_VERSION 3

#ifndef MAX_LEN /* (overridable only to measure other limits; the format fixes 12) */
#define MAX_LEN 12 /* longest Huffman code, bits (docs/format.md 4.7) */
#endif
#define TABLE_BITS MAX_LEN
#define TABLE_SIZE (1u << TABLE_BITS)
#define STREAMS 8                     /* interleaved Huffman bitstreams per chunk */
#define MIN_SYMBOL_BITS 8
#define MAX_SYMBOL_BITS 12
#define BLOCK 1024                    /* elements decoded into the symbol buffer at a time */

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define INLINE static inline __attribute__((always_inline))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define INLINE static inline
#endif

/* ---- little-endian loads and stores (payloads and tensors are little-endian) ----------------- */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define FROM_LE16(x) __builtin_bswap16(x)
#define FROM_LE32(x) __builtin_bswap32(x)
#define FROM_LE64(x) __builtin_bswap64(x)
#else
#define FROM_LE16(x) (x)
#define FROM_LE32(x) (x)
#define FROM_LE64(x) (x)
#endif

INLINE uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return FROM_LE16(v); }
INLINE uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return FROM_LE32(v); }
INLINE uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return FROM_LE64(v); }
INLINE void st16(uint8_t *p, uint16_t v) { v = FROM_LE16(v); memcpy(p, &v, 2); }
INLINE void st32(uint8_t *p, uint32_t v) { v = FROM_LE32(v); memcpy(p, &v, 4); }

/* ---- the element transform ---------------------------------------------------------------------
 * The top 16 bits of a B-bit pattern (B = 16 or 32) are rotated left by one, which makes the
 * exponent of float32/bfloat16 (float16: exponent and 3 mantissa bits) the top byte. The symbol
 * is the top S bits of the result, the tail the W = B - S bits below it. */

INLINE uint32_t load_element(const uint8_t *p, int itemsize) {
    return itemsize == 4 ? ld32(p) : ld16(p);
}

INLINE uint32_t rotate_in(uint32_t u, int itemsize) {
    if (itemsize == 4)
        return ((u << 1) & 0xFFFE0000u) | ((u >> 15) & 0x00010000u) | (u & 0xFFFFu);
    return ((u << 1) | (u >> 15)) & 0xFFFFu;
}

INLINE uint32_t rotate_out(uint32_t x, int itemsize) {
    if (itemsize == 4)
        return ((x >> 1) & 0x7FFF0000u) | ((x << 15) & 0x80000000u) | (x & 0xFFFFu);
    return ((x >> 1) | (x << 15)) & 0xFFFFu;
}

INLINE void store_element(uint8_t *p, uint32_t v, int itemsize) {
    if (itemsize == 4)
        st32(p, v);
    else
        st16(p, (uint16_t)v);
}

/* =================================================================================================
 * Bit packing
 *
 * Bits go least significant first: bit j of a stream is bit (j mod 8) of byte j / 8. Writers
 * keep up to 63 pending bits in a 64-bit word and store all 8 of its bytes at once, moving on
 * by the whole bytes they hold; near the end of their area they store byte by byte, so nothing
 * is ever written past the exact length the sizes were computed for (neighbouring chunks are
 * written by other threads).
 * ============================================================================================== */

typedef struct {
    uint8_t *p;    /* the byte holding the next bit */
    uint8_t *end;  /* one past the last byte this writer may write */
    uint64_t acc;  /* pending bits: nb of them, the rest zero */
    unsigned nb;   /* 0..7 between flushes */
} bitwriter;

INLINE void flush_bits(uint8_t **p, uint8_t *end, uint64_t *acc, unsigned *nb) {
    if (LIKELY(*p + 8 <= end)) {
        uint64_t v = FROM_LE64(*acc);
        memcpy(*p, &v, 8);
    } else {
        for (unsigned b = 0; *p + b < end && b < 8; b++)
            (*p)[b] = (uint8_t)(*acc >> (8 * b));
    }
    *p += *nb >> 3;
    *acc >>= *nb & ~7u; /* writers keep nb < 64 */
    *nb &= 7;
}

/* =================================================================================================
 * Encoding
 * ============================================================================================== */

typedef struct {
    uint32_t freq;
    uint32_t symbol;
} leaf;

static int by_freq_then_symbol(const void *a, const void *b) {
    const leaf *x = a, *y = b;
    if (x->freq != y->freq)
        return x->freq < y->freq ? -1 : 1;
    return x->symbol < y->symbol ? -1 : (x->symbol > y->symbol);
}
/* Code lengths (1..MAX_LEN) of a Huffman code for the n >= 2 used symbols of freq[0..A-1];
 * unused symbols get 0. Huffman's algorithm on the sorted leaves (two queues), then, when the
 * tree is deeper than MAX_LEN, the depth histogram is flattened the way JPEG's Annex K.3 does
 * it (a pair of the deepest leaves moves up, one leaf of the next shallower level makes room),
 * and lengths go to symbols by decreasing frequency. Deterministic: ties are broken by symbol.
 * Returns -1 when memory runs out. */
static int build_lengths(const uint32_t *freq, int A, uint8_t *len) {
    int n = 0;
    for (int s = 0; s < A; s++)
        n += freq[s] != 0;
    leaf *leaves = malloc(sizeof(leaf) * (size_t)n);
    uint64_t *weight = malloc(sizeof(uint64_t) * (size_t)(2 * n));
    int *parent = malloc(sizeof(int) * (size_t)(2 * n));
    int *depth = malloc(sizeof(int) * (size_t)(2 * n));
    int *count = calloc((size_t)n + 1, sizeof(int));
    int status = -1;
    if (!leaves || !weight || !parent || !depth || !count)
        goto done;
    n = 0;
    for (int s = 0; s < A; s++)
        if (freq[s]) {
            leaves[n].freq = freq[s];
            leaves[n].symbol = (uint32_t)s;
            n++;
        }
    qsort(leaves, (size_t)n, sizeof(leaf), by_freq_then_symbol);
    for (int i = 0; i < n; i++)
        weight[i] = leaves[i].freq;
    /* Nodes 0..n-1 are the leaves in increasing weight, n..2n-2 the merged nodes in the order
     * made (also increasing weight): the two lightest of both queues merge next. */
    int next_leaf = 0, next_node = n;
    for (int made = n; made < 2 * n - 1; made++) {
        int pick[2];
        for (int k = 0; k < 2; k++) {
            if (next_leaf < n && (next_node >= made || weight[next_leaf] <= weight[next_node]))
                pick[k] = next_leaf++;
            else
                pick[k] = next_node++;
        }
        weight[made] = weight[pick[0]] + weight[pick[1]];
        parent[pick[0]] = parent[pick[1]] = made;
    }
    depth[2 * n - 2] = 0;
    int deepest = 0;
    for (int x = 2 * n - 3; x >= 0; x--) {
        depth[x] = depth[parent[x]] + 1;
        if (x < n) {
            count[depth[x]]++;
            if (depth[x] > deepest)
                deepest = depth[x];
        }
    }
    for (int i = deepest; i > MAX_LEN; i--) {
        while (count[i] > 0) {
            int j = i - 2;
            while (count[j] == 0)
                j--;
            count[i] -= 2;
            count[i - 1] += 1;
            count[j + 1] += 2;
            count[j] -= 1;
        }
    }
    memset(len, 0, (size_t)A);
    int rank = n - 1; /* the most frequent leaf gets the shortest length */
    for (int l = 1; l <= MAX_LEN && l <= deepest; l++)
        for (int k = 0; k < count[l]; k++, rank--)
            len[leaves[rank].symbol] = (uint8_t)l;
    status = 0;
done:
    free(leaves);
    free(weight);
    free(parent);
    free(depth);
    free(count);
    return status;
}

/* Canonical codes (docs/format.md 4.7): by increasing length, then symbol; each code is the
 * previous plus one, shifted left when the length grows. Stored bit-reversed (the stream is
 * read least significant bit first, a code most significant bit first) with its length:
 * code[s] = reversed | length << 16. Returns the Kraft sum in units of 2^-MAX_LEN. */
static uint32_t canonical_codes(const uint8_t *len, int A, uint32_t *code) {
    uint32_t per_length[MAX_LEN + 1] = {0}, next[MAX_LEN + 2];
    uint32_t kraft = 0;
    for (int s = 0; s < A; s++)
        if (len[s]) {
            per_length[len[s]]++;
            kraft += 1u << (MAX_LEN - len[s]);
        }
    uint32_t c = 0;
    for (int l = 1; l <= MAX_LEN; l++) {
        next[l] = c;
        c = (c + per_length[l]) << 1;
    }
    for (int s = 0; s < A; s++) {
        unsigned l = len[s];
        if (!l) {
            code[s] = 0;
            continue;
        }
        uint32_t v = next[l]++, r = 0;
        for (unsigned b = 0; b < l; b++)
            r |= ((v >> b) & 1u) << (l - 1 - b);
        code[s] = r | (l << 16);
    }
    return kraft;
}

/* Bytes of the code-length table: runs of symbols, a new run when more than 8 unused symbols
 * (4 bytes of run header) separate two used ones. Writes it when out is not NULL. */
static size_t length_table(const uint8_t *len, int A, uint8_t *out) {
    size_t size = 2, runs = 0;
    int s = 0;
    while (s < A) {
        while (s < A && !len[s])
            s++;
        if (s == A)
            break;
        int first = s, last = s; /* last used symbol of the run */
        for (int t = s + 1; t < A && t - last <= 9; t++)
            if (len[t])
                last = t;
        int n = last - first + 1;
        if (out) {
            uint8_t *p = out + size;
            st16(p, (uint16_t)first);
            st16(p + 2, (uint16_t)n);
            for (int k = 0; k < n; k += 2)
                p[4 + k / 2] = (uint8_t)(len[first + k] | (k + 1 < n ? len[first + k + 1] << 4 : 0));
        }
        size += 4 + (size_t)(n + 1) / 2;
        runs++;
        s = last + 1;
    }
    if (out)
        st16(out, (uint16_t)runs);
    return size;
}

/* Tails of w bits from eight elements fill exactly w bytes, so each group of eight starts on a
 * byte boundary: with w a constant every shift and flush inside a group is a constant, and the
 * only thing carried from group to group is the output position. */
#if defined(__GNUC__) && !defined(__clang__)
#define UNROLL8 _Pragma("GCC unroll 8")
#else
#define UNROLL8
#endif
#define PACK_GROUPS(FIELD, w)                                                                        \
    do {                                                                                              \
        for (; i + 8 <= m; i += 8) {                                                                  \
            uint64_t acc = 0;                                                                         \
            unsigned nb = 0;                                                                          \
            UNROLL8 for (unsigned k = 0; k < 8; k++) {                                                \
                acc |= (uint64_t)(FIELD(i + k, k)) << nb;                                             \
                nb += (w);                                                                            \
                if (k == 7 || nb > 63 - (w)) /* flush when the next field would not fit in 63 bits */ \
                    flush_bits(&p, end, &acc, &nb);                                                   \
            }                                                                                         \
        }                                                                                             \
        uint64_t acc = 0;                                                                             \
        unsigned nb = 0;                                                                              \
        for (; i < m; i++) {                                                                          \
            acc |= (uint64_t)(FIELD(i, i)) << nb;                                                     \
            nb += (w);                                                                                \
            flush_bits(&p, end, &acc, &nb);                                                           \
        }                                                                                             \
    } while (0)

/* The per-stream histograms are this many counts apart: 2^S + 16, not 2^S, because counters
 * 4 KiB apart alias in the CPU's store-to-load checks (3% of the encoding time). */
#define HIST_STRIDE(A) ((size_t)(A) + 16)

/* Pass 1 over a chunk: a histogram of symbols per stream (so each stream's exact length is
 * known before it is written), the OR and the AND of all tails (the bits where they differ
 * are the ones to store), and the tails packed at full width W into their place after the
 * chunk's header. Returns the OR; *all gets the AND. */
INLINE uint32_t scan_chunk(const uint8_t *restrict src, size_t m, int itemsize, unsigned W, int A,
                           uint32_t *restrict hist, uint8_t *restrict tail, uint8_t *end, uint32_t *all) {
    const uint32_t tmask = (1u << W) - 1u;
    uint32_t tails = 0, common = tmask;
    uint8_t *p = tail;
    size_t i = 0;
#define SCAN_FIELD(e, k)                                                                              \
    ({                                                                                                \
        uint32_t x = rotate_in(load_element(src + (e) * (size_t)itemsize, itemsize), itemsize);       \
        hist[(size_t)((k) % STREAMS) * HIST_STRIDE(A) + (x >> W)]++;                                  \
        tails |= x & tmask;                                                                           \
        common &= x;                                                                                  \
        x & tmask;                                                                                    \
    })
    PACK_GROUPS(SCAN_FIELD, W);
#undef SCAN_FIELD
    *all = common;
    return tails;
}

/* The tails again, as their w bits from bit z (the others are the same in every element):
 * pass 1 packed them whole before it knew. Only tensors like float32 holding bfloat16 values,
 * or masks, get here. */
INLINE void pack_tails(const uint8_t *restrict src, size_t m, int itemsize, unsigned z, unsigned w,
                       uint8_t *restrict tail, uint8_t *end) {
    const uint32_t fmask = (1u << w) - 1u;
    uint8_t *p = tail;
    size_t i = 0;
#define TAIL_FIELD(e, k) ((rotate_in(load_element(src + (e) * (size_t)itemsize, itemsize), itemsize) >> z) & fmask)
    PACK_GROUPS(TAIL_FIELD, w);
#undef TAIL_FIELD
}

/* Pass 2: the symbols of one block of elements, then each stream's share of them. */
INLINE void write_streams(const uint8_t *restrict src, size_t m, int itemsize, unsigned W,
                          const uint32_t *restrict code, bitwriter *streams) {
    uint16_t sym[BLOCK];
    for (size_t e0 = 0; e0 < m; e0 += BLOCK) {
        size_t count = m - e0 < BLOCK ? m - e0 : BLOCK;
        const uint8_t *s = src + e0 * (size_t)itemsize;
        for (size_t k = 0; k < count; k++)
            sym[k] = (uint16_t)(rotate_in(load_element(s + k * (size_t)itemsize, itemsize), itemsize) >> W);
        for (int j = 0; j < STREAMS; j++) {
            bitwriter *w = &streams[j];
            uint8_t *p = w->p, *end = w->end;
            uint64_t acc = w->acc;
            unsigned nb = w->nb;
            size_t k = (size_t)j;
            /* 4 codes of at most 12 bits between flushes: 7 + 48 pending bits at most */
            for (; k + 3 * STREAMS < count; k += 4 * STREAMS) {
                uint32_t c0 = code[sym[k]], c1 = code[sym[k + STREAMS]], c2 = code[sym[k + 2 * STREAMS]],
                         c3 = code[sym[k + 3 * STREAMS]];
                acc |= (uint64_t)(c0 & 0xFFFFu) << nb;
                nb += c0 >> 16;
                acc |= (uint64_t)(c1 & 0xFFFFu) << nb;
                nb += c1 >> 16;
                acc |= (uint64_t)(c2 & 0xFFFFu) << nb;
                nb += c2 >> 16;
                acc |= (uint64_t)(c3 & 0xFFFFu) << nb;
                nb += c3 >> 16;
                flush_bits(&p, end, &acc, &nb);
            }
            for (; k < count; k += STREAMS) {
                uint32_t c = code[sym[k]];
                acc |= (uint64_t)(c & 0xFFFFu) << nb;
                nb += c >> 16;
                flush_bits(&p, end, &acc, &nb);
            }
            w->p = p;
            w->acc = acc;
            w->nb = nb;
        }
    }
}

/* One chunk of m elements (itemsize 2 or 4 bytes, little-endian) into dst, which has room for
 * exactly 1 + m * itemsize bytes (the stored form). Returns the chunk's length, or -1 when out
 * of memory. Which form is written: docs/format.md 4.7, "Encoding". */
INLINE Py_ssize_t encode_chunk_body(const uint8_t *src, size_t m, int itemsize, int S, uint8_t *dst) {
    const unsigned B = 8u * (unsigned)itemsize, W = B - (unsigned)S;
    const int A = 1 << S;
    const size_t stored = 1 + m * (size_t)itemsize;
    uint8_t *const end = dst + stored;
    uint32_t *hist = calloc((size_t)STREAMS * HIST_STRIDE(A), sizeof(uint32_t));
    uint32_t *freq = malloc(sizeof(uint32_t) * (size_t)A);
    uint32_t *code = malloc(sizeof(uint32_t) * (size_t)A);
    uint8_t *len = malloc((size_t)A);
    Py_ssize_t result = -1;
    if (!hist || !freq || !code || !len)
        goto done;
    if (m == 0) {
        dst[0] = 0;
        result = 1;
        goto done;
    }

    const size_t head = 3 + (W + 7) / 8; /* mode, z, w, c */
    uint8_t *tail = dst + head;
    uint32_t tails, all;
    if (itemsize == 4 && W == 22)
        tails = scan_chunk(src, m, 4, 22, A, hist, tail, end, &all);
    else if (itemsize == 2 && W == 6)
        tails = scan_chunk(src, m, 2, 6, A, hist, tail, end, &all);
    else if (itemsize == 2 && W == 8)
        tails = scan_chunk(src, m, 2, 8, A, hist, tail, end, &all);
    else if (itemsize == 4)
        tails = scan_chunk(src, m, 4, W, A, hist, tail, end, &all);
    else
        tails = scan_chunk(src, m, 2, W, A, hist, tail, end, &all);
    int used = 0, only = 0;
    for (int s = 0; s < A; s++) {
        freq[s] = 0;
        for (int j = 0; j < STREAMS; j++)
            freq[s] += hist[(size_t)j * HIST_STRIDE(A) + s];
        if (freq[s]) {
            used++;
            only = s;
        }
    }
    /* The tail bits that differ between elements are bits z .. z + w - 1; the rest, c, are
     * stored once. */
    const uint32_t varying = tails ^ all;
    unsigned z = 0, w = 0;
    if (varying) {
        while (!((varying >> z) & 1u))
            z++;
        for (w = W - z; !((varying >> (z + w - 1)) & 1u); w--)
            ;
    }
    const uint32_t c = all & ~(((1u << w) - 1u) << z);
    const size_t tail_bytes = (m * w + 7) / 8;
    size_t size, stream_bytes[STREAMS], table = 0;
    if (used == 1) {
        size = head + tail_bytes + 2;
    } else {
        if (build_lengths(freq, A, len) < 0)
            goto done;
        canonical_codes(len, A, code);
        table = length_table(len, A, NULL);
        size = head + tail_bytes + table + 4 * STREAMS;
        for (int j = 0; j < STREAMS; j++) {
            uint64_t bits = 0;
            for (int s = 0; s < A; s++)
                bits += (uint64_t)hist[(size_t)j * HIST_STRIDE(A) + s] * len[s];
            stream_bytes[j] = (size_t)((bits + 7) / 8);
            size += stream_bytes[j];
        }
    }
    if (size >= stored) { /* mode 0: the elements as they are */
        dst[0] = 0;
        memcpy(dst + 1, src, m * (size_t)itemsize);
        result = (Py_ssize_t)stored;
        goto done;
    }
    dst[0] = used == 1 ? 2 : 1;
    dst[1] = (uint8_t)z;
    dst[2] = (uint8_t)w;
    for (unsigned b = 0; b < (W + 7) / 8; b++)
        dst[3 + b] = (uint8_t)(c >> (8 * b));
    if (itemsize == 4 && z == 16 && w == 6)
        pack_tails(src, m, 4, 16, 6, tail, end);
    else if (w != W)
        pack_tails(src, m, itemsize, z, w, tail, end);
    uint8_t *p = tail + tail_bytes;
    if (used == 1) { /* mode 2: one symbol, no Huffman part */
        st16(p, (uint16_t)only);
        result = (Py_ssize_t)size;
        goto done;
    }
    length_table(len, A, p);
    p += table;
    bitwriter streams[STREAMS];
    uint8_t *q = p + 4 * STREAMS;
    for (int j = 0; j < STREAMS; j++) {
        st32(p + 4 * j, (uint32_t)stream_bytes[j]);
        streams[j] = (bitwriter){q, q + stream_bytes[j], 0, 0};
        q += stream_bytes[j];
    }
    if (itemsize == 4)
        write_streams(src, m, 4, W, code, streams);
    else
        write_streams(src, m, 2, W, code, streams);
    result = (Py_ssize_t)size;
done:
    free(hist);
    free(freq);
    free(code);
    free(len);
    return result;
}

/* =================================================================================================
 * Decoding
 * ============================================================================================== */

/* A Huffman stream, its position counted in bits from the start of the chunk (one base
 * pointer and one bound for all the streams keep the decoding loop in registers). */
typedef struct {
    uint64_t pos;    /* the next bit to read */
    uint64_t start;  /* the stream's first byte, counted from the chunk's start */
    uint64_t nbytes; /* the stream's length */
} bitreader;

/* Up to 24 bits at pos, zeros past the chunk's len bytes (only a damaged stream gets there). */
INLINE uint32_t peek_safe(const uint8_t *src, size_t len, uint64_t pos) {
    uint64_t byte = pos >> 3;
    uint32_t v = 0;
    for (unsigned k = 0; k < 3; k++)
        if (byte + k < len)
            v |= (uint32_t)src[byte + k] << (8 * k);
    return v >> (pos & 7);
}

/* A decoding table entry: the symbol's part of the output element (its bits after the
 * rotation is undone, so an element is that OR its tail's part) and the code's length, in the
 * low 4 bits for float32 (whose symbol part has them zero), in bits 16..19 for 16-bit values. */
INLINE uint32_t entry_length(uint32_t e, int itemsize) { return itemsize == 4 ? e & 15u : e >> 16; }
/* For 16-bit values the length bits stay: storing an element keeps only its low 16 bits. */
INLINE uint32_t entry_value(uint32_t e, int itemsize) { return itemsize == 4 ? e & ~15u : e; }

/* Symbol parts of elements e0 .. e0 + count - 1 (e0 a multiple of STREAMS) into sym. Fast
 * rounds take 4 codes of each stream from one 64-bit load (4 * 12 <= 57 bits); a round moves a
 * stream on by at most 6 bytes, so before a run of rounds the furthest stream tells how many
 * may go by without reading past the chunk. The rest go one at a time through peek_safe. The
 * streams are independent chains of table look-ups, which the CPU overlaps: one chain waits
 * for each look-up (3 ns a symbol here), 4 overlap to 0.86 ns, 8 to 0.57 (docs/lossless.md). */
INLINE void decode_symbols(const uint8_t *restrict src, size_t len, bitreader *rd, const uint32_t *restrict table,
                           uint32_t mask, uint32_t *restrict sym, size_t count, int itemsize) {
    size_t k = 0;
    uint64_t q[STREAMS];
    for (int j = 0; j < STREAMS; j++)
        q[j] = rd[j].pos;
    while (k + 4 * STREAMS <= count) {
        uint64_t far = q[0];
        for (int j = 1; j < STREAMS; j++)
            far = q[j] > far ? q[j] : far;
        if ((far >> 3) + 8 > len)
            break;
        size_t rounds = (size_t)((len - 8 - (far >> 3)) / 6) + 1, left = (count - k) / (4 * STREAMS);
        if (rounds > left)
            rounds = left;
        for (; rounds; rounds--) {
            uint64_t b[STREAMS];
            for (int j = 0; j < STREAMS; j++)
                b[j] = ld64(src + (q[j] >> 3)) >> (q[j] & 7);
            for (int r = 0; r < 4; r++)
                for (int j = 0; j < STREAMS; j++) {
                    uint32_t e = table[b[j] & mask], l = entry_length(e, itemsize);
                    sym[k + STREAMS * r + j] = entry_value(e, itemsize);
                    b[j] >>= l;
                    q[j] += l;
                }
            k += 4 * STREAMS;
        }
    }
    for (int j = 0; j < STREAMS; j++)
        rd[j].pos = q[j];
    for (; k < count; k++) {
        bitreader *r = &rd[k % STREAMS];
        uint32_t e = table[peek_safe(src, len, r->pos) & mask];
        sym[k] = entry_value(e, itemsize);
        r->pos += entry_length(e, itemsize);
    }
}

/* Elements e0 .. e0 + count - 1 (e0 a multiple of 8) from their symbol parts and their tails
 * t (w bits each, packed from byte 0 of tail): element = sym | part(t << z), where part() is
 * the rotation undone, looked up in rot (float32: for the bits above the low 16, which stay
 * where they are). Eight tails span exactly w bytes, so with w a constant every field's byte
 * and shift are constants. A load of 8 bytes may run past the tail into the rest of the
 * chunk, never past readable (the bytes from tail to the chunk's end). */
INLINE void assemble(const uint32_t *restrict sym, size_t e0, size_t count, const uint8_t *restrict tail,
                     size_t readable, unsigned z, unsigned w, const uint32_t *restrict rot, int itemsize,
                     uint8_t *restrict dst) {
    const uint64_t mask = ((uint64_t)1 << w) - 1;
    uint8_t *out = dst + e0 * (size_t)itemsize;
    size_t k = 0;
#define PART(t) (itemsize == 4 ? rot[((t) << z) >> 16] | (((t) << z) & 0xFFFFu) : rot[t])
    if (w == 0) {
        for (; k < count; k++)
            store_element(out + k * (size_t)itemsize, sym[k] | PART(0u), itemsize);
        return;
    }
    for (; k + 8 <= count; k += 8) {
        size_t at = ((e0 + k) / 8) * w;
        if (UNLIKELY(at + ((7 * w) >> 3) + 8 > readable))
            break;
        const uint8_t *tp = tail + at;
        if (w <= 8) { /* the whole group in one load */
            uint64_t v = ld64(tp);
            for (unsigned j = 0; j < 8; j++) {
                uint32_t t = (uint32_t)((v >> (j * w)) & mask);
                store_element(out + (k + j) * (size_t)itemsize, sym[k + j] | PART(t), itemsize);
            }
            continue;
        }
        for (unsigned j = 0; j < 8; j++) {
            uint32_t t = (uint32_t)((ld64(tp + ((j * w) >> 3)) >> ((j * w) & 7)) & mask);
            store_element(out + (k + j) * (size_t)itemsize, sym[k + j] | PART(t), itemsize);
        }
    }
    for (; k < count; k++) {
        uint64_t bit = (uint64_t)(e0 + k) * w;
        size_t byte = (size_t)(bit >> 3);
        uint64_t v = 0;
        for (unsigned b = 0; b < 4 && byte + b < readable; b++)
            v |= (uint64_t)tail[byte + b] << (8 * b);
        uint32_t t = (uint32_t)((v >> (bit & 7)) & mask);
        store_element(out + k * (size_t)itemsize, sym[k] | PART(t), itemsize);
    }
#undef PART
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>

static int have_avx2;

/* AVX2 copies of assemble() for the layouts mlcompress writes, 8 or 16 elements a step: the
 * tail bytes of each field are gathered into its lane by a byte shuffle, moved into place by a
 * per-lane shift (a multiplication for 16-bit lanes), and the rotation is undone with constant
 * shifts. Scalar, assemble() costs about as much as decoding the Huffman streams (0.58 of 1.2
 * ns an element for bfloat16, docs/lossless.md). Each returns how many elements it did (a
 * multiple of 8); its loads stay inside the readable bytes, the rest is left to assemble(). */

/* 16 elements of 16-bit values from their fields t (16-bit lanes, z = 0): rotation undone,
 * constant bits and symbol parts ORed in, stored at out. */
__attribute__((target("avx2"))) static inline void put16(const uint32_t *sym, __m256i t, __m256i fixed, uint8_t *out) {
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    __m256i part = _mm256_or_si256(_mm256_or_si256(_mm256_srli_epi16(t, 1), _mm256_slli_epi16(t, 15)), fixed);
    __m256i v0 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)sym), low16);
    __m256i v1 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(sym + 8)), low16);
    __m256i values = _mm256_permute4x64_epi64(_mm256_packus_epi32(v0, v1), 0xD8);
    _mm256_storeu_si256((__m256i *)out, _mm256_or_si256(values, part));
}

/* 8 float32 elements from their tails y = field << z (32-bit lanes), likewise. */
__attribute__((target("avx2"))) static inline void put8(const uint32_t *sym, __m256i y, __m256i fixed, uint8_t *out) {
    const __m256i low = _mm256_set1_epi32(0xFFFF), top = _mm256_set1_epi32(0x7FFF0000);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), symbol = _mm256_set1_epi32(~15);
    __m256i part = _mm256_or_si256(_mm256_and_si256(y, low), _mm256_and_si256(_mm256_srli_epi32(y, 1), top));
    part = _mm256_or_si256(part, _mm256_and_si256(_mm256_slli_epi32(y, 15), sign));
    __m256i values = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)sym), symbol);
    _mm256_storeu_si256((__m256i *)out, _mm256_or_si256(_mm256_or_si256(values, part), fixed));
}

/* 16-bit values, w = 6 and z = 0 (bfloat16 and float16 with S = 10): 16 fields in 12 bytes.
 * Field k is bits 6k .. 6k+5: bytes 6k/8 and the next, moved up by 10 - 6k mod 8 and down by
 * 10 (16-bit lanes shift by constants only, so the first shift is a multiplication). */
__attribute__((target("avx2"))) static size_t assemble_avx2_16w6(const uint32_t *sym, size_t e0, size_t count,
                                                                   const uint8_t *tail, size_t readable,
                                                                   uint32_t constant, uint8_t *dst) {
    const __m256i gather = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6,
                                            6, 7, 6, 7, 7, 8, 8, 9, 9, 10, 9, 10, 10, 11, 11, 12);
    const __m256i align = _mm256_setr_epi16(1024, 16, 64, 256, 1024, 16, 64, 256,
                                            1024, 16, 64, 256, 1024, 16, 64, 256);
    const __m256i fixed = _mm256_set1_epi16((short)constant);
    size_t k = 0;
    for (; k + 16 <= count; k += 16) {
        size_t at = (e0 + k) / 8 * 6;
        if (at + 16 > readable)
            break;
        __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tail + at)));
        __m256i t = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, gather), align), 10);
        put16(sym + k, t, fixed, dst + (e0 + k) * 2);
    }
    return k;
}

/* 16-bit values, w = 8 and z = 0 (float16 with S = 8): a field is a byte. */
__attribute__((target("avx2"))) static size_t assemble_avx2_16w8(const uint32_t *sym, size_t e0, size_t count,
                                                                   const uint8_t *tail, size_t readable,
                                                                   uint32_t constant, uint8_t *dst) {
    const __m256i fixed = _mm256_set1_epi16((short)constant);
    size_t k = 0;
    for (; k + 16 <= count && e0 + k + 16 <= readable; k += 16)
        put16(sym + k, _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(tail + e0 + k))), fixed,
              dst + (e0 + k) * 2);
    return k;
}

/* float32 with w = 22, z = 0 (S = 10): 8 fields in 22 bytes, 4 from each 11-byte half; and
 * float32 holding bfloat16 values, w = 6 and z = 16: 8 fields in 6 bytes. 32-bit lanes shift
 * by a variable count. */
__attribute__((target("avx2"))) static size_t assemble_avx2_32w22(const uint32_t *sym, size_t e0, size_t count,
                                                                    const uint8_t *tail, size_t readable,
                                                                    uint32_t constant, uint8_t *dst) {
    const __m256i gather = _mm256_setr_epi8(0, 1, 2, 3, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11,
                                            0, 1, 2, 3, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11);
    const __m256i shift = _mm256_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2), field = _mm256_set1_epi32(0x3FFFFF);
    const __m256i fixed = _mm256_set1_epi32((int)constant);
    size_t k = 0;
    for (; k + 8 <= count; k += 8) {
        size_t at = (e0 + k) / 8 * 22;
        if (at + 11 + 16 > readable)
            break;
        __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(tail + at))),
                                                _mm_loadu_si128((const __m128i *)(tail + at + 11)), 1);
        put8(sym + k, _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, gather), shift), field), fixed,
             dst + (e0 + k) * 4);
    }
    return k;
}

__attribute__((target("avx2"))) static size_t assemble_avx2_32w6(const uint32_t *sym, size_t e0, size_t count,
                                                                   const uint8_t *tail, size_t readable,
                                                                   uint32_t constant, uint8_t *dst) {
    const __m256i gather = _mm256_setr_epi8(0, 1, -1, -1, 0, 1, -1, -1, 1, 2, -1, -1, 2, 3, -1, -1,
                                            3, 4, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1, 5, 6, -1, -1);
    const __m256i shift = _mm256_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2), field = _mm256_set1_epi32(63);
    const __m256i fixed = _mm256_set1_epi32((int)constant);
    size_t k = 0;
    for (; k + 8 <= count; k += 8) {
        size_t at = (e0 + k) / 8 * 6;
        if (at + 16 > readable)
            break;
        __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tail + at)));
        __m256i t = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, gather), shift), field);
        put8(sym + k, _mm256_slli_epi32(t, 16), fixed, dst + (e0 + k) * 4);
    }
    return k;
}
#endif

/* The layouts mlcompress writes get copies with their constants inlined: float32 with S = 10
 * (w 22) and float32 holding bfloat16 values (w 6, z 16), bfloat16 with S = 10 (w 6), float16
 * with S = 8 (w 8); and AVX2 copies where the CPU has it. constant: rot[]'s constant part. */
INLINE void assemble_any(const uint32_t *sym, size_t e0, size_t count, const uint8_t *tail, size_t readable,
                         unsigned z, unsigned w, const uint32_t *rot, int itemsize, uint8_t *dst) {
#ifdef HAVE_AVX2_PATH
    if (have_avx2) {
        size_t done = 0;
        const uint32_t constant = rot[0]; /* the part of a field of zeros: the constant bits */
        if (itemsize == 2 && w == 6 && z == 0)
            done = assemble_avx2_16w6(sym, e0, count, tail, readable, constant, dst);
        else if (itemsize == 2 && w == 8 && z == 0)
            done = assemble_avx2_16w8(sym, e0, count, tail, readable, constant, dst);
        else if (itemsize == 4 && w == 22 && z == 0)
            done = assemble_avx2_32w22(sym, e0, count, tail, readable, constant, dst);
        else if (itemsize == 4 && w == 6 && z == 16)
            done = assemble_avx2_32w6(sym, e0, count, tail, readable, constant, dst);
        sym += done;
        e0 += done;
        count -= done;
    }
#endif
    if (itemsize == 4 && w == 22 && z == 0)
        assemble(sym, e0, count, tail, readable, 0, 22, rot, 4, dst);
    else if (itemsize == 4 && w == 6 && z == 16)
        assemble(sym, e0, count, tail, readable, 16, 6, rot, 4, dst);
    else if (itemsize == 2 && w == 6 && z == 0)
        assemble(sym, e0, count, tail, readable, 0, 6, rot, 2, dst);
    else if (itemsize == 2 && w == 8 && z == 0)
        assemble(sym, e0, count, tail, readable, 0, 8, rot, 2, dst);
    else if (itemsize == 4)
        assemble(sym, e0, count, tail, readable, z, w, rot, 4, dst);
    else
        assemble(sym, e0, count, tail, readable, z, w, rot, 2, dst);
}

/* Reads the code-length table at src[pos..len) into lengths[0..A-1]; returns the position
 * after it, or 0 with *error set. */
static size_t read_lengths(const uint8_t *src, size_t len, size_t pos, int A, uint8_t *lengths, const char **error) {
    memset(lengths, 0, (size_t)A);
    if (pos + 2 > len) {
        *error = "chunk shorter than its code-length table";
        return 0;
    }
    unsigned runs = ld16(src + pos), end = 0;
    pos += 2;
    if (runs == 0) {
        *error = "code-length table without runs";
        return 0;
    }
    for (unsigned r = 0; r < runs; r++) {
        if (pos + 4 > len) {
            *error = "code-length table runs past the chunk";
            return 0;
        }
        unsigned first = ld16(src + pos), n = ld16(src + pos + 2);
        pos += 4;
        if (n == 0 || first < end || first + n > (unsigned)A) {
            *error = "code-length runs out of order or out of range";
            return 0;
        }
        size_t nb = (n + 1) / 2;
        if (pos + nb > len) {
            *error = "code-length table runs past the chunk";
            return 0;
        }
        for (unsigned k = 0; k < n; k++) {
            unsigned l = (src[pos + k / 2] >> (4 * (k & 1))) & 15u;
            if (l > MAX_LEN) {
                *error = "code length above 12";
                return 0;
            }
            lengths[first + k] = (uint8_t)l;
        }
        if ((n & 1) && (src[pos + nb - 1] >> 4)) {
            *error = "nonzero padding nibble in the code-length table";
            return 0;
        }
        pos += nb;
        end = first + n;
    }
    return pos;
}

/* One chunk of m elements from src (len bytes) into dst (m * itemsize bytes). Returns NULL,
 * or a message saying what is wrong with the chunk. */
INLINE const char *decode_chunk_body(const uint8_t *src, size_t len, size_t m, int itemsize, int S, uint8_t *dst) {
    const unsigned B = 8u * (unsigned)itemsize, W = B - (unsigned)S;
    const int A = 1 << S;
    if (len < 1)
        return "empty chunk";
    unsigned mode = src[0];
    if (mode == 0) {
        if (len != 1 + m * (size_t)itemsize)
            return "stored chunk of the wrong length";
        memcpy(dst, src + 1, m * (size_t)itemsize);
        return NULL;
    }
    if (mode > 2)
        return "unknown chunk mode";
    const size_t head = 3 + (W + 7) / 8;
    if (len < head)
        return "chunk shorter than its header";
    const unsigned z = src[1], w = src[2];
    if (z + w > W)
        return "tail field outside the tail";
    uint32_t c = 0;
    for (unsigned b = 0; b < (W + 7) / 8; b++)
        c |= (uint32_t)src[3 + b] << (8 * b);
    if ((c >> W) || (c & (((1u << w) - 1u) << z)))
        return "constant tail bits overlap the field or the symbol";
    const size_t tail_bytes = (m * w + 7) / 8;
    if (head + tail_bytes > len)
        return "chunk shorter than its tail";
    const uint8_t *tail = src + head;
    if ((m * w) & 7 && tail[tail_bytes - 1] >> ((m * w) & 7))
        return "nonzero padding bits after the tail";
    const size_t readable = len - head;
    size_t pos = head + tail_bytes;

    /* Rotation parts of tails, each with the constant bits c (the rotation is a permutation of
     * bits, so parts OR together): 16-bit values, the whole field; float32, the tail bits above
     * the low 16, which stay where they are (the low 16 bits of c are in every entry). */
    uint32_t rot[256];
    const unsigned rot_bits = itemsize == 4 ? W - 16 : w;
    const uint32_t constant = rotate_out(c, itemsize);
    for (uint32_t h = 0; h < (1u << rot_bits); h++)
        rot[h] = (itemsize == 4 ? rotate_out(h << 16, 4) : rotate_out(h << z, 2)) | constant;

    uint32_t sym[BLOCK];
    if (mode == 2) {
        if (len != pos + 2)
            return "single-symbol chunk of the wrong length";
        unsigned s = ld16(src + pos);
        if (s >= (unsigned)A)
            return "symbol out of range";
        uint32_t value = rotate_out((uint32_t)s << W, itemsize);
        for (size_t k = 0; k < BLOCK; k++)
            sym[k] = value;
        for (size_t e0 = 0; e0 < m; e0 += BLOCK)
            assemble_any(sym, e0, m - e0 < BLOCK ? m - e0 : BLOCK, tail, readable, z, w, rot, itemsize, dst);
        return NULL;
    }

    const char *error = NULL;
    uint8_t lengths[1 << MAX_SYMBOL_BITS];
    pos = read_lengths(src, len, pos, A, lengths, &error);
    if (!pos)
        return error;
    int used = 0;
    for (int s = 0; s < A; s++)
        used += lengths[s] != 0;
    uint32_t code[1 << MAX_SYMBOL_BITS];
    if (used < 2 || canonical_codes(lengths, A, code) != TABLE_SIZE)
        return "code lengths do not make a complete prefix code";
    if (pos + 4 * STREAMS > len)
        return "chunk shorter than its stream lengths";
    bitreader rd[STREAMS];
    uint64_t at = pos + 4 * STREAMS;
    for (int j = 0; j < STREAMS; j++) {
        rd[j].start = at;
        rd[j].nbytes = ld32(src + pos + 4 * j);
        rd[j].pos = 8 * at;
        at += rd[j].nbytes;
    }
    if (at != (uint64_t)len)
        return "stream lengths do not add up to the chunk";

    /* Indexed by the next `longest` stream bits (a small chunk's short codes need a small
     * table: filling all 4096 entries would cost more than decoding it). */
    unsigned longest = 0;
    for (int s = 0; s < A; s++)
        longest = lengths[s] > longest ? lengths[s] : longest;
    const uint32_t size = 1u << longest;
    uint32_t table[TABLE_SIZE];
    for (int s = 0; s < A; s++) {
        unsigned l = lengths[s];
        if (!l)
            continue;
        uint32_t value = rotate_out((uint32_t)s << W, itemsize);
        uint32_t e = itemsize == 4 ? value | l : value | l << 16;
        for (uint32_t t = code[s] & 0xFFFFu; t < size; t += 1u << l)
            table[t] = e;
    }
    for (size_t e0 = 0; e0 < m; e0 += BLOCK) {
        size_t count = m - e0 < BLOCK ? m - e0 : BLOCK;
        if (itemsize == 4)
            decode_symbols(src, len, rd, table, size - 1, sym, count, 4);
        else
            decode_symbols(src, len, rd, table, size - 1, sym, count, 2);
        assemble_any(sym, e0, count, tail, readable, z, w, rot, itemsize, dst);
    }
    for (int j = 0; j < STREAMS; j++) {
        uint64_t bits = rd[j].pos - 8 * rd[j].start, end = rd[j].start + rd[j].nbytes;
        if ((bits + 7) / 8 != rd[j].nbytes)
            return "a Huffman stream does not end where its length says";
        if ((bits & 7) && (src[end - 1] >> (bits & 7)))
            return "nonzero padding bits after a Huffman stream";
    }
    return NULL;
}

/* gcc's straight-line vectoriser packs the symbol stores of the decoding rounds into vector
 * inserts, which made bfloat16 decoding 15% slower (1.42 against 1.20 ns an element). (A BMI2
 * build, chosen at run time, was no faster once the 8 streams kept the loop in registers.) */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_SLP __attribute__((optimize("no-tree-slp-vectorize")))
#else
#define NO_SLP
#endif

NO_SLP static Py_ssize_t encode_chunk(const uint8_t *src, size_t m, int itemsize, int S, uint8_t *dst) {
    return encode_chunk_body(src, m, itemsize, S, dst);
}

NO_SLP static const char *decode_chunk(const uint8_t *src, size_t len, size_t m, int itemsize, int S, uint8_t *dst) {
    return decode_chunk_body(src, len, m, itemsize, S, dst);
}

/* =================================================================================================
 * CRC-32 (zlib's: reflected polynomial 0xEDB88320, initial and final inversion)
 * ============================================================================================== */

static uint32_t crc_table[8][256];

static void crc_init_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            crc_table[t][n] = crc_table[0][crc_table[t - 1][n] & 0xFF] ^ (crc_table[t - 1][n] >> 8);
}

/* The CRC register (not inverted) after the bytes p[0..n-1], eight bytes a step. */
static uint32_t crc_bytes(uint32_t r, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint32_t lo = ld32(p) ^ r, hi = ld32(p + 4);
        r = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        r = crc_table[0][(r ^ *p++) & 0xFF] ^ (r >> 8);
    return r;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_FOLDING 1
#include <emmintrin.h>
#include <wmmintrin.h>

static int have_clmul;
static uint64_t fold_k[4]; /* x^(512+32), x^(512-32), x^(128+32), x^(128-32) mod P, prepared */

/* Folding by carry-less multiplication. In the reflected bit order a 128-bit block X (bit k is
 * the coefficient of x^(127-k), its low 64 bits the higher powers A, the rest Bp) followed by D
 * more bits is X x^D = A x^(64+D) + Bp x^D. A carry-less product of reflected operands is the
 * product times x, so a constant holding (x^n mod P) reflected and shifted left by one turns
 * an operand into operand * x^(n+32) mod P: folding by D bits uses n = D + 32 (for A) and
 * n = D - 32 (for Bp), and the folded value has the same remainder as the message. */
static uint32_t xpow_mod(unsigned n) {
    uint32_t r = 1; /* x^0, bit i = coefficient of x^i, P = x^32 + 0x04C11DB7 */
    for (unsigned i = 0; i < n; i++)
        r = (r & 0x80000000u) ? (r << 1) ^ 0x04C11DB7u : r << 1;
    return r;
}

static uint64_t fold_constant(unsigned n) {
    uint32_t r = xpow_mod(n), reflected = 0;
    for (int i = 0; i < 32; i++)
        reflected |= ((r >> i) & 1u) << (31 - i);
    return (uint64_t)reflected << 1;
}

__attribute__((target("pclmul,sse2")))
static inline __m128i fold(__m128i x, __m128i k, __m128i data) {
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), data);
}

/* The register after n bytes (n a multiple of 16, at least 64) of p. */
__attribute__((target("pclmul,sse2")))
static uint32_t crc_folded(uint32_t r, const uint8_t *p, size_t n) {
    const __m128i k512 = _mm_set_epi64x((long long)fold_k[1], (long long)fold_k[0]);
    const __m128i k128 = _mm_set_epi64x((long long)fold_k[3], (long long)fold_k[2]);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)r));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    n -= 64;
    while (n >= 64) {
        x0 = fold(x0, k512, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    __m128i x = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);
    while (n >= 16) {
        x = fold(x, k128, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    uint8_t rest[16];
    _mm_storeu_si128((__m128i *)rest, x);
    return crc_bytes(0, rest, 16); /* the 16 folded bytes as a message of their own */
}
#endif

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t r = ~crc;
#ifdef HAVE_FOLDING
    if (have_clmul && n >= 128) {
        size_t bulk = n & ~(size_t)15;
        r = crc_folded(r, p, bulk);
        p += bulk;
        n -= bulk;
    }
#endif
    return ~crc_bytes(r, p, n);
}

/* =================================================================================================
 * Python interface
 * ============================================================================================== */

/* The arguments of both kernels, (src, itemsize, symbol_bits, dst), parsed and checked; on
 * failure the buffers are released and an exception is set. */
static int chunk_args(PyObject *args, Py_buffer *src, int *itemsize, int *symbol_bits, Py_buffer *dst, int encoding) {
    if (!PyArg_ParseTuple(args, "y*iiw*", src, itemsize, symbol_bits, dst))
        return -1;
    const char *error = NULL;
    if (*itemsize != 2 && *itemsize != 4)
        error = "itemsize must be 2 or 4";
    else if (*symbol_bits < MIN_SYMBOL_BITS || *symbol_bits > MAX_SYMBOL_BITS)
        error = "symbol_bits must be in 8..12";
    else if ((encoding ? src->len : dst->len) % *itemsize)
        error = encoding ? "src is not a whole number of elements" : "dst is not a whole number of elements";
    else if (encoding && dst->len < src->len + 1)
        error = "dst is shorter than 1 + len(src)";
    if (!error)
        return 0;
    PyErr_SetString(PyExc_ValueError, error);
    PyBuffer_Release(src);
    PyBuffer_Release(dst);
    return -1;
}

PyDoc_STRVAR(encode_chunk_doc,
"encode_chunk(src, itemsize, symbol_bits, dst) -> int\n\n"
"Code the elements in src (little-endian, itemsize 2 or 4 bytes) as one lossless3 chunk into\n"
"the writable buffer dst (at least 1 + len(src) bytes); returns the chunk's length.");

static PyObject *py_encode_chunk(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int itemsize, symbol_bits;
    (void)self;
    if (chunk_args(args, &src, &itemsize, &symbol_bits, &dst, 1) < 0)
        return NULL;
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = encode_chunk(src.buf, (size_t)src.len / (size_t)itemsize, itemsize, symbol_bits, dst.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return n < 0 ? PyErr_NoMemory() : PyLong_FromSsize_t(n);
}

PyDoc_STRVAR(decode_chunk_doc,
"decode_chunk(src, itemsize, symbol_bits, dst) -> None\n\n"
"Decode the lossless3 chunk src into dst, whose length (a multiple of itemsize) says how many\n"
"elements the chunk holds; raises ValueError with a one-line reason if the chunk is invalid.");

static PyObject *py_decode_chunk(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int itemsize, symbol_bits;
    (void)self;
    if (chunk_args(args, &src, &itemsize, &symbol_bits, &dst, 0) < 0)
        return NULL;
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = decode_chunk(src.buf, (size_t)src.len, (size_t)dst.len / (size_t)itemsize, itemsize, symbol_bits,
                         dst.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(crc32_doc,
"crc32(data, value=0) -> int\n\n"
"zlib.crc32(data, value): the same number, computed by carry-less multiplication when the CPU\n"
"has it. Releases the GIL for large buffers.");

static PyObject *py_crc32(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned int value = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &value))
        return NULL;
    uint32_t crc;
    if (data.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        crc = crc32_update(value, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc32_update(value, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(simd_doc,
"simd(enabled) -> bool\n\n"
"Use the AVX2 kernels (when the CPU has them) or not, and return whether they were in use: the\n"
"tests decode with both. The bytes written and decoded never depend on it.");

static PyObject *py_simd(PyObject *self, PyObject *arg) {
    (void)self;
    int enable = PyObject_IsTrue(arg);
    if (enable < 0)
        return NULL;
#ifdef HAVE_AVX2_PATH
    int previous = have_avx2;
    have_avx2 = enable && __builtin_cpu_supports("avx2");
    return PyBool_FromLong(previous);
#else
    return PyBool_FromLong(0);
#endif
}

/* ---- batches: many chunks (and CRCs) in one call, on native threads ---------------------------
 *
 * Why: a model's tensors are coded chunk by chunk, and for a small model (a LeNet-5: 10 tensors,
 * 1.7 MB) the cost of one Python call per chunk, and of waking a Python worker thread for each,
 * was as large as the coding itself, so a second thread made decoding slower. A batch holds
 * every chunk of every tensor of a read (and the CRC of every payload): one call parses the
 * buffers, releases the GIL once, and `threads` native threads (the caller and threads - 1
 * workers of a pool kept for the process) take the jobs largest first from a shared counter.
 * Jobs write disjoint buffers, so the bytes never depend on the thread count. */

enum { JOB_DECODE, JOB_ENCODE, JOB_CRC };

typedef struct {
    int kind;
    Py_buffer src, dst;
    int itemsize, bits;
    const char *error;  /* decode: NULL or what is wrong with the chunk */
    Py_ssize_t result;  /* encode: the chunk's length (< 0: out of memory); crc: the CRC */
} job;

typedef struct {
    job *jobs;
    size_t *order;  /* job indices, largest first */
    size_t n;
    size_t next;    /* the next position in order to take (atomic) */
} batch;

static void run_job(job *j) {
    if (j->kind == JOB_DECODE)
        j->error = decode_chunk(j->src.buf, (size_t)j->src.len, (size_t)j->dst.len / (size_t)j->itemsize,
                                j->itemsize, j->bits, j->dst.buf);
    else if (j->kind == JOB_ENCODE)
        j->result = encode_chunk(j->src.buf, (size_t)j->src.len / (size_t)j->itemsize, j->itemsize, j->bits,
                                 j->dst.buf);
    else
        j->result = (Py_ssize_t)crc32_update(0, j->src.buf, (size_t)j->src.len);
}

static void *drain(void *arg) {
    batch *b = arg;
    for (;;) {
        size_t at = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (at >= b->n)
            return NULL;
        run_job(&b->jobs[b->order[at]]);
    }
}

static const job *sort_base;
static int by_cost(const void *a, const void *b) {
    Py_ssize_t x = sort_base[*(const size_t *)a].src.len, y = sort_base[*(const size_t *)b].src.len;
    if (x != y)
        return x < y ? 1 : -1;
    return *(const size_t *)a < *(const size_t *)b ? -1 : 1;
}

#ifdef HAVE_THREADS
/* A pool of native worker threads, started on first use and kept: measured on a 2-core VM, a
 * thread created for each call started its first job about 100 us late (placing a new thread
 * on an idle CPU), which on a small model's 400 us decode left a second thread almost nothing
 * to do; a worker parked on a condition variable started within about 10 us there, but on
 * another VM (Intel Xeon, 2 vCPUs) waking it took most of a LeNet-5 decode, so workers and the
 * caller spin for a while before they park (SPIN_NS below). The pool runs one batch at a time
 * (a second caller meanwhile decodes alone), workers never touch Python objects, and a forked
 * child starts with an empty pool. */
enum { MAX_WORKERS = 255 };
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* held by the batch using the pool */
static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER; /* guards the fields below */
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_started;     /* workers running */
static int pool_threads;     /* threads (caller included) the latest batch or wake asked for */
static batch *pool_batch;    /* the batch workers may join; NULL once its jobs are all taken */
static unsigned pool_round;  /* bumped for each batch, so a worker joins each at most once */
static int pool_wanted;      /* workers the batch asks for, and how many have joined it */
static int pool_joined;
static unsigned pool_active; /* workers still in the batch (read while spinning) */
static long pool_cpus = 1;     /* online CPUs, read once at import */

/* How long a thread spins before it sleeps: a worker after its batch (for the next one), the
 * caller after its share (for the workers' last jobs). Why: on the VMs measured a thread
 * parked in the kernel left its virtual CPU halted, and waking it took so long (a 2-thread
 * decode of a LeNet-5 took 435 us against 455 on one) that a second thread did almost nothing;
 * a tensors() call is one batch per read, so consecutive batches and a run of decodes find the
 * workers awake. OpenMP runtimes spin similarly before they block. */
#define SPIN_NS 2000000L

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spins while *word == value and SPIN_NS have not passed; returns whether it changed. */
static int spin_while_equal(const unsigned *word, unsigned value) {
    int64_t deadline = 0;
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value)
            return 1;
        cpu_relax();
        if ((i & 255) == 255) {
            int64_t t = now_ns();
            if (!deadline)
                deadline = t + SPIN_NS;
            else if (t > deadline)
                return 0;
        }
    }
}

/* Spins while *word != 0, at most SPIN_NS after its last change. */
static void spin_while_nonzero(const unsigned *word) {
    unsigned value;
    while ((value = __atomic_load_n(word, __ATOMIC_ACQUIRE)) != 0 && spin_while_equal(word, value)) {
    }
}

/* Whether worker `index` (the caller: -1) may spin. Only while every thread the latest batch
 * asked for has a CPU of its own: with more threads than CPUs (threads= above the core count)
 * a spinning worker would take the CPU the thread with work needs. And only the workers that
 * batch uses: a pool started for more threads earlier keeps its other workers parked. */
static int pool_may_spin(int index) {
    int threads = __atomic_load_n(&pool_threads, __ATOMIC_RELAXED);
    return index < threads - 1 && threads <= pool_cpus;
}

static void *pool_worker(void *arg) {
    int index = (int)(intptr_t)arg;
    unsigned seen = 0;
    pthread_mutex_lock(&pool_mutex);
    for (;;) {
        while (pool_round == seen || !pool_batch || pool_joined >= pool_wanted) {
            seen = pool_round;
            pthread_mutex_unlock(&pool_mutex);
            int woke = pool_may_spin(index) && spin_while_equal(&pool_round, seen);
            pthread_mutex_lock(&pool_mutex);
            if (!woke && pool_round == seen)
                pthread_cond_wait(&pool_work, &pool_mutex);
        }
        seen = pool_round;
        batch *b = pool_batch;
        pool_joined++;
        __atomic_add_fetch(&pool_active, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&pool_mutex);
        drain(b);
        pthread_mutex_lock(&pool_mutex);
        if (__atomic_sub_fetch(&pool_active, 1, __ATOMIC_RELEASE) == 0)
            pthread_cond_signal(&pool_done);
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has none of the parent's threads */
    pthread_mutex_init(&pool_busy, NULL);
    pthread_mutex_init(&pool_mutex, NULL);
    pthread_cond_init(&pool_work, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_started = 0;
    pool_batch = NULL;
    pool_joined = pool_active = pool_wanted = 0;
}

/* Starts workers until the pool has `helpers` (or as many as the system gives), and notes how
 * many threads the batch to come uses; under pool_mutex. */
static void pool_start(int helpers) {
    __atomic_store_n(&pool_threads, helpers + 1, __ATOMIC_RELAXED);
    while (pool_started < helpers && pool_started < MAX_WORKERS) {
        pthread_t t;
        if (pthread_create(&t, NULL, pool_worker, (void *)(intptr_t)pool_started) != 0)
            break;
        pthread_detach(t);
        pool_started++;
    }
}

/* Drains b on the caller and up to `helpers` pool workers; returns once every job is done. */
static void pool_run(batch *b, int helpers) {
    if (helpers <= 0 || pthread_mutex_trylock(&pool_busy) != 0) {
        drain(b);
        return;
    }
    pthread_mutex_lock(&pool_mutex);
    pool_start(helpers);
    pool_batch = b;
    pool_wanted = helpers;
    pool_joined = 0;
    __atomic_add_fetch(&pool_round, 1, __ATOMIC_RELEASE); /* spinning workers see it at once */
    pthread_cond_broadcast(&pool_work);
    pthread_mutex_unlock(&pool_mutex);
    drain(b);
    pthread_mutex_lock(&pool_mutex);
    pool_batch = NULL; /* workers that wake from now on leave this batch alone */
    if (pool_active > 0) { /* the workers' last jobs: spin for them before sleeping */
        pthread_mutex_unlock(&pool_mutex);
        if (pool_may_spin(-1))
            spin_while_nonzero(&pool_active);
        pthread_mutex_lock(&pool_mutex);
    }
    while (pool_active > 0)
        pthread_cond_wait(&pool_done, &pool_mutex);
    pthread_mutex_unlock(&pool_mutex);
    pthread_mutex_unlock(&pool_busy);
}

/* Starts the pool's workers if needed and wakes `helpers` of them without a batch: they spin
 * (SPIN_NS) for the batch the caller is about to hand over, so waking a parked worker's CPU
 * overlaps the caller's own preparation (reading the file, planning the chunks) instead of
 * delaying the batch. A pool in use by another batch is left alone. */
static void pool_wake(int helpers) {
    if (helpers <= 0 || pthread_mutex_trylock(&pool_busy) != 0)
        return;
    pthread_mutex_lock(&pool_mutex);
    pool_start(helpers);
    __atomic_add_fetch(&pool_round, 1, __ATOMIC_RELEASE); /* no batch: woken workers spin */
    pthread_cond_broadcast(&pool_work);
    pthread_mutex_unlock(&pool_mutex);
    pthread_mutex_unlock(&pool_busy);
}
#endif

/* Runs the n jobs on `threads` threads (the caller included) with the GIL released; -1 with
 * MemoryError set (and nothing run) if the job order cannot be allocated. */
static int run_batch(job *jobs, size_t n, int threads) {
    size_t *order = PyMem_Malloc((n + 1) * sizeof *order);
    if (!order) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t k = 0; k < n; k++)
        order[k] = k;
    batch b = {jobs, order, n, 0};
    sort_base = jobs; /* under the GIL, which keeps two batches from sharing sort_base */
    qsort(order, n, sizeof *order, by_cost);
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_THREADS
    int helpers = threads - 1;
    if ((size_t)helpers > n - (n > 0))
        helpers = (int)(n - (n > 0));
    pool_run(&b, helpers);
#else
    (void)threads;
    drain(&b);
#endif
    Py_END_ALLOW_THREADS
    PyMem_Free(order);
    return 0;
}

static void release_jobs(job *jobs, size_t n) {
    for (size_t k = 0; k < n; k++) {
        PyBuffer_Release(&jobs[k].src);
        if (jobs[k].kind != JOB_CRC)
            PyBuffer_Release(&jobs[k].dst);
    }
    PyMem_Free(jobs);
}

/* Parses a sequence of (src, itemsize, symbol_bits, dst) chunk jobs (then, when crcs is given,
 * one CRC job per buffer in it) into a fresh job array; NULL with an exception set on failure. */
static job *parse_jobs(PyObject *chunks, PyObject *crcs, int kind, size_t *count) {
    PyObject *seq = PySequence_Fast(chunks, "chunks must be a sequence of (src, itemsize, symbol_bits, dst)");
    if (!seq)
        return NULL;
    PyObject *cseq = NULL;
    if (crcs && !(cseq = PySequence_Fast(crcs, "crcs must be a sequence of buffers"))) {
        Py_DECREF(seq);
        return NULL;
    }
    size_t n = (size_t)PySequence_Fast_GET_SIZE(seq), m = cseq ? (size_t)PySequence_Fast_GET_SIZE(cseq) : 0;
    job *jobs = PyMem_Calloc(n + m + 1, sizeof *jobs);
    size_t done = 0;
    if (!jobs) {
        PyErr_NoMemory();
        goto fail;
    }
    for (; done < n; done++) {
        job *j = &jobs[done];
        PyObject *item = PySequence_Fast_GET_ITEM(seq, done);
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "each chunk job must be a tuple (src, itemsize, symbol_bits, dst)");
            goto fail;
        }
        if (chunk_args(item, &j->src, &j->itemsize, &j->bits, &j->dst, kind == JOB_ENCODE) < 0)
            goto fail;
        j->kind = kind;
    }
    for (size_t k = 0; k < m; k++, done++) {
        job *j = &jobs[done];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(cseq, k), &j->src, PyBUF_SIMPLE) < 0)
            goto fail;
        j->kind = JOB_CRC;
    }
    Py_DECREF(seq);
    Py_XDECREF(cseq);
    *count = done;
    return jobs;
fail:
    if (jobs)
        release_jobs(jobs, done);
    Py_DECREF(seq);
    Py_XDECREF(cseq);
    return NULL;
}

static int threads_arg(int threads) {
    if (threads >= 1)
        return 0;
    PyErr_SetString(PyExc_ValueError, "threads must be at least 1");
    return -1;
}

PyDoc_STRVAR(decode_chunks_doc,
"decode_chunks(chunks, crcs, threads) -> (list[int], (int, str) | None)\n\n"
"Decode every chunk job (src, itemsize, symbol_bits, dst) of chunks, as decode_chunk does, and\n"
"compute zlib's CRC-32 of every buffer in crcs, on `threads` threads. Returns the CRCs and, if\n"
"a chunk is invalid, (its index, the reason) for the first such chunk (all jobs still run).");

static PyObject *py_decode_chunks(PyObject *self, PyObject *args) {
    PyObject *chunks, *crcs;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOi", &chunks, &crcs, &threads) || threads_arg(threads) < 0)
        return NULL;
    size_t n = 0;
    job *jobs = parse_jobs(chunks, crcs, JOB_DECODE, &n);
    if (!jobs)
        return NULL;
    if (run_batch(jobs, n, threads) < 0) {
        release_jobs(jobs, n);
        return NULL;
    }
    PyObject *values = PyList_New(0), *error = NULL;
    for (size_t k = 0; values && k < n; k++) {
        if (jobs[k].kind == JOB_CRC) {
            PyObject *v = PyLong_FromUnsignedLong((unsigned long)(uint32_t)jobs[k].result);
            if (!v || PyList_Append(values, v) < 0)
                Py_CLEAR(values);
            Py_XDECREF(v);
        } else if (jobs[k].error && !error) {
            error = Py_BuildValue("(ns)", (Py_ssize_t)k, jobs[k].error);
            if (!error)
                Py_CLEAR(values);
        }
    }
    release_jobs(jobs, n);
    if (!values) {
        Py_XDECREF(error);
        return NULL;
    }
    return Py_BuildValue("(NN)", values, error ? error : Py_NewRef(Py_None));
}

PyDoc_STRVAR(encode_chunks_doc,
"encode_chunks(chunks, threads) -> list[int]\n\n"
"Code every chunk job (src, itemsize, symbol_bits, dst) of chunks, as encode_chunk does, on\n"
"`threads` threads; returns the chunks' lengths.");

static PyObject *py_encode_chunks(PyObject *self, PyObject *args) {
    PyObject *chunks;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oi", &chunks, &threads) || threads_arg(threads) < 0)
        return NULL;
    size_t n = 0;
    job *jobs = parse_jobs(chunks, NULL, JOB_ENCODE, &n);
    if (!jobs)
        return NULL;
    if (run_batch(jobs, n, threads) < 0) {
        release_jobs(jobs, n);
        return NULL;
    }
    PyObject *lengths = PyList_New((Py_ssize_t)n);
    for (size_t k = 0; lengths && k < n; k++) {
        if (jobs[k].result < 0) {
            Py_CLEAR(lengths);
            PyErr_NoMemory();
            break;
        }
        PyObject *v = PyLong_FromSsize_t(jobs[k].result);
        if (!v) {
            Py_CLEAR(lengths);
            break;
        }
        PyList_SET_ITEM(lengths, (Py_ssize_t)k, v);
    }
    release_jobs(jobs, n);
    return lengths;
}

PyDoc_STRVAR(wake_doc,
"wake(threads) -> None\n\n"
"Get threads - 1 pool workers running (spinning, not parked) for a batch about to come: call it\n"
"before the work that prepares the batch. Nothing else changes; a no-op for threads <= 1.");

static PyObject *py_wake(PyObject *self, PyObject *arg) {
    (void)self;
    long threads = PyLong_AsLong(arg);
    if (threads == -1 && PyErr_Occurred())
        return NULL;
#ifdef HAVE_THREADS
    if (threads > 1) {
        Py_BEGIN_ALLOW_THREADS
        pool_wake(threads - 1 > MAX_WORKERS ? MAX_WORKERS : (int)(threads - 1));
        Py_END_ALLOW_THREADS
    }
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_O, simd_doc},
    {"encode_chunk", py_encode_chunk, METH_VARARGS, encode_chunk_doc},
    {"decode_chunk", py_decode_chunk, METH_VARARGS, decode_chunk_doc},
    {"encode_chunks", py_encode_chunks, METH_VARARGS, encode_chunks_doc},
    {"decode_chunks", py_decode_chunks, METH_VARARGS, decode_chunks_doc},
    {"crc32", py_crc32, METH_VARARGS, crc32_doc},
    {"wake", py_wake, METH_O, wake_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lossless3",
    "Native kernels of the lossless3 codec and a fast zlib-compatible CRC-32 (see _lossless3.c).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lossless3(void) {
    crc_init_tables();
#if defined(HAVE_FOLDING) || defined(HAVE_AVX2_PATH)
    __builtin_cpu_init();
#endif
#ifdef HAVE_FOLDING
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
    fold_k[0] = fold_constant(512 + 32);
    fold_k[1] = fold_constant(512 - 32);
    fold_k[2] = fold_constant(128 + 32);
    fold_k[3] = fold_constant(128 - 32);
#endif
#ifdef HAVE_AVX2_PATH
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
#ifdef HAVE_THREADS
    pthread_atfork(NULL, NULL, pool_after_fork);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    pool_cpus = cpus > 0 ? cpus : 1;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", KERNEL_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CODE_LENGTH", MAX_LEN) < 0 ||
        PyModule_AddIntConstant(m, "STREAMS", STREAMS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
