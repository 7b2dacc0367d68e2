"""Safe, atomic training checkpoints in a single ``.npz`` file (no pickle).

Layout of the file (every entry a plain numeric array; loaded with ``allow_pickle=False``):

==========================  =====================================================================
``format_version``          0-d int64, :data:`FORMAT_VERSION`
``meta``                    uint8 array: UTF-8 JSON with the model class and config, the trainer
                            hyperparameters (prediction type included), the schedule name and T, the
                            EMA decay and update count, the step, the parameter shapes/dtypes, the
                            rng's bit-generator state (big integers written as decimal strings) and
                            the run metadata ``run`` (see below)
``step``                    0-d int64, number of updates applied
``schedule/betas``          (T,) float64
``params/<key>``            the model's parameters
``ema/<key>``               the EMA parameters
``optim/m/<key>``,          Adam's moment estimates
``optim/v/<key>``
``optim/<scalar>``          0-d arrays: step, lr, beta1, beta2, eps, weight_decay
==========================  =====================================================================

The run metadata (``meta["run"]``, format version 2) says what the model was trained on, so that
sampling, evaluation and resuming never guess: ``image_shape`` [C, H, W], ``data`` (the data source),
``batch_size``, ``seed`` and ``num_classes`` (None: unconditional); together with the schedule (name
and T) and the prediction type, :func:`read_metadata` returns them. A value the writer did not know is
stored as null. Version 1 files (before the run metadata) are still read; their run metadata is null.

The archive is written with ``np.savez`` without keyword options (NumPy before 2.1 stores any keyword,
``allow_pickle=False`` included, as one more array), after checking that every entry is a plain numeric
array, so the file holds exactly the entries above on every NumPy version. Loading refuses any entry
not listed above.

Saving writes to a temporary file in the destination directory, flushes and fsyncs it, then
``os.replace`` s it over the destination: a crash mid-save leaves the previous checkpoint intact.
Loading checks the file's magic bytes, every key, shape and dtype against the model rebuilt from the
stored config, and raises ``ValueError`` (or ``OSError`` / ``FileNotFoundError``) naming the problem;
a file holding pickled data is refused, never unpickled.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from difnumpy._io import atomic_write

from difnumpy.kernels import check_backend
from difnumpy.schedules import Schedule
from difnumpy.trainer import Trainer

__all__ = ["FORMAT_VERSION", "RUN_METADATA_KEYS", "save_checkpoint", "load_checkpoint", "load_model",
           "read_checkpoint", "read_metadata"]

#: Version of the on-disk layout written; bumped on incompatible changes. Version 2 added ``meta["run"]``.
FORMAT_VERSION = 2
#: Versions this module reads (version 1 files have no run metadata).
READABLE_VERSIONS = (1, 2)
#: Keys of the run metadata ``meta["run"]`` (see the module docstring).
RUN_METADATA_KEYS = ("image_shape", "data", "batch_size", "seed", "num_classes")
_FORMAT_NAME = "difnumpy-checkpoint"
_ZIP_MAGIC = b"PK\x03\x04"
_OPTIM_SCALARS = ("step", "lr", "beta1", "beta2", "eps", "weight_decay")
_HPARAM_KEYS = ("lr", "ema_decay", "prediction_type", "weight_decay", "grad_clip", "warmup_steps",
                "optimizer", "betas", "eps", "backend", "label_dropout")
_HPARAM_DEFAULTS = {"label_dropout": 0.0}  # hyperparameters added later: files written before them lack them
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


# --------------------------------------------------------------------------------------------------
# JSON helpers (rng state with big ints, numpy scalars/dtypes in configs)
# --------------------------------------------------------------------------------------------------

def _encode_state(obj: Any) -> Any:
    """Bit-generator state -> JSON-able: ints become {"__int__": "decimal"}, arrays {"__ndarray__": [...]}."""
    if isinstance(obj, dict):
        return {str(k): _encode_state(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [str(int(x)) for x in obj.ravel()], "dtype": obj.dtype.name,
                "shape": list(obj.shape)}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return {"__int__": str(int(obj))}
    if isinstance(obj, str):
        return obj
    raise TypeError(f"cannot store rng state entry of type {type(obj).__name__}")


def _decode_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__int__"}:
            return int(obj["__int__"])
        if "__ndarray__" in obj:
            dtype = np.dtype(obj["dtype"])
            if dtype.kind not in "ui":
                raise ValueError(f"rng state array has dtype {dtype}, expected an integer dtype")
            return np.array([int(s) for s in obj["__ndarray__"]], dtype=dtype).reshape(obj["shape"])
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, (str, bool)):
        return obj
    raise ValueError(f"unexpected rng state entry {obj!r}")


def rng_to_json(rng: np.random.Generator) -> dict:
    """The generator's bit-generator state as a JSON-able dict (big ints as decimal strings)."""
    return _encode_state(rng.bit_generator.state)


