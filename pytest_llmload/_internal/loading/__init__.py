"""The load call: files, precision, cache, built-ins, safety, ownership."""
