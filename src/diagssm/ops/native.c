/* Depthwise contractions of the chunked diagonal SSM (ops/chunked_native.py), on the (B, L, H)
 * layout itself: the channel h is the vector lane, so nothing is transposed into a matmul layout.
 *
 * A "row" is one chunk of one batch row: rows (b, c) at base + b sb + c sc, each a (K, H) block of
 * floats with the channel innermost (a (T, H) chunk of u or y, a (2M, H) state). Weights (and
 * weight gradients) are stored per lane tile of NL channels (one machine vector, below), each tile's
 * (K, I) block contiguous (in strips: WAT below). The work:
 *   rows_mm   C[r][i][h]  = sum_k A1[r][k][h] W1[k][i][h] + sum_k A2[r][k][h] W2[k][i][h]
 *   rows_red  G[k][i][h] += sum_r A[r][k][h] Bm[r][i][h]      (a weight gradient)
 * A triangular W1 (tri1 = 1: zero where k > i / cp, the causal Toeplitz block of T steps by C' = cp
 * outputs per step, in (step, channel) order; 2: zero where k / cp < i, its transpose; integer
 * division) skips the zero blocks of a tile's outputs, and rows_red with tri = 1 only fills G[k][i]
 * for k <= i / cp (to within a tile): half the work of the Toeplitz parts.
 *   carry_fwd / carry_bwd  the complex scan over chunk boundaries, states as (Re, Im) row pairs.
 *   dense_carry            the same with a dense real (n, n) matrix per channel (S4's system).
 *   chunks_fwd             the op's forward over its full chunks in one pass: per batch row, blocks
 *                          of RB chunks: their sums (rows_mm), the carry, their outputs (rows_mm).
 *   tile_weights           weights between a strided (K, I, H) array and the tiled layout above.
 *   scan_fwd / scan_bwd    ops/scan.py's scan with a constant A_bar, on complex64 (B, L, P).
 *   s5_fwd / s5_bwd        the fused S5 layer of ops/s5_native.py (GEMMs, scan and skip term per
 *                          time block of one batch row; `gemm` broadcasts its row operand).
 * rows_mm and rows_red first copy a block of rows into a lane-major scratch (`pack_block`: one
 * sequential read of the rows, then contiguous lanes; reading the lanes in place strides by H floats,
 * which runs the L1's sets short and the prefetchers blind). They return 0, or -1 when a thread could
 * not allocate its scratch (nothing is then written). rows_red's threads beyond the first sum into
 * partial copies of G that the caller owns, so that a backward pass zeroes and adds them once, not on
 * each of its calls.
 * Each entry point does all its rows and splits them (row blocks or batch rows) over
 * OpenMP threads. Built
 * with -fopenmp, it shares the OpenMP runtime torch has loaded (the same libgomp.so.1), so it runs
 * on torch's threads instead of competing with them. H must be a multiple of 16, I of 4.
 * float32 only; GCC/Clang vector extensions (no intrinsics), compiled for the machine it runs on.
 */
#include <omp.h>
#include <stdlib.h>
typedef float vf __attribute__((vector_size(64), aligned(4))); /* 16 channels: the carries, S5's loops */
#define LANES 16
#define LD(p) (*(const vf *)(p))
/* The register tiles (rows_mm, rows_red, the S5 gemm) are written in the machine's own vector, vn
 * of NL floats, and sized for its register file: with AVX-512, vn is vf and 32 registers hold
 * tiles of 4 x 4 vectors; with AVX/AVX2 (8 floats, 16 registers) and otherwise (4 floats, SSE or
 * NEON) the tiles are 4 x 2. The row kernels' lane tile is one vn (NL channels). Sized for 32
 * registers, a tile of 16 accumulators plus its operands spills on a 16-register machine (GCC cannot
 * even keep the operands in registers: the build failed on AVX2 with the AVX-512 tile).
 * HOLD(x): keep a loaded vector in a register. GCC otherwise folds the load into each multiply-add
 * that uses it (a memory operand), so that a 4 x 4 tile issued 20 loads per 16 multiply-adds, more
 * than the load ports feed (+10-30% for both row kernels with AVX-512, by hand). */
#if defined(__AVX512F__)
#define NL 16
#define HOLD(x) __asm__("" : "+v"(x))
#elif defined(__AVX__)
#define NL 8
#define HOLD(x) __asm__("" : "+x"(x))
#elif defined(__SSE2__)
#define NL 4
#define HOLD(x) __asm__("" : "+x"(x))
#else
#define NL 4
#define HOLD(x) ((void)0)
#endif
typedef float vn __attribute__((vector_size(NL * sizeof(float)), aligned(4)));
#define LDN(p) (*(const vn *)(p))
/* tile widths: rows_mm's outputs per tile (of MR rows) and rows_red's i per tile (of 4 k), which are
 * also the width of the weights' strips (below); the gemm's vectors per wide tile (of GR rows) */
#if NL == 16
#define NO 4
#define GW 4
#else
#define NO 2
#define GW 2
#endif
/* Weights and their gradients, (K, I) per channel, are stored per lane tile of NL channels, in strips
 * of SW(I) outputs, each strip (K, SW, NL) contiguous: entry (k, i) of lane tile t at t K I NL +
 * WAT(K, I, k, i). With 8 or 4 floats per vector the strips are a tile's NO outputs, so that a tile
 * reads its weights as one sequential stream: in (K, I, NL) order its loads strided by I NL floats,
 * all in one set of the L1 (on AVX2 the op's row contractions took 379 ms a pass that way against 303
 * in strips, `bench_chunked.py --sections`, with 16-channel lane tiles at the time). With AVX-512 the
 * strip is the whole row, (K, I, 16): strips were measured no faster there in the op (session 13). */
#if NL == 16
#define SW(I) (I)
#else
#define SW(I) NO
#endif
#define WAT(K, I, k, i) ((((i) / SW(I) * (K) + (k)) * SW(I) + (i) % SW(I)) * NL)
/* Rows per block: rows_mm packs RB rows of each operand (their lanes of all channels: RB (K1 + K2)
 * H floats, 512 KB at K1 = K2 = 64, H = 128, in L2) and sweeps the lane tiles over them; rows_red
 * packs RBR rows and adds their products into its thread's sum (G itself for thread 0). Chosen by
 * timing the kernels by hand at B = 16, H = 128, T = 2M = 64 on 2 cores with AVX-512: RB 8-32 within
 * 5%, RBR 8 about 15% slower than 16; since each row's lanes stay in registers, RBR 32 a few % faster
 * than 16 (each block of rows reads and writes the thread's whole G, 2 MB here, more than L2).
 * `benchmarks/bench_chunked.py --parts` times both kernels as they are. */