def rng_from_json(state: dict) -> np.random.Generator:
    """Rebuild a Generator from :func:`rng_to_json` output (only NumPy's own bit generators)."""
    decoded = _decode_state(state)
    name = decoded.get("bit_generator") if isinstance(decoded, dict) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(f"rng state names bit generator {name!r}; supported: {_BIT_GENERATORS}")
    bg = getattr(np.random, name)()
    bg.state = decoded
    return np.random.Generator(bg)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.dtype):
        return obj.name
    if isinstance(obj, type) and issubclass(obj, np.generic):
        return np.dtype(obj).name
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store config value of type {type(obj).__name__} in a checkpoint")


def _json_to_array(obj: Any) -> np.ndarray:
    data = json.dumps(obj, default=_json_default, sort_keys=True, allow_nan=True).encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).copy()


def _config_from_json(config: dict) -> dict:
    # JSON turns tuples into lists; model constructors take tuples (e.g. channel_mults).
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


# --------------------------------------------------------------------------------------------------
# Model classes a checkpoint may name (a file never makes us import arbitrary code)
# --------------------------------------------------------------------------------------------------

def _known_model_class(name: str):
    if name == "difnumpy.nn.unet.UNet":
        from difnumpy.nn.unet import UNet

        return UNet
    raise ValueError(f"checkpoint names model class {name!r}; only 'difnumpy.nn.unet.UNet' is known "
                     f"(pass model_cls= to load another class)")


def _class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------

