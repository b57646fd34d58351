"""`python -m n2s_stream` is the same as the `n2s-stream` command."""

from __future__ import annotations

import sys

from n2s_stream.cli import main

sys.exit(main())