#define RB 8
#define RBR 32
/* rows per register tile of rows_mm: 4 rows x NO outputs (6 rows: slower with AVX-512) */
#define MR 4

static inline const float *row(const float *base, long r, long nc, long sb, long sc) {
    return base + (r / nc) * sb + (r % nc) * sc;
}

/* The lanes of rows r0 .. r0 + n - 1 of A (n <= nb) into q, lane tile t's block (nb K NL floats) at
 * q + t nb K NL, each entry a vector of NL lanes, in one of two orders:
 *   by rows (kq = 0): groups of MR rows, row j at k at [j / MR][k][j % MR]; rows up to the next
 *                     multiple of MR repeat the last one (rows_mm's register tile of MR rows);
 *   by k (kq = 1):    groups of 4 k, at [k / 4][j][k % 4] (rows_red's 4 x NO tile of G).
 * The copy runs along the destination: each step reads the MR rows (or 4 k) at one k (k group) and
 * writes their vectors of every lane tile, MR (4) vectors in a row. Walking the rows one at a time
 * instead wrote each 64-byte line of q in two halves, far apart, in 16 streams 16 KB apart (one L1
 * set): `bench_chunked.py --parts` (AVX2, session 16), rows_mm 38.7-41.5 -> 32.8-33.4 ms, rows_red
 * 48.1-49.3 -> 39.9-45.6. */
static void pack_block(float *q, const float *A, long sb, long sc, long K, long H, long nc, long r0,
                       long n, long nb, int kq) {
    long tile = nb * K * NL; /* floats per lane tile */
    if (!kq) {
        for (long j0 = 0; j0 < n; j0 += MR) {
            const float *ra[MR];
            for (long jj = 0; jj < MR; jj++)
                ra[jj] = row(A, r0 + (j0 + jj < n ? j0 + jj : n - 1), nc, sb, sc);
            for (long k = 0; k < K; k++) {
                float *qk = q + (j0 / MR * K + k) * MR * NL;
                for (long t = 0; t < H / NL; t++)
                    for (long jj = 0; jj < MR; jj++)
                        *(vn *)(qk + t * tile + jj * NL) = LDN(ra[jj] + k * H + t * NL);
            }
        }
    } else {
        for (long j = 0; j < n; j++) {
            const float *ra = row(A, r0 + j, nc, sb, sc);
            for (long k0 = 0; k0 < K; k0 += 4) {
                float *qk = q + (k0 / 4 * nb + j) * 4 * NL;
                for (long t = 0; t < H / NL; t++)
                    for (long kk = 0; kk < 4; kk++)
                        *(vn *)(qk + t * tile + kk * NL) = LDN(ra + (k0 + kk) * H + t * NL);
            }
        }
    }
}

/* acc[j][q] += sum over k in [lo, hi) of A_j[k] W[k][i0 + q] (one lane tile, MR rows, NO outputs);
 * pa: the MR rows' packed lanes, row j at k at pa + (k MR + j) NL */
static inline void fma_k(vn acc[MR][NO], const float *pa, const float *w, long K, long I, long i0, long ho,
                         long lo, long hi) {
    const float *wp = w + ho * K * I + WAT(K, I, lo, i0); /* ho / NL tiles of K I NL */
    for (long k = lo; k < hi; k++, wp += SW(I) * NL) {
        vn wq[NO];
#pragma GCC unroll 8
        for (int q = 0; q < NO; q++) {
            wq[q] = LDN(wp + q * NL);
            HOLD(wq[q]); /* held in registers, not reloaded per row */
        }
#pragma GCC unroll 8
        for (int j = 0; j < MR; j++) {
            vn x = LDN(pa + (k * MR + j) * NL);
            HOLD(x);
#pragma GCC unroll 8
            for (int q = 0; q < NO; q++)
                acc[j][q] += wq[q] * x;
        }
    }
}

/* Weights between a (K, I, H) array w (any strides: entry (k, i, h) at w + k sK + i sI + h sH) and
 * the kernels' tiled layout t (lane tiles of NL channels, strips WAT): t <- w, or w <- t with untile.
 * Lane tiles split over OpenMP threads; within one, its NL channels' entries are read (written) in
 * (k, i) order, as many streams as lanes. */
void tile_weights(float *t, float *w, long sK, long sI, long sH, long K, long I, long H, long untile) {
    long sd = untile ? sH : 1, ss = untile ? 1 : sH; /* lane strides of the destination and the source */
#pragma omp parallel for schedule(static)
    for (long ho = 0; ho < H; ho += NL) {
        float *tt = t + ho * K * I;
        for (long k = 0; k < K; k++)
            for (long i = 0; i < I; i++) {
                float *tv = tt + WAT(K, I, k, i), *wv = w + k * sK + i * sI + ho * sH;
                float *d = untile ? wv : tv, *src = untile ? tv : wv;
                for (long v = 0; v < NL; v++)
                    d[v * sd] = src[v * ss];
            }
    }
}

/* Within a parallel region: whether every thread allocated its scratch (ok: this thread did);
 * *fail is set when one did not. A barrier, so that all threads take the same branch. */
static int all_allocated(int ok, int *fail) {
    if (!ok) {
#pragma omp atomic write
        *fail = 1;
    }
#pragma omp barrier
    int f;
#pragma omp atomic read
    f = *fail;
    return !f;
}

/* Rows rb .. rb + n - 1 (n <= RB) of C from their packed lanes (`pack_block`, by rows in groups of
 * MR) q1 (K1 per row) and, when W2 is given, q2 (K2 per row): rows_mm's work on one block. */
