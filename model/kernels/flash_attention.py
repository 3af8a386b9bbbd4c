"""Flash attention in Pallas: forward and backward kernels under a custom VJP, returning the log-sum-exp too.

Shape letters, the legend for every array name in model/, parallel/, train/ and serve/ (`x_BxTxD` is [B, T, D];
the letters of one name are joined by `x`; a trailing `_` stands for any further dimensions):

    B   batch: sequences                          b   one pipeline micro-batch's rows (B / M)
    T   length: this call's tokens (queries)      S   key/value length (S >= T; S = T in self-attention)
    T1  T + 1: a token window with its targets    Tc  one chunk of T (a device's shard, a loss chunk)
    D   model width (d_model)                     Dh  head dim (head_dim); Dr = Dh / 2 rotary frequencies
    H   query heads                               K   key/value heads;  G = H / K query heads per kv head
    N   heads of either kind (H or K)             Hn  heads per device (H / n)
    F   MLP width (d_ff)                          V   vocabulary
    L   layers (the stacked axis)                 E   experts
    C   expert capacity (slots per sequence)      J   experts chosen per token (top_k)
    R   routed rows (B * T * J, dropless MoE)     Nc  number of loss chunks
    A   gradient-accumulation micro-batches       P   pipeline stages
    M   pipeline micro-batches                    I   pipeline iterations (M + P - 1)
    Tq  a kernel's query tile (block_q)           Sk  a kernel's key/value tile (block_k)
  serving (the paged KV cache, serve/kernels/, the engine's step, speculative decoding):
    Np  KV-cache pages (a pool)                   Ps  slots per page (page_size)
    W   block-table width (pages per sequence)    Ns  splits of a sequence's pages (num_splits)
    Ws  table entries per split (whole chunks)    Wp  W padded to Ns * Ws (with the null page)
    Pc  pages gathered per chunk (pages_per_chunk; a chunk is Sk = Pc * Ps keys)
    Gp  G padded to a power of two >= 16 (a decode tile's query rows)
    Bd  a step's decode rows (one token each)     Nt  a step's prefill tiles, of Tt tokens each
    Rs  a step's sampling slots (Bd + Nt)         Nd  tokens drafted per row (speculative decoding)

Lower-case names in comments and formulas (bq, bk, n) are plain numbers: tile sizes, a device count.

Layout is the model's: q [B, T, H, Dh], k and v [B, S, K, Dh], H = K * G (grouped-query attention: query head h
reads kv head h // G). `flash_attention` returns out [B, T, H, Dh] in q's dtype and lse [B, H, T] in float32, the
natural log of each query's softmax denominator over the scaled scores, so ring attention can merge partial
results; the backward accepts a cotangent for lse as well as for out. Causal: query t sees key s iff
s <= t + (S - T), the last query aligned with the last key (as in model/attention.py), so T <= S.

Forward. Grid (B, H, T / bq). A program holds one [bq, Dh] query tile and walks the key/value tiles [bk, Dh] of
its kv head with an online softmax in float32 (running max, sum and [bq, Dh] accumulator). Causal programs stop
at the diagonal. Tiles wholly visible to every query of the tile take a loop without any masking; only the
diagonal tiles (and a ragged last tile) are masked, with `jnp.where` to -inf, so no key outside the mask ever
weighs in.

Backward (FlashAttention-2). With P = exp(scale * Q K^T - lse), dP = dO V^T and delta = rowsum(dO * O) - dlse:
dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO. (The lse cotangent enters through
delta: d lse / d s = P.) Two kernels: dQ on grid (B, H, T / bq) walking key tiles, and dK/dV on grid
(B, H, S / bk) walking query tiles, both recomputing P from the saved lse. dK/dV are computed per query head;
with G > 1 they are written in float32 and summed over each kv head's G query heads afterwards.

Ragged shapes. T and S are padded with zeros up to whole tiles and Dh up to a power of two >= 16 (what Triton's
`dot` needs); padded keys are masked, padded queries and head-dim columns are sliced off, and a padded query
contributes nothing to dK/dV (its dO and delta are zero).

On GPU the kernels go through Pallas's Triton lowering; `interpret=True` runs them on CPU. Accumulation is in
float32 for every input dtype; float32 inputs use full-precision (IEEE) dots, not TF32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.checks import check_ints, check_power_of_two
from model.kernels.triton import compiler_params, triton_deprecation_ignored

_MIN_TILE = 16  # Triton's `dot` needs every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch parameters. `num_warps` None: 4 for head_dim <= 64,
    else 8. `default_block_sizes` gives the tuned choice per head dim."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            check_power_of_two(f"BlockSizes.{name}", getattr(self, name), _MIN_TILE)
        for name in ("num_warps", "num_warps_bwd"):
            if getattr(self, name) is not None:
                check_power_of_two(f"BlockSizes.{name}", getattr(self, name))
        check_ints("BlockSizes.", self, ("num_stages", "num_stages_bwd"))


def default_block_sizes(head_dim: int) -> BlockSizes:
    """The fastest tiles measured on an H100 (bfloat16, causal, seq 4096; docs/BENCHMARKS.md): 128 x 64 forward
    tiles with a 3-stage pipeline; head dim <= 64 keeps 64 x 64 backward tiles and 4 warps, larger head dims take
    128-query backward tiles and 8 warps."""
    if head_dim <= 64:
        return BlockSizes(num_stages=3)
    return BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=64, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels are specialised on."""

    causal: bool
    scale: float
    q_len: int  # T and S before padding
    kv_len: int
    blocks: BlockSizes
    interpret: bool

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


