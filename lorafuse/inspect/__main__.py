"""`python -m lorafuse.inspect` (see cli.py)."""

import os
import sys

# The inspection compiles the kernels, which Triton's interpreter cannot: a TRITON_INTERPRET left in the
# environment (tests set it) must not reach lorafuse.kernels, which is first imported below this line.
os.environ.pop("TRITON_INTERPRET", None)

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
