"""Resolved policy: tier thresholds + profile evidence sizes + overrides, with a digest.

The tier (`policies/tiers.yaml`) says how much degradation is acceptable; the profile
(`policies/profiles.yaml`) says how much evidence to collect. A config or preset may override
any of those values; the resolved policy records which ones it did, and its digest (sha256 of
canonical JSON) lets a reviewer see at a glance whether two certificates used the same rules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from invarlock.config import deep_merge, flatten, get
from invarlock.errors import ConfigError

TIERS = ("balanced", "conservative", "aggressive")
PROFILES = ("dev", "ci", "release")
DEFAULT_TIER = "balanced"
DEFAULT_PROFILE = "ci"
DEFAULT_SEED = 42

# Config key → resolved-policy key, for values a config may override.
_CONFIG_TO_POLICY = {
    "dataset.preview_n": "windows.preview_n",
    "dataset.final_n": "windows.final_n",
    "dataset.seq_len": "windows.seq_len",
    "dataset.stride": "windows.stride",
    "dataset.seed": "windows.seed",
    "eval.bootstrap.replicates": "bootstrap.replicates",
    "eval.bootstrap.alpha": "bootstrap.alpha",
    "eval.bootstrap.seed": "bootstrap.seed",
    "eval.primary_metric.ratio_limit": "primary_metric.ratio_limit",
    "eval.primary_metric.accuracy_delta_min_pp": "primary_metric.accuracy_delta_min_pp",
    "eval.primary_metric.catastrophic_ratio": "primary_metric.catastrophic_ratio",
    "eval.primary_metric.drift_band": "primary_metric.drift_band",
    "eval.distribution.kld_mean_upper": "distribution.kld_mean_upper",
    "eval.distribution.same_top_p_lower": "distribution.same_top_p_lower",
    "eval.distribution.kld_p99_upper": "distribution.kld_p99_upper",
    "auto.sequential": "sequential.enabled",
}


def policies_dir() -> Path:
    """Where tiers.yaml and profiles.yaml live: inside the installed package, or the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "policies", here.parent / "policies"):
        if (candidate / "tiers.yaml").is_file():
            return candidate
    raise ConfigError(f"policy files not found next to the package ({here})")


@cache
def _load(name: str) -> dict[str, Any]:
    path = policies_dir() / name
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def tiers() -> dict[str, Any]:
    return _load("tiers.yaml")


def profiles() -> dict[str, Any]:
    return _load("profiles.yaml")


@dataclass(frozen=True)
class PrimaryMetricPolicy:
    ratio_limit: float
    accuracy_delta_min_pp: float
    catastrophic_ratio: float
    drift_band: tuple[float, float]


@dataclass(frozen=True)
class WindowPolicy:
    preview_n: int
    final_n: int
    seq_len: int
    stride: int
    seed: int
    strict: bool


@dataclass(frozen=True)
class BootstrapPolicy:
    replicates: int
    alpha: float
    seed: int


@dataclass(frozen=True)
class EvidenceFloor:
    """The least evidence a profile promises; its own window counts, length and replicates.

    `seq_len` is the profile's window length, or the model's context length when that is
    shorter (the model cannot take longer windows, so that is not a shortfall).
    """

    profile: str
    preview_n: int
    final_n: int
    seq_len: int
    replicates: int
    below_floor: str  # "refuse": a config below the floor is an input error; "record": flagged
    gates: bool  # whether `evidence_meets_profile` is a gating flag in this profile

    def shortfalls(self, *, preview_n: int, final_n: int, seq_len: int,
                   replicates: int) -> tuple[str, ...]:
        """One phrase per value below the floor, e.g. 'final_n 50 < 200'."""
        pairs = (("preview_n", preview_n, self.preview_n), ("final_n", final_n, self.final_n),
                 ("seq_len", seq_len, self.seq_len),
                 ("bootstrap replicates", replicates, self.replicates))
        return tuple(f"{name} {have} < {floor}" for name, have, floor in pairs if have < floor)

    def as_dict(self) -> dict[str, Any]:
        return {"preview_n": self.preview_n, "final_n": self.final_n, "seq_len": self.seq_len,
                "replicates": self.replicates}


