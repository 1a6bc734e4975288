"""Host memory and time for one tensor-parallel rank to build its shard of a preset (CPU, no GPU needed).

`build_tensor_parallel` makes the model's structure on the meta device, then each parameter's full initial
value in turn, keeping this rank's slice: the peak should be the shard plus about the largest parameter, not
the whole model. Building needs no communication, so one rank alone measures what each rank of an N-way group
does; this script runs that one rank in one process (fairscale told the group has N ranks, this one rank 0).

    python benchmarks/tensor_parallel_build.py 7b 8        # preset, model-parallel size
"""
import argparse
import resource
import tempfile
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", help="tiny, 385m, 1b, 3b, 7b, 13b, 65b or 175b")
    ap.add_argument("size", type=int, help="model-parallel size")
    args = ap.parse_args()

    import fairscale.nn.model_parallel.layers as fairscale_layers
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.model import TransNormerLLM
    from tnllm_plugin.parallel import build_tensor_parallel
    from tnllm_plugin.presets import preset_config

    cfg = preset_config(args.preset)
    if cfg.norm != "srms":      # ParallelOutNorm's weights would need the real group's size
        raise SystemExit("this one-process measurement supports the presets' parameter-free SRMSNorm only")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/init", rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    for module in (mpu, fairscale_layers):      # rank 0 of an N-way group, as the layers and the slicing see it
        module.get_model_parallel_world_size = lambda: args.size
        module.get_model_parallel_rank = lambda: 0

    with torch.device("meta"):
        TransNormerLLM(preset_config("tiny"))   # the first meta model loads ~150 MB of torch once: not counted
        params = list(TransNormerLLM(cfg).parameters())
    full_gb = sum(p.numel() for p in params) * 4 / 1e9
    largest_gb = max(p.numel() for p in params) * 4 / 1e9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6     # Linux: KiB -> GB
    t0 = time.perf_counter()
    model = build_tensor_parallel(cfg)
    seconds = time.perf_counter() - t0
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 - before
    shard_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"| {args.preset} | {args.size} | {full_gb:.1f} | {shard_gb:.2f} | {largest_gb:.2f} | {grew:.2f} | "
          f"{seconds:.0f} s ({torch.get_num_threads()} threads) |")


if __name__ == "__main__":
    main()
