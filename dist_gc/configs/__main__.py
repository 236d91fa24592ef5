"""``python -m dist_gc.configs list | path NAME | export DIR`` (see :mod:`dist_gc.configs`)."""

from __future__ import annotations

import argparse

from . import export, names, path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dist_gc.configs", description="The example configs shipped with dist_gc.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every shipped config")
    sp = sub.add_parser("path", help="absolute path of a shipped config")
    sp.add_argument("name")
    sp = sub.add_parser("export", help="copy them to DIR (accelerate YAMLs then point at DIR's DeepSpeed JSONs)")
    sp.add_argument("dir")
    args = p.parse_args(argv)
    if args.command == "list":
        print("\n".join(names()))
    elif args.command == "path":
        try:
            print(path(args.name))
        except FileNotFoundError as exc:
            p.error(str(exc))
    else:
        for written in export(args.dir):
            print(written)


if __name__ == "__main__":
    main()
