"""`python -m finetune.cli VERB ...`: the same as the `finetune` command."""

import sys

from finetune.cli.main import main

sys.exit(main())
