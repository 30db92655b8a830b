"""Tail-biting Viterbi search over the bitshift trellis, compiled with numba (CPU path).

One call searches a batch of tiles in parallel (one tile per thread at a time). For each
tile: a free pass on the sequence rotated by T/2 proposes overlaps (the L-k bits shared by
the last and first state: read off the best `candidates` paths at the wrap-around point),
then one constrained pass per distinct overlap forces the start state's high bits and the
end state's low bits to it; the cheapest constrained path wins. Every tile thus costs
exactly T*k bits. candidates=1 is the usual two-pass approximation; more candidates get
closer to exact tail-biting at one extra pass each.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

INF = np.float32(np.inf)
BLOCK = 1024  # predecessor classes per block of a step: its working set (~36 KB) fits in L1


@functools.cache
def _kernels(k: int, L: int):
    """Compile the search for one (k, L): constants let LLVM unroll and vectorise.

    A step never materialises the 2^L path costs: with B[m] = min_p cost[m + p*Q] (the best
    predecessor of the K states m*K + n), B_t[a*K + n] = min_p B_{t-1}[p*Q/K + a] +
    w_t (x_t - code(p*Q + a*K + n))^2. With the code table permuted to [n][p][a] (`code_p`),
    the loops over a are contiguous. With K <= 4 the n and p loops unroll inside the vectorised
    loop over a, so the running minima stay in registers (one code load, one add, one compare
    and two blends per state); with larger K the minimum of row n and its back-pointers (stored
    in the order n*Q/K + a) are updated in memory, over blocks of a that keep them in L1. An
    interleaving pass over the Q minima gives B_t in natural order. The last step writes all
    2^L end costs in the transposed layout, state s = m*K + n at index n*Q + m. Same floating
    point operations in the same order as the plain step: the results do not change.
    """
    K = 1 << k
    Q = 1 << (L - k)
    QK = Q // K
    S = 1 << L
    BA = min(QK, BLOCK)

    @numba.njit(nogil=True)
    def index(s):
        return (s & (K - 1)) * Q + (s >> k)

    @numba.njit(nogil=True)
    def forward(x, w, code_t, code_p, overlap, cost, best, run, bp):
        """Viterbi costs of all end states into `cost` (transposed); back-pointers into bp.

        overlap < 0: free start; else the first state's high L-k bits are forced to it."""
        T = x.shape[0]
        for m in range(Q):  # B_{-1}: no cost, or +inf off the forced high bits
            best[m] = 0.0 if overlap < 0 or m == overlap else INF
        for t in range(T - 1):
            xt = x[t]
            wt = w[t]
            row = bp[t + 1]
            if K <= 4:  # unrolled over n and p: the minima stay in registers
                for a in range(QK):
                    for n in range(K):
                        d = xt - code_p[n * Q + a]
                        r = best[a] + wt * d * d
                        arg = np.uint8(0)
                        for p in range(1, K):
                            d = xt - code_p[n * Q + p * QK + a]
                            c = best[p * QK + a] + wt * d * d
                            take = c < r  # strict: the lowest p wins ties
                            r = c if take else r
                            arg = np.uint8(p) if take else arg
                        run[n * QK + a] = r
                        row[n * QK + a] = arg
            else:
                for a0 in range(0, QK, BA):  # blocks of a: B, running minima and rows stay in L1
                    for n in range(K):  # p = 0 starts the running minimum of row n
                        for a in range(a0, a0 + BA):
                            d = xt - code_p[n * Q + a]
                            run[n * QK + a] = best[a] + wt * d * d
                            row[n * QK + a] = 0
                    for p in range(1, K):
                        for n in range(K):
                            off = n * Q + p * QK
                            for a in range(a0, a0 + BA):
                                d = xt - code_p[off + a]
                                c = best[p * QK + a] + wt * d * d
                                take = c < run[n * QK + a]  # strict: the lowest p wins ties
                                run[n * QK + a] = c if take else run[n * QK + a]
                                row[n * QK + a] = np.uint8(p) if take else row[n * QK + a]
            for a in range(QK):
                for n in range(K):
                    best[a * K + n] = run[n * QK + a]
        xt = x[T - 1]
        wt = w[T - 1]
        for n in range(K):
            off = n * Q
            for m in range(Q):
                d = xt - code_t[off + m]
                cost[off + m] = best[m] + wt * d * d

    @numba.njit(nogil=True)
    def backtrace(bp, end, T, out_states):
        s = end
        out_states[T - 1] = s
        for t in range(T - 1, 0, -1):
            m = s >> k
            j = np.int64(bp[t, (m & (K - 1)) * QK + (m >> k)])
            s = m | (j << (L - k))
            out_states[t - 1] = s

    @numba.njit(nogil=True)
    def search_tile(xs, ws, i, code_t, code_p, candidates, out_states, out_cost, cost, best, run, bp, path, xr, wr):
        """Tail-biting search of row i of xs into out_states[i], out_cost[i] (buffers given)."""
        T = xs.shape[1]
        half = T // 2
        for t in range(T):
            xr[t] = xs[i, (t + half) % T]
            wr[t] = ws[i, (t + half) % T]
        forward(xr, wr, code_t, code_p, -1, cost, best, run, bp)
        overlaps = np.full(candidates, -1, np.int64)
        n_ov = 0
        for c in range(candidates):  # best end states in order, distinct overlaps kept
            e = np.argmin(cost)
            if cost[e] == INF:
                break
            cost[e] = INF
            backtrace(bp, (e % Q) * K + e // Q, T, path)
            ov = path[half] >> k
            if ov not in overlaps[:n_ov]:
                overlaps[n_ov] = ov
                n_ov += 1
        best_cost = INF
        for c in range(n_ov):
            ov = overlaps[c]
            forward(xs[i], ws[i], code_t, code_p, ov, cost, best, run, bp)
            top = INF
            end = 0
            for j in range(K):  # end states whose low L-k bits are the overlap
                s = (j << (L - k)) | ov
                if cost[index(s)] < top:
                    top = cost[index(s)]
                    end = s
            if top < best_cost or c == 0:
                best_cost = top
                backtrace(bp, end, T, path)
                for t in range(T):
                    out_states[i, t] = path[t]
        out_cost[i] = best_cost

    @numba.njit(parallel=True, nogil=True)
    def search_tiles(xs, ws, code_t, code_p, out_states, out_cost, candidates):
        """Tail-biting search of every row of xs ([N, T]) with per-weight weights ws.

        Tiles go to threads in chunks that reuse their buffers (a fresh 4 MB back-pointer
        array per tile costs more in page faults than the search saves)."""
        N, T = xs.shape
        chunks = min(N, 4 * numba.get_num_threads())
        for c in numba.prange(chunks):
            cost = np.empty(S, np.float32)
            best = np.empty(Q, np.float32)
            run = np.empty(Q, np.float32)
            bp = np.empty((T, Q), np.uint8)
            path = np.empty(T, np.int64)
            xr = np.empty(T, np.float32)
            wr = np.empty(T, np.float32)
            for i in range(c * N // chunks, (c + 1) * N // chunks):
                search_tile(xs, ws, i, code_t, code_p, candidates, out_states, out_cost, cost, best, run, bp,
                            path, xr, wr)

    return search_tiles


def viterbi_tiles(x: np.ndarray, w, code: np.ndarray, k: int, L: int, candidates: int = 1):
    """Search N tail-biting sequences; returns (states int32 [N, T], weighted SSE float32 [N])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(np.broadcast_to(w, x.shape), dtype=np.float32)
    K, Q = 1 << k, 1 << (L - k)
    table = np.asarray(code, dtype=np.float32)
    code_t = np.ascontiguousarray(table.reshape(Q, K).T).ravel()  # [n][m]: code[m*K + n]
    code_p = np.ascontiguousarray(table.reshape(K, Q // K, K).transpose(2, 0, 1)).ravel()  # [n][p][a]
    states = np.empty(x.shape, np.int32)
    cost = np.empty(x.shape[0], np.float32)
    if x.shape[0]:
        _kernels(k, L)(x, w, code_t, code_p, states, cost, max(1, int(candidates)))
    return states, cost
