"""Planning: device maps, fit checks, training-memory estimates, validation."""