static void mm_block(float *C, long sCb, long sCc, const float *q1, const float *W1, long K1, long tri1, long cp,
                     const float *q2, const float *W2, long K2, long I, long H, long nc, long rb, long n) {
    long re = rb + n;
    for (long ho = 0; ho < H; ho += NL) {
        for (long r = rb; r < re; r += MR) {
            long m = re - r < MR ? re - r : MR; /* rows past m repeat the last row, not stored */
            long at = ho / NL * RB + (r - rb); /* the group's rows in the packed tile */
            const float *pk1 = q1 + at * K1 * NL, *pk2 = W2 ? q2 + at * K2 * NL : 0;
            float *pc[MR];
            for (long j = 0; j < MR; j++)
                pc[j] = (float *)row(C, r + (j < m ? j : m - 1), nc, sCb, sCc);
            for (long i0 = 0; i0 < I; i0 += NO) {
                long last = (i0 + NO - 1) / cp + 1; /* tri1 = 1: the tile's outputs read k < last */
                long lo = tri1 == 2 ? i0 * cp : 0, hi = tri1 == 1 && last < K1 ? last : K1;
                vn acc[MR][NO];
#pragma GCC unroll 8
                for (int j = 0; j < MR; j++)
#pragma GCC unroll 8
                    for (int q = 0; q < NO; q++)
                        acc[j][q] = (vn){0};
                fma_k(acc, pk1, W1, K1, I, i0, ho, lo, hi);
                if (W2)
                    fma_k(acc, pk2, W2, K2, I, i0, ho, 0, K2);
                for (long j = 0; j < m; j++)
                    for (long q = 0; q < NO; q++)
                        *(vn *)(pc[j] + (i0 + q) * H + ho) = acc[j][q];
            }
        }
    }
}

int rows_mm(float *C, long sCb, long sCc,
            const float *A1, long sA1b, long sA1c, const float *W1, long K1, long tri1, long cp,
            const float *A2, long sA2b, long sA2c, const float *W2, long K2,
            long I, long H, long nc, long nrows) {
    int fail = 0;
#pragma omp parallel
    {
        float *q1 = aligned_alloc(64, (K1 + K2) * RB * H * sizeof(float)), *q2 = q1 ? q1 + K1 * RB * H : 0;
        if (all_allocated(q1 != 0, &fail)) {
#pragma omp for schedule(static)
            for (long rb = 0; rb < nrows; rb += RB) {
                long n = rb + RB < nrows ? RB : nrows - rb;
                pack_block(q1, A1, sA1b, sA1c, K1, H, nc, rb, n, RB, 0);
                if (A2)
                    pack_block(q2, A2, sA2b, sA2c, K2, H, nc, rb, n, RB, 0);
                mm_block(C, sCb, sCc, q1, W1, K1, tri1, cp, q2, A2 ? W2 : 0, K2, I, H, nc, rb, n);
            }
        }
        free(q1);
    }
    return fail ? -1 : 0;
}

/* G[k][i][h] += sum over the nrows rows of A[r][k][h] Bm[r][i][h]. Thread 0 sums its row blocks into
 * G itself, thread t > 0 into parts[t - 1] (nparts <= the number of threads - 1, each K I H floats in
 * G's layout), RBR rows at a time with a 4 x NO tile of G per lane tile in registers. The parts are the
 * caller's: it zeroes them, may pass them to several calls, and adds them to G in order at the end
 * (chunked_native._red), so that the result does not change from run to run (it does with the number
 * of threads, as the order of the sums does).
 * Its tile is written as loops that GCC unrolls completely; with AVX-512 they compile to the same
 * inner loop as the hand-unrolled 4 x 4 tile it replaced (session 14). */
long rows_red_block(void) { return RBR; }
long vector_floats(void) { return NL; }
long strip_width(long I) {
    (void)I; /* unused where the strips are NO wide */
    return SW(I);
}

int rows_red(float *G, float *parts, long nparts, const float *A, long sAb, long sAc, const float *Bm, long sBb,
             long sBc, long K, long I, long H, long nc, long nrows, long tri, long cp) {
    int fail = 0;
#pragma omp parallel num_threads(nparts + 1)
    {
        int id = omp_get_thread_num();
        float *qa = aligned_alloc(64, RBR * (K + I) * H * sizeof(float)), *qb = qa ? qa + RBR * K * H : 0;
        float *Gp = id == 0 ? G : parts + (id - 1) * K * I * H;
        if (all_allocated(qa != 0, &fail)) {
#pragma omp for schedule(static)
            for (long rb = 0; rb < nrows; rb += RBR) {
                long n = rb + RBR < nrows ? RBR : nrows - rb;
                pack_block(qa, A, sAb, sAc, K, H, nc, rb, n, RBR, 1);
                pack_block(qb, Bm, sBb, sBc, I, H, nc, rb, n, RBR, 1);
                for (long ho = 0; ho < H; ho += NL) {
                    const float *qat = qa + ho * RBR * K, *qbt = qb + ho * RBR * I;
                    for (long k0 = 0; k0 < K; k0 += 4) {
                        for (long i0 = 0; i0 < I; i0 += NO) {
                            if (tri == 1 && k0 > (i0 + NO - 1) / cp)
                                continue; /* G[k][i] with k > i / cp not wanted */
                            float *g = Gp + ho * K * I + WAT(K, I, k0, i0); /* (k0 + kk, i0 + ii) at */
                            vn acc[4][NO];                               /* g + (kk SW + ii) NL */
#pragma GCC unroll 8
                            for (int kk = 0; kk < 4; kk++)
#pragma GCC unroll 8
                                for (int ii = 0; ii < NO; ii++)
                                    acc[kk][ii] = LDN(g + (kk * SW(I) + ii) * NL);
                            /* the packed rows: 4 k (or 4 i) per row, from i0's group of 4 */
                            const float *xa = qat + k0 * RBR * NL;
                            const float *xb = qbt + ((i0 & ~3L) * RBR + (i0 & 3)) * NL;
                            for (long j = 0; j < n; j++, xa += 4 * NL, xb += 4 * NL) {
                                vn x[4], w[NO];
#pragma GCC unroll 8
                                for (int kk = 0; kk < 4; kk++) {
                                    x[kk] = LDN(xa + kk * NL);
                                    HOLD(x[kk]);
                                }
#pragma GCC unroll 8
                                for (int ii = 0; ii < NO; ii++) {
                                    w[ii] = LDN(xb + ii * NL);
                                    HOLD(w[ii]);
                                }
#pragma GCC unroll 8
                                for (int kk = 0; kk < 4; kk++)
#pragma GCC unroll 8
                                    for (int ii = 0; ii < NO; ii++)
                                        acc[kk][ii] += w[ii] * x[kk];
                            }
                            for (long kk = 0; kk < 4; kk++)
                                for (long ii = 0; ii < NO; ii++)
                                    *(vn *)(g + (kk * SW(I) + ii) * NL) = acc[kk][ii];
                        }
                    }
                }
            }
        }
        free(qa);
    }
    return fail ? -1 : 0;
}

