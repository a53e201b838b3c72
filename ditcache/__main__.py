"""The ``ditcache`` command (also ``python -m ditcache``).

An entry point, not part of the library: it dispatches to ``ditcache.pipelines`` and ``ditcache.eval``,
which the core itself never imports.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ditcache", description="Token-wise caching for diffusers' DiTs.")
    commands = parser.add_subparsers(dest="command", required=True)

    from ditcache.pipelines import cli

    cli.add_arguments(commands.add_parser("generate", help="generate images with caching, timed, optionally against uncached"))
    commands.add_parser("bench", help="speed and FLOPs of uncached, FORA and ToCa (see --help)", add_help=False)
    from ditcache.eval import sweep

    sweep.add_arguments(commands.add_parser("sweep", help="run or resume an evaluation sweep from a YAML config"))
    evaluation = commands.add_parser("eval", help="the metrics' weights: what is here, and fetching them")
    evaluation.add_argument("action", choices=["check", "fetch"], help="check: list without downloading; fetch: download")
    evaluation.add_argument("names", nargs="*", help="weights to fetch (default: all)")

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from ditcache.eval import speed

        speed.main(rest)
        return
    parser.parse_args(argv)  # reject unknown options
    if args.command == "sweep":
        sweep.run_from_arguments(args)
    elif args.command == "eval":
        from ditcache.eval import weights

        weights.main(args.action, args.names)
    else:
        cli.generate(args)


if __name__ == "__main__":
    main()
