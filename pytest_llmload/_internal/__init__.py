"""pytest-llmload's implementation: private, no stable API (the public face is ``pytest_llmload``)."""
