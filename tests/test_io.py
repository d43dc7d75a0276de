"""Atomic writes, overwrite refusal, and weights loading that never unpickles arbitrary objects."""

import collections
import os
import re

import pytest
import torch

from sepconv.io import atomic_write, atomic_write_text, check_output, load_state_dict, save_state_dict


def test_atomic_write_refuses_to_overwrite_unless_asked(tmp_path) -> None:
    path = tmp_path / "out.txt"
    atomic_write_text(path, "first")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        atomic_write_text(path, "second")
    assert path.read_text() == "first"
    atomic_write_text(path, "second", overwrite=True)
    assert path.read_text() == "second"


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken, overwrite=True)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_safetensors_and_torch_round_trips(tmp_path) -> None:
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_state_dict(state, tmp_path / "w.safetensors")
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"state_dict": collections.OrderedDict(state)}, tmp_path / "ckpt.pt")
    assert torch.equal(load_state_dict(tmp_path / "ckpt.pt")["a.weight"], state["a.weight"])


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_full_pickles_are_refused(tmp_path, capsys) -> None:
    torch.save({"w": torch.ones(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="full pickles are never loaded"):
        load_state_dict(tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out


def test_missing_or_wrong_content(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_state_dict(tmp_path / "list.pt")


def test_written_files_get_the_usual_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_state_dict({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_write_png_writes_a_png_refuses_to_overwrite_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    path = tmp_path / "plot.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_write_png(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    fig2, _ = plt.subplots()
    with pytest.raises(FileExistsError):
        atomic_write_png(fig2, path)
    assert not plt.fignum_exists(fig2.number) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temp file left behind


def test_a_corrupt_safetensors_file_is_a_value_error_naming_it(tmp_path) -> None:
    garbage = tmp_path / "c.safetensors"
    garbage.write_bytes(b"garbage")
    truncated = tmp_path / "t.safetensors"
    save_state_dict({"w": torch.randn(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-16])  # the header promises more bytes than there are
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=re.escape(f"cannot read {path} as a safetensors file: ")):
            load_state_dict(path)


def test_a_directory_is_refused_before_anything_is_written(tmp_path) -> None:
    folder = tmp_path / "out.txt"
    folder.mkdir()
    (folder / "kept").write_text("inside")
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match=r"out\.txt is a directory; give a file path"):
            check_output(folder, overwrite=overwrite)
        with pytest.raises(IsADirectoryError, match="is a directory"):
            atomic_write_text(folder, "text", overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["out.txt"] and os.listdir(folder) == ["kept"]  # no temp file left
    assert check_output(tmp_path / "new.txt") == tmp_path / "new.txt"
