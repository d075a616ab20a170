"""Do per-layer quantization errors add up? The premise of mixed precision, checked end to end.

    python benchmarks/additivity.py [--model digits-dit] [--num-prompts 16] [--steps 20] [--top 4]
        [--budget 4.0] [--out benchmarks/results/additivity]

A mixed-precision allocator scores each layer quantized *alone* and assumes the scores add: the
plan's error is the sum of its layers' errors. This script measures that premise on one model with
the error that is finally judged, the mean squared error of the final images against full
precision (held-out prompts, not the calibration ones):

* every layer alone at 3, 4 and 8 weight bits (8-bit activations, the calibrated recipe of
  ``diffq.quantize``), in an otherwise float model;
* uniform 4-bit (the ``w4a8`` plan): predicted, the sum of the layers' errors alone, against actual;
* in context: from uniform 4-bit, the ``--top`` layers with the largest error alone raised to 8
  bits, and the ``--top`` layers whose 3-bit error alone is smallest lowered to 3 bits, each set
  together and each layer on its own; predicted, uniform's actual error plus the change the errors
  alone say, against actual;
* the integer program's plan at ``--budget`` average weight bits, solved on these errors alone
  (candidates 3, 4 and 8 bits), predicted against actual.

Where the changes in context are as large as, but unrelated to, what the errors alone predict,
no allocation from per-layer scores can be trusted to beat the uniform plan on that model.
Writes ``results.md`` / ``results.json`` to ``--out/<model>``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from common import DEFAULT_RESULTS, markdown, publish

BITS = (3, 4, 8)


def psnr(mse: float) -> float:
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


class Harness:
    """A float pipeline whose quantizable layers can be swapped, one or all, for quantized twins
    built once per (layer, weight bits); final images are compared with the float ones."""

    def __init__(self, model: str, num_prompts: int, steps: int, seed: int, progress: bool) -> None:
        import diffq
        from diffq.pipelines import adapter_for, denoiser_of, reference
        from diffq.pipelines.calibrate import default_call_kwargs
        from diffq.pipelines.patching import install_timestep_hook
        from diffq.pipelines.sensitivity import final_images

        self.pipe = diffq.load(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.stats = diffq.calibrate(self.pipe, progress=progress)  # what diffq.quantize calibrates with
        self.denoiser = denoiser_of(self.pipe)
        adapter = adapter_for(self.denoiser)
        self.layers, _ = adapter.layers(self.denoiser)
        self.splits = adapter.concat_splits(self.denoiser)
        install_timestep_hook(self.denoiser)
        self.prompts = [prompt for prompt, _ in reference.eval_prompts(num_prompts)]
        self.call = (self.pipe, self.prompts, steps, seed, default_call_kwargs(self.pipe))
        self._final_images = final_images
        self.reference = final_images(*self.call)
        self.twins: dict[tuple[str, int], Any] = {}

    def twin(self, name: str, w_bits: int) -> Any:
        from diffq.convert import convert_model
        from diffq.plan import QuantPlan
        from diffq.planning import CalibrationOptions, plan_candidate
        from diffq.sensitivity import Candidate

        key = (name, w_bits)
        if key not in self.twins:
            original = self.layers[name]
            config = plan_candidate(name, original, Candidate(w_bits, 8), CalibrationOptions(), self.stats,
                                    self.splits.get(name))
            convert_model(self.denoiser, QuantPlan("probe", {name: config}), self.stats, progress=False)
            self.twins[key] = self.denoiser.get_submodule(name)
            self.denoiser.set_submodule(name, original)
        return self.twins[key]

    def error(self, bits: dict[str, int]) -> float:
        """Final-image MSE against full precision with ``bits[name]``-bit layers (others float)."""
        for name, w_bits in bits.items():
            self.denoiser.set_submodule(name, self.twin(name, w_bits))
        try:
            images = self._final_images(*self.call)
        finally:
            for name in bits:
                self.denoiser.set_submodule(name, self.layers[name])
        return float((images - self.reference).pow(2).mean())


def solved_plan(harness: Harness, alone: dict[str, dict[int, float]], budget: float) -> dict[str, int]:
    """The integer program's bits per layer, with each candidate's loss its error alone."""
    from diffq.allocation import allocate_bits
    from diffq.planning import layer_shape
    from diffq.sensitivity import Candidate, Sensitivity

    candidates = [Candidate(b, 8) for b in BITS]
    scores = {n: {c.label: -10 * math.log10(max(alone[n][c.w_bits], 1e-30)) for c in candidates} for n in alone}
    sensitivity = Sensitivity("additivity", dict.fromkeys(alone, "quality"), scores)
    shapes = {n: layer_shape(harness.layers[n]) for n in alone}
    return {n: c.w_bits for n, c in allocate_bits(sensitivity, shapes, candidates, budget).choice.items()}


def measure(model: str, num_prompts: int, steps: int, seed: int, top: int, budget: float,
            progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    began = time.perf_counter()
    harness = Harness(model, num_prompts, steps, seed, progress)
    names = list(harness.layers)
    alone = {}
    for name in tqdm(names, desc=f"{model}: layers alone", disable=not progress):
        alone[name] = {b: harness.error({name: b}) for b in BITS}
    uniform = dict.fromkeys(names, 4)
    actual_uniform = harness.error(uniform)
    rows = [("uniform 4-bit", sum(alone[n][4] for n in names), actual_uniform)]

    def in_context(label: str, changes: dict[str, int]) -> None:
        predicted = actual_uniform + sum(alone[n][b] - alone[n][4] for n, b in changes.items())
        rows.append((label, predicted, harness.error({**uniform, **changes})))

    raised = sorted(names, key=lambda n: alone[n][4], reverse=True)[:top]
    lowered = sorted(names, key=lambda n: alone[n][3])[:top]
    in_context(f"{top} largest raised to 8 bits", dict.fromkeys(raised, 8))
    for name in raised:
        in_context(f"  {name} to 8 bits", {name: 8})
    in_context(f"{top} cheapest lowered to 3 bits", dict.fromkeys(lowered, 3))
    for name in lowered:
        in_context(f"  {name} to 3 bits", {name: 3})
    plan = solved_plan(harness, alone, budget)
    counts = {b: sum(1 for v in plan.values() if v == b) for b in BITS}
    rows.append((f"solved plan at {budget:g} bits ({', '.join(f'{c}×{b}' for b, c in counts.items() if c)})",
                 sum(alone[n][b] for n, b in plan.items()), harness.error(plan)))
    return {
        "model": model, "prompts": num_prompts, "steps": steps, "seed": seed, "budget": budget,
        "alone": {n: {str(b): e for b, e in v.items()} for n, v in alone.items()},
        "rows": [{"case": c, "predicted_mse": p, "actual_mse": a} for c, p, a in rows],
        "plan": plan, "seconds": round(time.perf_counter() - began, 1),
    }


def report(result: dict[str, Any]) -> str:
    uniform = result["rows"][0]["actual_mse"]
    table_rows = []
    for row in result["rows"]:
        predicted, actual = row["predicted_mse"], row["actual_mse"]
        table_rows.append([row["case"], f"{predicted:.3e}", f"{actual:.3e}", f"{psnr(predicted):.2f}",
                           f"{psnr(actual):.2f}", f"{(actual - uniform) / uniform:+.1%}"])
    header = ["case", "predicted MSE", "actual MSE", "predicted PSNR (dB)", "actual PSNR (dB)", "actual vs uniform"]
    return (f"### {result['model']}\n\n{len(result['alone'])} layers, {result['prompts']} held-out prompts, "
            f"{result['steps']} steps, seed {result['seed']} ({result['seconds']:.0f} s).\n\n"
            f"{markdown(header, table_rows)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--out", default=str(DEFAULT_RESULTS / "additivity"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.model, args.num_prompts, args.steps, args.seed, args.top, args.budget,
                     not args.no_progress)
    publish(Path(args.out) / args.model, report(result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
