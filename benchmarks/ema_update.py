"""Cost of one EMA update step: phema against its peers, side by side in one process.

What is measured, per device (the CPU, and CUDA when available):

* **Throughput** on a ~43M-parameter fp32 model in ~300 tensors (a token
  embedding, 6 transformer-like blocks of width 640 with a 4x MLP, 28 residual
  conv blocks of 64..160 channels with GroupNorm, a head; no buffers). Cases:
  ``phema.PowerFunctionEMA`` with two profiles (stds 0.05, 0.10), ema-pytorch's
  ``PostHocEMA`` with the same two profiles, timm's ``ModelEmaV3`` (one profile,
  ``foreach=True``), ``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn`` (one profile), a bare ``torch._foreach_lerp_`` (one
  profile), a naive per-parameter ``lerp_`` loop over two profiles, phema over a
  bf16 copy of the model (fp32 shadows), and two references that move as many
  bytes as phema's fused two-profile update must: a "copy bound", one flat
  ``dst.copy_(src)``, and a stricter "stream bound", one flat in-place
  ``a.lerp_(b, w)`` (on CPUs a copy also reads every target line before writing
  it, so it moves ~1.5x its logical bytes and makes a lenient bound). For each case: median/min/max ms per update, the bytes the update must
  move logically (12 B/param for one fp32 profile, 24 B/param for two profiles
  updated separately, ``(2K+1)*4`` = 20 B/param for phema's fused update,
  ``2K*4+2`` = 18 B/param for phema over bf16 parameters), the achieved GB/s,
  and ``ratio_to_copy_bound``: the case's time over the time a plain copy needs
  to move the same bytes at the copy speed measured in the same run (and
  ``ratio_to_stream_bound``, the same against the in-place stream).
* **Fixed overhead**: the same ~300-tensor structure shrunk to ~0.1M parameters,
  where the time per update is almost all per-call and per-tensor overhead
  (microseconds per update).

Every update does real work: each EMA is updated once before timing (the first
call of phema, PostHocEMA and AveragedModel copies the weights), then the model
is perturbed once so that model and shadows differ, and every peer is configured
to do a real EMA step on every call (PostHocEMA: ``update_every=1`` and a
checkpoint interval far beyond the run, its folder in a temporary directory;
timm: ``update_after_step=0`` and steps past the warm-up). The cases are
interleaved over several rounds (the order rotates each round), each round runs
one untimed and ``--repeats`` timed calls per case, and the figures are the
median/min/max over all timed calls.

Output: JSON lines on stdout only, one per figure, ending with a summary line
that sets phema's figures against its targets.

Run::

    python3 benchmarks/ema_update.py            # full run, a few minutes on 2 cores
    python3 benchmarks/ema_update.py --quick    # ~2M parameters, a smoke run of seconds
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _common import device_name, emit, sig, summarize, time_call
from torch import Tensor, nn

import phema

BENCH = "ema_update"
STDS = (0.05, 0.10)
DECAY = 0.9999
#: Start of the training-time counter: weights of the power profiles are then those
#: of a run some way in, not of its first steps.
T0 = 10_000

TARGET_RATIO_TO_COPY_BOUND = 1.25
TARGET_SPEEDUP_VS_POSTHOCEMA = 1.3
TARGET_OVERHEAD_MS = 0.3


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the synthetic model: sizes only, the structure is fixed."""

    width: int  # transformer width d
    vocab: int  # rows of the token embedding
    blocks: int  # transformer-like blocks
    conv_channels: tuple[int, ...]  # output channels of each conv block
    head: int  # outputs of the final linear head


#: ~42.7M parameters in 309 tensors.
FULL = ModelSpec(640, 8192, 6, (64,) * 10 + (128,) * 10 + (160,) * 8, 1000)
#: ~2M parameters, same 309 tensors.
QUICK = ModelSpec(128, 2048, 6, (16,) * 10 + (32,) * 10 + (48,) * 8, 256)
#: ~0.1M parameters in 307 tensors: the fixed per-call cost dominates.
TINY = ModelSpec(16, 256, 6, (8,) * 14 + (16,) * 14, 16)


