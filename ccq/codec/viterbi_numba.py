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


@functools.cache
def _kernels(k: int, L: int):
    """Compile the search for one (k, L): constants let LLVM unroll and vectorise.

    Costs live in a transposed layout, state s = m*K + n (m its high L-k bits, n the k new
    bits) at index n*Q + m, with the code table permuted the same way. Then the add phase
    (cost = best predecessor + error) runs over contiguous memory, the min phase reads K
    contiguous streams, and only the Q minima need an interleaving pass: about twice as fast
    as the natural layout, where broadcasting each minimum to its K successors does not
    vectorise. Back-pointer rows are stored in the min phase's own order (index b*Q/K + a for
    m = a*K + b).
    """
    K = 1 << k
    Q = 1 << (L - k)
    QK = Q // K
    S = 1 << L

    @numba.njit(nogil=True)
    def index(s):
        return (s & (K - 1)) * Q + (s >> k)

    @numba.njit(nogil=True)
    def forward(x, w, code_t, overlap, cost, best_p, best, bp):
        """Viterbi costs of all end states into `cost` (transposed); back-pointers into bp.

        overlap < 0: free start; else the first state's high L-k bits are forced to it."""
        T = x.shape[0]
        x0 = x[0]
        w0 = w[0]
        for i in range(S):
            d = x0 - code_t[i]
            cost[i] = w0 * d * d
        if overlap >= 0:
            for i in range(S):
                if i % Q != overlap:  # i = n*Q + m and s >> k == m
                    cost[i] = INF
        for t in range(1, T):
            xt = x[t]
            wt = w[t]
            row = bp[t]
            for b in range(K):  # min over the K predecessors of every m = a*K + b
                for a in range(QK):
                    base = b * Q + a
                    c0 = cost[base]
                    r = np.uint8(0)
                    for j in range(1, K):
                        c = cost[base + j * QK]
                        r = np.uint8(j) if c < c0 else r
                        c0 = c if c < c0 else c0
                    best_p[b * QK + a] = c0
                    row[b * QK + a] = r
            for a in range(QK):
                for b in range(K):
                    best[a * K + b] = best_p[b * QK + a]
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

    @numba.njit(parallel=True, nogil=True)
    def search_tiles(xs, ws, code_t, out_states, out_cost, candidates):
        """Tail-biting search of every row of xs ([N, T]) with per-weight weights ws."""
        N, T = xs.shape
        half = T // 2
        for i in numba.prange(N):
            cost = np.empty(S, np.float32)
            best_p = np.empty(Q, np.float32)
            best = np.empty(Q, np.float32)
            bp = np.empty((T, Q), np.uint8)
            path = np.empty(T, np.int64)
            xr = np.empty(T, np.float32)
            wr = np.empty(T, np.float32)
            for t in range(T):
                xr[t] = xs[i, (t + half) % T]
                wr[t] = ws[i, (t + half) % T]
            forward(xr, wr, code_t, -1, cost, best_p, best, bp)
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
                forward(xs[i], ws[i], code_t, ov, cost, best_p, best, bp)
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

    return search_tiles


def viterbi_tiles(x: np.ndarray, w, code: np.ndarray, k: int, L: int, candidates: int = 1):
    """Search N tail-biting sequences; returns (states int32 [N, T], weighted SSE float32 [N])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(np.broadcast_to(w, x.shape), dtype=np.float32)
    Q = 1 << (L - k)
    code_t = np.ascontiguousarray(np.asarray(code, dtype=np.float32).reshape(Q, 1 << k).T).ravel()
    states = np.empty(x.shape, np.int32)
    cost = np.empty(x.shape[0], np.float32)
    _kernels(k, L)(x, w, code_t, states, cost, max(1, int(candidates)))
    return states, cost
