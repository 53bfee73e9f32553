"""Print the versions a CI job runs on (README's "Tested with" table is made from these lines)."""

import importlib.metadata
import sys

NAMES = ["torch", "transformers", "accelerate", "bitsandbytes", "peft", "kernels", "huggingface-hub",
         "tokenizers", "safetensors", "pytest", "pytest-xdist", "hypothesis"]


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


if __name__ == "__main__":
    job = sys.argv[1] if len(sys.argv) > 1 else "local"
    print(f"versions ({job}): python {sys.version.split()[0]}, "
          + ", ".join(f"{name} {version(name)}" for name in NAMES))
