"""The release pipeline a CI job runs when a Modelfile changes, as one ordered list of existing slmops steps:

    check → create → quantize → gate → sign → push → release → channel → rollout

Each step is a function slmops already has (``modelfile.build.create``, ``ops.quantize.quantize_model``,
``ops.evaluate.evaluate``/``gate`` with the fleet agent's golden-prompt check, ``security.signing.sign``,
``store.pushing.push_to_registry``, and the control plane's release, channel and rollout calls through
:class:`~slmops.client.fleet.FleetClient`); this module only orders them, says what each did, and stops at the first
one that fails, so that a job has one verdict, one reason and a summary it can archive. Nothing leaves the machine
before the gate has passed: a model that loses quality is never signed, pushed or published.

Re-running is cheap and safe, so a job that failed at ``push`` or ``release`` (a registry or control plane down)
can simply run again. Local steps remember what they made in a small state file, keyed by their inputs (the
Modelfile's text, the source digest and type, the digests evaluated with the gate's settings, the manifest and the
signing key's public half): a rerun finds the model made, quantized, gated and signed, and goes on from the push.
Remote steps ask the other side instead: a push sends only what the registry lacks; a release that exists with
the same digests, a channel already on the release, a rollout of it to the group already started are each left as
they are; a release that exists with other digests is a failure (releases never change: publish a new version).
The state is keyed by the Modelfile's text, not by the files it names: a model of new content is a new version.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.api.fleet import NAME_RE, VERSION_RE, Golden, RolloutRequest
from slmops.store.atomic import atomic_writer
from slmops.store.registry_auth import RegistryConfig
from slmops.types import quant
from slmops.types.errors import InvalidInput, ModelNotFound, NotFound, SlmopsError
from slmops.types.name import ModelName, Reference

if TYPE_CHECKING:
    from slmops.client.fleet import FleetClient
    from slmops.store.store import Store

AS_IS = "as-is"  # a variant that is the model the Modelfile makes, unquantized
STEPS = ("check", "create", "quantize", "gate", "sign", "push", "release", "channel", "rollout")


@dataclass(frozen=True)
class VariantPlan:
    """One variant of the release: the hardware key devices match (cpu, cuda, cpu-aarch64, *) and the type its
    model is quantized to, or ``as-is``."""

    hardware: str
    qtype: str

    @classmethod
    def parse(cls, text: str) -> VariantPlan:
        """``HARDWARE=TYPE``; the type is checked now, so a typo fails before anything is made."""
        hardware, sep, qtype = text.partition("=")
        if not sep or not hardware or not qtype:
            raise InvalidInput(f"--variant {text!r}: write it as HARDWARE=TYPE (cpu=q8_0, cuda=f16, *={AS_IS})")
        qtype = qtype.strip().lower()
        return cls(hardware.strip(), qtype if qtype == AS_IS else quant.parse(qtype))


@dataclass(frozen=True)
class GatePlan:
    """When a release may leave: every quantized variant within ``max_ppl_increase`` percent of the baseline's
    perplexity, and every variant passing at least ``min_golden_score`` of the golden prompts (which also travel
    with the release, for the devices' own smoke test)."""

    max_ppl_increase: float = 1.0
    golden: tuple[Golden, ...] = ()
    min_golden_score: float = 1.0
    ctx: int = 512
    windows: int = 0  # 0: the whole held-out text
    baseline: ModelName | None = None  # None: the model the Modelfile makes
    # conversations whose last message is a well-rated answer (a tuning dataset's held-out file): each model's
    # perplexity of those answers may exceed the baseline's by at most max_heldout_increase percent
    heldout: tuple[tuple[dict[str, str], ...], ...] = ()
    max_heldout_increase: float = 0.0


@dataclass(frozen=True)
class PublishPlan:
    fleet_url: str
    channel: str = "canary"
    rollout: RolloutRequest | None = None  # None: publish to the channel only
    notes: str = ""


@dataclass(frozen=True)
class ReleasePlan:
    name: str
    version: str
    modelfile: Path | None  # what the release is made from: a Modelfile, or
    registry: str  # host[:port]/namespace the variants are pushed under
    variants: tuple[VariantPlan, ...]
    signing_key: Path
    gate: GatePlan
    publish: PublishPlan
    allow_requantize: bool = False
    key_password: str | None = None
    source: ModelName | None = None  # a model already in the store (one `slmops tune` made), released as it is

    def __post_init__(self) -> None:
        if (self.modelfile is None) == (self.source is None):
            raise InvalidInput("release a Modelfile (-f) or a model in the store (--model), one of them")
        if not NAME_RE.match(self.name):
            raise InvalidInput(f"release name {self.name!r}: lowercase letters, digits and ._- (64 at most)")
        if not VERSION_RE.match(self.version):
            raise InvalidInput(f"release version {self.version!r}: letters, digits and .+- (32 at most)")
        if not self.variants:
            raise InvalidInput("a release needs at least one --variant HARDWARE=TYPE")
        keys = [v.hardware for v in self.variants]
        if len(set(keys)) != len(keys):
            raise InvalidInput("a hardware key is given twice; one model per hardware key")
        for qtype in {AS_IS, *self.qtypes()}:
            if not Reference.parse(self.model(qtype).display).host_given:
                raise InvalidInput(f"--registry {self.registry!r}: write it as HOST[:PORT]/NAMESPACE")

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def qtypes(self) -> list[str]:
        """The models the variants need, each once (``as-is`` first). The model the Modelfile makes is created
        whatever they are (it is what the others are quantized from, and the gate's default baseline), but it is
        signed and pushed only as a variant of its own."""
        types = {v.qtype for v in self.variants}
        return ([AS_IS] if AS_IS in types else []) + sorted(types - {AS_IS})

    def model(self, qtype: str) -> ModelName:
        """The store's and the registry's name of one model: the version as its tag, plus the type if quantized."""
        tag = self.version.lower().replace("+", "_") + ("" if qtype == AS_IS else f"-{qtype}")
        return ModelName.parse(f"{self.registry.strip('/')}/{self.name}:{tag}")


@dataclass
class StepResult:
    step: str
    status: str  # done | skipped | planned (--dry-run) | failed | not run
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReleaseSummary:
    """What a CI job archives (``--json``): every step, the variants as pushed, and the verdict."""

    release: str
    dry_run: bool
    ok: bool = True
    failed_step: str | None = None
    reason: str | None = None
    steps: list[StepResult] = field(default_factory=list)
    variants: list[dict[str, Any]] = field(default_factory=list)
    rollout: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Wiring:
    """What the pipeline reaches outside the store; built from settings at the command line."""

    registry: RegistryConfig
    fleet: Callable[[], FleetClient]
    engine: Callable[[], Any]  # an in-process engine, made only when the gate runs
    state: Path  # where local steps remember what they made


class StepMemo:
    """Results of local steps by a fingerprint of their inputs, in one JSON file written atomically."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, step: str, key: str) -> dict[str, Any] | None:
        return self.data.get(step, {}).get(key)

    def put(self, step: str, key: str, value: dict[str, Any]) -> None:
        self.data.setdefault(step, {})[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path) as f:
            f.write(json.dumps(self.data, indent=1, sort_keys=True).encode())


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class ReleasePipeline:
    """One run of :data:`STEPS` for ``plan``; ``report`` is told each step's result as it ends."""

    def __init__(self, store: Store, plan: ReleasePlan, wiring: Wiring, report: Callable[[StepResult], None]):
        self.store, self.plan, self.wiring, self.report = store, plan, wiring, report
        self.memo = StepMemo(wiring.state)
        self.digests: dict[str, str] = {}  # qtype -> manifest digest of its model
        self._fleet: FleetClient | None = None

    def run(self, dry_run: bool = False) -> ReleaseSummary:
        """Every step in order until one fails; with ``dry_run``, only ``check`` runs and the rest say what they
        would do."""
        summary = ReleaseSummary(self.plan.label, dry_run)
        try:
            for step in STEPS:
                if not summary.ok:
                    summary.steps.append(StepResult(step, "not run", ""))
                    continue
                result = self._planned(step) if dry_run and step != "check" else self._timed(step)
                summary.steps.append(result)
                self.report(result)
                if result.status == "failed":
                    summary.ok, summary.failed_step, summary.reason = False, step, result.detail
        finally:
            if self._fleet is not None:
                self._fleet.close()
        summary.variants = self._variants()
        rollout = summary.steps[-1]
        summary.rollout = rollout.data.get("id") if rollout.status in ("done", "skipped") else None
        return summary

    def _timed(self, step: str) -> StepResult:
        """A step's result; any error it raises is its failure, said in one line (the summary is still written)."""
        t0 = time.monotonic()
        try:
            status, detail, data = getattr(self, f"_{step}")()
        except SlmopsError as err:
            status, detail, data = "failed", str(err), {}
        except Exception as err:  # noqa: BLE001 - a CI job needs its summary whatever broke
            status, detail, data = "failed", f"{type(err).__name__}: {err}", {}
        return StepResult(step, status, detail, round(time.monotonic() - t0, 2), data)

    def _variants(self) -> list[dict[str, Any]]:
        return [{"hardware": v.hardware, "type": v.qtype, "reference": self.plan.model(v.qtype).display,
                 "digest": self.digests.get(v.qtype)} for v in self.plan.variants]

    def fleet(self) -> FleetClient:
        if self._fleet is None:
            self._fleet = self.wiring.fleet()
        return self._fleet

    def _has(self, name: ModelName, digest: str) -> bool:
        return self.store.exists(name) and str(self.store.manifests.digest(name)) == digest

    # -- the steps: each returns (status, detail, data) -------------------------------------------------------
    def _check(self) -> tuple[str, str, dict[str, Any]]:
        """Inputs that would otherwise fail late: the Modelfile, the signing key, the control plane and its key."""
        from slmops.modelfile import parse
        from slmops.security.signing import check_key_file

        made_from = f"{self.plan.source.display} is in the store" if self.plan.source else "Modelfile parses"
        if self.plan.source is None:
            parse(self._modelfile_text())
        elif not self.store.exists(self.plan.source):
            raise ModelNotFound(self.plan.source.display)
        check_key_file(self.plan.signing_key, "private key", self.plan.key_password)
        channels = {c.name: c.release for c in self.fleet().channels()}
        at = channels.get(self.plan.publish.channel)
        return "done", (f"{made_from}, {self.plan.signing_key.name} signs, control plane answers (channel "
                        f"{self.plan.publish.channel}: {at or 'not set yet'})"), {"channel_before": at}

    def _modelfile_text(self) -> str:
        assert self.plan.modelfile is not None
        try:
            return self.plan.modelfile.read_text()
        except (OSError, UnicodeDecodeError):
            raise InvalidInput(f"cannot read Modelfile {self.plan.modelfile}; pass its path with -f") from None

    def _create(self) -> tuple[str, str, dict[str, Any]]:
        from slmops.modelfile import build, parse

        name = self.plan.model(AS_IS)
        if self.plan.source is not None:
            return self._copy(self.plan.source, name)
        text = self._modelfile_text()
        key = fingerprint({"modelfile": text, "name": name.display})
        done = self.memo.get("create", key)
        if done and self._has(name, done["digest"]):
            self.digests[AS_IS] = done["digest"]
            return "skipped", f"{name.display} ({_short(done['digest'])}) made before from this Modelfile", done
        build.create(self.store, name, parse(text), self.plan.modelfile.resolve().parent)
        digest = str(self.store.manifests.digest(name))
        self.memo.put("create", key, {"model": name.display, "digest": digest})
        self.digests[AS_IS] = digest
        return "done", f"{name.display} ({_short(digest)})", {"model": name.display, "digest": digest}

    def _copy(self, source: ModelName, name: ModelName) -> tuple[str, str, dict[str, Any]]:
        """A model made before (its manifest, config and provenance unchanged) under the release's name."""
        digest = str(self.store.manifests.digest(source))
        self.digests[AS_IS] = digest
        data = {"model": name.display, "digest": digest, "source": source.display}
        if self._has(name, digest):
            return "skipped", f"{name.display} ({_short(digest)}) is {source.display} already", data
        self.store.copy(source, name)
        return "done", f"{name.display} ({_short(digest)}) from {source.display}", data

    def _quantize(self) -> tuple[str, str, dict[str, Any]]:
        from slmops.ops.quantize import quantize_model

        src, warnings, made, skipped = self.plan.model(AS_IS), [], [], []
        for qtype in [q for q in self.plan.qtypes() if q != AS_IS]:
            dst = self.plan.model(qtype)
            key = fingerprint({"source": self.digests[AS_IS], "type": qtype, "name": dst.display})
            done = self.memo.get("quantize", key)
            if done and self._has(dst, done["digest"]):
                self.digests[qtype] = done["digest"]
                skipped.append(dst.display)
                continue
            quantize_model(self.store, src, dst, qtype, self.plan.allow_requantize, warn=warnings.append)
            self.digests[qtype] = str(self.store.manifests.digest(dst))
            self.memo.put("quantize", key, {"model": dst.display, "digest": self.digests[qtype]})
            made.append(f"{dst.display} ({_short(self.digests[qtype])})")
        data = {"made": made, "made_before": skipped, "warnings": warnings}
        if not made:
            why = "made before" if skipped else f"every variant is the model as created ({AS_IS})"
            return "skipped", f"{', '.join(skipped)} {why}" if skipped else why, data
        return "done", ", ".join(made) + (f"; {len(skipped)} made before" if skipped else ""), data

    def _gate(self) -> tuple[str, str, dict[str, Any]]:
        g = self.plan.gate
        baseline = g.baseline or self.plan.model(AS_IS)
        if not self.store.exists(baseline):
            raise ModelNotFound(f"{baseline.display} (the gate's baseline; pull it first)")
        key = fingerprint({"baseline": str(self.store.manifests.digest(baseline)), "models": self.digests,
                           "gate": {**asdict(g), "baseline": baseline.display,
                                    "golden": [x.model_dump() for x in g.golden]}})
        done = self.memo.get("gate", key)
        if done:
            return "skipped", f"passed before with these models and limits: {done['verdict']}", done
        data = evaluate_gate(self.wiring.engine, self.store, baseline,
                             [self.plan.model(q) for q in self.plan.qtypes()], g)
        if data["failure"]:
            return "failed", data["failure"], data
        self.memo.put("gate", key, data)
        return "done", data["verdict"], data

    def _sign(self) -> tuple[str, str, dict[str, Any]]:
        from slmops.security.signing import sign

        key_id = public_key_id(self.plan.signing_key, self.plan.key_password)
        signed, before = [], []
        for qtype in self.plan.qtypes():
            name, digest = self.plan.model(qtype), self.digests[qtype]
            memo_key = fingerprint({"digest": digest, "key": key_id, "name": name.display})
            done, sig = self.memo.get("sign", memo_key), self.store.signature_path(name)
            if done and sig.is_file() and hashlib.sha256(sig.read_bytes()).hexdigest() == done["bundle"]:
                before.append(name.display)
                continue
            bundle = sign(self.store, name, self.plan.signing_key, self.plan.key_password)
            self.memo.put("sign", memo_key, {"bundle": hashlib.sha256(bundle.read_bytes()).hexdigest()})
            signed.append(name.display)
        data = {"signed": signed, "signed_before": before, "key": key_id}
        if not signed:
            return "skipped", f"signed before with {self.plan.signing_key.name}", data
        return "done", f"{len(signed)} model(s) signed with {self.plan.signing_key.name} (key {key_id[:12]})", data

    def _push(self) -> tuple[str, str, dict[str, Any]]:
        from slmops.store.pushing import push_to_registry

        pushed = []
        for qtype in self.plan.qtypes():
            name = self.plan.model(qtype)
            result = push_to_registry(self.store, Reference.of(name), lambda *a: None, self.wiring.registry)
            pushed.append({"reference": name.display, "digest": str(result.digest), "signed": result.signed,
                           "uploaded_blobs": len(result.uploaded)})
        sent = sum(p["uploaded_blobs"] for p in pushed)
        return "done", (f"{len(pushed)} model(s) with signatures, {sent} new blob(s): "
                        + ", ".join(f"{p['reference']}@{_short(p['digest'])}" for p in pushed)), {"pushed": pushed}

    def _release(self) -> tuple[str, str, dict[str, Any]]:
        p = self.plan
        want = {v.hardware: self.digests[v.qtype] for v in p.variants}
        try:
            existing = self.fleet().release(p.name, p.version)
        except NotFound:
            existing = None
        if existing is not None:
            have = {v.hardware: v.manifest_digest for v in existing.variants}
            if have == want:
                return "skipped", f"release {p.label} exists with these digests", {"variants": have}
            return "failed", (f"release {p.label} exists with other content ({_difference(have, want)}); releases "
                              "never change: publish a new version"), {"variants": have}
        variants = [{"hardware": v.hardware, "reference": p.model(v.qtype).display,
                     "manifest_digest": self.digests[v.qtype]} for v in p.variants]
        made = self.fleet().create_release(p.name, p.version, variants,
                                           [g.model_dump(exclude_none=True) for g in p.gate.golden], self._notes())
        shown = ", ".join(f"{v.hardware} {'signed' if v.signed else 'unsigned'}" for v in made.variants)
        return "done", f"release {made.release} created ({shown})", {
            "variants": {v.hardware: v.manifest_digest for v in made.variants}}

    def _notes(self) -> str:
        """The notes given, else, for a tuned model, its base and the feedback it was trained on."""
        from slmops.ops.tune import notes, provenance

        if self.plan.publish.notes or self.plan.source is None:
            return self.plan.publish.notes
        made = provenance(self.store, self.plan.source)
        return notes(made) if made else ""

    def _channel(self) -> tuple[str, str, dict[str, Any]]:
        channel, label = self.plan.publish.channel, self.plan.label
        try:
            before = self.fleet().channel(channel).release
        except NotFound:
            before = None
        if before == label:
            return "skipped", f"channel {channel} is on {label} already", {"before": before}
        info = self.fleet().set_channel(channel, label)
        return "done", f"channel {info.name} -> {info.release}" + (f" (was {before})" if before else ""), {
            "before": before}

    def _rollout(self) -> tuple[str, str, dict[str, Any]]:
        req = self.plan.publish.rollout
        if req is None:
            return "skipped", f"no rollout asked for; the release waits on channel {self.plan.publish.channel}", {}
        existing = [r for r in self.fleet().rollouts(group=req.group) if r.release == req.release]
        if existing:
            r = existing[0]
            return "skipped", f"rollout {r.id} of {r.release} to group {r.group} exists ({r.status})", {
                "id": r.id, "status": r.status}
        info = self.fleet().start_rollout(req)
        return "done", f"rollout {info.id} started: {info.release} to group {info.group}", {
            "id": info.id, "status": info.status, "classes": [c.hardware_class for c in info.classes]}

    def _planned(self, step: str) -> StepResult:
        """What ``step`` would do (``--dry-run``)."""
        p, g, pub = self.plan, self.plan.gate, self.plan.publish
        refs = ", ".join(p.model(q).display for q in p.qtypes())
        text = {
            "create": f"create {p.model(AS_IS).display} from {p.source.display if p.source else p.modelfile}",
            "quantize": ", ".join(f"{p.model(q).display} ({q})" for q in p.qtypes() if q != AS_IS)
                        or "nothing to quantize",
            "gate": (f"evaluate {refs} against {(g.baseline or p.model(AS_IS)).display}: perplexity within "
                     f"{g.max_ppl_increase:+g}%, golden score at least {g.min_golden_score:g} over "
                     f"{len(g.golden)} prompt(s)" + (f", held-out answers within {g.max_heldout_increase:+g}% over "
                                                     f"{len(g.heldout)} conversation(s)" if g.heldout else "")),
            "sign": f"sign {refs} with {p.signing_key.name}",
            "push": f"push {refs}",
            "release": f"create release {p.label} on {pub.fleet_url}: "
                       + ", ".join(f"{v.hardware}={p.model(v.qtype).display}" for v in p.variants),
            "channel": f"point channel {pub.channel} at {p.label}",
            "rollout": (f"start a rollout of {p.label} to group {pub.rollout.group}" if pub.rollout
                        else "no rollout"),
        }[step]
        return StepResult(step, "planned", text)


def _difference(have: dict[str, str], want: dict[str, str]) -> str:
    hw = next(h for h in sorted(set(have) | set(want)) if have.get(h) != want.get(h))
    return f"variant {hw}: {_short(have.get(hw, 'absent'))} there, {_short(want.get(hw, 'absent'))} here"


def evaluate_gate(engine_factory: Callable[[], Any], store: Store, baseline: ModelName, models: list[ModelName],
                  g: GatePlan) -> dict[str, Any]:
    """Perplexity and built-in golden prompts of the baseline and each model (``slmops eval``), the perplexity
    limit on each model that is not the baseline, and the release's golden prompts on each; ``failure`` says every
    reason a model may not be released, in one line, or is None."""
    from slmops.engine.client import spec_from_store
    from slmops.ops.evaluate import answer_perplexity, evaluate, gate, increase

    conversations = [list(c) for c in g.heldout]
    engine = engine_factory()
    try:
        base_spec = spec_from_store(store, baseline)
        base = evaluate(engine, base_spec, g.ctx, g.windows)
        base_held = answer_perplexity(base_spec, conversations).value if conversations else None
        rows, failures = [], []
        for name in models:
            spec = spec_from_store(store, name)
            report = base if name == baseline else evaluate(engine, spec, g.ctx, g.windows)
            golden = golden_check(engine, spec, g.golden, g.min_golden_score)
            row = {"model": name.display, "eval": report.to_json(),
                   "perplexity_increase_percent": round(increase(report, base), 3), "golden": golden}
            if base_held is not None:
                held = base_held if name == baseline else answer_perplexity(spec, conversations).value
                rise = 100 * (held / base_held - 1)
                row["heldout"] = {"perplexity": held, "baseline": base_held, "increase_percent": round(rise, 3),
                                  "conversations": len(conversations)}
                if rise > g.max_heldout_increase and name != baseline:
                    failures.append(f"held-out answers' perplexity of {name.display} is {rise:+.1f}% over "
                                    f"{baseline.display} ({held:.3f} vs {base_held:.3f}, limit "
                                    f"{g.max_heldout_increase:+.1f}%); keep the baseline")
            rows.append(row)
            failures += [f for f in (gate(report, base, g.max_ppl_increase) if name != baseline else None,
                                     golden["failure"]) if f]
    finally:
        engine.close()
    verdict = "; ".join(f"{r['model']} {r['perplexity_increase_percent']:+.2f}% perplexity, "
                        + (f"{r['heldout']['increase_percent']:+.2f}% held-out answers, " if "heldout" in r else "")
                        + f"golden {r['golden']['passed']}/{r['golden']['total']}" for r in rows)
    failure = "gate failed: " + "; ".join(f.removeprefix("gate failed: ") for f in failures) if failures else None
    return {"baseline": base.to_json(), "models": rows, "verdict": verdict, "failure": failure}


def golden_check(engine: Any, spec: Any, golden: tuple[Golden, ...], threshold: float) -> dict[str, Any]:
    """The release's golden prompts asked as a device's smoke test asks them (greedy, ``max_tokens``) and judged
    by the same rule (:mod:`slmops.fleet.agent.smoke`), so a release that passes here passes there too. Unlike a
    device, a CI job may show the prompt and the answer that failed."""
    from slmops.engine.client import Request
    from slmops.fleet.agent.smoke import passes, score

    results, answers = [], []
    for g in golden:
        req = Request(messages=[{"role": "user", "content": g.prompt}],
                      options={"temperature": 0, "num_predict": g.max_tokens})
        answers.append("".join(out.text for out in engine.run(spec, req)))
        results.append(passes(g, answers[-1]))
    result = score(results, threshold)
    failure = None
    if not result.passed:
        first = result.failed[0]
        g = golden[first]
        want = " and ".join(([f"containing {g.expect!r}"] if g.expect is not None else [])
                            + ([f"matching /{g.expect_regex}/"] if g.expect_regex is not None else [])) or "non-empty"
        failure = (f"{spec.name} passed {len(results) - len(result.failed)}/{len(results)} golden "
                   f"prompts (need a score of {threshold:g}); prompt {first + 1} {g.prompt[:60]!r} was "
                   f"answered {answers[first][:80]!r}, not an answer {want}")
    return {"passed": len(results) - len(result.failed), "total": len(results), "score": result.score,
            "failed": [{"prompt": golden[i].prompt, "answer": answers[i]} for i in result.failed],
            "failure": failure}


def public_key_id(private_key: Path, password: str | None) -> str:
    """sha256 of the public half of the signing key: what a signature is remembered by, never the secret."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key.read_bytes(), password.encode() if password else None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


__all__ = ["AS_IS", "STEPS", "GatePlan", "PublishPlan", "ReleasePipeline", "ReleasePlan", "ReleaseSummary",
           "StepResult", "VariantPlan", "Wiring", "evaluate_gate", "golden_check"]
