"""`python -m tvm_flash`: the same as the `tvm-flash` command."""

import sys

from .cli import main

sys.exit(main())
