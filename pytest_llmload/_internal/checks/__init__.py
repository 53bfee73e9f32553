"""The checks behind :mod:`pytest_llmload.assertions`, one private module per domain."""