/* X[c] += a X[c - 1] for c = c0 + 1 .. c0 + n, X[c] at X + c sc (M (Re, Im) row pairs of H lanes,
 * a = ar + i ai): carry_fwd's work on one batch row's chunk boundaries, in order. */
static void carry_run(float *X, long sc, long c0, long n, const float *ar, const float *ai, long M, long H) {
    for (long c = c0 + 1; c <= c0 + n; c++) {
        const float *p = X + (c - 1) * sc;
        float *x = X + c * sc;
        for (long m = 0; m < M; m++) {
            const float *pr = p + 2 * m * H, *pi = pr + H, *a = ar + m * H, *e = ai + m * H;
            float *xr = x + 2 * m * H, *xi = xr + H;
            for (long h = 0; h < H; h += LANES) {
                vf A = LD(a + h), E = LD(e + h), Pr = LD(pr + h), Pi = LD(pi + h);
                *(vf *)(xr + h) = LD(xr + h) + A * Pr - E * Pi;
                *(vf *)(xi + h) = LD(xi + h) + A * Pi + E * Pr;
            }
        }
    }
}

/* States X (rows (b, c), c = 0..nc, each M (Re, Im) row pairs of H lanes): on entry X[b][0] is the
 * initial state and X[b][c] (c >= 1) the input sum of chunk c - 1; on return X[b][c] is the state
 * entering chunk c (X[b][nc]: the final state): X[c] = a X[c-1] + X[c], a = ar + i ai (M, H). */
void carry_fwd(float *X, long sb, long sc, const float *ar, const float *ai, long M, long H,
               long nc, long Bn) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++)
        carry_run(X + b * sb, sc, 0, nc, ar, ai, M, H);
}

/* The forward of the chunked op over nc full chunks in one pass over u: per batch row (split over
 * OpenMP threads), RB chunks at a time in order, the chunks' input sums into X[b][c + 1] (U W_in),
 * the carry (X[b][c + 1] += a X[b][c], X[b][0] the state entering the first chunk), then their
 * outputs Y = U W_toe (tri1 = 1, C' = I / T) + X W_out, with U's packed lanes reused and the new states still
 * in cache. The same contractions as rows_mm (sums), carry_fwd, rows_mm (outputs), which read U
 * from memory twice and X three times more. U (B, nc, T, H) rows, X (B, nc + 1, 2M, H), Y (B, nc,
 * I, H); W_in (T, 2M), W_toe (T, I), W_out (2M, I) tiled. Returns 0, or -1 as rows_mm. */
int chunks_fwd(float *Y, long sYb, long sYc, float *X, long sXb, long sXc, const float *U, long sUb, long sUc,
               const float *Win, const float *Wtoe, const float *Wout, const float *ar, const float *ai,
               long T, long M, long I, long H, long nc, long Bn) {
    int fail = 0;
    long P = 2 * M;
#pragma omp parallel
    {
        float *qu = aligned_alloc(64, (T + P) * RB * H * sizeof(float)), *qx = qu ? qu + T * RB * H : 0;
        if (all_allocated(qu != 0, &fail)) {
#pragma omp for schedule(static)
            for (long b = 0; b < Bn; b++)
                for (long c0 = 0; c0 < nc; c0 += RB) {
                    long n = c0 + RB < nc ? RB : nc - c0, r0 = b * nc + c0;
                    pack_block(qu, U, sUb, sUc, T, H, nc, r0, n, RB, 0);
                    mm_block(X + sXc, sXb, sXc, qu, Win, T, 0, 1, 0, 0, 0, P, H, nc, r0, n);
                    carry_run(X + b * sXb, sXc, c0, n, ar, ai, M, H);
                    pack_block(qx, X, sXb, sXc, P, H, nc, r0, n, RB, 0);
                    mm_block(Y, sYb, sYc, qu, Wtoe, T, 1, I / T, qx, Wout, P, I, H, nc, r0, n);
                }
        }
        free(qu);
    }
    return fail ? -1 : 0;
}

/* The adjoint of carry_fwd over chunks c0 .. c0 + n - 1 (Lm's rows 0 .. n, X's rows c0 .. c0 + n).
 * On entry Lm[b][j] (j < n) is the gradient of the state entering chunk c0 + j through that chunk's
 * outputs and Lm[b][n] the total gradient of the state entering chunk c0 + n (or the final state);
 * on return Lm[b][j] is the total gradient: Lm[j] += conj(a) Lm[j+1]. gA[b] (2M rows of H lanes,
 * (Re, Im) pairs) accumulates sum_j Lm[j+1] conj(X[j]), the gradient of a in PyTorch's convention
 * for complex gradients, X the states from carry_fwd (X pointing at chunk c0). */
void carry_bwd(float *Lm, long sLb, long sLc, const float *X, long sXb, long sXc,
               const float *ar, const float *ai, float *gA, long sGb, long M, long H, long n, long Bn) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++)
        for (long j = n - 1; j >= 0; j--) {
            const float *q = Lm + b * sLb + (j + 1) * sLc, *x = X + b * sXb + j * sXc;
            float *l = Lm + b * sLb + j * sLc;
            for (long m = 0; m < M; m++) {
                const float *qr = q + 2 * m * H, *qi = qr + H, *xr = x + 2 * m * H, *xi = xr + H;
                const float *a = ar + m * H, *e = ai + m * H;
                float *lr = l + 2 * m * H, *li = lr + H, *gr = gA + b * sGb + 2 * m * H, *gi = gr + H;
                for (long h = 0; h < H; h += LANES) {
                    vf Qr = LD(qr + h), Qi = LD(qi + h), Xr = LD(xr + h), Xi = LD(xi + h);
                    vf A = LD(a + h), E = LD(e + h);
                    *(vf *)(gr + h) = LD(gr + h) + Qr * Xr + Qi * Xi;
                    *(vf *)(gi + h) = LD(gi + h) + Qi * Xr - Qr * Xi;
                    *(vf *)(lr + h) = LD(lr + h) + A * Qr + E * Qi;
                    *(vf *)(li + h) = LD(li + h) + A * Qi - E * Qr;
                }
            }
        }
}

