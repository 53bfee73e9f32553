"""Repository root conftest: the project's own tests and examples share the built-in checkpoint cache."""
