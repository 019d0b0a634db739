"""`python -m cli ...`: the `pod` command."""

import sys

from cli.main import main

sys.exit(main())