/* The dense carry of ops/chunked_dense.py's system on the native kernels: rows of n real state
 * coordinates of H lanes, A (n, n, H) (A[k][j] the lanes of entry (k, j)), n even. adjoint = 0:
 * X[c] += A X[c - 1] for c = 1 .. steps, in order (X as in carry_fwd); adjoint = 1:
 * X[j] += A^T X[j + 1] for j = steps - 1 .. 0 (the states' gradients, as carry_bwd's Lm; A's
 * gradient is a rows_red). Per lane tile of NL channels (split over threads), each step is a small
 * matrix product (B, n) x (n, n)^T per lane: the tile's lanes of A (or A^T) and the current states
 * of all batch rows are first copied into a contiguous scratch (read in place, A's lanes stride by
 * H floats, which leaves a few cache sets for its block: by hand ~900 ms against ~80 a pass at B = 16,
 * H = 128, n = 64, L = 16384), and each register tile of 4 batch rows x 2 outputs reuses every load
 * of A four times.
 * Returns 0, or -1 when a thread could not allocate its scratch (nothing is then written). */
static inline __attribute__((always_inline)) void dense_rows(float *x, long sb, long H, const vn *a, const vn *cur,
                                                              vn *nxt, long n, long nb) {
    for (long k = 0; k < n; k += 2) {
        const vn *r0 = a + k * n, *r1 = r0 + n;
        vn s[4][2];
        for (long b = 0; b < nb; b++) {
            s[b][0] = LDN(x + b * sb + k * H);
            s[b][1] = LDN(x + b * sb + (k + 1) * H);
        }
        for (long j = 0; j < n; j++) {
            vn p = r0[j], q = r1[j];
            HOLD(p);
            HOLD(q);
            for (long b = 0; b < nb; b++) {
                vn c = cur[b * n + j];
                s[b][0] += p * c;
                s[b][1] += q * c;
            }
        }
        for (long b = 0; b < nb; b++) {
            *(vn *)(x + b * sb + k * H) = nxt[b * n + k] = s[b][0];
            *(vn *)(x + b * sb + (k + 1) * H) = nxt[b * n + k + 1] = s[b][1];
        }
    }
}

int dense_carry(float *X, long sb, long sc, const float *A, long n, long H, long steps, long Bn, long adjoint) {
    int fail = 0;
#pragma omp parallel
    {
        vn *a = aligned_alloc(64, (n * n + 2 * Bn * n) * sizeof(vn)), *cur = a ? a + n * n : 0;
        vn *nxt = cur ? cur + Bn * n : 0;
        if (all_allocated(a != 0, &fail)) {
#pragma omp for schedule(static)
            for (long t = 0; t < H / NL; t++) {
                long h = t * NL;
                for (long k = 0; k < n; k++)
                    for (long j = 0; j < n; j++)
                        a[k * n + j] = LDN(A + (adjoint ? j * n + k : k * n + j) * H + h);
                for (long b = 0; b < Bn; b++)
                    for (long j = 0; j < n; j++)
                        cur[b * n + j] = LDN(X + b * sb + (adjoint ? steps : 0) * sc + j * H + h);
                for (long s = 0; s < steps; s++) {
                    float *x = X + (adjoint ? steps - 1 - s : s + 1) * sc + h;
                    long b = 0;
                    for (; b + 4 <= Bn; b += 4) /* a constant 4: the tile's sums stay in registers */
                        dense_rows(x + b * sb, sb, H, a, cur + b * n, nxt + b * n, n, 4);
                    for (; b < Bn; b++)
                        dense_rows(x + b * sb, sb, H, a, cur + b * n, nxt + b * n, n, 1);
                    vn *swap = cur;
                    cur = nxt;
                    nxt = swap;
                }
            }
        }
        free(a);
    }
    return fail ? -1 : 0;
}

/* Complex helpers, (Re, Im) interleaved, P complex numbers. z += a * p */
static inline void cmul_add(float *z, const float *a, const float *p, long P) {
    for (long m = 0; m < P; m++) {
        float ar = a[2 * m], ai = a[2 * m + 1], pr = p[2 * m], pi = p[2 * m + 1];
        z[2 * m] += ar * pr - ai * pi;
        z[2 * m + 1] += ar * pi + ai * pr;
    }
}

/* z += conj(a) * p */
static inline void cmulc_add(float *z, const float *a, const float *p, long P) {
    for (long m = 0; m < P; m++) {
        float ar = a[2 * m], ai = a[2 * m + 1], pr = p[2 * m], pi = p[2 * m + 1];
        z[2 * m] += ar * pr + ai * pi;
        z[2 * m + 1] += ar * pi - ai * pr;
    }
}

/* z += p * conj(x) */
static inline void cmul_conj_add(float *z, const float *p, const float *x, long P) {
    for (long m = 0; m < P; m++) {
        float pr = p[2 * m], pi = p[2 * m + 1], xr = x[2 * m], xi = x[2 * m + 1];
        z[2 * m] += pr * xr + pi * xi;
        z[2 * m + 1] += pi * xr - pr * xi;
    }
}

/* The time-invariant diagonal scan of ops/scan.py on complex64 (B, L, P) tensors, (Re, Im)
 * interleaved: h[l] = a h[l-1] + x[l] over l (descending when rev), from h0 (B, P) or zero.
 * Each batch row is one sequential loop over L, vectorised over its P modes; rows split over
 * OpenMP threads. a: P complex numbers, (Re, Im) interleaved. */
void scan_fwd(float *h, const float *x, const float *a, const float *h0, long Bn, long L, long P,
              long rev) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++) {
        const float *prev = h0 ? h0 + b * 2 * P : 0;
        for (long s = 0; s < L; s++) {
            long l = rev ? L - 1 - s : s;
            const float *xl = x + (b * L + l) * 2 * P;
            float *hl = h + (b * L + l) * 2 * P;
            for (long p = 0; p < 2 * P; p++)
                hl[p] = xl[p];
            if (prev)
                cmul_add(hl, a, prev, P);
            prev = hl;
        }
    }
}

/* The adjoint of scan_fwd: lam[l] = g[l] + conj(a) lam[l+1] (l walked the other way), the
 * gradient of x; ga[b] (P complex) = sum_l lam[l] conj(h[l-1]) with h[-1] = h0 (or zero), and
 * gh0[b] = conj(a) lam[first] when gh0 is given: PyTorch's convention for complex gradients. */
