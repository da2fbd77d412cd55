"""Timestep-aware calibration data (docs/methods/qdiffusion.md#calibration-data), collected in O(S) and cached on disk.

One FP sampling run with the deployment sampler records (x_t, t, ε_FP) at every step; ``num_steps_kept`` steps
are chosen uniformly and ``samples_per_step`` inputs are kept at each. The cache file is keyed by everything the
data depends on (model weights, scheduler config, calibration config); a mismatching cache raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin
from torch import Tensor, nn

from tadq.adapters.freeu import freeu_settings
from tadq.config import CalibrationConfig, config_to_dict
from tadq.safefiles import DamagedFileError, load_checked, require_finite, save_checked
from tadq.sampling import Conditioning, ConditionSource, SamplingPlan, sample, scheduler_config_key
from tadq.utils import eval_mode, public_config, remove_stale_temp_files

__all__ = ["CalibrationSet", "collect_calibration_set", "calibration_key", "model_fingerprint", "kept_steps"]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Denoiser inputs along FP trajectories.

    Args:
        x: (M, C, H, W) noisy inputs x_t.
        t: (M,) training timesteps.
        step_index: (M,) sampler step index (0 = noisiest).
        eps: (M, C, H, W) the ε the FP sampler stepped with at (x_t, t) (the guided ε under guidance).
        key: hash of everything the data depends on.
        fields: what ``key`` hashes, as JSON reads it back (set by ``collect_calibration_set``; ``None`` for a set
            built by hand), so ``tadq.quantize`` can refuse a set made for another call by the field that differs.
        cond: (M rows) what the network was told with each input (``None``: unconditional model). Under guidance
            every kept input appears twice, with the conditional and with the unconditional branch, as the network
            sees both in deployment.
    """

    x: Tensor
    t: Tensor
    step_index: Tensor
    eps: Tensor
    key: str
    cond: Conditioning | None = None
    fields: dict | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return self.x.shape[0]

    def save(self, path: str | Path, fields: dict | None = None) -> None:
        """Write atomically with a checksum; ``fields`` (what the key hashes) let a mismatch name the field.

        Non-finite data is never cached: a NaN model would otherwise poison every later run with this key.
        """
        tensors = {"x": self.x, "t": self.t, "step_index": self.step_index, "eps": self.eps}
        require_finite(tensors, "calibration data")
        tensors.update({} if self.cond is None else self.cond.to_tensors())
        save_checked(tensors, {"kind": "tadq-calibration-cache", "key": self.key, "fields": fields or {}}, path)

    @classmethod
    def load(cls, path: str | Path, expected_key: str, fields: dict | None = None) -> CalibrationSet:
        """Load a cached set; ``ValueError`` naming the field if it was made for another model, scheduler or config.

        Damaged files (truncated, flipped bytes, an old or foreign format) raise ``DamagedFileError``.
        """
        tensors, meta = load_checked(path, "calibration cache")
        key = meta.get("key") if isinstance(meta, dict) else None
        if key != expected_key:
            saved = meta.get("fields") if isinstance(meta, dict) and isinstance(meta.get("fields"), dict) else {}
            expected = json.loads(json.dumps(fields or {}, default=str))
            differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise ValueError(
                f"calibration cache {path} does not match this run (differs in: {', '.join(differing) or 'key'}; "
                f"cache key {key}, expected {expected_key}); delete it or point --cache-dir elsewhere"
            )
        cond = Conditioning.from_tensors(tensors)
        tensors = {name: value for name, value in tensors.items() if not name.startswith("cond.")}
        if set(tensors) != {"x", "t", "step_index", "eps"}:
            raise DamagedFileError(f"calibration cache {path} holds tensors {sorted(tensors)}; delete it")
        require_finite(tensors, f"calibration cache {path}:")
        return cls(tensors["x"], tensors["t"], tensors["step_index"], tensors["eps"], key, cond)


