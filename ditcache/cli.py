"""The ``ditcache`` command (also ``python -m ditcache``): its arguments, one-line errors, and dispatch.

Only the standard library is imported here: ``--help`` and mistakes in the arguments answer at once,
and each command imports torch and diffusers when it runs. A mistake found later (a model that cannot
be loaded, a setting out of range, a download without a network) is raised as ``CommandError`` and
printed as one line, with exit status 2, instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

NAMED_METHODS = ("toca", "fora", "tome", "toca-taylor", "fora-taylor", "toca-reference", "fora-reference")
BENCH_DESCRIPTION = """\
Wall-clock time and FLOPs of uncached, FORA, ToCa and diffusers' own caches on one pipeline, side by side.

Random weights (speed does not depend on them). Methods run interleaved, after a warm-up run each; the
table shows the median time per pipeline call, the transformer's FLOPs counted by FlopCounterMode next to
the engine's own count, the efficiency (time speedup over FLOPs speedup) and the cache's memory.

  ditcache bench                                               # tiny DiT, offline
  ditcache bench --width xl --layers 4 --size 32               # DiT-XL/2 width, 256 tokens
  ditcache bench --model flux --width flux --size 32x64 --steps 50 --methods uncached toca:4:0.9:auto:auto
"""
METHOD_SPEC_HELP = (
    "uncached, fora:N[:schedule], toca:N:R[:score[:schedule]] (either with a trailing :order=K forecast), "
    "tome:R[:mlp], a caching method and ToMe joined by + (toca:4:0.9+tome:0.5), or diffusers' caches: "
    "fbc[:threshold], taylorseer[:interval[:order]], magcache[:threshold], pab[:block_skip_range]"
)


class CommandError(Exception):
    """What the command was given cannot be run (a missing model, a setting out of range, no network):
    printed as one line naming the problem, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed and the sweeps' results (int64) take


