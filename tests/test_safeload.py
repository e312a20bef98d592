"""Pickles are read for the globals they name, never unpickled, before any library loads them (harness.safeload)."""

import pickle

import pytest
import torch

from harness.errors import BadInput
from harness.safeload import ALLOWED, check_pickles, pickle_globals
from tests.helpers import plant


def test_what_torch_saves_for_a_model_and_an_optimizer_names_only_allowed_globals(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "state.bin")
    found = pickle_globals(tmp_path / "state.bin")
    assert found and set(found) <= ALLOWED
    check_pickles(tmp_path, "checkpoint")  # nothing raised


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", ".metadata", "model_states.pt"])
def test_a_planted_pickle_is_refused_naming_the_file_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "ran"
    (tmp_path / "ck").mkdir()
    plant(tmp_path / "ck" / name, marker)
    assert any(g in ("posix.system", "os.system", "nt.system") for g in pickle_globals(tmp_path / "ck" / name))
    with pytest.raises(BadInput, match=rf"checkpoint {tmp_path / 'ck'} cannot be loaded: {name} would run code when loaded"):
        check_pickles(tmp_path / "ck", "checkpoint")
    assert not marker.exists()


def test_a_global_built_from_anything_but_literals_is_refused_and_so_is_a_file_cut_short(tmp_path):
    # STACK_GLOBAL whose module name comes from the memo of a call's result, not from a literal string
    hostile = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"  # PROTO 4, FRAME
               b"\x8c\x08builtins\x94\x8c\x03str\x94\x93\x94)\x85\x94R\x94"  # str() -> memo
               b"h\x04\x8c\x06system\x94\x93\x94.")  # BINGET the result, 'system', STACK_GLOBAL
    assert None in pickle_globals_of(tmp_path, hostile)
    (tmp_path / "ck").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "ck" / "optimizer.bin")
    raw = (tmp_path / "ck" / "optimizer.bin").read_bytes()
    (tmp_path / "ck" / "optimizer.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInput, match="optimizer.bin is not a pickle harness can read"):
        check_pickles(tmp_path / "ck", "checkpoint")


def pickle_globals_of(tmp_path, data: bytes):
    (tmp_path / "p.pkl").write_bytes(data)
    return pickle_globals(tmp_path / "p.pkl")


def test_the_literal_names_of_stack_global_are_read_through_the_memo(tmp_path):
    data = pickle.dumps([torch.float32, torch.float32, torch.Size([2])], protocol=4)  # the second from the memo
    assert pickle_globals_of(tmp_path, data) == ["torch.float32", "torch.Size"]
