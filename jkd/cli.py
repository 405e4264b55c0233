"""The ``jkd`` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jkd", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="distil a small MLP on the embedded MNIST sample (no network)")
    demo.add_argument("--epochs", type=int, default=40, help="student epochs (teacher: half)")
    demo.add_argument("--seeds", type=int, default=3, help="students per setting, in one vmap")
    demo.add_argument("--temperature", type=float, default=8.0, help="soft KD temperature T > 0")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1 or args.seeds < 1 or args.temperature <= 0:
            parser.error("--epochs and --seeds must be >= 1 and --temperature > 0")
        from jkd import quickdemo

        quickdemo.main(epochs=args.epochs, seeds=args.seeds, temperature=args.temperature)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
