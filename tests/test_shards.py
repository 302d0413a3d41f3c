import pytest
import torch

from core.data import pack
from core.shards import FIELDS, ShardReader, write_shards


def packed(n=37, seq=16):
    g = torch.Generator().manual_seed(0)
    samples = [
        {"input_ids": torch.randint(3, 90, (int(k),), generator=g).tolist(), "loss_mask": [1] * int(k)}
        for k in torch.randint(2, seq, (n,), generator=g)
    ]
    return pack(samples, seq, pad_id=0)


def test_round_trip_across_shards(tmp_path):
    data = packed()
    write_shards(data, tmp_path, rows_per_shard=5)
    reader = ShardReader(tmp_path, batch_size=4)
    batches = list(reader)
    n = len(batches) * 4
    assert len(batches) == len(reader) == data["tokens"].shape[0] // 4
    for f in FIELDS:
        got = torch.cat([b[f] for b in batches])
        assert torch.equal(got, data[f][:n].to(got.dtype)), f
    assert batches[0]["tokens"].dtype == torch.long and batches[0]["loss_mask"].dtype == torch.float32


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_shards"):
        ShardReader(tmp_path, 4)
    write_shards(packed(8), tmp_path)
    with pytest.raises(ValueError, match="expected numpy or dali"):
        ShardReader(tmp_path, 4, backend="arrow")


@pytest.mark.gpu
def test_dali_backend_matches_numpy(tmp_path):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (R1_EXTRAS=gpu)")
    write_shards(packed(), tmp_path, rows_per_shard=5)
    ref = list(ShardReader(tmp_path, 4))
    got = list(ShardReader(tmp_path, 4, backend="dali"))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        for f in FIELDS:
            assert torch.equal(a[f], b[f].cpu())
