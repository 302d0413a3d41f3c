"""GPU specifications and the planner's calibration constants.

Peak figures are NVIDIA's dense (no sparsity) tensor-core numbers for the SXM parts; bandwidths are per GPU
and per direction. H800 and H20 are the export variants: the H800 keeps H100 compute with NVLink cut to
400 GB/s (both directions), the H20 keeps NVLink and more HBM with compute cut to ~15%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    fp8_flops: float  # dense FP8 peak, FLOP/s
    hbm_gib: float  # memory capacity
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s per GPU per direction, within a node
    ib_bw: float  # bytes/s per GPU per direction, across nodes (one 400 Gb/s NIC per GPU)
    pcie_bw: float  # bytes/s per GPU per direction, host <-> device (Gen5 x16)
    host_bw: float  # bytes/s of host DRAM bandwidth per GPU (a 2-socket DDR5 host shared by 8 GPUs)

    def as_dict(self) -> dict:
        return asdict(self)


T, G = 1e12, 1e9
_HOST = dict(ib_bw=50 * G, pcie_bw=64 * G, host_bw=75 * G)
GPUS = {
    # https://www.nvidia.com/en-us/data-center/h100/ (SXM column; 80 GB, 3.35 TB/s, NVLink 900 GB/s)
    "h100": GPU("NVIDIA H100 SXM5 80GB", 989 * T, 1979 * T, 80, 3.35e12, 450 * G, **_HOST),
    # H100 silicon, NVLink 400 GB/s both directions (DeepSeek-V3 report §3.2.2: IB 50 GB/s, NVLink 160 GB/s)
    "h800": GPU("NVIDIA H800 SXM5 80GB", 989 * T, 1979 * T, 80, 3.35e12, 200 * G, **_HOST),
    # 96 GB HBM3 at 4.0 TB/s, 148 TFLOPS BF16 / 296 FP8 dense, NVLink 900 GB/s (verl's flops table: 148e12)
    "h20": GPU("NVIDIA H20 96GB", 148 * T, 296 * T, 96, 4.0e12, 450 * G, **_HOST),
    # https://www.nvidia.com/en-us/data-center/h200/ (141 GB, 4.8 TB/s, H100 compute)
    "h200": GPU("NVIDIA H200 SXM 141GB", 989 * T, 1979 * T, 141, 4.8e12, 450 * G, **_HOST),
}


# --------------------------------------------------------------------------- calibration
# Two fitted constants; everything else is a spec or a published measurement. tools/plan/published.py
# re-derives both (`fit()`) and checks every published figure against the model.
MATMUL_EFF = 0.36
"""Achieved share of the dense tensor-core peak (FP8 runs: the FP8 peak) in training matmuls and attention.
Fitted jointly on DeepSeek-V3 pre-training (FP8, H800) and verl's MFU (BF16, H20): the value that minimises
the larger of the two relative errors."""

DECODE_OVERHEAD_S = 1.239e-3
"""Seconds per transformer layer per decode step that no byte or FLOP count explains: kernel launches,
scheduling, and the latency of the two all-reduces a layer does across a multi-node TP32 engine. Fitted on
the rows that decode (tools.plan.published: NeMo-RL v0.4 and v0.6, verl's rollout), minimising the largest
error: fitted to NeMo-RL v0.4's 256-GPU step alone it was 1.42e-3, and v0.6 does that step in 134 s, not 154."""

# Not fitted: taken from specs or published measurements.
BW_EFF = 0.8
"""Achieved share of a link's or memory's nominal bandwidth: the DeepSeek-V3 report (§3.2.2) works with 160 GB/s
of NVLink on the H800, whose nominal figure is 200 GB/s per direction."""

DUALPIPE_COMM_SMS = 20 / 132
"""Share of the SMs DeepSeek-V3 gives to the overlapped all-to-all (20 of 132, report §3.2.2)."""

RESERVED_GIB = 3.0
"""Per-GPU memory no model state can use: CUDA context, NCCL buffers, allocator fragmentation."""


def calibration() -> dict:
    return dict(
        matmul_eff=MATMUL_EFF,
        decode_overhead_s_per_layer=DECODE_OVERHEAD_S,
        bw_eff=BW_EFF,
        dualpipe_comm_sm_share=DUALPIPE_COMM_SMS,
        reserved_gib=RESERVED_GIB,
    )