def flash_attention(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *, causal: bool = True,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Attention of q over k, v: (out [B, T, H, Dh] in q's dtype, lse [B, H, T] float32). Differentiable in q, k,
    v through the Pallas backward; `scale` defaults to Dh ** -0.5. See the module docstring."""
    if q_BxTxHxDh.ndim != 4 or k_BxSxKxDh.ndim != 4 or v_BxSxKxDh.shape != k_BxSxKxDh.shape:
        raise ValueError(f"need q [B, T, H, Dh] and k, v [B, S, K, Dh] alike; got q {q_BxTxHxDh.shape}, "
                         f"k {k_BxSxKxDh.shape}, v {v_BxSxKxDh.shape}")
    (B, T, H, Dh), (Bk, S, K, Dk) = q_BxTxHxDh.shape, k_BxSxKxDh.shape
    if B != Bk or Dh != Dk or H % K or T < 1 or S < 1:
        raise ValueError(f"need equal batch and head dims, H a multiple of K, T, S >= 1; got q {q_BxTxHxDh.shape}, "
                         f"k {k_BxSxKxDh.shape}")
    if causal and T > S:
        raise ValueError(f"causal attention aligns the last query with the last key, so it needs T <= S; got "
                         f"T = {T}, S = {S}")
    if not (q_BxTxHxDh.dtype == k_BxSxKxDh.dtype == v_BxSxKxDh.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q_BxTxHxDh.dtype}, {k_BxSxKxDh.dtype}, "
                         f"{v_BxSxKxDh.dtype}")
    static = _Static(causal=bool(causal), scale=float(Dh ** -0.5 if scale is None else scale), q_len=T, kv_len=S,
                     blocks=block_sizes or default_block_sizes(Dh), interpret=bool(interpret))
    with triton_deprecation_ignored():
        return _flash(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, static)


def flash_attention_block_grads(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array,
                                do_BxTxHxDh: jax.Array, lse_BxHxT: jax.Array, delta_BxHxT: jax.Array, *,
                                causal: bool = True, scale: float | None = None,
                                block_sizes: BlockSizes | None = None, interpret: bool = False
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward kernels for one key/value block of a larger attention: (dq, dk, dv) of this block's share,
    given the whole attention's lse [B, H, T] and delta = rowsum(dO * O) - dlse [B, H, T] (float32). Summed
    over the blocks they give the gradients of the whole; this is how ring attention's backward runs without
    keeping the blocks it saw. dq is in q's dtype, dk and dv in k's."""
    (_, T, _, Dh), S = q_BxTxHxDh.shape, k_BxSxKxDh.shape[1]
    static = _Static(causal=bool(causal), scale=float(Dh ** -0.5 if scale is None else scale), q_len=T, kv_len=S,
                     blocks=block_sizes or default_block_sizes(Dh), interpret=bool(interpret))
    t, s, d = _padded_dims(static, Dh)
    rows = {2: t}
    with triton_deprecation_ignored():
        dq, dk, dv = _backward(_pad_to(q_BxTxHxDh, {1: t, 3: d}), _pad_to(k_BxSxKxDh, {1: s, 3: d}),
                               _pad_to(v_BxSxKxDh, {1: s, 3: d}), _pad_to(do_BxTxHxDh.astype(q_BxTxHxDh.dtype),
                                                                         {1: t, 3: d}),
                               _pad_to(lse_BxHxT, rows), _pad_to(delta_BxHxT, rows), static)
    return dq[:, :T, :, :Dh], dk[:, :S, :, :Dh], dv[:, :S, :, :Dh]


def flash_attention_reference(q_BxTxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array, *,
                              causal: bool = True, scale: float | None = None, block_sizes: BlockSizes | None = None,
                              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The kernel's pure-JAX reference, same signature (tiles and interpret ignored): dense float32 scores, the
    same causal alignment, (out in q's dtype, lse [B, H, T] float32)."""
    del block_sizes, interpret
    B, T, H, Dh = q_BxTxHxDh.shape
    S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
    scale = Dh ** -0.5 if scale is None else scale
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST) * scale
    if causal:
        scores = jnp.where(jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :], scores, -jnp.inf)
    lse_BxKxGxT = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse_BxKxGxT[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, T, H, Dh).astype(q_BxTxHxDh.dtype), lse_BxKxGxT.reshape(B, H, T)


def merge_blocks(out_a_BxTxHxDh: jax.Array, lse_a_BxHxT: jax.Array, out_b_BxTxHxDh: jax.Array,
                 lse_b_BxHxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention over two disjoint key blocks from each block's (out [B, T, H, Dh], lse [B, H, T]): the softmax
    over their union, as ring attention combines the blocks it receives. Differentiable (through both lse). The
    merged out is float32 whatever the inputs' dtype, so a chain of merges does not round at every step; cast
    once at the end."""
    lse_BxHxT = jnp.logaddexp(lse_a_BxHxT, lse_b_BxHxT)
    w_a_BxTxHx1 = jnp.exp(lse_a_BxHxT - lse_BxHxT).transpose(0, 2, 1)[..., None]
    w_b_BxTxHx1 = jnp.exp(lse_b_BxHxT - lse_BxHxT).transpose(0, 2, 1)[..., None]
    return (w_a_BxTxHx1 * out_a_BxTxHxDh.astype(jnp.float32) + w_b_BxTxHx1 * out_b_BxTxHxDh.astype(jnp.float32),
            lse_BxHxT)


# ----------------------------------------------------------------------------------------------------- padding


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_dims(static: _Static, head_dim: int) -> tuple[int, int, int]:
    """(T, S, Dh) after padding: whole tiles of both the forward's and the backward's sizes, Dh a power of two."""
    b = static.blocks
    t = _round_up(static.q_len, max(b.block_q, b.block_q_bwd))
    s = _round_up(static.kv_len, max(b.block_k, b.block_k_bwd))
    return t, s, max(_MIN_TILE, 1 << (head_dim - 1).bit_length())


def _pad_to(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pad the given axes up to the given sizes (no copy when nothing changes)."""
    widths = [(0, sizes.get(axis, n) - n) for axis, n in enumerate(x.shape)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


# ----------------------------------------------------------------------------------------------------- kernels


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """a . b contracting a's axis contract[0] with b's axis contract[1], float32 out, IEEE for float32 inputs."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _mask(s_TqxSk: jax.Array, q_start, k_start, static: _Static) -> jax.Array:
    """-inf where key k_start + j is invisible to query q_start + i (past the diagonal, or a padded key)."""
    bq, bk = s_TqxSk.shape
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = k_pos < static.kv_len
    if static.causal:
        visible = visible & (k_pos <= q_pos + static.offset)
    return jnp.where(visible, s_TqxSk, -jnp.inf)


def _kv_blocks(q_start, bq: int, bk: int, n_kv: int, static: _Static):
    """For a query tile starting at q_start: (tiles every query sees whole, tiles it needs at all)."""
    if static.causal:
        needed = jnp.minimum(n_kv, pl.cdiv(q_start + bq + static.offset, bk))
        whole = jnp.minimum(needed, (q_start + static.offset + 1) // bk)
    else:
        needed, whole = n_kv, n_kv
    return jnp.minimum(whole, static.kv_len // bk), needed


def _key_tile_scores(q_TqxDh, k_ref, v_ref, q_start, j, bk: int, masked: bool, static: _Static):
    """Key/value tile j of this kv head and the query tile's scaled scores against it (masked where needed):
    what the forward and the dQ kernels both start each step with."""
    k_SkxDh = k_ref[pl.ds(j * bk, bk), :]
    v_SkxDh = v_ref[pl.ds(j * bk, bk), :]
    s_TqxSk = _dot(q_TqxDh, k_SkxDh, (1, 1)) * static.scale
    if masked:
        s_TqxSk = _mask(s_TqxSk, q_start, j * bk, static)
    return k_SkxDh, v_SkxDh, s_TqxSk


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, static: _Static):
    bq, bk = static.blocks.block_q, static.blocks.block_k
    q_start = pl.program_id(2) * bq
    q_TqxDh = q_ref[...]
    whole, needed = _kv_blocks(q_start, bq, bk, k_ref.shape[0] // bk, static)

    def body(masked: bool):
        def step(j, carry):
            m_Tq, l_Tq, acc_TqxDh = carry
            k_SkxDh, v_SkxDh, s_TqxSk = _key_tile_scores(q_TqxDh, k_ref, v_ref, q_start, j, bk, masked, static)
            m_new = jnp.maximum(m_Tq, jnp.max(s_TqxSk, axis=1))  # finite: key 0 is visible to every query
            p_TqxSk = jnp.exp(s_TqxSk - m_new[:, None])
            alpha_Tq = jnp.exp(m_Tq - m_new)
            acc_TqxDh = alpha_Tq[:, None] * acc_TqxDh + _dot(p_TqxSk.astype(v_SkxDh.dtype), v_SkxDh, (1, 0))
            return m_new, alpha_Tq * l_Tq + jnp.sum(p_TqxSk, axis=1), acc_TqxDh
        return step

    Dh = q_TqxDh.shape[1]
    carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, Dh), jnp.float32))
    carry = jax.lax.fori_loop(0, whole, body(False), carry)
    m_Tq, l_Tq, acc_TqxDh = jax.lax.fori_loop(whole, needed, body(True), carry)
    o_ref[...] = (acc_TqxDh / l_Tq[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_Tq + jnp.log(l_Tq)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, static: _Static):
    bq, bk = static.blocks.block_q_bwd, static.blocks.block_k_bwd
    q_start = pl.program_id(2) * bq
    q_TqxDh, do_TqxDh = q_ref[...], do_ref[...]
    lse_Tq, delta_Tq = lse_ref[...], delta_ref[...]
    whole, needed = _kv_blocks(q_start, bq, bk, k_ref.shape[0] // bk, static)

    def body(masked: bool):
        def step(j, dq_TqxDh):
            k_SkxDh, v_SkxDh, s_TqxSk = _key_tile_scores(q_TqxDh, k_ref, v_ref, q_start, j, bk, masked, static)
            p_TqxSk = jnp.exp(s_TqxSk - lse_Tq[:, None])
            ds_TqxSk = p_TqxSk * (_dot(do_TqxDh, v_SkxDh, (1, 1)) - delta_Tq[:, None])
            return dq_TqxDh + _dot(ds_TqxSk.astype(k_SkxDh.dtype), k_SkxDh, (1, 0))
        return step

    dq_TqxDh = jnp.zeros(q_TqxDh.shape, jnp.float32)
    dq_TqxDh = jax.lax.fori_loop(0, whole, body(False), dq_TqxDh)
    dq_TqxDh = jax.lax.fori_loop(whole, needed, body(True), dq_TqxDh)
    dq_ref[...] = (dq_TqxDh * static.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, static: _Static):
    bq, bk = static.blocks.block_q_bwd, static.blocks.block_k_bwd
    k_start = pl.program_id(2) * bk
    k_SkxDh, v_SkxDh = k_ref[...], v_ref[...]
    n_q = q_ref.shape[0] // bq
    if static.causal:  # query tiles before `first` see none of these keys; from `whole` on they see all
        first = jnp.maximum(k_start - static.offset, 0) // bq
        whole = jnp.minimum(n_q, pl.cdiv(jnp.maximum(k_start + bk - 1 - static.offset, 0), bq))
    else:
        first, whole = 0, 0
    if static.kv_len % bk:  # the ragged last key tile is masked for every query tile
        ragged = (k_start + bk > static.kv_len).astype(jnp.int32)  # int arithmetic: Triton lowers no i1 select
        whole = whole + (n_q - whole) * ragged

    def body(masked: bool):
        def step(i, carry):
            dk_SkxDh, dv_SkxDh = carry
            q_TqxDh = q_ref[pl.ds(i * bq, bq), :]
            do_TqxDh = do_ref[pl.ds(i * bq, bq), :]
            lse_Tq = lse_ref[pl.ds(i * bq, bq)]
            delta_Tq = delta_ref[pl.ds(i * bq, bq)]
            s_TqxSk = _dot(q_TqxDh, k_SkxDh, (1, 1)) * static.scale
            if masked:
                s_TqxSk = _mask(s_TqxSk, i * bq, k_start, static)
            p_TqxSk = jnp.exp(s_TqxSk - lse_Tq[:, None])
            dv_SkxDh = dv_SkxDh + _dot(p_TqxSk.astype(do_TqxDh.dtype), do_TqxDh, (0, 0))
            ds_TqxSk = p_TqxSk * (_dot(do_TqxDh, v_SkxDh, (1, 1)) - delta_Tq[:, None])
            dk_SkxDh = dk_SkxDh + _dot(ds_TqxSk.astype(q_TqxDh.dtype), q_TqxDh, (0, 0))
            return dk_SkxDh, dv_SkxDh
        return step

    zeros = jnp.zeros(k_SkxDh.shape, jnp.float32)
    carry = jax.lax.fori_loop(first, whole, body(True), (zeros, zeros))
    dk_SkxDh, dv_SkxDh = jax.lax.fori_loop(whole, n_q, body(False), carry)
    dk_ref[...] = (dk_SkxDh * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_SkxDh.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------- pallas calls


def _warps(n: int | None, head_dim: int) -> int:
    return n if n is not None else (4 if head_dim <= 64 else 8)


def _pallas(kernel, static: _Static, name: str, params, **specs):
    """`pl.pallas_call` of `kernel` specialised on `static` (interpret mode where it says), named
    `flash_attention_<name>`; `specs` are the grid, block specs and output shapes."""
    return pl.pallas_call(functools.partial(kernel, static=static), compiler_params=params,
                          interpret=static.interpret, name=f"flash_attention_{name}", **specs)


def _forward(q, k, v, static: _Static):
    """Padded inputs -> padded (out [B, T, H, Dh], lse [B, H, T])."""
    (B, T, H, Dh), K = q.shape, k.shape[2]
    G, S, b = H // K, k.shape[1], static.blocks
    bq = b.block_q
    return _pallas(
        _fwd_kernel, static, "fwd", compiler_params(_warps(b.num_warps, Dh), b.num_stages),
        grid=(B, H, T // bq),
        in_specs=[pl.BlockSpec((None, bq, None, Dh), lambda i, h, t: (i, t, h, 0)),
                  pl.BlockSpec((None, S, None, Dh), lambda i, h, t: (i, 0, h // G, 0)),
                  pl.BlockSpec((None, S, None, Dh), lambda i, h, t: (i, 0, h // G, 0))],
        out_specs=[pl.BlockSpec((None, bq, None, Dh), lambda i, h, t: (i, t, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, h, t: (i, h, t))],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, Dh), q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
    )(q, k, v)


def _backward(q, k, v, do, lse, delta, static: _Static):
    """Padded inputs -> padded (dq, dk, dv)."""
    (B, T, H, Dh), K = q.shape, k.shape[2]
    G, S, b = H // K, k.shape[1], static.blocks
    bq, bk = b.block_q_bwd, b.block_k_bwd
    params = compiler_params(_warps(b.num_warps_bwd, Dh), b.num_stages_bwd)
    q_tile = pl.BlockSpec((None, bq, None, Dh), lambda i, h, t: (i, t, h, 0))
    kv_whole = pl.BlockSpec((None, S, None, Dh), lambda i, h, t: (i, 0, h // G, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, h, t: (i, h, t))
    dq = _pallas(
        _dq_kernel, static, "dq", params,
        grid=(B, H, T // bq),
        in_specs=[q_tile, kv_whole, kv_whole, q_tile, row_tile, row_tile],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, do, lse, delta)

    q_whole = pl.BlockSpec((None, T, None, Dh), lambda i, h, s: (i, 0, h, 0))
    kv_tile = pl.BlockSpec((None, bk, None, Dh), lambda i, h, s: (i, s, h // G, 0))
    dkv_tile = pl.BlockSpec((None, bk, None, Dh), lambda i, h, s: (i, s, h, 0))
    row_whole = pl.BlockSpec((None, None, T), lambda i, h, s: (i, h, 0))
    dkv_dtype = k.dtype if G == 1 else jnp.float32  # per query head; summed over the group below
    dk, dv = _pallas(
        _dkv_kernel, static, "dkv", params,
        grid=(B, H, S // bk),
        in_specs=[q_whole, kv_tile, kv_tile, q_whole, row_whole, row_whole],
        out_specs=[dkv_tile, dkv_tile],
        out_shape=[jax.ShapeDtypeStruct((B, S, H, Dh), dkv_dtype)] * 2,
    )(q, k, v, do, lse, delta)
    if G > 1:
        dk = dk.reshape(B, S, K, G, Dh).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(B, S, K, G, Dh).sum(axis=3).astype(v.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, static: _Static):
    out, lse, _ = _flash_fwd_padded(q, k, v, static)
    return out, lse


def _flash_fwd_padded(q, k, v, static: _Static):
    (B, T, H, Dh) = q.shape
    t, s, d = _padded_dims(static, Dh)
    qp, kp, vp = _pad_to(q, {1: t, 3: d}), _pad_to(k, {1: s, 3: d}), _pad_to(v, {1: s, 3: d})
    out_p, lse_p = _forward(qp, kp, vp, static)
    out, lse = out_p[:, :T, :, :Dh], lse_p[:, :, :T]
    return out, lse, (qp, kp, vp, out_p, lse_p)


def _flash_fwd(q, k, v, static: _Static):
    out, lse, residuals = _flash_fwd_padded(q, k, v, static)
    return (out, lse), residuals


def _flash_bwd(static: _Static, residuals, cotangents):
    qp, kp, vp, out_p, lse_p = residuals
    d_out, d_lse = cotangents
    T, Dh, S = d_out.shape[1], d_out.shape[3], static.kv_len
    t, d = qp.shape[1], qp.shape[3]
    do_p = _pad_to(d_out.astype(qp.dtype), {1: t, 3: d})
    delta_BxTxH = jnp.sum(out_p.astype(jnp.float32) * do_p.astype(jnp.float32), axis=-1)
    delta_BxHxT = jnp.transpose(delta_BxTxH, (0, 2, 1)) - _pad_to(d_lse.astype(jnp.float32), {2: t})
    dq, dk, dv = _backward(qp, kp, vp, do_p, lse_p, delta_BxHxT, static)
    return dq[:, :T, :, :Dh], dk[:, :S, :, :Dh], dv[:, :S, :, :Dh]


_flash.defvjp(_flash_fwd, _flash_bwd)
