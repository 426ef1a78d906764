"""WeightsWriter writes what safetensors' own reader (the servers' loader) reads back exactly."""

import pytest
import torch
from safetensors.torch import load_file

from astrai.train.weights_file import WeightsWriter


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(5, generator=g),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
        "steps": torch.tensor(12345678901, dtype=torch.int64),  # a scalar
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(3, generator=g).half(),
        "bytes": torch.arange(5, dtype=torch.uint8),
    }


def test_safetensors_reads_back_every_tensor_exactly(tmp_path):
    state = mixed_state()
    WeightsWriter().write(state, tmp_path / "model.safetensors")
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert not (tmp_path / "model.safetensors.partial").exists()


def test_one_writer_writes_later_states_of_other_sizes(tmp_path):
    writer, path = WeightsWriter(), tmp_path / "w.safetensors"
    writer.write(mixed_state(), path)
    bigger = {"a": torch.ones(1000), "b": torch.zeros(3, dtype=torch.bfloat16)}
    writer.write(bigger, path)
    loaded = load_file(str(path))
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], bigger["a"])
    smaller = {"c": torch.full((2,), 3.0)}
    writer.write(smaller, path)
    assert set(load_file(str(path))) == {"c"} and torch.equal(load_file(str(path))["c"], smaller["c"])


def test_a_dtype_safetensors_cannot_store_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="'z'.*complex"):
        WeightsWriter().write({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "w.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tensors_are_written_after_their_copies_end(tmp_path):
    state = {k: v.cuda() for k, v in mixed_state().items()}
    WeightsWriter().write(state, tmp_path / "model.safetensors")
    loaded = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor.cpu()), name