def _check_run_metadata(run: Any, where: str, model_config: dict | None = None) -> dict:
    """The run metadata as a dict with every key of :data:`RUN_METADATA_KEYS` (None: unknown), checked.

    ``where`` starts the error messages (the argument or the file). With ``model_config``, an image
    shape is also checked against the model: C must be its ``in_channels``, H and W divisible by
    ``2 ** (len(channel_mults) - 1)``.
    """
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise TypeError(f"{where} must be a dict with keys {RUN_METADATA_KEYS}, got {type(run).__name__}")
    unknown = sorted(set(run) - set(RUN_METADATA_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {RUN_METADATA_KEYS}")
    out = {k: run.get(k) for k in RUN_METADATA_KEYS}

    def pos_int(v, name, lo=1):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{where}: {name} must be an int >= {lo} or None, got {v!r}")
        return int(v)

    shape = out["image_shape"]
    if shape is not None:
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3:
            raise ValueError(f"{where}: image_shape must be (C, H, W) or None, got {shape!r}")
        shape = [pos_int(v, "image_shape", 1) for v in shape]
        if model_config is not None:
            c = model_config.get("in_channels")
            levels = len(model_config.get("channel_mults") or (1,))
            div = 2 ** (levels - 1)
            if c is not None and shape[0] != int(c):
                raise ValueError(f"{where}: image_shape {tuple(shape)} has {shape[0]} channel(s), the model "
                                 f"has in_channels={c}")
            if shape[1] % div or shape[2] % div:
                raise ValueError(f"{where}: image_shape {tuple(shape)}: H and W must be divisible by "
                                 f"2**(levels-1) = {div} for the model's {levels} levels")
        out["image_shape"] = shape
    if out["data"] is not None and (not isinstance(out["data"], str) or not out["data"]):
        raise ValueError(f"{where}: data must be a non-empty str (the data source) or None, got {out['data']!r}")
    if out["batch_size"] is not None:
        out["batch_size"] = pos_int(out["batch_size"], "batch_size", 1)
    if out["seed"] is not None:
        out["seed"] = pos_int(out["seed"], "seed", 0)
    if out["num_classes"] is not None:
        out["num_classes"] = pos_int(out["num_classes"], "num_classes", 1)
    return out


def _trainer_arrays(trainer: Trainer, metadata: dict | None) -> dict[str, np.ndarray]:
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a difnumpy Trainer, got {type(trainer).__name__}")
    model = trainer.model
    # NumPy copies of the parameters (on backend="cuda" they live on the device)
    params = model.host_params() if callable(getattr(model, "host_params", None)) else model.params
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"trainer.model must have a .config dict, got {type(model).__name__}")
    run = _check_run_metadata(metadata, "metadata", config)
    model_k = config.get("num_classes")
    if run["num_classes"] is None:
        run["num_classes"] = model_k  # the model says it
    elif run["num_classes"] != model_k:
        raise ValueError(f"metadata: num_classes={run['num_classes']} contradicts the model's num_classes={model_k}")
    opt_state = trainer.optimizer.state_dict()
    ema_state = trainer.ema.state_dict()
    meta = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": _class_path(type(model)),
        "model_config": config,
        "trainer": trainer.hparams(),
        "schedule": {"name": trainer.schedule.name, "num_timesteps": trainer.schedule.num_timesteps},
        "ema": {"decay": ema_state["decay"], "num_updates": ema_state["num_updates"]},
        "step": trainer.step_count,
        "params": {k: {"shape": list(p.shape), "dtype": p.dtype.name} for k, p in params.items()},
        "rng": rng_to_json(trainer.rng),
        "run": run,
    }
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "meta": _json_to_array(meta),
        "step": np.array(trainer.step_count, dtype=np.int64),
        "schedule/betas": np.asarray(trainer.schedule.betas, dtype=np.float64),
    }
    for k, p in params.items():
        arrays[f"params/{k}"] = p
        arrays[f"ema/{k}"] = ema_state[f"params/{k}"]
        arrays[f"optim/m/{k}"] = opt_state[f"m/{k}"]
        arrays[f"optim/v/{k}"] = opt_state[f"v/{k}"]
    arrays["optim/step"] = np.array(opt_state["step"], dtype=np.int64)
    for s in _OPTIM_SCALARS[1:]:
        arrays[f"optim/{s}"] = np.array(opt_state[s], dtype=np.float64)
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":  # np.savez would pickle an object array: never write one
            raise TypeError(f"checkpoint entry {name!r} has dtype {a.dtype}; only numeric arrays are stored")
        arrays[name] = a
    return arrays


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    # No keyword options: before NumPy 2.1 np.savez(f, allow_pickle=False, **arrays) stored an extra
    # array named "allow_pickle". The arrays are checked numeric above, so nothing is pickled.
    np.savez(f, **arrays)


