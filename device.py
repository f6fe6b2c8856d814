"""Where the arithmetic runs and in which precision, and on how many processes: shared by train.py,
judge.py, sample.py, evaluate.py and bench.py."""
import contextlib
import os
import time

import torch
import torch.distributed as dist

from data import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str) -> torch.device:
    """--device: auto takes a CUDA GPU, else Apple's MPS, else the CPU; a named device must exist."""
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; give auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch sees no CUDA GPU (a CPU build, or no driver)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not mps:
        raise UserError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: give auto, cpu, cuda, cuda:N or mps")
    return device


def set_threads(n: int = 0):
    """torch's CPU threads: n, or with 0 the cores shared among this machine's processes (torchrun
    starts LOCAL_WORLD_SIZE of them; one each would oversubscribe the cores)."""
    torch.set_num_threads(n or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def bf16_matmul_speedup(n: int = 256, repeats: int = 5) -> float:
    """How many times faster an n x n matmul runs in bfloat16 than in float32 on this CPU (best of
    `repeats`). Above 1 on CPUs with AVX512-BF16 or AMX; far below 1 elsewhere, where bf16 is emulated."""
    a = torch.randn(n, n)

    def best(x):
        times = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(a) / best(a.bfloat16())


def use_bf16(device, precision: str) -> bool:
    """Whether to train under bf16 autocast: 'fp32' never, 'bf16' always, 'auto' on CUDA GPUs that
    support it and on CPUs where a bf16 matmul measures at least 1.2x faster than float32. Measured,
    not assumed: on a CPU without bf16 instructions it is many times slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_may_have_bf16() and bf16_matmul_speedup() >= 1.2


def cpu_may_have_bf16() -> bool:
    """False when Linux says the CPU has no bf16 instructions (avx512_bf16, amx_bf16, Arm's bf16):
    then bf16 is emulated and slow, and timing it would only delay the start. True where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return "bf16" in f.read()
    except OSError:
        return True


def autocast(device, bf16: bool):
    """bf16 autocast when `bf16`, else full precision. The loss's read-out always runs in float32.
    Other devices (Apple's MPS) run in full precision: older torch has no autocast for them."""
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def setup_distributed(device_name: str):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    named = pick_device(device_name)  # a named device must exist
    if world == 1:
        return 0, 1, named
    use_cuda = named.type == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device("cpu")


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def check_in_sync(params, world):
    """Debugging aid: every process must hold the very same parameters after a step."""
    mine = torch.cat([p.detach().float().flatten().cpu() for p in params])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if not all(torch.equal(mine, other) for other in everyone):
        raise RuntimeError("processes hold different parameters")
