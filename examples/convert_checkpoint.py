"""Convert TransNormerLLM checkpoints between the released Hugging Face layout and the plugin's fairseq format.

    python examples/convert_checkpoint.py released-to-plugin SRC_DIR OUT_DIR
        SRC_DIR: config.json + pytorch_model.bin | model.safetensors | shards with an *.index.json
        OUT_DIR: checkpoint.pt (fairseq format), dict.txt, released_config.json, tokenizer files.
        Use it with fairseq as the data dir:
            fairseq-eval-lm OUT_DIR --user-dir tnllm_plugin --path OUT_DIR/checkpoint.pt ...
        or without fairseq: tnllm_plugin.convert.load_model("OUT_DIR")

    python examples/convert_checkpoint.py plugin-to-released CKPT OUT_DIR [--safetensors] [--max-shard-size 2GB]
        CKPT: a checkpoint from released-to-plugin or from fairseq-train (e.g. checkpoints/checkpoint_best.pt)

Token ids are embedding rows in both formats (no permutation, logits unchanged); see tnllm_plugin/convert.py for
how fairseq's four special symbols line up with the released pad/bos/eos ids.
"""
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))     # the repository root

from tnllm_plugin.convert import main  # noqa: E402

if __name__ == "__main__":
    # importing fairseq (to write a complete cfg) is chatty: deprecation notices of its dependencies, hydra's logs
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="hydra")
    for name in ("hydra", "fairseq"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
