"""`python train.py [RECIPE] [key=value ...]` is `finetune train`; with no recipe it runs the demo."""

import sys

from finetune.cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "=" in args[0] or args[0].startswith("-") and args[0] != "--resume":
        sys.exit(main(["demo", *args]))
    sys.exit(main(["train", *args]))