def evidence_floor(profile: str, context_length: int | None = None) -> EvidenceFloor:
    """The floor of `profile` (policies/profiles.yaml), for a model of `context_length`."""
    if profile not in profiles():
        raise ConfigError(f"unknown profile '{profile}'; choose one of {', '.join(profiles())}")
    prof = profiles()[profile]
    rule = dict(prof.get("evidence") or {})
    below = str(rule.get("below_floor", "record"))
    if below not in ("refuse", "record"):
        raise ConfigError(f"profiles.yaml: {profile}.evidence.below_floor must be 'refuse' or "
                          f"'record', got {below!r}")
    seq_len = int(prof["windows"]["seq_len"])
    if context_length is not None:
        seq_len = min(seq_len, int(context_length))
    return EvidenceFloor(profile, int(prof["windows"]["preview_n"]),
                         int(prof["windows"]["final_n"]), seq_len,
                         int(prof["bootstrap"]["replicates"]), below,
                         bool(rule.get("gates", False)))


@dataclass(frozen=True)
class ResolvedPolicy:
    """The rules a certificate was judged by. `values` is what the certificate records."""

    tier: str
    profile: str
    values: dict[str, Any]
    overrides: tuple[str, ...]
    allow_underpowered: bool = False  # auto.allow_underpowered / --allow-underpowered

    @property
    def weakened(self) -> tuple[str, ...]:
        """Overrides that ask for less than the tier and profile promise (`weakened_settings`)."""
        return weakened_settings(self.values, self.tier, self.profile)

    @property
    def digest(self) -> str:
        return policy_digest(self.values)

    @property
    def primary_metric(self) -> PrimaryMetricPolicy:
        pm = self.values["primary_metric"]
        return PrimaryMetricPolicy(
            ratio_limit=float(pm["ratio_limit"]),
            accuracy_delta_min_pp=float(pm["accuracy_delta_min_pp"]),
            catastrophic_ratio=float(pm["catastrophic_ratio"]),
            drift_band=(float(pm["drift_band"][0]), float(pm["drift_band"][1])),
        )

    @property
    def windows(self) -> WindowPolicy:
        w = self.values["windows"]
        return WindowPolicy(int(w["preview_n"]), int(w["final_n"]), int(w["seq_len"]),
                            int(w["stride"]), int(w["seed"]), bool(w["strict"]))

    @property
    def bootstrap(self) -> BootstrapPolicy:
        b = self.values["bootstrap"]
        return BootstrapPolicy(int(b["replicates"]), float(b["alpha"]), int(b["seed"]))

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values.get(name, {}))

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "profile": self.profile, "values": self.values,
                "overrides": list(self.overrides), "digest": self.digest}


# Settings whose override can talk the evidence down, and which direction is the weaker one:
# +1 a larger value asks for less (a wider interval, a higher limit), −1 a smaller one does.
# A `*` matches one key (a family). Replicates and window counts are the floor's own checks.
_WEAKER_WHEN = {
    "bootstrap.alpha": +1,
    "guards.calibration_windows": -1,
    "primary_metric.ratio_limit": +1,
    "primary_metric.accuracy_delta_min_pp": -1,
    "primary_metric.catastrophic_ratio": +1,
    "distribution.kld_mean_upper": +1,
    "distribution.same_top_p_lower": -1,
    "distribution.kld_p99_upper": +1,
    "guards.spectral.deadband": +1,
    "guards.spectral.max_caps": +1,
    "guards.spectral.family_caps.*": +1,
    "guards.spectral.module_change_limit": +1,
    "guards.spectral.max_spectral_norm": +1,
    "guards.spectral.edit_size_limit": +1,
    "guards.spectral.edit_along_data_limit": +1,
    "guards.spectral.multiple_testing.alpha": +1,
    "guards.rows.tau": +1,
    "guards.rows.max_share": +1,
    "guards.rmt.null_z": +1,
    "guards.rmt.false_alarm_rate": +1,
    "guards.rmt.null_tau": +1,
    "guards.rmt.edge_band": +1,
    "guards.rmt.epsilon_by_family.*": +1,
    "guards.variance.discovery.deadband": +1,
    "guards.variance.gating.min_effect_lognll": +1,
}
GUARD_MODE_RANK = {"off": 0, "monitor": 1, "gate": 2}


