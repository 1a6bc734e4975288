"""Host memory and time for one rank to build its shards of a preset (CPU, no GPU needed).

    --parallel tensor (``--model-parallel-size N``): ``build_tensor_parallel`` makes the model's structure on the
        meta device, then this rank's blocks of each parameter's initial value (tiles drawn alone): the peak
        should be the shard plus about one parameter's slice.
    --parallel fsdp (``--ddp-backend fully_sharded``): fairseq's ``build_model`` inside fairseq's FSDP wrap
        context, then the outer wrap, as fairseq-train does: the model is made one block at a time and each
        block sharded before the next exists, so the peak should be the shards plus one block, the embedding
        and the LM head.
Building needs no communication, so one rank alone measures what each rank of an N-way group does; this script
runs rank 0 in one process (fairscale told the group has N ranks; for FSDP, fairseq's stand-in group of size N).

    python benchmarks/sharded_build.py 7b 8                     # tensor parallel, size 8
    python benchmarks/sharded_build.py 7b 8 --parallel fsdp     # FSDP over 8 ranks
"""
import argparse
import resource
import tempfile
import time
from argparse import Namespace

import torch
import torch.distributed as dist


def build_tensor_parallel_rank(cfg, size):
    import fairscale.nn.model_parallel.layers as fairscale_layers
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.parallel import build_tensor_parallel

    if cfg.norm != "srms":      # ParallelOutNorm's weights would need the real group's size
        raise SystemExit("this one-process measurement supports the presets' parameter-free SRMSNorm only")
    mpu.initialize_model_parallel(1)
    for module in (mpu, fairscale_layers):      # rank 0 of an N-way group, as the layers and the slicing see it
        module.get_model_parallel_world_size = lambda: size
        module.get_model_parallel_rank = lambda: 0
    return lambda: build_tensor_parallel(cfg)


def build_fsdp_rank(preset, cfg, size):
    from fairscale.nn import enable_wrap
    from fairseq.data import Dictionary
    from fairseq.distributed import fsdp_wrap
    from fairseq.distributed.fully_sharded_data_parallel import DummyProcessGroup, FullyShardedDataParallel
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from tnllm_plugin.fairseq_adapter import TransNormerLanguageModel

    dictionary = Dictionary()
    for i in range(cfg.vocab_size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    args = Namespace(arch=f"transnormer_llm_{preset}", checkpoint_activations=True)
    ARCH_CONFIG_REGISTRY[args.arch](args)

    def build():
        with enable_wrap(wrapper_cls=FullyShardedDataParallel, process_group=DummyProcessGroup(rank=0, size=size),
                         flatten_parameters=True):
            return fsdp_wrap(TransNormerLanguageModel.build_model(args, Namespace(target_dictionary=dictionary)))
    return build


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", help="tiny, 385m, 1b, 3b, 7b, 13b, 65b or 175b")
    ap.add_argument("size", type=int, help="number of ranks sharing the model")
    ap.add_argument("--parallel", choices=("tensor", "fsdp"), default="tensor")
    args = ap.parse_args()

    from tnllm_plugin.model import TransNormerLLM
    from tnllm_plugin.presets import preset_config

    cfg = preset_config(args.preset)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/init", rank=0, world_size=1)
    build = (build_tensor_parallel_rank(cfg, args.size) if args.parallel == "tensor"
             else build_fsdp_rank(args.preset, cfg, args.size))
    with torch.device("meta"):
        TransNormerLLM(preset_config("tiny"))   # the first meta model loads ~150 MB of torch once: not counted
        model = TransNormerLLM(cfg)
    full_gb = sum(p.numel() for p in model.parameters()) * 4 / 1e9
    largest_gb = max(p.numel() for p in model.parameters()) * 4 / 1e9
    block_gb = sum(p.numel() for p in model.layers[0].parameters()) * 4 / 1e9
    del model
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6     # Linux: KiB -> GB
    t0 = time.perf_counter()
    model = build()
    seconds = time.perf_counter() - t0
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 - before
    shard_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"| {args.parallel} | {args.preset} | {args.size} | {full_gb:.1f} | {shard_gb:.2f} | {largest_gb:.2f} | "
          f"{block_gb:.2f} | {grew:.2f} | {seconds:.0f} s ({torch.get_num_threads()} threads) |")


if __name__ == "__main__":
    main()