class _TransformerBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None


class BenchModel(nn.Module):
    """A parameter container shaped like a small hybrid network (never run forward)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.width
        self.embed = nn.Embedding(spec.vocab, d)
        self.blocks = nn.ModuleList(_TransformerBlock(d) for _ in range(spec.blocks))
        self.norm = nn.LayerNorm(d)
        self.stem = nn.Conv2d(3, spec.conv_channels[0], 3, padding=1)
        convs, c_in = [], spec.conv_channels[0]
        for c_out in spec.conv_channels:
            convs.append(_ConvBlock(c_in, c_out))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.conv_norm = nn.GroupNorm(8, c_in)
        self.head = nn.Linear(d, spec.head)


def build_model(spec: ModelSpec, device: torch.device, seed: int = 0) -> nn.Module:
    """The synthetic fp32 model on ``device``, deterministic for a seed."""
    torch.manual_seed(seed)
    model = BenchModel(spec).to(device)
    model.requires_grad_(False)
    assert not list(model.buffers()), "the benchmark model must have no buffers"
    return model


def numel(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 1e-3) -> None:
    """Move every parameter by a small random step (stands for one optimizer step)."""
    for p in model.parameters():
        p.add_(torch.randn_like(p), alpha=scale)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One way of doing the EMA update: a name, the call to time and its logical traffic."""

    name: str
    profiles: int
    bytes_per_param: float  # logical bytes one update must move per model parameter
    step: Callable[[], object]
    probe: Callable[[], Tensor] | None = None  # a shadow that every real update changes
    extra: dict[str, Any] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)


@dataclass
class Skipped:
    """A peer that could not be set up, and why."""

    name: str
    reason: str


def _peer_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def phema_case(model: nn.Module, name: str = "phema", bytes_per_param: float | None = None) -> Case:
    """phema's fused update of all profiles in one pass."""
    ema = phema.PowerFunctionEMA(model, stds=STDS)
    clock = [float(T0)]

    def step() -> None:
        clock[0] += 1.0
        ema.update(clock[0])

    step()  # the first update copies the weights: keep it out of the timings
    last = ema.names[-1]
    per_param = (2 * len(STDS) + 1) * 4 if bytes_per_param is None else bytes_per_param
    return Case(
        name,
        len(STDS),
        per_param,
        step,
        probe=lambda: ema.profile(STDS[0])[last],
        extra={"peer": "phema", "peer_version": _peer_version("torch-phema")},
    )


def posthocema_case(model: nn.Module, folder: str) -> Case | Skipped:
    """ema-pytorch's ``PostHocEMA``: one ``KarrasEMA`` per profile, each its own loop."""
    try:
        from ema_pytorch import PostHocEMA
    except ImportError as e:
        return Skipped("posthocema", f"ema_pytorch cannot be imported: {e}")
    ema = PostHocEMA(
        model,
        sigma_rels=STDS,
        update_every=1,
        checkpoint_every_num_steps=10**9,
        checkpoint_folder=folder,
    )
    ema.update()  # first call copies the weights (KarrasEMA's init path)
    shadow = list(ema.ema_models[0].ema_model.parameters())[-1]
    return Case(
        "posthocema",
        len(STDS),
        3 * 4 * len(STDS),
        ema.update,
        probe=lambda: shadow.detach().clone(),
        extra={"peer": "ema-pytorch PostHocEMA", "peer_version": _peer_version("ema-pytorch")},
    )


