"""Built-in tiny checkpoints: real configs, safetensors weights and a tokenizer, written on first use.

They let the plugin, its tests and its examples load models through the real ``from_pretrained``
with no network. Each is deterministic (seeded) and has several blocks so device maps can split it.
torch and transformers are imported only when a checkpoint is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmload.errors import ModelLoadError
from pytest_llmload._internal.loading.ownership import (  # a staging folder's owner lock, not part of a checkpoint
    MARKER as MARKER_NAME,
)

FORMAT_VERSION = 1
MANIFEST = "llmload-manifest.json"
_BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    config_class: str
    model_class: str
    config: dict[str, Any]
    specials: tuple[str, ...]
    template: str | None  # post-processor template for single sequences
    description: str
    tokenizer_kwargs: dict[str, str] = field(default_factory=dict)


_GPT_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "tiny-llama",
            "LlamaConfig",
            "LlamaForCausalLM",
            dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=False, **_IDS),
            tuple(_BYTE_SPECIALS), "<s> $A", "Llama decoder, 4 layers, untied embeddings (the default)",
            _GPT_TOKENS,
        ),
        BuiltinModel(
            "tiny-gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            dict(vocab_size=320, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                 tie_word_embeddings=True, **_IDS),
            tuple(_BYTE_SPECIALS), None, "GPT-2 decoder, 4 blocks, tied input/output embeddings",
            _GPT_TOKENS,
        ),
        BuiltinModel(
            "tiny-t5",
            "T5Config",
            "T5ForConditionalGeneration",
            dict(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3,
                 num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                 tie_word_embeddings=True),
            tuple(_BYTE_SPECIALS), "$A </s>", "T5 encoder-decoder, 3+3 blocks, shared embeddings",
            {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ),
        BuiltinModel(
            "tiny-bert",
            "BertConfig",
            "BertModel",
            dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=256, pad_token_id=0),
            tuple(_BERT_SPECIALS), "[CLS] $A [SEP]", "BERT encoder (AutoModel), 4 layers",
            {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "mask_token": "[MASK]"},
        ),
        BuiltinModel(
            "tiny-mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
                 **_IDS),
            tuple(_BYTE_SPECIALS), "<s> $A", "Mixtral mixture-of-experts decoder, 4 layers x 4 experts",
            _GPT_TOKENS,
        ),
    )
}


def cache_root() -> Path:
    """Where built-in checkpoints live: ``$LLMLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-llmload``."""
    env = os.environ.get("LLMLOAD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-llmload"


def _fingerprint(model: BuiltinModel) -> str:
    import torch
    import transformers

    payload = json.dumps(
        [FORMAT_VERSION, model.config_class, model.model_class, model.config, model.specials,
         model.template, transformers.__version__, torch.__version__.split("+")[0]],
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def builtin_path(name: str) -> Path:
    """The directory of built-in checkpoint ``name``, building it first if it is missing or damaged."""
    model = BUILTIN_MODELS[name]
    target = cache_root() / "builtin" / f"{name}-{_fingerprint(model)}"
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(_cache_dir_problem(target.parent, exc)) from None
    # One builder at a time per cache folder: without the lock, a process that found the copy missing
    # could delete the one another process renamed into place a moment later, while that one loads it.
    with _build_lock(target.parent):
        if _is_complete(target):  # built by another process while this one waited
            return target
        return _build(model, target)


BUILD_LOCK_TIMEOUT = 300.0  # seconds to wait for another process building into the same cache folder


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Hold an exclusive ``flock`` on the cache folder itself (no lock file is left behind) while building.

    Where the filesystem cannot lock a directory (NFS emulates flock with write locks) or there is no
    flock (Windows), builders are not serialized; each still writes a staging copy and renames it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise ModelLoadError(_cache_dir_problem(folder, exc)) from None
    try:
        deadline = time.monotonic() + BUILD_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ModelLoadError(
                        f"another process has been building the built-in checkpoints in {folder} for over "
                        f"{BUILD_LOCK_TIMEOUT:g} s (it holds a lock on that folder); stop it or point "
                        "LLMLOAD_CACHE_DIR at another directory") from None
                time.sleep(0.05)
            except OSError:
                break  # no directory locks here: build unserialized, as without flock
        yield
    finally:
        os.close(fd)  # drops the lock


def _build(model: BuiltinModel, target: Path) -> Path:
    from pytest_llmload._internal.loading.ownership import (
        owned_folder,
        release_owned_folder,
        remove_owned_folder,
        sweep_dead_staging,
    )

    try:
        if target.exists():  # damaged (files removed or truncated after it was written): rebuild
            shutil.rmtree(target, ignore_errors=True)
        sweep_dead_staging(target.parent)  # half-written copies of processes that died mid-write
        # The staging folder carries a marker locked while this process lives, so no one else sweeps it.
        staging = Path(owned_folder(prefix=f".{model.name}-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(_cache_dir_problem(target.parent, exc)) from None
    try:
        _write_checkpoint(model, staging)
        try:
            os.rename(staging, target)  # atomic: readers never see a half-written checkpoint
        except OSError:
            if not _is_complete(target):  # another process won the race but its copy is unsound
                raise
        else:
            release_owned_folder(staging)
            with contextlib.suppress(OSError):  # a checkpoint now, not a staging folder; a stray marker is harmless
                (target / MARKER_NAME).unlink(missing_ok=True)
    except OSError as exc:
        raise ModelLoadError(_cache_dir_problem(target.parent, exc)) from None
    finally:
        remove_owned_folder(staging)
    return target


def _cache_dir_problem(folder: Path, exc: OSError) -> str:
    """One line naming the cache directory (and the variable that chose it) and why it cannot hold checkpoints."""
    env = os.environ.get("LLMLOAD_CACHE_DIR")
    where = f"LLMLOAD_CACHE_DIR={env}" if env else f"the built-in checkpoint cache {cache_root()}"
    blocker = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        from pytest_llmload._internal.loading.safety import not_regular

        kind = not_regular(blocker) or "a file"
        why = f"{blocker} is {kind}, not a directory"
    elif not folder.is_dir():
        why = f"cannot create {folder}: {exc.strerror or exc}"
    else:
        why = f"cannot write in {folder}: {exc.strerror or exc}"
    advice = ("point LLMLOAD_CACHE_DIR at a writable directory" if env
              else "set LLMLOAD_CACHE_DIR to a writable directory")
    return f"{where} cannot hold the built-in checkpoints: {why}; {advice}"


def _is_complete(path: Path) -> bool:
    from pytest_llmload._internal.loading.safety import not_regular, read_json

    try:
        manifest = read_json(path / MANIFEST)  # never a FIFO, never unbounded
        if "config.json" not in manifest["files"]:  # a copy written without its model (see _write_checkpoint)
            return False
        return all(not_regular(path / f) is None and (path / f).stat().st_size == size
                   for f, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_tokenizer(model: BuiltinModel):
    """A byte-level tokenizer with no merges: every string encodes, the vocabulary is tiny and fixed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(model.specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    unk = model.tokenizer_kwargs.get("unk_token")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if model.template:
        specials = [t for t in model.template.split() if t in vocab]
        backend.post_processor = processors.TemplateProcessing(
            single=model.template, special_tokens=[(t, vocab[t]) for t in specials]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=256, **model.tokenizer_kwargs)


def _write_checkpoint(model: BuiltinModel, directory: Path) -> None:
    import torch
    import transformers

    config = getattr(transformers, model.config_class)(**model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = getattr(transformers, model.model_class)(config)
    # Under a launcher (torch.distributed initialized) transformers writes weights and config on rank 0 only,
    # and this is every process's own private staging copy: each must write all of it.
    network.should_save_on_this_rank = lambda is_main_process: True
    network.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(model).save_pretrained(directory)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != MARKER_NAME}
    (directory / MANIFEST).write_text(json.dumps({"name": model.name, "files": files}, indent=1))
