"""Energy of the lightning attention's forward+backward when it runs back to back, as the attention table times it
(replayed from a CUDA graph) and as training runs it: per version of triton_chunk.py (the current one, and any paths
given) and fla's chunk_simple_gla (g_gamma form) where fla is installed, at bf16, H=16, D=128, B = 32768 / N:

    ms per call, mJ per call (NVML's total-energy counter over ~1.5 s of replays), mean W, SM clock (median / min)

Where the mean power sits at the board's cap (700 W on an H200), the time per call is the energy per call over the
cap: less work, not shorter chains of waits, is what makes it faster.

    python benchmarks/lightning_energy.py 1024,8192,32768 [other_triton_chunk.py ...]
"""
import ctypes
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_plugin.model import alibi_slopes  # noqa: E402
# the versions, shapes and inputs of the kernel comparison, so that both scripts time the same calls
from compare_lightning_kernels import H, TOKENS, current, inputs, load  # noqa: E402

CALLS_PER_GRAPH = 20
SECONDS = 1.5


class Nvml:
    """The few NVML calls needed, through ctypes (no Python package): the GPU torch uses as device 0, by PCI bus id."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        p = torch.cuda.get_device_properties(0)
        self.bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByPciBusId_v2(self.bus.encode(), ctypes.byref(self.handle)) != 0:
            raise RuntimeError(f"NVML has no GPU at bus {self.bus}")

    def energy_mj(self) -> int:
        e = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(e)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return e.value

    def sm_clock_mhz(self) -> int:
        c = ctypes.c_uint()
        self.lib.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(c))     # 1: NVML_CLOCK_SM
        return c.value


def measure(nvml, fn):
    """(ms per call, mJ per call, mean W, sorted SM clocks) of fn replayed back to back from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    time.sleep(0.5)                 # let the previous run's power settle a little
    clocks, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            clocks.append(nvml.sm_clock_mhz())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    e0, t0 = nvml.energy_mj(), time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replays = 0
    while time.perf_counter() - t0 < SECONDS:
        for _ in range(10):
            graph.replay()
        replays += 10
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    e1, t1 = nvml.energy_mj(), time.perf_counter()
    stop.set()
    sampler.join()
    calls = replays * CALLS_PER_GRAPH
    return start.elapsed_time(end) / calls, (e1 - e0) / calls, (e1 - e0) / (t1 - t0) / 1e3, sorted(clocks)


def main():
    if len(sys.argv) < 2 or not all(n.isdigit() and int(n) > 0 for n in sys.argv[1].split(",")):
        sys.exit("usage: lightning_energy.py N[,N...] [other_triton_chunk.py ...]  (sequence lengths, e.g. 1024,8192)")
    if not torch.cuda.is_available():
        sys.exit("lightning_energy.py: needs a CUDA GPU (and NVML, libnvidia-ml.so.1)")
    ns = [int(n) for n in sys.argv[1].split(",")]
    versions = {"current": current.lightning_attention_triton}
    for i, path in enumerate(sys.argv[2:]):
        versions[os.path.splitext(os.path.basename(path))[0]] = load(path, i).lightning_attention_triton
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    nvml = Nvml()
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    print(f"{torch.cuda.get_device_name()} bus {nvml.bus}")
    print("| N | B | version | ms per fwd+bwd | mJ per fwd+bwd | mean W | SM MHz median / min |")
    print("|---|---|---|---|---|---|---|")
    for N in ns:
        B = TOKENS // N
        q, k, v, do = inputs(B, N, N)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fns = {name: (lambda f=f: torch.autograd.grad(f(*leaves, slopes, output_final_state=False)[0], leaves, do))
               for name, f in versions.items()}
        if chunk_simple_gla is not None:
            g_gamma = (-slopes).contiguous()
            fns["fla chunk_simple_gla"] = lambda: torch.autograd.grad(
                chunk_simple_gla(*leaves, g_gamma=g_gamma, scale=1.0)[0], leaves, do)
        for rnd in range(2):            # the first round warms every version up; the second is reported
            for name, fn in fns.items():
                ms, mj, watts, clocks = measure(nvml, fn)
                if rnd == 1:
                    print(f"| {N} | {B} | {name} | {ms:.3f} | {mj:.3f} | {watts:.0f} | "
                          f"{clocks[len(clocks) // 2]} / {clocks[0]} |", flush=True)


if __name__ == "__main__":
    main()