def load_timm_model_ema() -> ModuleType | str:
    """timm's ``utils/model_ema.py`` loaded from its file, without importing ``timm``.

    ``import timm`` pulls in torchvision, which may be broken or absent; the EMA
    module itself only needs torch. Returns the module, or the reason it failed.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return "timm is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_timm_utils_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        return f"cannot load {path}"
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:  # anything at import time means: not measurable here
        return f"loading {path} failed: {type(e).__name__}: {e}"
    if not hasattr(module, "ModelEmaV3"):
        return f"{path} has no ModelEmaV3"
    return module


def timm_case(model: nn.Module) -> Case | Skipped:
    """timm's ``ModelEmaV3`` (one profile, ``foreach=True``)."""
    loaded = load_timm_model_ema()
    if isinstance(loaded, str):
        return Skipped("timm_modelemav3", loaded)
    ema = loaded.ModelEmaV3(model, decay=DECAY, update_after_step=0, foreach=True)
    counter = [T0]

    def step() -> None:
        counter[0] += 1
        ema.update(model, counter[0])

    step()
    shadow = list(ema.module.parameters())[-1]
    return Case(
        "timm_modelemav3",
        1,
        12,
        step,
        probe=lambda: shadow.detach().clone(),
        extra={"peer": "timm ModelEmaV3", "peer_version": _peer_version("timm")},
    )


def averaged_model_case(model: nn.Module) -> Case:
    """``torch.optim.swa_utils.AveragedModel`` with the multi-tensor EMA function."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))

    def step() -> None:
        avg.update_parameters(model)

    step()  # n_averaged == 0: copies the weights
    shadow = list(avg.module.parameters())[-1]
    return Case(
        "averagedmodel",
        1,
        12,
        step,
        probe=lambda: shadow.detach().clone(),
        extra={"peer": "torch AveragedModel", "peer_version": torch.__version__},
    )


def foreach_case(model: nn.Module) -> Case:
    """A bare ``torch._foreach_lerp_`` over all parameters, one profile."""
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]

    def step() -> None:
        torch._foreach_lerp_(shadows, params, 1.0 - DECAY)

    return Case(
        "foreach_lerp",
        1,
        12,
        step,
        probe=lambda: shadows[-1].clone(),
        extra={"peer": "torch._foreach_lerp_"},
    )


def naive_case(model: nn.Module) -> Case:
    """A per-parameter ``lerp_`` loop, one pass per profile (power-function weights)."""
    params = [p.detach() for p in model.parameters()]
    gammas = [float(g) for g in phema.sigma_rel_to_gamma(list(STDS))]
    shadows = [[p.clone() for p in params] for _ in gammas]
    clock = [float(T0)]

    def step() -> None:
        t_prev, clock[0] = clock[0], clock[0] + 1.0
        for gamma, profile in zip(gammas, shadows, strict=True):
            w = phema.power_weight(gamma, t_prev, clock[0])
            for s, p in zip(profile, params, strict=True):
                s.lerp_(p, w)

    return Case(
        "naive_lerp_loop",
        len(gammas),
        3 * 4 * len(gammas),
        step,
        probe=lambda: shadows[0][-1].clone(),
        extra={"peer": "per-parameter Tensor.lerp_"},
    )


def copy_case(params: int, device: torch.device) -> Case:
    """One flat copy moving as many bytes as phema's fused K-profile update must."""
    update_bytes = (2 * len(STDS) + 1) * 4 * params
    n = update_bytes // 2 // 4  # a copy moves 2x its size: read the source, write the target
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def step() -> None:
        dst.copy_(src)

    step()
    # Logical bytes per *model parameter*, so that bytes = bytes_per_param * params.
    return Case("copy_bound", 0, 2 * 4 * n / params, step, extra={"elements": n})


def stream_case(params: int, device: torch.device) -> Case:
    """One flat in-place ``lerp_`` moving as many bytes as phema's fused update must.

    A stricter reference than the copy on CPUs: an in-place update reads the lines
    it writes anyway, while a copy's stores to a fresh target also read each line
    first (write-allocate), so a copy moves ~1.5x its logical bytes.
    """
    update_bytes = (2 * len(STDS) + 1) * 4 * params
    n = update_bytes // 3 // 4  # read target + read source + write target
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)

    def step() -> None:
        a.lerp_(b, 1.0 - DECAY)

    step()
    return Case("stream_bound", 0, 3 * 4 * n / params, step, extra={"elements": n})


