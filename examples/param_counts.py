"""Print every preset's non-embedding parameter count next to the paper's Table 10 figure.

    python examples/param_counts.py
"""
from tnllm_plugin.presets import PRESETS, TABLE10_NON_EMBEDDING, non_embedding_parameters, preset_config


def main():
    print("| preset | layers | d_model | heads | glu_dim | non-embedding params (ours) | Table 10 | ours / paper "
          "| (paper - ours) / d_model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in PRESETS:
        cfg = preset_config(name, vocab_size=64000)
        ours = non_embedding_parameters(cfg)
        paper = TABLE10_NON_EMBEDDING.get(name)
        ratio = f"{ours / paper:.3f}" if paper else "-"
        paper_s = f"{paper:,}" if paper else "-"
        # the gap is ~50.3k x d_model at every size: one vocab x d_model matrix of a ~50k vocabulary
        per_d = f"{(paper - ours) / cfg.d_model:,.0f}" if paper else "-"
        print(f"| {name} | {cfg.n_layers} | {cfg.d_model} | {cfg.n_heads} | {cfg.glu_dim} | {ours:,} | {paper_s} "
              f"| {ratio} | {per_d} |")


if __name__ == "__main__":
    main()
