"""A leading UTF-8 byte order mark (Windows editors' "UTF-8 with BOM") is dropped by the one file reader the
configs, profiles, hostfiles and env files go through (ztune.inputs.read_text): a hostfile with one was refused
("'\\ufeffnode1' holds '\\ufeff'"), a DeepSpeed JSON with one gave json's "Unexpected UTF-8 BOM"."""

from __future__ import annotations

import json

import pytest

from ztune.config import load
from ztune.errors import UserError
from ztune.inputs import read_text
from ztune.launch import parse_env_file
from ztune.launch.hostfile import Host, parse_hostfile
from ztune.profiles import load_model

BOM = "\ufeff".encode()


def test_read_text_drops_a_leading_bom_only(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(BOM + "a\ufeffb\n".encode())
    assert read_text(path, error=UserError, what="file") == "a\ufeffb\n"  # one inside stays, for the checks to name


def test_files_saved_with_a_bom_load(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(BOM + b"# hosts\r\nnode1 slots=2\r\n")
    assert parse_hostfile(read_text(hostfile, error=UserError, what="hostfile")) == [Host("node1", (0, 1))]
    hostfile.write_bytes(BOM + b"node1 slots=2\n")  # on the first host's own line
    assert parse_hostfile(read_text(hostfile, error=UserError, what="hostfile")) == [Host("node1", (0, 1))]
    env = tmp_path / ".ztune_env"
    env.write_bytes(BOM + b"NCCL_DEBUG=INFO\n")
    assert parse_env_file(read_text(env, error=UserError, what="env file"), source=str(env)) == \
        {"NCCL_DEBUG": "INFO"}
    ds = tmp_path / "ds.json"
    ds.write_bytes(BOM + json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}).encode())
    assert load(ds).zero.stage == 2
    hf = tmp_path / "config.json"
    hf.write_bytes(BOM + json.dumps({"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
                                     "max_position_embeddings": 128}).encode())
    assert load_model(str(hf)).num_layers == 2


@pytest.mark.parametrize("data", [b"\xef\xbb", b"\xff\xfe{}"])  # a cut BOM, UTF-16's
def test_other_leading_bytes_are_still_refused_as_not_utf8(tmp_path, data):
    path = tmp_path / "f.json"
    path.write_bytes(data)
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_text(path, error=UserError, what="config file")
