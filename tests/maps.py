"""Device maps the tests share (the examples keep their own copies: they are meant to be read alone)."""

# The built-in GPT-2 with its two middle blocks offloaded to disk, the rest on the CPU.
GPT2_CPU_DISK = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
    "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu",
}