# what a calibration file holds and how it was recorded: bumped when that changes, so older files are not reused
CACHE_FORMAT = 2


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's class, its public config, FreeU when on and its tensors (names, dtypes, shapes, bytes).

    The config counts as much as the weights: a folder whose ``config.json`` was edited (another ``sample_size`` or
    ``norm_eps``) with the same weights samples something else, and must not reuse the old calibration data, cells
    or quantized models.
    """
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    digest.update(json.dumps(public_config(model), sort_keys=True, default=str).encode())
    freeu = freeu_settings(model)  # a runtime setting no config records; only when on, so other keys stay
    if freeu is not None:
        digest.update(json.dumps({"freeu": freeu}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()


def calibration_fields(model: nn.Module, scheduler_config: dict, config: CalibrationConfig,
                       conditions: ConditionSource | None = None, guidance_scale: float = 1.0) -> dict:
    """What the calibration data depends on: the model (weights and config), the device type it runs on (kernels
    differ in the last bits), the scheduler, the config (sampler incl. clipping), the cache format, and for a
    conditional model its conditions and guidance scale (absent when unconditional)."""
    parameter = next(model.parameters(), None)
    fields = {"format": CACHE_FORMAT, "model": model_fingerprint(model),
              "device": parameter.device.type if parameter is not None else "cpu",
              "scheduler": scheduler_config_key(scheduler_config), "config": config_to_dict(config)}
    if conditions is not None or guidance_scale != 1.0:
        fields["conditioning"] = {"conditions": None if conditions is None else conditions.key,
                                  "guidance_scale": float(guidance_scale)}
    return fields


def calibration_key(model: nn.Module, scheduler_config: dict, config: CalibrationConfig,
                    conditions: ConditionSource | None = None, guidance_scale: float = 1.0) -> str:
    return _key_of(calibration_fields(model, scheduler_config, config, conditions, guidance_scale))


def check_calibration_matches(calibration: CalibrationSet, model: nn.Module, scheduler, config: CalibrationConfig,
                              conditions: ConditionSource | None = None, guidance_scale: float = 1.0) -> None:
    """Refuse a precomputed calibration set made for another model, scheduler, calibration config or conditioning
    than the call it is handed to, naming what differs: its inputs would calibrate the ranges silently (and the
    artefact record a sampler the data did not come from), or fail deep in the first layer with another sample
    shape. The device type and the scheduler's provenance keys (``_class_name``, ``_diffusers_version``, which
    diffusers adds when it saves the scheduler) are not compared; a set built by hand (no ``fields``) is taken."""
    if calibration.fields is None:
        return
    scheduler_config = scheduler.config if hasattr(scheduler, "config") else scheduler
    expected = _comparable(_as_json(calibration_fields(model, scheduler_config, config, conditions, guidance_scale)))
    recorded = _comparable(calibration.fields)
    if conditions is None:  # the set carries its own conditions and guidance (a call without corrections needs
        # none, and a plain QuantConfig has no guidance of its own): its model, scheduler and config still count
        recorded.pop("conditioning", None)
        expected.pop("conditioning", None)
    differing = sorted(name for name in set(expected) | set(recorded) if expected.get(name) != recorded.get(name))
    if differing:
        raise ValueError(f"calibration= was collected for another {' and '.join(differing)} than this call (the "
                         "model, scheduler, calibration config and conditioning must be this call's): collect it with "
                         "tadq.calibration.collect_calibration_set(model, adapter, scheduler, config.calibration, "
                         "conditions=..., guidance_scale=...) as quantize would, or pass calibration=None")


def _as_json(fields: dict) -> dict:
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _comparable(fields: dict) -> dict:
    kept = {name: value for name, value in fields.items() if name != "device"}
    if isinstance(kept.get("scheduler"), dict):
        kept["scheduler"] = {k: v for k, v in kept["scheduler"].items() if not k.startswith("_")}
    return kept


def _key_of(fields: dict) -> str:
    payload = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def kept_steps(num_steps: int, num_kept: int) -> list[int]:
    """``num_kept`` step indices spread uniformly over ``range(num_steps)`` (first and last included)."""
    if num_kept == 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (num_kept - 1)) for i in range(num_kept)})


def _warn_unused_conditions(conditions: ConditionSource | None, num_trajectories: int) -> None:
    """Trajectory i takes condition i: a list of more conditions than trajectories leaves its tail unseen by
    calibration, which a user who passed them would not expect without a word."""
    count = len(conditions) if hasattr(conditions, "__len__") else None
    if count is not None and count > num_trajectories:
        logger.warning("calibration samples %d trajectories, one per condition: %d of the %d calibration conditions "
                       "are not used (raise CalibrationConfig.num_trajectories to %d to use them all)",
                       num_trajectories, count - num_trajectories, count, count)


def collect_calibration_set(
    model: nn.Module, adapter, scheduler_config: dict, config: CalibrationConfig,
    cache_dir: str | Path | None = None, progress: bool = True, *,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
) -> CalibrationSet:
    """Record the FP trajectory once and subsample it (O(S) model calls per trajectory).

    ``conditions`` (per-sample, from the calibration seed) and ``guidance_scale`` drive the FP sampler as in
    deployment; the kept inputs carry their conditioning (module docstring of ``CalibrationSet``).
    ``scheduler_config`` may also be the scheduler itself: its class names a flow-matching schedule, which a bare
    config does not (keys and cache files are those of its config).
    """
    scheduler = scheduler_config
    if hasattr(scheduler_config, "config"):
        scheduler_config = scheduler_config.config
    # the scheduler's class and the sampler are checked before the cache is read: a cached set (keyed by the
    # config's values) must not let a scheduler through that the FP run would have refused
    plan = SamplingPlan.build(scheduler if isinstance(scheduler, ConfigMixin) else scheduler_config, config.sampler,
                              guidance_scale)
    check = getattr(adapter, "check_prediction", None)  # e.g. a flow-matching model refuses an ε scheduler
    if check is not None:
        check(model, plan.steps[0].prediction_type)
    fields = calibration_fields(model, scheduler_config, config, conditions, guidance_scale)
    key = _key_of(fields)  # not calibration_key: the model is hashed once (seconds for a large one)
    path = Path(cache_dir) / f"calibration-{key}.safetensors" if cache_dir is not None else None
    parameter = next(model.parameters())
    if path is not None and path.exists():
        logger.info("using cached calibration data %s", path)
        # where a fresh collection puts it too (the model's device): a cached run must not differ from the first one
        loaded = replace(CalibrationSet.load(path, key, fields), fields=_as_json(fields))
        return _on_device(loaded, parameter.device)
    _warn_unused_conditions(conditions, config.num_trajectories)
    # in eval mode, as tadq.quantize runs it: a model built or left in training mode would record its dropout's
    # random draws, under the key (and into the cache file) of the same model in eval mode
    with eval_mode(model):
        result = sample(
            lambda x, t, cond=None: adapter.predict_eps(model, x, t, cond), plan,
            num_samples=config.num_trajectories, seed=config.seed, sample_shape=adapter.sample_shape(model),
            batch_size=config.batch_size, conditions=conditions, record_trajectory=True, progress=progress,
            device=parameter.device, dtype=parameter.dtype,
        )
    calib = replace(_subsample(result.trajectory, config, key, guided=plan.guided), fields=_as_json(fields))
    require_finite({"x": calib.x, "eps": calib.eps}, "calibration data recorded from the FP model:")
    if path is not None:
        # a run killed while writing a cache left its temp file (hundreds of MB for a large model) there for good
        removed = remove_stale_temp_files(path.parent)
        if removed:
            logger.info("removed %d temp file(s) a killed run left in %s", removed, path.parent)
        try:
            calib.save(path, _as_json(fields))
        except OSError as error:  # a read-only or full cache: the data is right, only the next run will redo it
            logger.warning("could not write the calibration cache %s (%s: %s); continuing without caching it",
                           path, type(error).__name__, error)
    # on the model's device, as a cached set comes back: the trajectory is recorded on the CPU, and a GPU model was
    # fed CPU inputs by the callers that take the set as it is (quantize_tfmq's reconstruction raised)
    return _on_device(calib, parameter.device)


def _on_device(calib: CalibrationSet, device: torch.device) -> CalibrationSet:
    """``calib`` with every tensor on ``device`` (dtypes kept: the file holds the model's)."""
    if calib.x.device == device:
        return calib
    cond = None if calib.cond is None else calib.cond.to(device)
    return CalibrationSet(calib.x.to(device), calib.t.to(device), calib.step_index.to(device), calib.eps.to(device),
                          calib.key, cond, calib.fields)


def _subsample(trajectory, config: CalibrationConfig, key: str, guided: bool) -> CalibrationSet:
    """``samples_per_step`` inputs at each kept step (a generator seeded by the calibration seed picks them)."""
    generator = torch.Generator().manual_seed(config.seed)
    xs, ts, steps, epss, conds = [], [], [], [], []
    for step in kept_steps(config.sampler.num_steps, config.num_steps_kept):
        chosen = torch.randperm(config.num_trajectories, generator=generator)[: config.samples_per_step]
        xs.append(trajectory.model_inputs[step][chosen])
        epss.append(trajectory.eps[step][chosen])
        # the timestep the network was called with: long on integer grids, float32 on fractional ones (euler, flow)
        ts.append(trajectory.timesteps[step].repeat(len(chosen)))
        steps.append(torch.full((len(chosen),), step, dtype=torch.long))
        if trajectory.cond is not None:
            conds.append(trajectory.cond.rows(chosen))
    x, t, index, eps = torch.cat(xs), torch.cat(ts), torch.cat(steps), torch.cat(epss)
    if not conds:
        return CalibrationSet(x, t, index, eps, key)
    cond = Conditioning.cat(conds)
    if not guided:
        return CalibrationSet(x, t, index, eps, key, cond.conditional_only())
    both = cond.stacked_branches()  # [conditional | unconditional], the rows marked
    return CalibrationSet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([index, index]), torch.cat([eps, eps]),
                          key, both)
