"""Slow reference implementations the tests compare fast paths against."""
import math

import torch


def naive_decode_attention(q, k, v, starts, ends):
    """One query per sequence over its slots [starts[b], ends[b]), head by head in float64.
    q [B, n_q, d]; k, v [B, n_kv, T, d] -> [B, n_q * d]."""
    b, n_q, d = q.shape
    group = n_q // k.shape[1]
    out = torch.zeros(b, n_q, d, dtype=torch.float64)
    for i in range(b):
        for h in range(n_q):
            keys = k[i, h // group, starts[i]:ends[i]].double()            # [ctx, d]
            vals = v[i, h // group, starts[i]:ends[i]].double()
            w = torch.softmax(keys @ q[i, h].double() / math.sqrt(d), dim=0)
            out[i, h] = w @ vals
    return out.reshape(b, n_q * d)
