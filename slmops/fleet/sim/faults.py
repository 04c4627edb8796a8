"""Faults a simulated fleet can be given, and which devices get which.

    load:CLASS            the new release's variant fails to load on CLASS: its devices report the failure against
                          the release (``Window.release``) and keep serving the one before
    ttft:CLASSxFACTOR     the new release is FACTOR times slower to first token on CLASS (and a little slower per
                          token): devices run it, the class's p95 gate should stop it
    clock:SHARE           that share of devices has a clock off by 6 to 30 minutes either way: past the 5 minutes a
                          signature may be off, so their first signed request is refused with
                          ``Slmops-Server-Time``, from which they correct their offset; inside the 1 hour desired
                          state lives (SLMOPS_FLEET_METADATA_TTL), since expiry is judged by the device's own clock
                          and a clock that far ahead refuses every document (the trust store says so, by design)
    replay:SHARE          that share of devices is fed, once they run the new release, the older signed document
                          they were first given (a replaying control plane or a man in the middle), a copy with its
                          release altered (a forgery), and their next document only after it expired by their
                          clock (a delivery frozen past its expiry): every one must be refused
    return:N              the first N devices of a regressed class to take the new release go offline right after
                          and come back only once it was reverted: they must return to the previous release
    offline:SHARE         that share of devices drops off for 3 to 15 s at a random moment of the rollout (reports
                          queue and are sent late)

``--faults default`` is ``load:npu-aarch64,ttft:cpu-aarch64x1.8,clock:0.01,replay:0.01,return:1,offline:0.02``;
``--faults none`` runs a clean rollout. Items combine with commas.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from slmops.fleet.sim.classes import CLASSES, Serving
from slmops.types.errors import InvalidInput

DEFAULT = "load:npu-aarch64,ttft:cpu-aarch64x1.8,clock:0.01,replay:0.01,return:1,offline:0.02"
_HELP = ("write faults as load:CLASS, ttft:CLASSxFACTOR, clock:SHARE, replay:SHARE, return:N, offline:SHARE "
         "(comma-separated), default or none")


@dataclass(frozen=True)
class Faults:
    load_failure: frozenset[str] = frozenset()  # classes on which the new release fails to load
    ttft_regression: dict[str, float] = field(default_factory=dict, hash=False)  # class -> TTFT factor
    clock_share: float = 0.0
    replay_share: float = 0.0
    returning: int = 0
    offline_share: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Faults:
        text = text.strip()
        if text in ("", "none"):
            return cls()
        if text == "default":
            text = DEFAULT
        out = cls()
        for item in (i.strip() for i in text.split(",") if i.strip()):
            kind, sep, value = item.partition(":")
            if not sep:
                raise InvalidInput(f"--faults: {item!r}: {_HELP}")
            out = _apply(out, kind, value, item)
        return out

    def serving(self, hardware_class: str, new_release: bool) -> Serving:
        """How a release serves on ``hardware_class``: the class's own numbers, but for the new release where a
        regression was injected."""
        base = Serving(CLASSES[hardware_class])
        factor = self.ttft_regression.get(hardware_class) if new_release else None
        return replace(base, ttft_factor=factor, tokens_factor=0.95) if factor else base

    def fails_to_load(self, hardware_class: str, new_release: bool) -> bool:
        return new_release and hardware_class in self.load_failure

    @property
    def bad_classes(self) -> set[str]:
        """The classes whose gates should stop the new release."""
        return set(self.load_failure) | set(self.ttft_regression)

    def describe(self) -> str:
        parts = [f"load:{c}" for c in sorted(self.load_failure)]
        parts += [f"ttft:{c}x{f:g}" for c, f in sorted(self.ttft_regression.items())]
        parts += [f"{name}:{v:g}" for name, v in (("clock", self.clock_share), ("replay", self.replay_share),
                                                  ("return", self.returning), ("offline", self.offline_share)) if v]
        return ",".join(parts) or "none"


def _apply(out: Faults, kind: str, value: str, item: str) -> Faults:
    if kind == "load":
        return replace(out, load_failure=out.load_failure | {_class(value, item)})
    if kind == "ttft":
        name, _, factor = value.rpartition("x")
        return replace(out, ttft_regression={**out.ttft_regression, _class(name, item): _number(factor, item, 1)})
    if kind == "return":
        return replace(out, returning=int(_number(value, item, 0)))
    shares = {"clock": "clock_share", "replay": "replay_share", "offline": "offline_share"}
    if kind in shares:
        share = _number(value, item, 0)
        if share > 1:
            raise InvalidInput(f"--faults: {item!r}: a share is between 0 and 1")
        return replace(out, **{shares[kind]: share})
    raise InvalidInput(f"--faults: unknown fault {kind!r}; {_HELP}")


def _class(name: str, item: str) -> str:
    if name not in CLASSES:
        raise InvalidInput(f"--faults: {item!r}: unknown class {name!r}; use {', '.join(CLASSES)}")
    return name


def _number(text: str, item: str, minimum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"--faults: {item!r}: {text!r} is not a number; {_HELP}") from None
    if value < minimum:
        raise InvalidInput(f"--faults: {item!r}: must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class Behaviour:
    """What one device does besides following its desired state."""

    clock_offset: float = 0.0  # seconds its clock is off from the true time
    replay: bool = False  # fed an older, a forged and an expired document once it runs the new release
    offline_at: float | None = None  # seconds into the rollout it drops off ...
    offline_for: float = 0.0  # ... and for how long


def behaviours(classes: list[str], faults: Faults, rng: random.Random) -> list[Behaviour]:
    """Each device's behaviour; the shares are drawn without replacement, so one device carries one fault and the
    counts are what the shares say. Returners are not chosen here: they are the first devices of a regressed
    class to take the new release (only those of its first wave ever do)."""
    n = len(classes)
    order = list(range(n))
    rng.shuffle(order)
    out = [Behaviour() for _ in range(n)]
    rest = iter(order)
    for share, make in ((faults.clock_share, lambda: Behaviour(clock_offset=_skew(rng))),
                        (faults.replay_share, lambda: Behaviour(replay=True)),
                        (faults.offline_share, lambda: Behaviour(offline_at=rng.uniform(0, 20),
                                                                 offline_for=rng.uniform(3, 15)))):
        for _ in range(round(share * n)):
            i = next(rest, None)
            if i is None:
                break
            out[i] = make()
    return out


def _skew(rng: random.Random) -> float:
    return rng.choice((-1, 1)) * rng.uniform(360, 1800)