# --------------------------------------------------------------------------- running


def check_real_work(cases: list[Case]) -> None:
    """Fail loudly if an update leaves its probed shadow unchanged (no real EMA step)."""
    for case in cases:
        if case.probe is None:
            continue
        before = case.probe().clone()
        case.step()
        if torch.equal(before, case.probe()):
            raise RuntimeError(f"case {case.name!r}: an update did not change the EMA state")


def run_interleaved(cases: list[Case], rounds: int, repeats: int, device: torch.device) -> None:
    """Time every case ``repeats`` times per round over ``rounds`` rounds, rotating the order."""
    for r in range(rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.step()  # untimed: settles caches / allocator after the previous case
            case.samples.extend(time_call(case.step, device) for _ in range(repeats))


def throughput_section(
    spec: ModelSpec, device: torch.device, rounds: int, repeats: int, tmp: str
) -> dict[str, float | None]:
    """Big-model section: ms per update, GB/s and ratio to the copy bound for every case."""
    model = build_model(spec, device)
    params, tensors = numel(model), len(list(model.parameters()))
    emit(
        BENCH,
        "model",
        device,
        params=params,
        tensors=tensors,
        buffers=len(list(model.buffers())),
        dtype="float32",
        device_name=device_name(device),
    )
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

    built: list[Case | Skipped] = [
        phema_case(model),
        posthocema_case(model, tmp),
        timm_case(model),
        averaged_model_case(model),
        foreach_case(model),
        naive_case(model),
        phema_case(model_bf16, "phema_bf16_params", 2 * len(STDS) * 4 + 2),
        copy_case(params, device),
        stream_case(params, device),
    ]
    for item in built:
        if isinstance(item, Skipped):
            emit(BENCH, item.name, device, section="throughput", skipped=item.reason)
    cases = [c for c in built if isinstance(c, Case)]
    perturb(model)
    perturb(model_bf16, scale=1e-2)  # bf16 resolution: a visible step
    check_real_work(cases)
    run_interleaved(cases, rounds, repeats, device)

    by_name = {c.name: c for c in cases}
    copy_bound = by_name["copy_bound"]
    copy_stats = summarize(copy_bound.samples)
    copy_bytes = copy_bound.bytes_per_param * params
    copy_bytes_per_ms = copy_bytes / copy_stats["ms_median"]
    stream = by_name["stream_bound"]
    stream_bytes_per_ms = stream.bytes_per_param * params / summarize(stream.samples)["ms_median"]
    medians: dict[str, float] = {}
    for case in cases:
        stats = summarize(case.samples)
        medians[case.name] = stats["ms_median"]
        nbytes = case.bytes_per_param * params
        emit(
            BENCH,
            case.name,
            device,
            section="throughput",
            profiles=case.profiles,
            params=params,
            tensors=tensors,
            param_dtype="bfloat16" if "bf16" in case.name else "float32",
            **stats,
            bytes=int(nbytes),
            bytes_per_param=sig(case.bytes_per_param),
            gb_per_s=sig(nbytes / stats["ms_median"] / 1e6),
            ratio_to_copy_bound=sig(stats["ms_median"] / (nbytes / copy_bytes_per_ms), 4),
            ratio_to_stream_bound=sig(stats["ms_median"] / (nbytes / stream_bytes_per_ms), 4),
            **case.extra,
        )
    phema_ms = medians["phema"]
    phema_bytes = by_name["phema"].bytes_per_param * params
    phema_ratio = phema_ms / (phema_bytes / copy_bytes_per_ms)
    phema_stream_ratio = phema_ms / (phema_bytes / stream_bytes_per_ms)
    speedup = medians["posthocema"] / phema_ms if "posthocema" in medians else None
    if speedup is not None:
        emit(
            BENCH,
            "phema_speedup",
            device,
            section="throughput",
            vs_posthocema=sig(speedup, 4),
            vs_naive_lerp_loop=sig(medians["naive_lerp_loop"] / phema_ms, 4),
        )
    return {"ratio": phema_ratio, "stream_ratio": phema_stream_ratio, "speedup": speedup}


def overhead_section(
    spec: ModelSpec, device: torch.device, rounds: int, repeats: int, tmp: str
) -> float:
    """Tiny-model section: microseconds per update, where per-call overhead dominates."""
    model = build_model(spec, device, seed=1)
    params, tensors = numel(model), len(list(model.parameters()))
    built: list[Case | Skipped] = [
        phema_case(model),
        foreach_case(model),
        naive_case(model),
        posthocema_case(model, tmp),
        timm_case(model),
        averaged_model_case(model),
    ]
    for item in built:
        if isinstance(item, Skipped):
            emit(BENCH, f"overhead_{item.name}", device, section="overhead", skipped=item.reason)
    cases = [c for c in built if isinstance(c, Case)]
    perturb(model)
    check_real_work(cases)
    run_interleaved(cases, rounds, repeats, device)
    phema_us = 0.0
    for case in cases:
        stats = summarize(case.samples, "us")
        if case.name == "phema":
            phema_us = stats["us_median"]
        emit(
            BENCH,
            f"overhead_{case.name}",
            device,
            section="overhead",
            profiles=case.profiles,
            params=params,
            tensors=tensors,
            **stats,
            us_per_tensor=sig(stats["us_median"] / tensors, 4),
            **case.extra,
        )
    return phema_us / 1e3


def run_device(device: torch.device, args: argparse.Namespace) -> None:
    """Both sections and the summary line on one device."""
    spec = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="phema-bench-") as tmp:
        big = throughput_section(spec, device, args.rounds, args.repeats, tmp + "/big")
        overhead_ms = overhead_section(
            TINY, device, args.rounds, args.overhead_repeats, tmp + "/tiny"
        )
    ratio, speedup = big["ratio"], big["speedup"]
    emit(
        BENCH,
        "summary",
        device,
        quick=args.quick,
        phema_ratio_to_copy_bound=sig(ratio, 4) if ratio is not None else None,
        target_ratio_to_copy_bound=TARGET_RATIO_TO_COPY_BOUND,
        phema_ratio_to_stream_bound=sig(big["stream_ratio"], 4)
        if big["stream_ratio"] is not None
        else None,
        phema_speedup_vs_posthocema=sig(speedup, 4) if speedup is not None else None,
        target_speedup=TARGET_SPEEDUP_VS_POSTHOCEMA,
        phema_overhead_ms=sig(overhead_ms, 4),
        target_overhead_ms=TARGET_OVERHEAD_MS,
        meets_ratio=ratio is not None and ratio <= TARGET_RATIO_TO_COPY_BOUND,
        meets_speedup=speedup is not None and speedup >= TARGET_SPEEDUP_VS_POSTHOCEMA,
        meets_overhead=overhead_ms <= TARGET_OVERHEAD_MS,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="~2M-parameter model, few samples")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case per round (default 8)"
    )
    p.add_argument(
        "--overhead-repeats",
        type=int,
        default=None,
        help="timed calls per case per round in the fixed-overhead section (default 40)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU, then CUDA when available",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    quick_defaults = {"rounds": 2, "repeats": 3, "overhead_repeats": 10}
    full_defaults = {"rounds": 10, "repeats": 8, "overhead_repeats": 40}
    for key, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.rounds, args.repeats, args.overhead_repeats) < 1:
        p.error("--rounds, --repeats and --overhead-repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark on the selected devices and print JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    devices = {
        "auto": ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
        "cpu": ["cpu"],
        "cuda": ["cuda"],
    }[args.device]
    for name in devices:
        run_device(torch.device(name), args)


if __name__ == "__main__":
    main()
