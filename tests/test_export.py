"""Writing a checkpoint one tensor at a time (issue 19): the same bytes as safetensors' own
save_file, and a write that never holds the whole model."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import save_file

from gptq_cli import api, export
from gptq_cli.errors import Interrupted
from gptq_cli.format import checkpoint, reader
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.safetensors_file import DTYPES, FileTensors, LazyTensors, write_file
from tests.tiny_models import save_tiny_model


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors stores, names that sort differently from their dtypes, an empty
    tensor, a scalar, odd byte counts (the header's padding and the data offsets must come out as
    save_file's)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        shape = (3, i % 4 + 1) if i % 3 else (5,)
        values = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=g)
        out[f"{chr(ord('z') - i)}.layer{i}.{name.lower()}"] = values.to(dtype)
    # same dtype as others: ordered by name
    out["a.weight"] = torch.randn(7, 3, generator=g)
    out["b.empty"] = torch.empty(0, 4, dtype=torch.float16)
    out["c.scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["model.layers.10.mlp.qweight"] = torch.randint(
        -(2**31), 2**31 - 1, (4, 9), generator=g, dtype=torch.int32
    )
    out["model.layers.9.mlp.qweight"] = torch.randint(
        -(2**31), 2**31 - 1, (4, 9), generator=g, dtype=torch.int32
    )
    return out


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_streamed_file_is_byte_for_byte_what_save_file_writes(tmp_path, metadata):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
    lazy = LazyTensors.holding(tensors)
    write_file(tmp_path / "streamed.safetensors", lazy, list(tensors), metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    read = FileTensors({"f": tmp_path / "streamed.safetensors"})
    assert read.metadata() == {"f": metadata}
    for key, t in tensors.items():
        assert read.spec(key) == (t.dtype, tuple(t.shape)) and torch.equal(read[key], t)


def test_a_tensor_unlike_its_announced_spec_is_refused(tmp_path):
    lazy = LazyTensors()
    lazy.add("w", (torch.float16, (2, 2)), lambda: torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="announced"):
        write_file(tmp_path / "x.safetensors", lazy, ["w"], None)


class LiveTensors:
    """Counts the tensors FileTensors has produced that are still referenced somewhere, and the
    peak."""

    def __init__(self) -> None:
        self.live = self.peak = self.reads = 0

    def wrap(self, read):
        def tracked(files, key):
            t = read(files, key)
            self.live += 1
            self.reads += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed)
            return t

        return tracked

    def _freed(self) -> None:
        self.live -= 1


def test_the_final_write_holds_about_one_tensor_not_the_model(tmp_path, monkeypatch):
    """Packing a finished work dir reads every block tensor and every unquantized tensor from
    their files (all through FileTensors), yet no more than two of them are alive at any moment:
    the old write gathered all of them in one dict before writing."""
    model = save_tiny_model(
        tmp_path / "model",
        "llama",
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    )

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    quant = QuantConfig(group_size=32)
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "write_checkpoint", interrupted)
        with pytest.raises(Interrupted):
            api.quantize(
                str(model),
                quant,
                dataset="builtin",
                nsamples=4,
                seqlen=16,
                batch_size=4,
                device="cpu",
                dtype="float32",
                output=tmp_path / "out",
            )
    # the caller's settings are not changed behind its back
    assert quant == QuantConfig(group_size=32)
    counter = LiveTensors()
    monkeypatch.setattr(FileTensors, "__getitem__", counter.wrap(FileTensors.__getitem__))
    out = export.pack_workdir(tmp_path / "out.work", tmp_path / "packed")
    stored = FileTensors({"m": out / "model.safetensors"})
    assert counter.reads >= len(stored) > 20  # every tensor came from a file
    assert counter.peak <= 2, f"{counter.peak} tensors alive at once"


def test_each_shard_is_what_save_file_writes_of_its_tensors(tmp_path, tiny_gptq_checkpoint):
    """The sharded checkpoint writer: every shard holds the bytes save_file gives for the same
    tensors."""
    from safetensors.torch import load_file

    out = checkpoint.write_checkpoint(
        tmp_path / "ckpt",
        reader.read_tensors(tiny_gptq_checkpoint.path),
        {"model_type": "llama"},
        QuantConfig(),
        max_shard_size="200KB",
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / reader.INDEX_FILE).is_file()
    for shard in shards:
        save_file(
            load_file(shard),
            str(tmp_path / "again.safetensors"),
            metadata=checkpoint.SAFETENSORS_METADATA,
        )
        assert shard.read_bytes() == (tmp_path / "again.safetensors").read_bytes(), shard.name