def save_checkpoint(path: str | os.PathLike, trainer: Trainer, metadata: dict | None = None) -> str:
    """Save everything needed to resume ``trainer`` bit for bit into one ``.npz`` file, atomically.

    Parameters
    ----------
    path : str or path-like
        Destination file (written exactly there; no ``.npz`` suffix is appended). Its directory must exist.
    trainer : Trainer
    metadata : dict, optional
        The run metadata (:data:`RUN_METADATA_KEYS`): ``image_shape`` (C, H, W) of the training images,
        ``data`` (the data source, e.g. ``"digits"`` or a file path), ``batch_size``, ``seed`` and
        ``num_classes`` (None: unconditional). A key left out is stored as null (unknown);
        :func:`difnumpy.train.train` fills in every key. The schedule and the prediction type come from
        the trainer.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    TypeError, ValueError
        ``trainer`` is not a Trainer; ``metadata`` has an unknown key or a bad value, e.g. an image
        shape whose C is not the model's ``in_channels`` or whose H, W the U-Net cannot halve
        ``len(channel_mults) - 1`` times.
    FileNotFoundError
        The directory of ``path`` does not exist.

    Notes
    -----
    A ``backend="cuda"`` trainer's device state is copied down (``model.host_params()``, ``state_dict()``).
    The arrays, all numeric (checked), are written with ``np.savez`` (no keyword options, so the archive
    holds the same entries on every NumPy version) to a temporary file in the same directory, flushed and
    fsynced, then moved over ``path`` with ``os.replace`` (atomic on POSIX and Windows); on any error the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save checkpoint {path!r}: directory {directory!r} does not exist")
    arrays = _trainer_arrays(trainer, metadata)
    atomic_write(path, lambda f: _write_npz(f, arrays))
    return path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def _read_arrays(path: str) -> dict[str, np.ndarray]:
    """All arrays of the .npz at ``path``, refusing anything that is not a plain numeric .npz."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):
        raise OSError(f"checkpoint path {path!r} is not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint file {path!r} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_ZIP_MAGIC):
        if head[:1] == b"\x80":
            kind = "a Python pickle; refused (pickles are never loaded)"
        elif head.startswith(b"\x93NUMPY"):
            kind = "a single .npy array, not an .npz checkpoint"
        else:
            kind = f"not an .npz archive (starts with {head[:4]!r})"
        raise ValueError(f"checkpoint file {path!r} is {kind}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                arrays[name] = z[name]
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ValueError(f"checkpoint file {path!r} holds pickled object arrays; refused "
                             f"(loaded with allow_pickle=False): {e}") from None
        raise ValueError(f"checkpoint file {path!r} is corrupted or truncated: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, OSError, KeyError, ... from a damaged file
        raise ValueError(f"checkpoint file {path!r} is corrupted or truncated "
                         f"({type(e).__name__}: {e})") from None
    for name, a in arrays.items():
        if a.dtype.hasobject:  # pragma: no cover (np.load refuses these already)
            raise ValueError(f"checkpoint file {path!r} entry {name!r} holds Python objects; refused")
    return arrays


def _read_meta(path: str, arrays: dict) -> dict:
    for key in ("format_version", "meta"):
        if key not in arrays:
            raise ValueError(f"checkpoint file {path!r} has no {key!r} entry; not a difnumpy checkpoint "
                             f"(entries: {sorted(arrays)[:8]})")
    fv = arrays["format_version"]
    if fv.shape != () or fv.dtype.kind not in "iu":
        raise ValueError(f"checkpoint file {path!r}: format_version must be a 0-d integer, got {fv.dtype} {fv.shape}")
    if int(fv) not in READABLE_VERSIONS:
        raise ValueError(f"checkpoint file {path!r} has format version {int(fv)}; this difnumpy reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    raw = arrays["meta"]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"checkpoint file {path!r}: 'meta' must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {path!r}: 'meta' is not valid UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise ValueError(f"checkpoint file {path!r}: 'meta' is not a {_FORMAT_NAME} header")
    for key in ("model_class", "model_config", "trainer", "schedule", "ema", "step", "params", "rng"):
        if key not in meta:
            raise ValueError(f"checkpoint file {path!r}: 'meta' lacks the {key!r} field")
    if not isinstance(meta["params"], dict) or not meta["params"]:
        raise ValueError(f"checkpoint file {path!r}: 'meta' lists no parameters")
    if not isinstance(meta["model_config"], dict):
        raise ValueError(f"checkpoint file {path!r}: model_config must be a JSON object")
    if meta.get("format_version") != int(fv):
        raise ValueError(f"checkpoint file {path!r}: 'meta' says format version {meta.get('format_version')!r}, "
                         f"the file {int(fv)}")
    if int(fv) >= 2:
        if "run" not in meta:
            raise ValueError(f"checkpoint file {path!r}: 'meta' lacks the 'run' field (the run metadata)")
        if not isinstance(meta["run"], dict) or set(meta["run"]) != set(RUN_METADATA_KEYS):
            raise ValueError(f"checkpoint file {path!r}: the run metadata must have the keys "
                             f"{list(RUN_METADATA_KEYS)}, got {meta['run']!r}")
        meta["run"] = _check_run_metadata(meta["run"], f"checkpoint file {path!r}", meta["model_config"])
    elif "run" in meta:
        raise ValueError(f"checkpoint file {path!r}: a version 1 file has no 'run' field")
    sched = meta["schedule"]
    if not isinstance(sched, dict) or not isinstance(sched.get("num_timesteps"), int) \
            or not isinstance(sched.get("name"), (str, type(None))):
        raise ValueError(f"checkpoint file {path!r}: 'schedule' must hold a name and num_timesteps, got {sched!r}")
    return meta


def _check_entries(path: str, arrays: dict, meta: dict) -> None:
    keys = list(meta["params"])
    expected = {"format_version", "meta", "step", "schedule/betas"}
    expected |= {f"optim/{s}" for s in _OPTIM_SCALARS}
    for k in keys:
        expected |= {f"params/{k}", f"ema/{k}", f"optim/m/{k}", f"optim/v/{k}"}
    missing = sorted(expected - set(arrays))
    extra = sorted(set(arrays) - expected)
    if missing or extra:
        hint = ("; an 'allow_pickle' entry comes from difnumpy 0.1.0 saving on NumPy < 2.1 (a bug, "
                "since fixed)" if "allow_pickle" in extra else "")
        raise ValueError(f"checkpoint file {path!r} has the wrong entries: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}{hint}")
    for k in keys:
        info = meta["params"][k]
        shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        for prefix in ("params", "ema", "optim/m", "optim/v"):
            a = arrays[f"{prefix}/{k}"]
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"checkpoint file {path!r}: {prefix}/{k} is {a.dtype} {a.shape}, "
                                 f"the header says {dtype} {shape}")
    for name in ("step", "optim/step"):
        a = arrays[name]
        if a.shape != () or a.dtype.kind not in "iu":
            raise ValueError(f"checkpoint file {path!r}: {name!r} must be a 0-d integer, got {a.dtype} {a.shape}")
    if not (int(arrays["step"]) == int(arrays["optim/step"]) == meta["step"]):
        raise ValueError(f"checkpoint file {path!r}: inconsistent step counts (step={int(arrays['step'])}, "
                         f"optim/step={int(arrays['optim/step'])}, meta={meta['step']})")
    betas = arrays["schedule/betas"]
    if betas.ndim != 1 or betas.dtype != np.float64:
        raise ValueError(f"checkpoint file {path!r}: schedule/betas must be a 1-D float64 array, "
                         f"got {betas.dtype} {betas.shape}")
    if betas.shape[0] != meta["schedule"]["num_timesteps"]:
        raise ValueError(f"checkpoint file {path!r}: the header's schedule has T={meta['schedule']['num_timesteps']}, "
                         f"schedule/betas holds {betas.shape[0]} values")


def _build_model(path: str, meta: dict, arrays: dict, prefix: str, model_cls=None, backend=None):
    cls = model_cls if model_cls is not None else _known_model_class(meta["model_class"])
    config = _config_from_json(meta["model_config"])
    if backend is not None:
        config["backend"] = check_backend(backend)
    try:
        model = cls(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint file {path!r}: its model config {meta['model_config']} does not "
                         f"build a {cls.__name__}: {e}") from None
    params = model.params
    stored = set(meta["params"])
    if set(params) != stored:
        raise ValueError(f"checkpoint file {path!r} does not match the model built from its config: "
                         f"missing {sorted(set(params) - stored)[:5]}, unexpected {sorted(stored - set(params))[:5]}")
    for k, p in params.items():
        a = arrays[f"{prefix}/{k}"]
        if a.shape != tuple(p.shape) or a.dtype != p.dtype:
            raise ValueError(f"checkpoint file {path!r}: {prefix}/{k} is {a.dtype} {a.shape} but the model "
                             f"built from its config has {p.dtype} {tuple(p.shape)} (another config?)")
    if callable(getattr(model, "set_params", None)):  # copies to the model's backend (the device on cuda)
        model.set_params({k: arrays[f"{prefix}/{k}"] for k in params})
    else:
        for k, p in params.items():
            p[...] = arrays[f"{prefix}/{k}"]
    return model


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read and validate a checkpoint file: returns ``(meta, arrays)`` (the JSON header and all arrays).

    Raises
    ------
    FileNotFoundError, OSError
        Missing path, or not a regular file.
    ValueError
        Empty, truncated, corrupted, pickled, foreign or inconsistent file; the message names the problem.
    """
    path = os.fspath(path)
    arrays = _read_arrays(path)
    meta = _read_meta(path, arrays)
    _check_entries(path, arrays, meta)
    return meta, arrays


def read_metadata(checkpoint: str | os.PathLike | dict) -> dict:
    """What a checkpoint says about its run: everything sampling, evaluation and resuming need.

    Parameters
    ----------
    checkpoint : str, path-like or dict
        A checkpoint file, or the ``meta`` header :func:`read_checkpoint` returned for one.

    Returns
    -------
    dict
        ``image_shape`` ((C, H, W) tuple), ``data``, ``batch_size``, ``seed``, ``num_classes`` (the run
        metadata; None where unknown: written without it, or a format 1 file), ``schedule`` (name),
        ``num_timesteps``, ``prediction_type`` and ``format_version``.

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        See :func:`read_checkpoint`.
    """
    if isinstance(checkpoint, dict):
        meta = checkpoint
    else:
        meta, _ = read_checkpoint(checkpoint)
    run = meta.get("run") or {k: None for k in RUN_METADATA_KEYS}
    out = {k: run.get(k) for k in RUN_METADATA_KEYS}
    if out["image_shape"] is not None:
        out["image_shape"] = tuple(int(v) for v in out["image_shape"])
    hp = meta.get("trainer") if isinstance(meta.get("trainer"), dict) else {}
    out.update(schedule=meta["schedule"].get("name"), num_timesteps=int(meta["schedule"]["num_timesteps"]),
               prediction_type=hp.get("prediction_type"), format_version=int(meta["format_version"]))
    return out


def load_checkpoint(path: str | os.PathLike, *, model_cls=None, backend: str | None = None, world=None) -> Trainer:
    """Rebuild a :class:`~difnumpy.trainer.Trainer` from :func:`save_checkpoint` output, ready to continue.

    Model parameters, EMA parameters, optimizer moments and step count, the schedule, the
    hyperparameters and the rng state are restored, so that further ``trainer.step`` calls give
    bit-for-bit the results an uninterrupted run would have given (on the same backend; a
    ``backend="cuda"`` trainer gets the restored state uploaded to the device).

    Parameters
    ----------
    path : str or path-like
    model_cls : class, optional
        Model class to rebuild (``model_cls(**config)``); by default the one the file names, which must
        be :class:`difnumpy.nn.unet.UNet`.
    backend : {"numpy", "cpu", "cuda"}, optional
        Kernel backend of the rebuilt model and optimizer instead of the stored one (e.g. resume on
        the CPU a run started on a GPU).
    world : difnumpy.distributed.World, optional
        Resume data-parallel (a checkpoint does not depend on the number of ranks).

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        See :func:`read_checkpoint`; also when the arrays do not fit the model built from the stored config.
    """
    path = os.fspath(path)
    meta, arrays = read_checkpoint(path)
    model = _build_model(path, meta, arrays, "params", model_cls, backend)
    try:
        schedule = Schedule(arrays["schedule/betas"], name=meta["schedule"].get("name"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint file {path!r}: invalid schedule: {e}") from None
    hp = meta["trainer"]
    if isinstance(hp, dict):
        hp = {**{k: v for k, v in _HPARAM_DEFAULTS.items() if k not in hp}, **hp}
    if not isinstance(hp, dict) or set(hp) != set(_HPARAM_KEYS):
        raise ValueError(f"checkpoint file {path!r}: trainer hyperparameters must have the keys "
                         f"{sorted(_HPARAM_KEYS)}, got {sorted(hp) if isinstance(hp, dict) else hp!r}")
    try:
        rng = rng_from_json(meta["rng"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"checkpoint file {path!r}: invalid rng state: {e}") from None
    kw = dict(hp)
    kw["betas"] = tuple(kw["betas"])
    if backend is not None:
        kw["backend"] = backend
    try:
        trainer = Trainer(model, schedule, rng=rng, world=world, **kw)
        opt_state = {s: arrays[f"optim/{s}"] for s in _OPTIM_SCALARS}
        for k in meta["params"]:
            opt_state[f"m/{k}"] = arrays[f"optim/m/{k}"]
            opt_state[f"v/{k}"] = arrays[f"optim/v/{k}"]
        trainer.optimizer.load_state_dict(opt_state)
        ema_state = {"decay": meta["ema"]["decay"], "num_updates": meta["ema"]["num_updates"]}
        ema_state.update({f"params/{k}": arrays[f"ema/{k}"] for k in meta["params"]})
        trainer.ema.load_state_dict(ema_state)
        trainer.sync_to_device()  # backend="cuda": the next step starts from the restored state
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint file {path!r}: cannot restore the trainer: {e}") from None
    return trainer


def load_model(path: str | os.PathLike, ema: bool = True, *, model_cls=None, backend: str | None = None):
    """Load the model of a checkpoint for sampling: the EMA parameters (``ema=True``) or the raw ones.

    ``model_cls`` and ``backend`` as in :func:`load_checkpoint`.

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        See :func:`read_checkpoint`.
    """
    if not isinstance(ema, (bool, np.bool_)):
        raise TypeError(f"ema must be a bool, got {type(ema).__name__}")
    path = os.fspath(path)
    meta, arrays = read_checkpoint(path)
    return _build_model(path, meta, arrays, "ema" if ema else "params", model_cls, backend)
