"""Tail-biting Viterbi search over the bitshift trellis, compiled with numba (CPU path).

One call searches a batch of tiles in parallel (one tile per thread at a time). For each
tile: a free pass on the sequence rotated by T/2 picks the overlap (the L-k bits shared
by the last and first state), then a constrained pass forces the start state's high bits
and the end state's low bits to that overlap, so the tile costs exactly T*k bits.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

INF = np.float32(np.inf)


@functools.cache
def _kernels(k: int, L: int):
    """Compile the search for one (k, L): constants let LLVM unroll and vectorise."""
    K = 1 << k
    Q = 1 << (L - k)
    S = 1 << L
    LOW = Q - 1

    @numba.njit(cache=True, fastmath=False, nogil=True)
    def search(x, w, code, overlap, cost, nxt, bp, out_states):
        """Best path for one sequence; overlap < 0 means unconstrained. Returns its cost."""
        T = x.shape[0]
        x0 = x[0]
        w0 = w[0]
        for s in range(S):
            d = x0 - code[s]
            cost[s] = w0 * d * d
        if overlap >= 0:
            for s in range(S):
                if (s >> k) != overlap:
                    cost[s] = INF
        for t in range(1, T):
            xt = x[t]
            wt = w[t]
            row = bp[t]
            for m in range(Q):
                best = cost[m]
                arg = 0
                for j in range(1, K):
                    c = cost[m + j * Q]
                    if c < best:
                        best = c
                        arg = j
                nxt[m] = best
                row[m] = arg
            for m in range(Q):
                base = nxt[m]
                for n in range(K):
                    s = m * K + n
                    d = xt - code[s]
                    cost[s] = base + wt * d * d
        best = INF
        end = 0
        if overlap >= 0:
            for j in range(K):
                s = (j << (L - k)) | overlap
                if cost[s] < best:
                    best = cost[s]
                    end = s
        else:
            for s in range(S):
                if cost[s] < best:
                    best = cost[s]
                    end = s
        s = end
        out_states[T - 1] = s
        for t in range(T - 1, 0, -1):
            m = s >> k
            s = m | (np.int64(bp[t, m]) << (L - k))
            out_states[t - 1] = s
        return best

    @numba.njit(cache=True, parallel=True, nogil=True)
    def search_tiles(xs, ws, code, out_states, out_cost):
        """Tail-biting search of every row of xs ([N, T]) with per-weight weights ws."""
        N, T = xs.shape
        half = T // 2
        for i in numba.prange(N):
            cost = np.empty(S, np.float32)
            nxt = np.empty(Q, np.float32)
            bp = np.empty((T, Q), np.uint8)
            rot_states = np.empty(T, np.int64)
            xr = np.empty(T, np.float32)
            wr = np.empty(T, np.float32)
            for t in range(T):
                xr[t] = xs[i, (t + half) % T]
                wr[t] = ws[i, (t + half) % T]
            search(xr, wr, code, -1, cost, nxt, bp, rot_states)
            overlap = rot_states[half] >> k
            states = np.empty(T, np.int64)
            out_cost[i] = search(xs[i], ws[i], code, overlap, cost, nxt, bp, states)
            for t in range(T):
                out_states[i, t] = states[t]

    return search_tiles


def viterbi_tiles(x: np.ndarray, w: np.ndarray, code: np.ndarray, k: int, L: int):
    """Search N tail-biting sequences; returns (states int32 [N, T], weighted SSE float32 [N])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(np.broadcast_to(w, x.shape), dtype=np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    states = np.empty(x.shape, np.int32)
    cost = np.empty(x.shape[0], np.float32)
    _kernels(k, L)(x, w, code, states, cost)
    return states, cost
