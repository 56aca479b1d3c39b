"""`python -m segops.models NAME --size H W`: print the model's summary (see complexity.py);
`python -m segops.models --list` lists the models and backbones."""
from __future__ import annotations

import argparse

from segops.models import backbones, list_models
from segops.models.complexity import summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segops.models", description=__doc__)
    parser.add_argument("name", nargs="?", help="a model or backbone name")
    parser.add_argument("--size", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--list", action="store_true", help="list models and backbones")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        print("models:", " ".join(list_models()))
        print("backbones:", " ".join(backbones.list_backbones()))
        return
    print(summary(args.name, tuple(args.size), args.num_classes))


if __name__ == "__main__":
    main()