void scan_bwd(float *lam, const float *g, const float *h, const float *a, const float *h0, float *ga,
              float *gh0, long Bn, long L, long P, long rev) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++) {
        const float *next = 0;
        float *gab = ga + b * 2 * P;
        for (long p = 0; p < 2 * P; p++)
            gab[p] = 0;
        for (long s = 0; s < L; s++) {
            long l = rev ? s : L - 1 - s; /* the scan's own order, backwards */
            long lp = rev ? l + 1 : l - 1; /* the step before l in the scan's order */
            const float *gl = g + (b * L + l) * 2 * P;
            float *ll = lam + (b * L + l) * 2 * P;
            const float *hp = (lp >= 0 && lp < L) ? h + (b * L + lp) * 2 * P : (h0 ? h0 + b * 2 * P : 0);
            for (long p = 0; p < 2 * P; p++)
                ll[p] = gl[p];
            if (next)
                cmulc_add(ll, a, next, P);
            if (hp)
                cmul_conj_add(gab, ll, hp, P);
            next = ll;
        }
        if (gh0) { /* conj(a) lam at the scan's first step */
            for (long p = 0; p < 2 * P; p++)
                gh0[b * 2 * P + p] = 0;
            cmulc_add(gh0 + b * 2 * P, a, lam + (b * L + (rev ? L - 1 : 0)) * 2 * P, P);
        }
    }
}

/* ---- The fused S5 layer (ops/s5_native.py): y = Re-projection of the scan of B u, plus D u. ----
 * Per batch row, in time blocks of TB steps that stay in cache: Bu = u W_in (a GEMM, into the saved
 * states xs), the scan in place (complex, (Re, Im) interleaved), y = xs W_out^T + D u (a GEMM).
 * The backward walks the blocks in reverse the same way. Rows split over OpenMP threads by batch row.
 * H and P2 = 2 x modes must be multiples of 16. */

/* GEMM tile: C[i][0 : NL NV] (= or +=) sum_k A[i sai + k sak] W[k sw + 0 : NL NV], rows i < n <= GR.
 * A's entries are broadcast, W's rows are vectors: GR x NV accumulators. */
#define GR 4
#define GEMM_TILE(NAME, NV)                                                                          \
    static inline void NAME(float *C, long sc, const float *A, long sai, long sak, const float *W,   \
                            long sw, long K, long n, int add) {                                      \
        const float *a[GR];                                                                          \
        vn acc[GR][NV];                                                                              \
        for (int i = 0; i < GR; i++) {                                                               \
            a[i] = A + (i < n ? i : n - 1) * sai; /* rows past n repeat the last one, not stored */  \
            for (int q = 0; q < NV; q++)                                                             \
                acc[i][q] = add && i < n ? LDN(C + i * sc + q * NL) : (vn){0};                       \
        }                                                                                            \
        for (long k = 0; k < K; k++) {                                                               \
            const float *wk = W + k * sw;                                                            \
            vn w[NV];                                                                                \
            for (int q = 0; q < NV; q++) {                                                           \
                w[q] = LDN(wk + q * NL);                                                             \
                HOLD(w[q]);                                                                          \
            }                                                                                        \
            for (int i = 0; i < GR; i++) {                                                           \
                float s = a[i][k * sak];                                                             \
                for (int q = 0; q < NV; q++)                                                         \
                    acc[i][q] += w[q] * s;                                                           \
            }                                                                                        \
        }                                                                                            \
        for (long i = 0; i < n; i++)                                                                 \
            for (int q = 0; q < NV; q++)                                                             \
                *(vn *)(C + i * sc + q * NL) = acc[i][q];                                            \
    }
GEMM_TILE(gtile_wide, GW)
GEMM_TILE(gtile16, LANES / NL) /* the 16-column tail; only AVX-512's 64-column wide tile leaves one */

/* C (rows x N, row stride sc) (= or +=) A (rows x K, strides sai, sak) W (K x N, row stride sw);
 * N a multiple of 16. Column tiles outside, so that one W panel (K x GW NL) serves every row. */
static void gemm(float *C, long sc, const float *A, long sai, long sak, const float *W, long sw,
                 long rows, long K, long N, int add) {
    long j = 0;
    for (; j + GW * NL <= N; j += GW * NL)
        for (long i = 0; i < rows; i += GR)
            gtile_wide(C + i * sc + j, sc, A + i * sai, sai, sak, W + j, sw, K, rows - i < GR ? rows - i : GR, add);
    for (; j < N; j += LANES)
        for (long i = 0; i < rows; i += GR)
            gtile16(C + i * sc + j, sc, A + i * sai, sai, sak, W + j, sw, K, rows - i < GR ? rows - i : GR, add);
}

/* Forward. u, y (B, L, H); xs (B, L, P2) the states (saved for the backward); hlast (B, P2);
 * Win (H, P2) with B u = u Win; WoutT (P2, H) with y = xs WoutT + D u; a (P2) the complex A_bar;
 * h0 (B, P2) or NULL (zero). */
void s5_fwd(float *y, float *xs, float *hlast, const float *u, const float *Win, const float *WoutT,
            const float *D, const float *a, const float *h0, long Bn, long L, long H, long P2, long TB) {
    long P = P2 / 2;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++) {
        const float *prev = h0 ? h0 + b * P2 : 0;
        for (long l0 = 0; l0 < L; l0 += TB) {
            long n = L - l0 < TB ? L - l0 : TB;
            const float *ub = u + (b * L + l0) * H;
            float *xb = xs + (b * L + l0) * P2, *yb = y + (b * L + l0) * H;
            gemm(xb, P2, ub, H, 1, Win, P2, n, H, P2, 0);
            for (long t = 0; t < n; t++) {
                if (prev)
                    cmul_add(xb + t * P2, a, prev, P);
                prev = xb + t * P2;
            }
            gemm(yb, H, xb, P2, 1, WoutT, H, n, P2, H, 0);
            for (long t = 0; t < n; t++)
                for (long h = 0; h < H; h += LANES)
                    *(vf *)(yb + t * H + h) += LD(D + h) * LD(ub + t * H + h);
        }
        for (long p = 0; p < P2; p++)
            hlast[b * P2 + p] = prev ? prev[p] : 0; /* L = 0 (the callers refuse it): h0, or zeros */
    }
}

