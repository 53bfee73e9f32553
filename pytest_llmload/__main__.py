import sys

from pytest_llmload.cli import main

sys.exit(main())
