"""Pre-tokenised shards: packed rows written once as .npy files, read back in fixed-size batches.

Two backends behind one interface: `numpy` (memory-mapped, any machine) and `dali` (an NVIDIA DALI
pipeline that prefetches rows onto the GPU, when installed: `R1_EXTRAS=gpu`). Both yield the same dicts of tensors in the same
order, so switching backend never changes training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
_DTYPES = {"tokens": np.int32, "labels": np.int32, "loss_mask": np.float32, "position_ids": np.int32}


def write_shards(packed: dict[str, torch.Tensor], out_dir: str | Path, rows_per_shard: int = 4096) -> Path:
    """Writes `core.data.pack` output as shard_XXXXX/<field>.npy plus an index.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, seq_len = packed["tokens"].shape
    shards = []
    for i, start in enumerate(range(0, n, rows_per_shard)):
        shard = out / f"shard_{i:05d}"
        shard.mkdir(exist_ok=True)
        for field in FIELDS:
            np.save(
                shard / f"{field}.npy", packed[field][start : start + rows_per_shard].numpy().astype(_DTYPES[field])
            )
        shards.append({"dir": shard.name, "rows": min(rows_per_shard, n - start)})
    (out / "index.json").write_text(json.dumps({"seq_len": seq_len, "rows": n, "shards": shards}))
    return out


class ShardReader:
    """Batches of `batch_size` rows in file order; the last partial batch is dropped."""

    def __init__(self, shard_dir: str | Path, batch_size: int, backend: str = "numpy"):
        self.dir = Path(shard_dir)
        index_file = self.dir / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} missing: write shards with core.shards.write_shards first")
        self.index = json.loads(index_file.read_text())
        self.batch_size = batch_size
        if backend not in ("numpy", "dali"):
            raise ValueError(f"shard backend {backend!r}: expected numpy or dali")
        self.backend = backend

    def __len__(self) -> int:
        return self.index["rows"] // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._dali() if self.backend == "dali" else self._numpy()

    def _rows(self, field: str) -> np.ndarray:
        arrays = [np.load(self.dir / s["dir"] / f"{field}.npy", mmap_mode="r") for s in self.index["shards"]]
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    def _numpy(self):
        columns = {f: self._rows(f) for f in FIELDS}
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield {f: _to_torch(columns[f][sl], f) for f in FIELDS}

    def _dali(self):
        try:
            from nvidia.dali import fn, pipeline_def
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        except ImportError as e:
            raise RuntimeError("shard backend 'dali' needs nvidia-dali (R1_EXTRAS=gpu make setup)") from e

        columns = {f: self._rows(f) for f in FIELDS}
        rows = len(self) * self.batch_size

        def source(field):
            def row(info):  # rows in file order, the same as the numpy backend
                if info.idx_in_epoch >= rows:
                    raise StopIteration
                return np.ascontiguousarray(columns[field][info.idx_in_epoch])

            return row

        @pipeline_def(batch_size=self.batch_size, num_threads=2, device_id=torch.cuda.current_device())
        def pipe():
            return tuple(fn.external_source(source=source(f), batch=False).gpu() for f in FIELDS)

        for batch in DALIGenericIterator(pipe(), list(FIELDS), last_batch_policy=LastBatchPolicy.DROP):
            yield {f: _to_torch(batch[0][f], f) for f in FIELDS}


def _to_torch(array, field: str) -> torch.Tensor:
    t = array if torch.is_tensor(array) else torch.from_numpy(np.ascontiguousarray(array))
    return t.float() if field == "loss_mask" else t.long()