/* Backward. gy (B, L, H), ghlast (B, P2) or NULL; lam (B, TB + 1, P2) scratch (one block per batch
 * row and a row for the carry); outputs gu (B, L, H) and, per batch row (summed by the caller), gWin (B, H, P2), gWout
 * (B, H, P2) (the gradient of Wout = WoutT^T), gD (B, H), ga (B, P2); gh0 (B, P2) when h0 is given
 * and gh0 is not NULL. Wout (H, P2), WinT (P2, H). PyTorch's convention for complex gradients:
 * lam[l] = g[l] + conj(a) lam[l+1], ga = sum_l lam[l] conj(x[l-1]), gh0 = conj(a) lam[0]. */
void s5_bwd(float *gu, float *gWin, float *gWout, float *gD, float *ga, float *gh0, float *lam,
            const float *gy, const float *ghlast, const float *u, const float *xs, const float *Wout,
            const float *WinT, const float *D, const float *a, const float *h0, long Bn, long L,
            long H, long P2, long TB) {
    long P = P2 / 2;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < Bn; b++) {
        float *lb = lam + b * (TB + 1) * P2, *carry = lb + TB * P2, *gWi = gWin + b * H * P2, *gWo = gWout + b * H * P2;
        float *gDb = gD + b * H, *gab = ga + b * P2;
        for (long p = 0; p < H * P2; p++)
            gWi[p] = gWo[p] = 0;
        for (long p = 0; p < H; p++)
            gDb[p] = 0;
        for (long p = 0; p < P2; p++)
            gab[p] = 0;
        long last = ((L - 1) / TB) * TB;
        for (long l0 = last; l0 >= 0; l0 -= TB) {
            long n = L - l0 < TB ? L - l0 : TB;
            const float *ub = u + (b * L + l0) * H, *gyb = gy + (b * L + l0) * H, *xb = xs + (b * L + l0) * P2;
            float *gub = gu + (b * L + l0) * H;
            /* lam = gy Wout (the gradient of the states through y), then the reverse scan; lb[0]
             * of the block after this one is still in lb[0] on entry: keep it */
            for (long p = 0; p < P2; p++)
                carry[p] = l0 == last ? (ghlast ? ghlast[b * P2 + p] : 0) : lb[p];
            gemm(lb, P2, gyb, H, 1, Wout, P2, n, H, P2, 0);
            float *lend = lb + (n - 1) * P2; /* the block's last step: the gradient from beyond it */
            if (l0 == last) {
                for (long p = 0; p < P2; p++)
                    lend[p] += carry[p];
            } else {
                cmulc_add(lend, a, carry, P);
            }
            for (long t = n - 1; t >= 0; t--) {
                float *lt = lb + t * P2;
                if (t < n - 1)
                    cmulc_add(lt, a, lt + P2, P);
                const float *xp = t > 0 ? xb + (t - 1) * P2 : (l0 > 0 ? xb - P2 : (h0 ? h0 + b * P2 : 0));
                if (xp)
                    cmul_conj_add(gab, lt, xp, P);
            }
            gemm(gub, H, lb, P2, 1, WinT, H, n, P2, H, 0);
            for (long t = 0; t < n; t++)
                for (long h = 0; h < H; h += LANES) {
                    vf g = LD(gyb + t * H + h), x = LD(ub + t * H + h);
                    *(vf *)(gub + t * H + h) += LD(D + h) * g;
                    *(vf *)(gDb + h) += g * x;
                }
            gemm(gWi, P2, ub, 1, H, lb, P2, H, n, P2, 1);
            gemm(gWo, P2, gyb, 1, H, xb, P2, H, n, P2, 1);
        }
        if (h0 && gh0) {
            for (long p = 0; p < P2; p++)
                gh0[b * P2 + p] = 0;
            cmulc_add(gh0 + b * P2, a, lb, P);
        }
    }
}

/* One step of the per-channel diagonal SSM (layers/base.py's SSMLayer.step; ops/step.py), complex64
 * as (Re, Im) pairs. Per batch row b and channel h, with M modes and C' output channels:
 *   xn[b][h][m] = A[h][m] x[b][h][m] + Bb[h][m] u[b][h]
 *   y[b][c][h]  = factor sum_m Re(C[c][h][m] xn[b][h][m]) + D[c][h] u[b][h]
 * In vectors of 4 complex numbers (8 floats), a x = Re(a) x + Im(a) (-Im x, Re x): the parts of a
 * duplicated over each pair and x's pairs swapped by shuffles (cmul_into); Re(c x) sums c x with the
 * signs (+, -) (redot). The (b, h) rows split over OpenMP threads when there are enough modes to
 * pay for it. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int i8 __attribute__((vector_size(32)));
#define LD8(p) (*(const v8 *)(p))

/* sum_m Re(a_m x_m) over M complex numbers */
static inline float redot(const float *a, const float *x, long M) {
    const v8 conj = {1, -1, 1, -1, 1, -1, 1, -1};
    long M4 = M / 4 * 4;
    v8 acc = {0};
    for (long m = 0; m < M4; m += 4)
        acc += LD8(a + 2 * m) * LD8(x + 2 * m);
    acc *= conj;
    float s = 0;
    for (long j = 0; j < 8; j++)
        s += acc[j];
    for (long m = M4; m < M; m++)
        s += a[2 * m] * x[2 * m] - a[2 * m + 1] * x[2 * m + 1];
    return s;
}

/* z = a x + w over M complex numbers (z may be x or w) */
static inline void cmul_into(float *z, const float *a, const float *x, const float *w, long M) {
    const i8 re = {0, 0, 2, 2, 4, 4, 6, 6}, im = {1, 1, 3, 3, 5, 5, 7, 7}, sw = {1, 0, 3, 2, 5, 4, 7, 6};
    const v8 alt = {-1, 1, -1, 1, -1, 1, -1, 1};
    long M4 = M / 4 * 4;
    for (long m = 0; m < M4; m += 4) {
        v8 av = LD8(a + 2 * m), xv = LD8(x + 2 * m);
        *(v8 *)(z + 2 * m) = __builtin_shuffle(av, re) * xv + __builtin_shuffle(av, im) * alt *
                             __builtin_shuffle(xv, sw) + LD8(w + 2 * m);
    }
    for (long m = M4; m < M; m++) {
        float ar = a[2 * m], ai = a[2 * m + 1], pr = x[2 * m], pi = x[2 * m + 1];
        z[2 * m] = ar * pr - ai * pi + w[2 * m];
        z[2 * m + 1] = ar * pi + ai * pr + w[2 * m + 1];
    }
}

