"""Issue 19, route 2, step by step: the CuTe DSL forward of :mod:`kernels.cute_forward` in the
builds that led to it, checked against float64 attention and timed beside cuDNN SDPA
(docs/benchmarks.md, "Route 2 ..."). Step 0 (:class:`CausalForward`, here): one warpgroup a CTA
takes 64 query rows; key blocks of 64 come by TMA one at a time; QK^T and PV run on wgmma, P
from registers. Step 1: :class:`~kernels.cute_forward.WarpSpecializedForward` without its
overlaps (a loader warpgroup, two consumer warpgroups, a K/V ring). Step 2: QK of block j in
flight beside PV of block j - 1. Step 3: the consumers take turns to issue their matrix
multiplies (ping-pong). Step 4: every row statistic (the library's build). The variants
(``step4c3n96``: three consumers, 96-key blocks; ``step4np``: no turns; ``step4s3``: three
K/V slots) are in :data:`KERNELS`.

It needs ``nvidia-cutlass-dsl`` (``pip install .[cute]``). Without a GPU it checks where the
wgmma fragments put each register (``register_coordinate``, traced on the host) and compiles
every build for sm_90a:

    python docs/experiments/cute_fwd.py --offline

(``CUTE_DSL_KEEP=cubin CUTE_DSL_DUMP_DIR=DIR`` keeps the cubins; ``cuobjdump -res-usage`` from
Triton's wheel reads their registers and spills.) On an sm_90 GPU it checks the output, the lse
and every row statistic against the float64 reference backend, then times them:

    python docs/experiments/cute_fwd.py [--kernels step0,step3,step4] [--time] [--no-check]

On the device tool's H200 the CuTe DSL wheels travel in three calls (fa4_wheels.sh,
fa4_hopper.py); the third can be ``bash .fa4c/install.sh docs/experiments/cute_fwd.py --time``.
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")  # before cutlass reads it (kernels.cute_forward's target)

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.nvgpu import warpgroup  # noqa: E402

from kernels.cute_attention import Masses, row_fields  # noqa: E402
from kernels.cute_forward import (  # noqa: E402
    BLOCK_M,
    LOG2E,
    WarpSpecializedForward,
    _fragment_layouts,
    consumer_registers,
    heads_as_one_mode,
    issue_pv,
    issue_qk,
    kernel_arguments,
    online_softmax,
    smem_operands,
    store_rows,
    tiled_mmas,
    tma_tiles,
)

#: Step 0's key blocks.
BLOCK_N = 64


class CausalForward:
    """``out = softmax(q k^T * scale, causal) v`` and ``lse``; the tensors of
    :func:`~kernels.cute_forward.cute_views` (``rows`` here holds only the lse)."""

    fields = 1

    def __init__(self, head_dim: int, group: int):
        self.d = head_dim
        self.group = group

    @cute.jit
    def __call__(
        self,
        q: cute.Tensor,
        k: cute.Tensor,
        vt: cute.Tensor,
        out: cute.Tensor,
        rows: cute.Tensor,
        scale: cutlass.Float32,
        stream,
    ):
        q, k, vt, out = (heads_as_one_mode(t) for t in (q, k, vt, out))
        dtype = q.element_type
        d = self.d
        mma_qk, mma_pv = tiled_mmas(dtype, BLOCK_N, d)
        (q_layout, k_layout, v_layout), ((tma_q, tq), (tma_k, tk), (tma_v, tv)) = smem_operands(
            q, k, vt, BLOCK_N, d, 1, 1
        )

        @cute.struct
        class Shared:
            bars: cute.struct.MemRange[cutlass.Int64, 2]
            sq: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(q_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(k_layout)], 1024]
            sv: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(v_layout)], 1024]

        self.shared = Shared
        n = q.shape[0]
        grid = (cute.ceil_div(n, BLOCK_M), cute.size(q, mode=[2]), 1)
        self.kernel(
            mma_qk,
            mma_pv,
            tma_q,
            tq,
            tma_k,
            tk,
            tma_v,
            tv,
            out,
            rows,
            scale * LOG2E,
            q_layout,
            k_layout,
            v_layout,
        ).launch(grid=grid, block=[128, 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        tma_q: cute.CopyAtom,
        tq: cute.Tensor,
        tma_k: cute.CopyAtom,
        tk: cute.Tensor,
        tma_v: cute.CopyAtom,
        tv: cute.Tensor,
        out: cute.Tensor,
        rows: cute.Tensor,
        scale_log2: cutlass.Float32,
        q_layout: cute.ComposedLayout,
        k_layout: cute.ComposedLayout,
        v_layout: cute.ComposedLayout,
    ):
        d = self.d
        tidx, _, _ = cute.arch.thread_idx()
        m_block, bh, _ = cute.arch.block_idx()
        hk = bh // self.group
        n = out.shape[0]
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(self.shared)
        bars = st.bars.data_ptr()
        sq = st.sq.get_tensor(q_layout.outer, swizzle=q_layout.inner)
        sk = st.sk.get_tensor(k_layout.outer, swizzle=k_layout.inner)
        sv = st.sv.get_tensor(v_layout.outer, swizzle=v_layout.inner)
        if tidx == 0:
            cute.arch.mbarrier_init(bars, 1)
            cute.arch.mbarrier_init(bars + 1, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        (tqs, tqg), (tks, tkg), (tvs, tvg) = tma_tiles(
            (tma_q, tma_k, tma_v), (tq, tk, tv), (sq, sk, sv), bh, hk, BLOCK_N, d
        )
        rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i = consumer_registers(mma_qk, mma_pv, tidx, sq, sk, sv, BLOCK_N, d)

        # TMA copies elect their issuing thread themselves: the whole warp 0 calls them
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(
                    bars, cute.size_in_bytes(out.element_type, cute.slice_(q_layout, (None, None, 0)))
                )
            cute.copy(tma_q, tqg[(None, m_block)], tqs[(None, 0)], tma_bar_ptr=bars)
        cute.arch.mbarrier_wait(bars, 0)

        n_blocks = cute.ceil_div(cutlass.min((m_block + 1) * BLOCK_M, n), BLOCK_N)
        kv_bytes = cute.size_in_bytes(out.element_type, cute.slice_(k_layout, (None, None, 0))) * 2
        for j in cutlass.range(n_blocks, unroll=1):
            if warp == 0:
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive_and_expect_tx(bars + 1, kv_bytes)
                cute.copy(tma_k, tkg[(None, j)], tks[(None, 0)], tma_bar_ptr=bars + 1)
                cute.copy(tma_v, tvg[(None, j)], tvs[(None, 0)], tma_bar_ptr=bars + 1)
            cute.arch.mbarrier_wait(bars + 1, j % 2)

            mma_qk = issue_qk(mma_qk, acc_s, rq, rk, 0, 0, d)
            warpgroup.wait_group(0)
            online_softmax(acc_s, acc_o, m_i, l_i, tidx, m_block * BLOCK_M, j * BLOCK_N, n, scale_log2, True)
            p16.store(acc_s.load().to(p16.element_type))
            mma_pv = issue_pv(mma_pv, acc_o, rp, rv, 0, BLOCK_N)
            warpgroup.wait_group(0)
            cute.arch.sync_threads()  # every warp done with this K/V before the next load

        store_rows(acc_o, m_i, l_i, tidx, m_block * BLOCK_M, n, out, rows, bh)


def fake_arguments(head_dim: int, fields: int = 1, dtype=cutlass.BFloat16) -> tuple:
    """Fake ``q, k, vt, out, rows`` typed as :func:`~kernels.cute_forward.cute_views` makes
    them (every extent and stride dynamic but the head dim's unit stride; rows compact):
    compile without a GPU."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_tensor

    n, b, hq, hkv, bh = (cute.sym_int() for _ in range(5))

    def fake(heads, transposed=False):  # (N, D, H, B), or (D, N, H, B)
        d, n_stride, h_stride, b_stride = cute.sym_int(), *(cute.sym_int64() for _ in range(3))
        if transposed:
            return make_fake_tensor(dtype, (d, n, heads, b), (1, n_stride, h_stride, b_stride), assumed_align=16)
        return make_fake_tensor(dtype, (n, d, heads, b), (n_stride, 1, h_stride, b_stride), assumed_align=16)

    q, k, vt, out = fake(hq), fake(hkv), fake(hkv, True), fake(hq)
    rows = make_fake_compact_tensor(cutlass.Float32, (n, bh, fields), stride_order=(1, 2, 0), assumed_align=16)
    return q, k, vt, out, rows


KERNELS = {
    "step0": CausalForward,
    "step1": functools.partial(WarpSpecializedForward, overlap=False, pingpong=False),
    "step2": functools.partial(WarpSpecializedForward, pingpong=False),
    "step3": WarpSpecializedForward,
    "step4": functools.partial(WarpSpecializedForward, masses=Masses()),
    # three consumers of 160 registers: over 128-key blocks (FlashAttention-3's head dim 64
    # tile) they spill; over 96-key blocks they do not (the library's build at D = 64 with
    # statistics)
    "step4c3": functools.partial(WarpSpecializedForward, masses=Masses(), consumers=3),
    "step3c3": functools.partial(WarpSpecializedForward, consumers=3),
    "step4c3n96": functools.partial(WarpSpecializedForward, masses=Masses(), consumers=3, block_n=96),
    "step3c3n96": functools.partial(WarpSpecializedForward, consumers=3, block_n=96),
    "step4np": functools.partial(WarpSpecializedForward, pingpong=False, masses=Masses()),  # no turns
    "step4s3": functools.partial(WarpSpecializedForward, masses=Masses(), stages=3),
    # P packed into 32-bit registers as it is rounded (not yet run on a GPU)
    "step4p": functools.partial(WarpSpecializedForward, masses=Masses(), packed_p=True),
    "step4c3n96p": functools.partial(WarpSpecializedForward, masses=Masses(), consumers=3, block_n=96, packed_p=True),
    "step3c3p": functools.partial(WarpSpecializedForward, consumers=3, packed_p=True),
    "step4c3p": functools.partial(WarpSpecializedForward, masses=Masses(), consumers=3, packed_p=True),
    "step3p": functools.partial(WarpSpecializedForward, packed_p=True),
    # O and the sums rescaled only where a row's max moved (not yet run on a GPU)
    "step3l": functools.partial(WarpSpecializedForward, lazy_rescale=True),
    "step4l": functools.partial(WarpSpecializedForward, masses=Masses(), lazy_rescale=True),
    "step4c3n96l": functools.partial(
        WarpSpecializedForward, masses=Masses(), consumers=3, block_n=96, lazy_rescale=True
    ),
    "step4c3n96pl": functools.partial(
        WarpSpecializedForward, masses=Masses(), consumers=3, block_n=96, packed_p=True, lazy_rescale=True
    ),
}


def offline(name: str, head_dim: int, group: int) -> None:
    from cutlass.cute.runtime import make_fake_stream

    kernel = KERNELS[name](head_dim, group)
    args = fake_arguments(head_dim, kernel.fields)
    cute.compile(kernel, *args, cutlass.Float32(head_dim**-0.5), make_fake_stream())
    print(f"{name} D = {head_dim}, group {group}: compiled")


def check_on_gpu(name: str, lengths=(128, 200, 1000, 4096), dims=(64, 128), groups=(1, 4)) -> None:
    """Against this project's float64 reference backend (``kernels.attention``), on random
    problems: the output, the lse and, for kernels with the statistics, every row statistic
    (``StatsSpec.every_row_statistic()``'s settings) and how many argmax rows differ. Needs an
    sm_90 GPU; run from the checkout's root."""
    import cuda.bindings.driver as cuda_driver
    import torch

    from kernels import StatsSpec, attention

    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in dims:
        for group in groups:
            kernel, compiled = KERNELS[name](d, group), None
            for n in lengths:
                h = 8
                q, k, v = (
                    torch.randn(1, x, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for x in (h, h // group, h // group)
                )
                args, out, rows = kernel_arguments(q, k, v, kernel.fields)
                scale = cutlass.Float32(d**-0.5)
                compiled = compiled or cute.compile(kernel, *args, scale, stream)  # one build, every length
                compiled(*args, scale, stream)
                torch.cuda.synchronize()
                want_out, want = attention(
                    *(t.double() for t in (q, k, v)), stats=StatsSpec.every_row_statistic(), backend="reference"
                )
                errors = {"out": (out.double() - want_out).abs().max().item()}
                for f, field in enumerate(row_fields(getattr(kernel, "masses", None))):
                    got = rows[..., f].double().view(want_out.shape[:3])
                    if field == "argmax":
                        errors["argmax rows differing"] = int((got.long() != want.argmax).sum())
                    elif field.startswith("offset_mass_"):
                        errors[field] = (got - want.offset_mass[..., int(field.split("_")[-1])]).abs().max().item()
                    else:
                        errors[field] = (got - getattr(want, field)).abs().max().item()
                shown = ", ".join(
                    f"{key} {value:.2e}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in errors.items()
                )
                print(f"{name} D = {d} group {group} N = {n}: {shown}", flush=True)


def time_on_gpu(names: list[str], lengths=(16384, 32768), heads: int = 32) -> None:
    """Milliseconds of each kernel, of cuDNN SDPA and of this project's kernel with every row
    statistic (``kernels.attention``), bf16, causal, batch 1, ``do_bench`` medians; a table
    last (needs an sm_90 GPU)."""
    import cuda.bindings.driver as cuda_driver
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from kernels import StatsSpec, attention

    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    table = ["| N | D | call | ms | SDPA / call |", "| --- | --- | --- | --- | --- |"]
    compiled = {}  # (build, D): one compiled kernel serves every length
    for n in lengths:
        for d in (128, 64):
            q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                call = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
                calls = {"SDPA (cuDNN)": call}
            stats = StatsSpec.every_row_statistic()
            calls["project kernel, every row statistic"] = functools.partial(
                attention, q, k, v, stats=stats, backend="triton"
            )
            for name in names:
                kernel = KERNELS[name](d, 1)
                args, _, _ = kernel_arguments(q, k, v, kernel.fields)
                scale = cutlass.Float32(d**-0.5)
                if (name, d) not in compiled:
                    compiled[name, d] = cute.compile(kernel, *args, scale, stream)
                calls[name] = functools.partial(compiled[name, d], *args, scale, stream)
            times = {}
            for name, call in calls.items():
                try:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        times[name] = do_bench(call, warmup=25, rep=200, return_mode="median")
                except Exception as error:  # e.g. more shared memory than a CTA may have
                    print(f"{name} N = {n} D = {d}: {type(error).__name__}: {error}"[:300], flush=True)
            sdpa = times["SDPA (cuDNN)"]
            table += [f"| {n} | {d} | {name} | {t:.3f} | {sdpa / t:.3f}x |" for name, t in times.items()]
            print("\n".join(table[-len(times) :]), flush=True)  # this shape's rows, as they come
    print("\n".join(table))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="check the register mapping and compile, no GPU")
    parser.add_argument(
        "--kernels", default="step0,step1,step2,step3,step4", help=f"comma list of {', '.join(KERNELS)}"
    )
    parser.add_argument("--time", action="store_true", help="after the checks, time them beside cuDNN SDPA")
    parser.add_argument("--no-check", action="store_true", help="skip the checks against float64 attention")
    parser.add_argument("--check-lengths", default="128,200,1000,4096", help="sequence lengths of the checks")
    args = parser.parse_args()
    names = args.kernels.split(",")
    if args.offline:
        for bn in (BLOCK_N, 96, 128):
            for d in (64, 128):
                wrong = []
                cute.compile(_fragment_layouts, bn, d, wrong)
                print(f"keys {bn}, D = {d}: {len(wrong)} registers off register_coordinate", wrong[:4])
        for name in names:
            for d in (64, 128):
                for g in (1, 4):
                    offline(name, d, g)
    else:
        for name in names if not args.no_check else ():
            check_on_gpu(name, tuple(int(x) for x in args.check_lengths.split(",")))
        if args.time:
            time_on_gpu(names)