_device_help = "torch device (default: cuda when available, else cpu)"


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder of a supported diffusers pipeline (default: the offline reference FLUX model)")
    parser.add_argument("--prompt", nargs="+", help="one or more prompts (one image each); for DiT label names (ImageNet's, "
                        "or the reference DiT's digit names) or class indices (default with no --model: the ten digits)")
    parser.add_argument("--negative-prompt", help="negative prompt (pipelines with classifier-free guidance)")
    parser.add_argument("--guidance-scale", type=float, help="guidance scale (default: the pipeline's; FLUX's distilled guidance, "
                        "or true_cfg_scale for the reference model)")
    parser.add_argument("--method", metavar="NAME", help=f"caching method, a named preset: {', '.join(NAMED_METHODS)} "
                        "(default: the folder's saved ditcache_config.json, else toca, the model's preset)")
    parser.add_argument("--cache-interval", type=int, help="N: a full step every N steps (default: the model's preset)")
    parser.add_argument("--cache-ratio", type=float, help="R: fraction of tokens reused on partial steps (ToCa; default: preset)")
    parser.add_argument("--steps", type=_at_least(1), help="denoising steps (default: 28; 20 for the reference model; a video pipeline's own)")
    parser.add_argument("--height", type=_at_least(1), help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=_at_least(1), help="image width (default: the pipeline's)")
    parser.add_argument("--frames", type=_at_least(1), help="video pipelines (OpenSora): frames to generate (default: the pipeline's)")
    parser.add_argument("--seed", type=_at_least(0, MAX_SEED), default=0, help="seed of the generator (default: 0)")
    parser.add_argument("--out", default="ditcache.png", help="where to write the images: a labelled grid, one row (the uncached "
                        "row above with --compare); .png, .jpg or .webp; for a video, .gif or .mp4 (each frame: uncached above "
                        "cached with --compare; .mp4 needs `pip install 'ditcache[video]'`) or .png (the frames in a row)")
    parser.add_argument("--compare", action="store_true", help="also run uncached: both warmed up, then timed alternately "
                        "(--repeats times); prints median times, the time and FLOPs speedups and the PSNR")
    parser.add_argument("--repeats", type=_at_least(1), default=5, help="timed runs of each with --compare (default: 5)")
    parser.add_argument("--device", help=_device_help)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (loading and sampling)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .specs import SPECS  # data only: no torch

    families = [spec.family for spec in SPECS.values() if spec.tiny]
    parser.add_argument("--model", choices=families, default="dit", help="model family, built tiny with random weights (default: dit)")
    parser.add_argument("--width", default="tiny", help="tiny: 32 hidden, 2 heads; xl: 1152 hidden, 16 heads; flux: 3072, 24 heads")
    parser.add_argument("--layers", type=_at_least(1), default=2, help="blocks (FLUX: double-stream blocks)")
    parser.add_argument("--single-layers", type=_at_least(0), default=2, help="FLUX single-stream blocks")
    parser.add_argument("--size", default="16", help="latent HEIGHT[xWIDTH]; image tokens = (height / 2) * (width / 2)")
    parser.add_argument("--text-tokens", type=_at_least(1), default=128, help="text tokens (PixArt, FLUX, OpenSora: 300 as released)")
    parser.add_argument("--frames", type=_at_least(1), default=51, help="OpenSora: video frames (51 = 15 latent frames)")
    parser.add_argument("--steps", type=_at_least(1), default=20, help="denoising steps (default: 20)")
    parser.add_argument("--batch", type=_at_least(1), default=1, help="images per call (guidance doubles the transformer batch)")
    parser.add_argument("--methods", nargs="+", metavar="SPEC", help=f"methods to compare (uncached is always first): {METHOD_SPEC_HELP}")
    parser.add_argument("--repeats", type=_at_least(1), default=3, help="timed runs of each method (default: 3)")
    parser.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs of each method first (default: 1)")
    parser.add_argument("--device", help=_device_help)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks; count graph breaks and timed-run recompiles")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep configuration (YAML), see eval/configs/")
    parser.add_argument("--output", required=True, help="output folder; rerun the same command to resume")
    parser.add_argument("--allow-changed", action="store_true", help="go on in a folder made by a different configuration")
    parser.add_argument("--device", help=_device_help + "; under accelerate launch, each process's own")
    parser.add_argument("--steps", type=_at_least(1), help="the configuration's steps, overridden (one config, several step counts)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a released name (flux1-dev, sd3.5-large, pixart-sigma-xl-1024, "
                        "dit-xl-2-256, wan2.1-t2v-14b, wan2.1-t2v-1.3b, hunyuanvideo, cogvideox-5b, ltx-video), "
                        "a transformer's config.json, or a model folder (a pipeline's or a transformer's)")
    parser.add_argument("--height", type=_at_least(16), default=1024, help="image height in pixels (default: 1024)")
    parser.add_argument("--width", type=_at_least(16), default=1024, help="image width in pixels (default: 1024)")
    parser.add_argument("--frames", type=_at_least(1), default=81, help="video frames (video models; default: 81)")
    parser.add_argument("--batch", type=_at_least(1), default=1, help="images per call (default: 1)")
    parser.add_argument("--steps", type=_at_least(1), default=50, help="denoising steps (default: 50)")
    parser.add_argument("--text-tokens", type=_at_least(1), help="prompt tokens (default: the released pipeline's: "
                        "FLUX.1 and Wan 512, SD3 333, PixArt 300, HunyuanVideo 256, CogVideoX 226, LTX-Video 128)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--methods", nargs="+", metavar="SPEC", help="ditcache's methods to estimate (default: fora:4, "
                        "fora:4:order=1, toca:4:0.9:auto:auto, ditcache): " + METHOD_SPEC_HELP.split(", or diffusers")[0])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditcache", description="Token-wise caching for diffusers' Diffusion Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_arguments(commands.add_parser(
        "generate", help="generate images with caching, timed, optionally against uncached",
        description="Generate images (or a video) with caching; with --compare also uncached, timed alternately."))
    add_bench_arguments(commands.add_parser(
        "bench", help="speed and FLOPs of uncached, FORA, ToCa and diffusers' caches",
        description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_sweep_arguments(commands.add_parser(
        "sweep", help="run or resume an evaluation sweep from a YAML config",
        description="Run or resume an evaluation sweep: images, metrics, results.csv/json and plots."))
    add_memory_arguments(commands.add_parser(
        "memory", help="each method's cache memory at a model's size, before any run",
        description="Each method's cache memory at a model's size (a released name, a config.json or a model folder), "
        "estimated by a run without data: no weights are loaded. H is one hidden-state tensor of a call.\n\n"
        "  ditcache memory --model flux1-dev --height 1024 --width 1024\n"
        "  ditcache memory --model wan2.1-t2v-14b --height 720 --width 1280 --frames 81 --steps 50",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    evaluation = commands.add_parser("eval", help="the metrics' weights: what is here, and fetching them",
                                     description="check: list the metrics' weights and where they are (exit 1 when some are "
                                     "missing); fetch: download them on a machine that is online.")
    evaluation.add_argument("action", choices=["check", "fetch"], help="check: list without downloading; fetch: download")
    evaluation.add_argument("names", nargs="*", help="weights to fetch (default: all)")
    return parser


def resolve_device(device: str | None) -> str:
    """``device``, or cuda when available, else cpu; ``CommandError`` for a device torch does not know or
    that this machine does not have."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CommandError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CommandError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: MPS is not available here")
    return device


def steady_cpu_allocator(device: str) -> None:
    """For timings on the CPU under glibc: keep freed blocks below 256 MiB in the process instead of
    returning them to the system. Otherwise glibc's adaptive threshold serves some large tensors from
    fresh ``mmap`` pages, and the page faults time the allocator instead of the model: the same
    comparison measured 1.69x to 2.15x from one process to the next, and 2.02x to 2.06x with this.
    Only the ``ditcache`` command's own process is changed; elsewhere this does nothing."""
    import ctypes
    import ctypes.util
    import platform

    if device != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 256 * 2**20
    libc.mallopt(m_mmap_threshold, limit)
    libc.mallopt(m_trim_threshold, limit)


def hide_loading_bars() -> None:
    """Turn off diffusers' and transformers' loading progress bars (for ``--quiet``)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from ditcache.generate import generate

        generate(args)
    elif args.command == "bench":
        from ditcache.eval import speed

        speed.run(args)
    elif args.command == "memory":
        from ditcache import memory

        memory.run(args)
    elif args.command == "sweep":
        from ditcache.eval import sweep

        sweep.run_from_arguments(args)
    else:
        from ditcache.eval import weights

        return weights.main(args.action, args.names)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CommandError as error:
        print(f"ditcache {args.command}: error: {error}", file=sys.stderr)
        return 2
