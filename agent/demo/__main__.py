"""``python -m agent.demo``."""

import sys

from agent.demo.run import main

sys.exit(main())