def weakened_settings(values: dict[str, Any], tier: str, profile: str) -> tuple[str, ...]:
    """One phrase per resolved value that asks for less than the tier and profile defaults.

    A confidence level below the profile's (a larger α), fewer calibration windows, a higher
    limit or a looser guard threshold than the tier's, a guard turned off or down to monitor
    or left out of `guards.order`, a guard's scope narrowed from `all`, a drift band widened,
    or a cap removed. Such a run does not carry the
    evidence its profile promises: `evidence_meets_profile` is false, and the refusing profiles
    (ci, release) refuse it unless underpowered runs are allowed. Values equal to or stricter
    than the defaults are never listed.
    """
    defaults = _defaults(tier, profile)
    have, want = flatten(values), flatten(defaults)
    out: list[str] = []
    for key in sorted(want):
        if key not in have:
            continue
        mine, default = have[key], want[key]
        direction = _direction(key)
        if key == "bootstrap.alpha" and _looser(mine, default, +1):
            out.append(f"bootstrap.alpha {mine:g} > {default:g} (a {_pct(mine)} interval, the "
                       f"profile promises {_pct(default)})")
        elif direction is not None and _looser(mine, default, direction):
            op = ">" if direction > 0 else "<"
            shown = "none" if mine is None else f"{mine:g}"
            out.append(f"{key} {shown} {op} {default:g}" if default is not None else
                       f"{key} {shown}")
        elif key.startswith("guards.") and key.endswith(".mode") and (
                GUARD_MODE_RANK.get(str(mine), 0) < GUARD_MODE_RANK.get(str(default), 0)):
            out.append(f"{key} {mine} instead of {default}")
        elif key.startswith("guards.") and default == "all" and mine != "all":
            out.append(f"{key} {mine} instead of all")  # a guard that looks at less
    order = (values.get("guards") or {}).get("order")
    dropped = [g for g in dict.fromkeys(defaults["guards"].get("order") or [])
               if isinstance(order, list) and g not in order]
    if dropped:
        out.append(f"guards.order leaves out {', '.join(dropped)}")
    lo, hi = have.get("primary_metric.drift_band") or (None, None)
    d_lo, d_hi = want["primary_metric.drift_band"]
    if lo is not None and (lo < d_lo or hi > d_hi):
        out.append(f"primary_metric.drift_band [{lo:g}, {hi:g}] wider than [{d_lo:g}, {d_hi:g}]")
    return tuple(out)


