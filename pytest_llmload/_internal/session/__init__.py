"""The pytest session's objects: matrix, gating, runners, report, baseline, limits."""
