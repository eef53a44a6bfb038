"""Checkpoint format pieces without a process group: fragments and read plans (resharding), checked JSON,
safetensors range reads and the streaming writer against the safetensors library, tag names, sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ztune.errors import UserError
from ztune.runtime.partition import build_layout, flatten_to
from ztune.runtime.state.files import (
    CheckpointError,
    TensorFile,
    read_checked_json,
    write_checked_json,
    write_tensor_stream,
)
from ztune.runtime.state.layout import fragments_of, index_fragments, plan_reads
from ztune.runtime.state.offline import parse_size
from ztune.runtime.state.tags import check_tag


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 5)), min_size=1, max_size=6),
       old_world=st.integers(1, 5), new_world=st.integers(1, 5))
def test_reshard_plan_rebuilds_every_shard(shapes, old_world, new_world):
    """Values saved as old_world shards (fragments) and read back for new_world shards equal the new
    layout's slices of the same flat values."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    names = [f"p{i}" for i in range(len(params))]
    old = build_layout([p.shape for p in params], world_size=old_world)
    old_flat = flatten_to(params, old, dtype=torch.float32, device=torch.device("cpu"))
    frags, shards = [], {}
    for r in range(old_world):
        lo, hi = old.shard_range(r)
        shards[r] = old_flat[lo:hi]
        frags += fragments_of(old, names, owned=(lo, hi), rank=r, group=0)
    index = index_fragments(frags)
    new = build_layout([p.shape for p in params], world_size=new_world)
    new_flat = flatten_to(params, new, dtype=torch.float32, device=torch.device("cpu"))
    for r in range(new_world):
        lo, hi = new.shard_range(r)
        out = torch.zeros(hi - lo)
        for f in fragments_of(new, names, owned=(lo, hi), rank=r, group=0):
            for rd in plan_reads(index, name=f.name, start=f.start, end=f.end, dst_offset=f.offset, where="x"):
                out[rd.dst_offset:rd.dst_offset + rd.length] = shards[rd.rank][rd.src_offset:rd.src_offset + rd.length]
        assert torch.equal(out, new_flat[lo:hi])


def test_plan_reads_reports_gaps_and_unknown_names():
    layout = build_layout([(4,), (6,)], world_size=1)
    index = index_fragments(fragments_of(layout, ["a", "b"], owned=(0, 4), rank=0, group=0))
    with pytest.raises(CheckpointError, match="no parameter 'b'"):
        plan_reads(index, name="b", start=0, end=6, dst_offset=0, where="ck")
    index = index_fragments(fragments_of(layout, ["a", "b"], owned=(0, 7), rank=0, group=0))
    with pytest.raises(CheckpointError, match=r"lacks elements \[3, 6\)"):
        plan_reads(index, name="b", start=0, end=6, dst_offset=0, where="ck")


def test_checked_json_detects_any_change(tmp_path):
    path = tmp_path / "m.json"
    write_checked_json(path, {"a": [1, 2, 3], "b": "x"})
    assert read_checked_json(path) == {"a": [1, 2, 3], "b": "x"}
    text = path.read_text()
    path.write_text(text.replace("3", "4"))
    with pytest.raises(CheckpointError, match="m.json is corrupted"):
        read_checked_json(path)
    path.write_text(text[:-5])
    with pytest.raises(CheckpointError, match="m.json is corrupted"):
        read_checked_json(path)
    with pytest.raises(CheckpointError, match="missing"):
        read_checked_json(tmp_path / "nope.json")


def test_range_reads_and_stream_writer_match_safetensors(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4).to(torch.bfloat16), "d": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "x.safetensors")
    with TensorFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read("a", 2, 9), tensors["a"].reshape(-1)[2:9])
        for name, t in tensors.items():
            assert torch.equal(f.read(name).reshape(f.shape(name)), t)
    items = [(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()]
    write_tensor_stream(tmp_path / "y.safetensors", items, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "y.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_tag_names_and_sizes():
    assert check_tag("global_step10") == "global_step10"
    for bad in ("", "latest", "../x", "a/b", ".tmp-x"):
        with pytest.raises(UserError):
            check_tag(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2 MiB") == 2 << 20 and parse_size("100") == 100
    for bad in ("lots", "-1MB", "0"):
        with pytest.raises(UserError, match="--max-shard-size"):
            parse_size(bad)