def _pct(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _direction(key: str) -> int | None:
    if key in _WEAKER_WHEN:
        return _WEAKER_WHEN[key]
    head, _, _tail = key.rpartition(".")
    return _WEAKER_WHEN.get(f"{head}.*")


def _looser(mine: Any, default: Any, direction: int) -> bool:
    """Whether `mine` asks for less than `default`; None (no limit) is the loosest value."""
    if isinstance(mine, bool) or isinstance(default, bool):
        return False
    if mine is None:
        return default is not None
    if default is None or not isinstance(mine, (int, float)):
        return False
    return (mine - default) * direction > 0


@cache
def _defaults_cached(tier: str, profile: str) -> str:
    return json.dumps(_defaults_values(tier, profile))


def _defaults(tier: str, profile: str) -> dict[str, Any]:
    return json.loads(_defaults_cached(tier, profile))


def _defaults_values(tier: str, profile: str) -> dict[str, Any]:
    if tier not in tiers():
        raise ConfigError(f"unknown tier '{tier}'; choose one of {', '.join(tiers())}")
    if profile not in profiles():
        raise ConfigError(f"unknown profile '{profile}'; choose one of {', '.join(profiles())}")
    prof = profiles()[profile]
    return deep_merge(tiers()[tier], {
        "windows": {**prof["windows"], "stride": None, "seed": DEFAULT_SEED},
        "bootstrap": {**prof["bootstrap"], "seed": DEFAULT_SEED},
        "guards": dict(prof.get("guards") or {}),
        "sequential": dict(prof.get("sequential") or {}),
    })


def policy_digest(values: dict[str, Any]) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def resolve(config: dict[str, Any], *, context_length: int | None = None) -> ResolvedPolicy:
    """Tier and profile defaults, then every policy value the (merged) config sets.

    With `context_length` (the model's maximum positions), a profile's default window length
    that does not fit is shortened to it; an explicitly configured one is an error.

    Evidence floor: where the profile refuses runs below its floor (ci, release), window
    counts, replicates or (once the context length is known) a window length below it are an
    error unless `auto.allow_underpowered` is set. The check needs no data or model weights.
    """
    tier = get(config, "auto.tier", DEFAULT_TIER)
    profile = get(config, "auto.profile", DEFAULT_PROFILE)
    if tier not in tiers():
        raise ConfigError(f"unknown tier '{tier}'; choose one of {', '.join(tiers())}")
    if profile not in profiles():
        raise ConfigError(f"unknown profile '{profile}'; choose one of {', '.join(profiles())}")

    defaults = _defaults(tier, profile)
    overrides: dict[str, Any] = {}
    for cfg_key, pol_key in _CONFIG_TO_POLICY.items():
        value = get(config, cfg_key)
        if value is not None:
            overrides[pol_key] = list(value) if isinstance(value, tuple) else value
    for section in ("guards",):
        if isinstance(config.get(section), dict):
            for key, value in flatten(config[section], f"{section}.").items():
                overrides[key] = value

    too_long = context_length is not None and defaults["windows"]["seq_len"] > context_length
    if too_long and "windows.seq_len" not in overrides:
        overrides["windows.seq_len"] = context_length
    values = deep_merge(defaults, {})
    for dotted, value in overrides.items():
        values = deep_merge(values, _nest(dotted, value))
    if context_length is not None and values["windows"]["seq_len"] > context_length:
        raise ConfigError(
            f"dataset.seq_len ({values['windows']['seq_len']}) exceeds the model's context "
            f"length ({context_length})"
        )
    windows = values["windows"]
    if windows["stride"] is None:
        windows["stride"] = windows["seq_len"]
    if windows["stride"] < windows["seq_len"]:
        raise ConfigError(
            f"dataset.stride ({windows['stride']}) is shorter than dataset.seq_len "
            f"({windows['seq_len']}): windows would overlap; use stride >= seq_len"
        )
    if windows["preview_n"] != windows["final_n"]:
        raise ConfigError(
            f"dataset.preview_n ({windows['preview_n']}) and dataset.final_n "
            f"({windows['final_n']}) must be equal: paired evidence needs equal counts"
        )
    lo, hi = values["primary_metric"]["drift_band"]
    if not lo < 1.0 < hi:
        raise ConfigError(f"eval.primary_metric.drift_band must bracket 1.0, got [{lo}, {hi}]")
    if defaults["windows"]["stride"] is None:
        defaults["windows"]["stride"] = defaults["windows"]["seq_len"]
    allow = get(config, "auto.allow_underpowered", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"auto.allow_underpowered must be true or false, got {allow!r}")
    _check_floor(values, evidence_floor(profile, context_length), allow,
                 seq_len_known=context_length is not None,
                 weakened=weakened_settings(values, tier, profile))
    changed = tuple(sorted(k for k, v in overrides.items() if get(defaults, k) != v))
    return ResolvedPolicy(tier=tier, profile=profile, values=values, overrides=changed,
                          allow_underpowered=allow)


def _check_floor(values: dict[str, Any], floor: EvidenceFloor, allow: bool, *,
                 seq_len_known: bool, weakened: tuple[str, ...] = ()) -> None:
    """Refuse a config below a refusing profile's floor, or one that weakens the tier's or the
    profile's settings, unless underpowered runs are allowed."""
    if floor.below_floor != "refuse" or allow:
        return
    windows = values["windows"]
    short = floor.shortfalls(
        preview_n=int(windows["preview_n"]), final_n=int(windows["final_n"]),
        seq_len=int(windows["seq_len"]) if seq_len_known else floor.seq_len,
        replicates=int(values["bootstrap"]["replicates"])) + weakened
    if short:
        raise ConfigError(
            f"below the {floor.profile} profile's evidence floor ({', '.join(short)}); use "
            f"the profile's and the tier's values or stricter ones, or pass "
            f"--allow-underpowered (auto.allow_underpowered: true) to run anyway with "
            f"evidence_meets_profile: false")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    cursor = node
    parts = dotted.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node
