"""tools.convert round trip: a tiny HF checkpoint → Megatron at TP2 (two ranks) → HF again at TP1:
every tensor identical, and transformers loads the export."""

import sys

import pytest
import torch

from tests.conftest import ROOT, run_worker


def _make_hf(model: str, out):
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from hf_bridge_worker import random_hf_model
    from safetensors.torch import save_file

    from core.compose import compose
    from core.hf_config import hf_config
    from core.tokenizer import build_char_tokenizer, save_tokenizer

    m = compose([f"model={model}"]).model
    _, state = random_hf_model(m, seed=3)
    out.mkdir()
    hf_config(m).save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(build_char_tokenizer(), out)  # the tiny presets' tokenizer, shipped with the model
    return state


@pytest.mark.parametrize(
    "model,layout",
    [("tiny_dense", ["parallel=tp2"]), ("tiny_dsv3", ["parallel.expert=2", "stage.train.micro_batch_size=1"])],
)
def test_import_at_a_layout_and_export_back(tmp_path, model, layout):
    from parallel.hf_bridge import load_hf_dir

    state = _make_hf(model, tmp_path / "hf")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29655"]
    run_worker(
        [*torchrun, "-m", "tools.convert", "import", tmp_path / "hf", tmp_path / "ckpt", f"model={model}", *layout], 600
    )
    run_worker(
        [sys.executable, "-m", "tools.convert", "export", tmp_path / "ckpt", tmp_path / "back", f"model={model}"], 600
    )
    back = load_hf_dir(tmp_path / "back")
    mtp = {k for k in back if k.startswith("model.layers.") and int(k.split(".")[2]) >= 4}
    assert set(state) <= set(back) and set(back) - set(state) <= mtp  # MTP layers exist only on our side
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    # The tokenizer travelled with the weights: import kept it beside the checkpoint, export wrote it out.
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        f.name for f in (tmp_path / "back").iterdir()
    }


def test_import_without_a_tokenizer_is_refused(tmp_path):
    import subprocess

    _make_hf("tiny_dense", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "tools.convert", "import", tmp_path / "hf", tmp_path / "ckpt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no tokenizer files" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists()


def test_import_without_config_is_a_clear_error(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "tools.convert", "import", tmp_path, tmp_path / "ckpt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no config.json" in proc.stderr