void diag_step(float *y, float *xn, const float *u, const float *x, const float *A, const float *Bb,
               const float *C, const float *D, float factor, long Bn, long H, long M, long Cp) {
    long n = Bn * H;
#pragma omp parallel for schedule(static) if (n * M >= 16384)
    for (long r = 0; r < n; r++) {
        long b = r / H, h = r % H;
        float *o = xn + 2 * r * M, ur = u[r];
        for (long m = 0; m < 2 * M; m++)
            o[m] = Bb[2 * h * M + m] * ur;
        cmul_into(o, A + 2 * h * M, x + 2 * r * M, o, M);
        for (long c = 0; c < Cp; c++)
            y[(b * Cp + c) * H + h] = factor * redot(C + 2 * (c * H + h) * M, o, M) + D[c * H + h] * ur;
    }
}

/* One bilinear step of S4 in its DPLR form (layers/s4.py's S4.step; ops/step.py's dplr_step), per
 * batch row b and channel h, with M modes, rank R <= 8 and C' outputs (the step_system's terms):
 *   q0 = Re(Pc2 x) (R numbers),  rhs = E x - sum_s q0_s Ph_s + dB u,  t = Re(Pd2 rhs),
 *   q = inv t (R x R),  xn = d rhs - sum_s q_s dPh_s,  y_c = 2 Re(C_c xn) + D_c u.
 * E, dB, d (H, M), Pc2, Ph, Pd2, dPh (R, H, M), C (C', H, M) complex; inv (H, R, R), D (C', H) real. */
#define RMAX 8
#define WBLK 256
void dplr_step(float *y, float *xn, const float *u, const float *x, const float *E, const float *Pc2,
               const float *Ph, const float *dB, const float *d, const float *Pd2, const float *inv,
               const float *dPh, const float *C, const float *D, long Bn, long H, long M, long R, long Cp) {
    long n = Bn * H, HM2 = 2 * H * M;
#pragma omp parallel for schedule(static) if (n * M * R >= 8192)
    for (long r = 0; r < n; r++) {
        long b = r / H, h = r % H, hm = 2 * h * M;
        const float *xr = x + 2 * r * M;
        float *o = xn + 2 * r * M, ur = u[r], q[RMAX], t[RMAX];
        for (long s = 0; s < R; s++)
            q[s] = redot(Pc2 + s * HM2 + hm, xr, M);
        for (long m = 0; m < 2 * M; m++)
            o[m] = dB[hm + m] * ur;
        for (long s = 0; s < R; s++)
            for (long m = 0; m < 2 * M; m++)
                o[m] -= q[s] * Ph[s * HM2 + hm + m];
        cmul_into(o, E + hm, xr, o, M);
        for (long s = 0; s < R; s++)
            t[s] = redot(Pd2 + s * HM2 + hm, o, M);
        for (long s = 0; s < R; s++) {
            q[s] = 0;
            for (long k = 0; k < R; k++)
                q[s] += inv[(h * R + s) * R + k] * t[k];
        }
        for (long m0 = 0; m0 < M; m0 += WBLK) { /* xn = d rhs + w, w = -sum_s q_s dPh_s, WBLK modes at a time */
            long nm = M - m0 < WBLK ? M - m0 : WBLK, k0 = 2 * m0;
            float w[2 * WBLK]; /* bounded: a (2 M)-float stack array overflowed the stack for M ~ 1e6 */
            for (long m = 0; m < 2 * nm; m++)
                w[m] = 0;
            for (long s = 0; s < R; s++)
                for (long m = 0; m < 2 * nm; m++)
                    w[m] -= q[s] * dPh[s * HM2 + hm + k0 + m];
            cmul_into(o + k0, d + hm + k0, o + k0, w, nm);
        }
        for (long c = 0; c < Cp; c++)
            y[(b * Cp + c) * H + h] = 2 * redot(C + 2 * (c * H + h) * M, o, M) + D[c * H + h] * ur;
    }
}

/* One step of the S5 layer (layers/s5.py's S5.step; ops/s5_native.py's s5_step), per batch row b,
 * with P complex modes as (Re, Im) pairs (P2 = 2P floats) and H channels:
 *   hn[b] = a h[b] + u[b] Win          (Win (H, P2): B_bar u as one real matrix)
 *   y[b]  = Wout hn[b] + D u[b]        (Wout (H, P2): factor Re(C h) as one real matrix)
 * The input projection adds the rows of Win; each output is a dot product of P2 floats, kept in a
 * vector of 8 partial sums. Batch rows split over OpenMP threads when there are enough of them. */
void s5_step(float *y, float *hn, const float *u, const float *h, const float *a, const float *Win,
             const float *Wout, const float *D, long Bn, long H, long P) {
    long P2 = 2 * P, P8 = P2 / 8 * 8;
#pragma omp parallel for schedule(static) if (Bn * H * P >= 65536)
    for (long b = 0; b < Bn; b++) {
        float *o = hn + b * P2;
        const float *hb = h + b * P2, *ub = u + b * H;
        for (long p = 0; p < P2; p++)
            o[p] = 0;
        for (long k = 0; k < H; k++) {
            const float *w = Win + k * P2;
            float uk = ub[k];
            for (long p = 0; p < P2; p++)
                o[p] += uk * w[p];
        }
        for (long m = 0; m < P; m++) {
            float ar = a[2 * m], ai = a[2 * m + 1], pr = hb[2 * m], pi = hb[2 * m + 1];
            o[2 * m] += ar * pr - ai * pi;
            o[2 * m + 1] += ar * pi + ai * pr;
        }
        for (long k = 0; k < H; k++) {
            const float *w = Wout + k * P2;
            v8 acc = {0};
            for (long p = 0; p < P8; p += 8)
                acc += LD8(w + p) * LD8(o + p);
            float s = 0;
            for (long j = 0; j < 8; j++)
                s += acc[j];
            for (long p = P8; p < P2; p++)
                s += w[p] * o[p];
            y[b * H + k] = s + D[k] * ub[k];
        }
    }
}
