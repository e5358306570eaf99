"""The settings every loader of ``tftransfer.data`` shares: validation of the
arguments (one ``Spec``) and the cache plan (``cache="auto"`` against the
budget of ``_memory``)."""

import atexit
import collections
import hashlib
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np

from tftransfer import _memory
from tftransfer._checks import invalid, is_int

CACHE_MODES = ("auto", "memory", "disk", True, False, None)
INTERPOLATIONS = ("area", "bicubic", "bilinear", "gaussian", "lanczos3",
                  "lanczos5", "mitchellcubic", "nearest")
AUGMENTATIONS = {  # name -> (layer class, positional args); pixels stay 0-255
    "contrast": (keras.layers.RandomContrast, (0.1, (0, 255))),
    "flip": (keras.layers.RandomFlip, ("horizontal",)),
    "rotation": (keras.layers.RandomRotation, (0.1,)),
    "translation": (keras.layers.RandomTranslation, (0.1, 0.1)),
    "zoom": (keras.layers.RandomZoom, (0.1,)),
}
DEFAULT_AUGMENTATION = ("flip", "rotation", "zoom")
# Validated settings; cache is "auto", "memory", "disk", None (off) or a file prefix.
Spec = collections.namedtuple("Spec", "image_size channels batch_size seed shuffle "
                              "cache augment interpolation validation_split budget")


def resolve_shape(model, image_size, channels) -> tuple[tuple[int, int], int]:
    """Returns ``((H, W), C)`` from ``model`` and/or the explicit values."""
    if model is None and image_size is None:
        raise ValueError("Either `model` (its input shape gives the size) or `image_size="
                         "(height, width)` must be given. Received: model=None, image_size=None")
    shape = (None,) * 4 if model is None else getattr(model, "input_shape", None)
    if not (isinstance(shape, tuple) and len(shape) == 4):
        raise invalid("model", "a keras.Model with one image input of shape "
                       "[None, H, W, C]", getattr(model, "name", model))
    size = shape[1:3] if image_size is None else image_size
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(is_int(s) and s > 0 for s in size)):
        raise invalid("image_size", f"(height, width), 2 positive ints (model input "
                       f"shape: {shape})", image_size)
    if None not in shape[1:3] and tuple(size) != shape[1:3]:
        raise invalid("image_size", f"{shape[1:3]} (the model's input size) or None",
                       image_size)
    want = channels if channels is not None else (shape[3] or 3)
    if not is_int(want) or want < 1 or shape[3] not in (None, want):
        raise invalid("channels", f"a positive int, matching the model's input "
                       f"channels ({shape[3]})" if shape[3] else "a positive int", channels)
    return tuple(int(s) for s in size), int(want)


def augment_layers(augment, seed: int) -> tuple:
    """Turns the ``augment`` argument into a tuple of keras layers."""
    if augment is None or augment is False:
        return ()
    items = DEFAULT_AUGMENTATION if augment is True or augment == "default" else augment
    items = [items] if isinstance(items, str) else items
    expected = f"None, True, 'default', or a list of {sorted(AUGMENTATIONS)} and/or keras layers"
    if not isinstance(items, (list, tuple)):
        raise invalid("augment", expected, augment)
    for item in items:
        if not isinstance(item, keras.layers.Layer) and item not in list(AUGMENTATIONS):
            raise invalid("augment", f"{expected}; unknown entry {item!r}", augment)
    return tuple(item if isinstance(item, keras.layers.Layer) else AUGMENTATIONS[item][0](
        *AUGMENTATIONS[item][1], seed=seed + i, dtype="float32") for i, item in enumerate(items))


def check_cache(cache):
    """``cache`` argument -> "auto" | "memory" | "disk" | None | file prefix."""
    if cache in CACHE_MODES or isinstance(cache, (str, os.PathLike)) and os.fspath(cache):
        return {True: "memory", False: None}.get(cache, cache) if cache in CACHE_MODES \
            else os.fspath(cache)
    raise invalid("cache", "'auto' (memory when it fits the budget), 'memory' or True, "
                   "'disk', a file path prefix, or False/None", cache)


def make_spec(*, model, image_size, channels, batch_size, seed, shuffle, cache,
              augment, interpolation, validation_split=0.0, cache_budget=None) -> Spec:
    """Validates the arguments every loader shares (called with explicit keywords)."""
    size, channels = resolve_shape(model, image_size, channels)
    if not is_int(batch_size) or batch_size < 1:
        raise invalid("batch_size", "an int >= 1", batch_size)
    if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
        raise invalid("validation_split", "a float in [0, 1)", validation_split)
    if interpolation not in INTERPOLATIONS:
        raise invalid("interpolation", f"one of {INTERPOLATIONS}", interpolation)
    if not is_int(seed):
        raise invalid("seed", "an int", seed)
    cache = check_cache(cache)
    if cache not in CACHE_MODES:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    return Spec(size, channels, int(batch_size), int(seed), bool(shuffle), cache,
                 augment_layers(augment, int(seed)), interpolation, float(validation_split),
                 _memory.budget(cache_budget))


def disk_cache_prefix() -> str:
    """A fresh temporary directory for ``cache="disk"``, removed at exit."""
    folder = tempfile.mkdtemp(prefix="tftransfer-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "images")


def cache_plan(spec: Spec, images: int | None) -> tuple[str | None, int | None]:
    """``(cache, bytes)``: None (off), "" (memory) or a file prefix, and the
    uint8 size of ``images`` resized images (``None`` if unknown)."""
    nbytes = None if images is None else images * int(np.prod(spec.image_size)) * spec.channels
    fits = nbytes is not None and nbytes <= spec.budget
    if spec.cache == "memory" and nbytes is not None and not fits:
        warnings.warn(f"cache='memory' keeps {images} resized images in memory: "
                      f"{_memory.show(nbytes)} as uint8, over the cache budget of "
                      f"{_memory.show(spec.budget)} (set by `cache_budget=` or "
                      f"${_memory.ENV}). Use cache='auto' or 'disk' to stay in bounds.",
                      stacklevel=4)
    plan = {"auto": "" if fits else None, "memory": "", "disk": None, None: None}
    if spec.cache == "disk":
        return disk_cache_prefix(), nbytes
    return plan.get(spec.cache, spec.cache), nbytes


def resolve_class_weight(class_weight, class_names, counts) -> dict[int, float] | None:
    """Resolves ``None`` | ``"balanced"`` | dict into ``{index: weight}``."""
    k = len(class_names)
    if class_weight is None:
        return None
    if isinstance(class_weight, str) and class_weight == "balanced":
        return {c: float(counts.sum() / (k * m)) if m else 0.0 for c, m in enumerate(counts)}
    index = {name: i for i, name in enumerate(class_names)}
    try:
        out = {index.get(c, c): float(w) for c, w in class_weight.items()}
    except (AttributeError, TypeError, ValueError):
        out = {}
    if sorted(out, key=str) != sorted(range(k), key=str) or not all(map(is_int, out)) \
            or not all(0 <= w < float("inf") for w in out.values()):
        raise invalid("class_weight", f"None, 'balanced', or a dict with a weight >= 0 "
                       f"for every class (keys 0..{k - 1} or {class_names})", class_weight)
    return {int(c): out[c] for c in range(k)}


def fingerprint(spec: Spec, *parts) -> str:
    """Hash of ``parts`` and of the settings that change cached images."""
    cached = (spec.image_size, spec.channels, spec.seed, spec.interpolation, spec.validation_split)
    digest = hashlib.sha1(repr(cached).encode())  # not augment, batch_size, shuffle, cache
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return digest.hexdigest()[:12]
