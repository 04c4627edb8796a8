"""The feedback loop in one run: a synthetic set of rated support answers → ``slmops feedback dataset`` →
``slmops tune`` with its report (held-out answers, held-out text, golden prompts) and loss curve → ``slmops bench``
of the base, the tuned model (base + adapter) and the same training merged into the weights (``--merge``), speeds
alternated run by run (medians), so what the adapter costs at serving time is measured beside what it bought.

    python bench/tune_bench.py [--home DIR] [--steps 30] [--lr 1e-4] [--runs 3]

The feedback is made up (a thermostat's support answers, twelve facts asked five ways, a few rated -1): the
product ships no user data, and the point is the loop's numbers, not the facts. Output:
``bench/results/tune.json`` and ``docs/bench/tune.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from shrink_bench import HERE, cli  # the real CLI with --json, in this bench folder
FACTS = {
    "reset the thermostat": "Hold the dial down for ten seconds until the ring blinks blue, then release it.",
    "change the battery": "Slide the back plate up and replace the two AA cells; your settings are kept.",
    "connect it to Wi-Fi": "Open Settings, choose Network, pick your 2.4 GHz network and enter its password.",
    "turn on eco mode": "Press the leaf button once; the ring turns green while eco mode is on.",
    "set a weekly schedule": "Open Schedule, pick a day, then drag the blocks to the hours you want heated.",
    "lock the controls": "Hold the leaf and the dial together for three seconds until a padlock appears.",
    "know when to change the air filter": "The ring pulses orange every 90 days; tap it to reset the filter timer.",
    "switch the display to Celsius": "Open Settings, choose Display, and set Units to Celsius.",
    "update the firmware": "Open Settings, choose About, then Update; keep it powered until the ring turns white.",
    "pair it with a remote sensor": "Press the sensor's button, then choose Add Sensor under Rooms within a minute.",
    "see how much energy I used": "Open History; each bar is a day, and green bars mean eco mode saved energy.",
    "turn off the night light": "Open Display and set Night Light to Off; the ring stays dark after 10 pm.",
}
ASKS = ("How do I {}?", "What is the way to {}?", "Can you tell me how to {}?", "How can I {}?",
        "What are the steps to {}?")


def feedback(path: Path) -> Path:
    lines, n = [], 0
    for task, answer in FACTS.items():
        for ask in ASKS:
            n += 1
            lines.append({"messages": [{"role": "user", "content": ask.format(task)},
                                       {"role": "assistant", "content": answer}], "rating": 1})
    for task in list(FACTS)[:4]:
        lines.append({"messages": [{"role": "user", "content": f"How do I {task}?"},
                                   {"role": "assistant", "content": "Please contact support."}], "rating": -1})
    for i, line in enumerate(lines):
        line.update(release="assistant:1.0.0", at=1_780_000_000.0 + i, model="assistant",
                    id="fb_" + hashlib.sha256(str(i).encode()).hexdigest()[:24])
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("SLMOPS_HOME", Path.home() / ".slmops")))
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", default="1e-4")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    tuned = f"{a.model.split(':')[0]}:tuned-bench"
    merged = f"{a.model.split(':')[0]}:merged-bench"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ds = cli(a.home, "feedback", "dataset", str(feedback(Path(tmp) / "feedback.jsonl")), "-o", str(data))
        png = HERE.parent / "docs" / "bench" / "tune.png"
        out = cli(a.home, "tune", a.model, "--data", str(data), "--to", tuned, "--steps", str(a.steps), "--lr", a.lr,
                  "--plot", str(png))
        folded = cli(a.home, "tune", a.model, "--data", str(data), "--to", merged, "--steps", str(a.steps), "--lr",
                     a.lr, "--merge")
    speed = cli(a.home, "bench", a.model, tuned, merged, "--runs", str(a.runs), "--tokens", "64",
                "--prompt-tokens", "256")
    result = {"dataset": ds["counts"], "tune": out, "merged": folded, "bench": speed, "cpus": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{ds['counts']['train']} answers trained on, {ds['counts']['heldout']} held out; {a.steps} steps in "
          f"{out['seconds']:.0f} s; adapter {out['adapter_bytes'] / 1e6:.1f} MB; loss {out['losses'][0]:.3f} -> "
          f"{out['losses'][-1]:.3f}")
    base = speed[0]
    print("| model | held-out answers ppl | held-out text ppl | golden | decode tok/s | prompt tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r, b in zip(out["report"] + folded["report"][1:], speed):
        print(f"| `{r['model']}` | {r['heldout_perplexity']:.2f} ({r['heldout_increase_percent']:+.1f}%) | "
              f"{r['text_perplexity']:.2f} ({r['text_increase_percent']:+.1f}%) | {r['golden'][0]}/{r['golden'][1]} | "
              f"{b['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×) | "
              f"{b['prompt_tokens_per_s']:.0f} ({b['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}×) | "
              f"{b['peak_rss_bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
