"""One module per stage, each owning its task and its driver (build -> train -> evaluate ->
export); `proalign.train.train` is the one loop they share.

    cache    build_caches     encode captions once (LLM embedder, CLIP text teacher)
    teacher  run_teacher      pre-train the demo's small English CLIP
    stage1   run_stage1       distil CLIP's text space into LLM embedder + adapter
    stage2   run_stage2       align image tower + adapter (InfoNCE + EMA self-distillation)
    coop     run_coop         few-shot CoOp context on the embedder
"""
