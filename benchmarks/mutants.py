"""Mutation check of the method tests: plausible one-line bugs in the method and evaluation code, each applied
in place, the tests that should catch it run, the file restored; prints killed / survived per mutant.

    python benchmarks/mutants.py [--only SUBSTRING] [--list] [--timeout 900]

Not run by CI (about half an hour on a busy 2-core machine: one pytest process per mutant). Exit status 1 when a
mutant that is not provably equivalent survives, 2 when the unmutated tests fail (then nothing is concluded).

Each mutant is a text patch (the old text must occur exactly once in its file). The original bytes are written
back in a `finally`, SIGTERM / SIGHUP are turned into exceptions so that the `finally` runs, and a copy of the
original waits in a temporary folder while a mutant is applied: a run killed with SIGKILL is repaired by the
next start, which restores any copy it finds before doing anything else.

The mutants of issue 33 (all surviving the tests before it):
  1. train/cache_tokens.py: tokens cached with shortcut=True (cache-shortcut); from an all-zero ID embedding
     (cache-zero-id).
  2. train/anchor.py: the run's drop rates not passed to AnchorObjective (anchor-drops-not-passed).
  3. train/reconfigure.py: DFM and LDC weights swapped (dfm-ldc-weights-swapped).
  4. models/saa.py: the earlier person owns an overlap (overlap-earlier-owns).
  5. infer/pipeline.py: the Python API's id_scale default 0.8 (api-id-scale-default).
  6. evaluate/face_metrics.py: ID confusion against the least similar other person (id-confused-min).
  7. evaluate/stats.py: 5th/95th percentiles as the 95 % interval (interval-5-95); a paired delta from unpaired
     draws (paired-delta-unpaired).
  8. prediction_type (added by the `registry` helper): a v-prediction base trained on the noise
     (v-target-is-noise, models/objectives.py); the weights always recording epsilon (prediction-type-not-recorded,
     train/anchor.py); an unknown type accepted (unknown-prediction-type-accepted).
The two tests the issue found missing, and the overlap rule decided with it:
  imr-targets-any-identity (reconfiguration targets drawn from every identity: the IMR stops keeping identity),
  edit-uses-first-person (every person edited towards the first person's target), overlap-hides-everyone (the
  literal reading of METHOD.md in an overlap), covered-box-accepted (a box inside a later box not refused).

The audit's mutants that the earlier tests already killed, reconstructed (the audit's own list was not kept;
these are the kinds it named: losses, CLIP input, inference defaults, checkpoint layout, golden module maths):
  anchor-loss-on-latents, id-tokens-before-text, dfm-against-source, ldc-reference-from-prediction,
  clip-last-layer, clip-mean, ddim-steps-30, guidance-7.5, boost-10-steps, single-person-boost,
  horizontal-strips, gate-threshold-0.2, perceiver-scale, landmark-xy-swapped, face-prompt-order,
  unet-prompt, id-drop-keeps-clip-image, faceid-prefix, timesteps-lower-half.

Provably equivalent mutants (run to show they survive; a survivor here is not a gap):
  owner-sentinel: the "no owner" value of a query cell, -1 -> -7. `owner` is only compared with `>= 0` and with
    person indices (>= 0), so every negative value gives the same hidden mask.
  count-floor: `np.maximum(counts, 1)` -> `np.maximum(counts, 0.5)` in the bootstrap. image_sums only records an
    image with at least one value, so every resampled count is >= the number of images >= 1: the floor never binds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKUPS = Path(tempfile.gettempdir()) / f"dynamicid-mutants-{hashlib.sha256(str(REPO).encode()).hexdigest()[:12]}"

TRAINING = "tests/test_oracles_training.py"
INFERENCE = "tests/test_oracles_inference.py"
SAA_TESTS = "tests/test_models_saa.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old, new); each old text occurs exactly once
    tests: tuple[str, ...]  # pytest arguments: files and -k expressions
    equivalent: str = ""  # why no test can tell it apart, for a provably equivalent mutant


def mutant(name: str, path: str, old: str, new: str, *tests: str, equivalent: str = "") -> Mutant:
    return Mutant(name, path, ((old, new),), tests, equivalent)


MUTANTS = [
    # ---- issue 33 ----
    mutant(
        "cache-shortcut",
        "train/cache_tokens.py",
        "face_encoder(*conditioner.face_encoder_inputs(clip, embeds))",
        "face_encoder(*conditioner.face_encoder_inputs(clip, embeds), shortcut=True)",
        TRAINING,
        "-k",
        "cached_tokens",
    ),
    mutant(
        "cache-zero-id",
        "train/cache_tokens.py",
        'embeds = torch.tensor(list(batch["embedding"]), dtype=torch.float32, device=device)',
        'embeds = torch.zeros_like(torch.tensor(list(batch["embedding"]), dtype=torch.float32, device=device))',
        TRAINING,
        "-k",
        "cached_tokens",
    ),
    mutant(
        "anchor-drops-not-passed",
        "train/anchor.py",
        "losses=AnchorObjective(base, dtype, (config.drop_text, config.drop_id, config.drop_both), prompts),",
        "losses=AnchorObjective(base, dtype, prompts=prompts),",
        TRAINING,
        "-k",
        "drop_the_conditions",
    ),
    mutant(
        "dfm-ldc-weights-swapped",
        "train/reconfigure.py",
        "total = self.config.dfm_weight * dfm + self.config.ldc_weight * ldc",
        "total = self.config.ldc_weight * dfm + self.config.dfm_weight * ldc",
        TRAINING,
        "-k",
        "dfm_and_ldc",
    ),
    mutant(
        "overlap-earlier-owns",
        "models/saa.py",
        "        owner[inside] = person",
        "        owner[inside & (owner < 0)] = person",
        SAA_TESTS,
        "-k",
        "overlap or inside",
    ),
    mutant(
        "api-id-scale-default",
        "infer/pipeline.py",
        "        id_scale: float = 1.0,\n        gating: bool = True,",
        "        id_scale: float = 0.8,\n        gating: bool = True,",
        INFERENCE,
        "-k",
        "id_scale",
    ),
    mutant(
        "id-confused-min",
        "evaluate/face_metrics.py",
        '"id_confused": (max(others) > (similarity or -1.0))',
        '"id_confused": (min(others) > (similarity or -1.0))',
        "tests/test_evaluate_score.py",
        "-k",
        "confus",
    ),
    Mutant(
        "interval-5-95",
        "evaluate/stats.py",
        (
            ('"low": float(np.percentile(resampled, 2.5)),', '"low": float(np.percentile(resampled, 5)),'),
            ('"high": float(np.percentile(resampled, 97.5)),', '"high": float(np.percentile(resampled, 95)),'),
        ),
        ("tests/test_evaluate_stats.py",),
    ),
    mutant(
        "paired-delta-unpaired",
        "evaluate/stats.py",
        "deltas = _resampled_means(*arrays[1], draws) - _resampled_means(*arrays[0], draws)",
        "deltas = _resampled_means(*arrays[1], rng.permutation(draws)) - _resampled_means(*arrays[0], draws)",
        "tests/test_evaluate_stats.py",
    ),
    mutant(
        "v-target-is-noise",
        "models/objectives.py",
        'target = noise if self.name == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)',
        "target = noise",
        TRAINING,
        "-k",
        "objectives_mse",
    ),
    mutant(
        "prediction-type-not-recorded",
        "train/anchor.py",
        "prediction_type=base.base_family.objective(base.noise_scheduler).name,",
        'prediction_type="epsilon",',
        TRAINING,
        "-k",
        "objectives_mse",
    ),
    mutant(
        "unknown-prediction-type-accepted",
        "models/objectives.py",
        "if prediction_type not in DDPM_PREDICTION_TYPES:",
        "if False:",
        "tests/test_models_objectives.py",
        "-k",
        "unknown",
    ),
    # ---- the missing tests and the overlap rule ----
    mutant(
        "imr-targets-any-identity",
        "train/data.py",
        "return source, [int(r) for r in rng.choice(rows, size=self.targets, replace=True)]",
        "return source, [int(r) for r in rng.choice(len(self.dataset), size=self.targets, replace=True)]",
        TRAINING,
        "-k",
        "keeps_the_sources",
    ),
    mutant(
        "edit-uses-first-person",
        "infer/pipeline.py",
        "self.reconfigure(tokens[i : i + 1], reference, person, i)",
        "self.reconfigure(tokens[i : i + 1], reference, people[0], i)",
        INFERENCE,
        "-k",
        "two_target",
    ),
    mutant(
        "overlap-hides-everyone",
        "models/saa.py",
        "hidden = (owner[None, :] >= 0) & (owner[None, :] != token_person[:, None])",
        "hidden = ((owner[None, :] >= 0) & (owner[None, :] != token_person[:, None])) | (cells.sum(0) > 1)[None, :]",
        SAA_TESTS,
        "-k",
        "overlap or inside",
    ),
    mutant(
        "covered-box-accepted",
        "models/saa.py",
        "covered = covered_box(checked) if expected > 1 else None",
        "covered = None",
        SAA_TESTS,
        "-k",
        "inside",
    ),
    # ---- the audit's killed mutants, reconstructed ----
    mutant(
        "anchor-loss-on-latents",
        "train/anchor.py",
        'return {"loss": F.mse_loss(model(**inputs).float(), target.float())}',
        'return {"loss": F.mse_loss(model(**inputs).float(), inputs["noisy_latents"].float())}',
        TRAINING,
        "-k",
        "objectives_mse",
    ),
    mutant(
        "id-tokens-before-text",
        "models/conditioning.py",
        "return torch.cat([text, id_tokens], dim=1)",
        "return torch.cat([id_tokens, text], dim=1)",
        TRAINING,
        "-k",
        "objectives_mse",
    ),
    mutant(
        "dfm-against-source",
        "train/reconfigure.py",
        'targets = torch.cat([item["tokens"][1:] for item in items]).to(device)',
        'targets = torch.cat([item["tokens"][:1].expand(len(item["tokens"]) - 1, -1, -1) for item in items]).to(device)',
        TRAINING,
        "-k",
        "dfm_and_ldc",
    ),
    mutant(
        "ldc-reference-from-prediction",
        "train/reconfigure.py",
        "reference = family.denoise(denoiser, *inputs, targets.to(self.dtype),",
        "reference = family.denoise(denoiser, *inputs, predicted.detach().to(self.dtype),",
        TRAINING,
        "-k",
        "dfm_and_ldc",
    ),
    mutant(
        "clip-last-layer",
        "models/conditioning.py",
        "output_hidden_states=True).hidden_states[-2]",
        "output_hidden_states=True).hidden_states[-1]",
        TRAINING,
        "-k",
        "cached_tokens",
    ),
    mutant(
        "clip-mean",
        "models/conditioning.py",
        "CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)",
        "CLIP_MEAN = (0.5, 0.5, 0.5)",
        TRAINING,
        "-k",
        "clip_encoder_the_same_input",
    ),
    mutant(
        "ddim-steps-30", "infer/pipeline.py", "DEFAULT_STEPS = 50", "DEFAULT_STEPS = 30", INFERENCE, "-k", "defaults"
    ),
    mutant(
        "guidance-7.5",
        "infer/pipeline.py",
        "DEFAULT_GUIDANCE = 5.0",
        "DEFAULT_GUIDANCE = 7.5",
        INFERENCE,
        "-k",
        "defaults",
    ),
    mutant(
        "boost-10-steps",
        "infer/pipeline.py",
        "MULTI_PERSON_BOOST = (2.0, 12)",
        "MULTI_PERSON_BOOST = (2.0, 10)",
        INFERENCE,
        "-k",
        "boost_lasts",
    ),
    mutant(
        "single-person-boost",
        "infer/pipeline.py",
        "SINGLE_PERSON_BOOST = (0.0, 0)",
        "SINGLE_PERSON_BOOST = (2.0, 12)",
        INFERENCE,
        "-k",
        "never_boosted",
    ),
    mutant(
        "horizontal-strips",
        "models/saa.py",
        "return tuple((0.0, i / num_ids, 1.0, (i + 1) / num_ids) for i in range(num_ids))",
        "return tuple((i / num_ids, 0.0, (i + 1) / num_ids, 1.0) for i in range(num_ids))",
        INFERENCE,
        "-k",
        "vertical_strips",
    ),
    mutant(
        "gate-threshold-0.2",
        "models/saa.py",
        "GATE_THRESHOLD = 0.3",
        "GATE_THRESHOLD = 0.2",
        SAA_TESTS,
        "-k",
        "thresholded",
    ),
    mutant(
        "perceiver-scale",
        "models/blocks.py",
        "scale = q.shape[-1] ** -0.25",
        "scale = q.shape[-1] ** -0.5",
        "tests/test_models_golden.py",
        "-k",
        "face_encoder_matches",
    ),
    mutant(
        "landmark-xy-swapped",
        "faces/align.py",
        "canvas[rows, columns] = 1.0",
        "canvas[columns, rows] = 1.0",
        TRAINING,
        "-k",
        "inputs_come_from",
    ),
    mutant(
        "face-prompt-order",
        "schemas/prompts.py",
        'FACE_PROMPT_TEMPLATE = "the expression is {expression}, the face is {pose}"',
        'FACE_PROMPT_TEMPLATE = "the face is {pose}, the expression is {expression}"',
        INFERENCE,
        "-k",
        "edited_expression",
    ),
    mutant(
        "unet-prompt",
        "schemas/prompts.py",
        'RECONFIGURE_UNET_PROMPT = "portrait, cinematic photo, film, professional, 4k, highly detailed"',
        'RECONFIGURE_UNET_PROMPT = "portrait, cinematic photo, film, professional, 8k, highly detailed"',
        TRAINING,
        "-k",
        "fixed_prompt",
    ),
    mutant(
        "id-drop-keeps-clip-image",
        "models/conditioning.py",
        "pixels = pixels * keep.to(pixels.device)[:, None, None, None].to(pixels.dtype)",
        "pixels = pixels",
        TRAINING,
        "-k",
        "dropping_rates",
    ),
    mutant(
        "faceid-prefix",
        "models/checkpoints.py",
        'for part, prefix in (("face_encoder", "image_proj."), ("saa", "ip_adapter.")):',
        'for part, prefix in (("face_encoder", "image_proj."), ("saa", "image_proj.")):',
        "tests/test_oracles_checkpoints.py",
        "-k",
        "loads_strictly",
    ),
    mutant(
        "timesteps-lower-half",
        "models/objectives.py",
        "timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)",
        "timesteps = torch.randint(0, steps // 2, (latents.shape[0],), generator=generator)",
        TRAINING,
        "-k",
        "timesteps",
    ),
    # ---- provably equivalent (see the module docstring) ----
    mutant(
        "owner-sentinel",
        "models/saa.py",
        "owner = torch.full((cells.shape[1],), -1, dtype=torch.long, device=device)",
        "owner = torch.full((cells.shape[1],), -7, dtype=torch.long, device=device)",
        SAA_TESTS,
        "-k",
        "overlap or inside",
        equivalent="owner is only compared with >= 0 and with person indices >= 0",
    ),
    mutant(
        "count-floor",
        "evaluate/stats.py",
        "return sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)",
        "return sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 0.5)",
        "tests/test_evaluate_stats.py",
        equivalent="every resampled count is >= 1 (images are recorded with at least one value)",
    ),
]


class Interrupted(Exception):
    pass


def _raise(signum, frame):
    raise Interrupted(f"signal {signum}")


def restore_leftovers() -> list[str]:
    """Originals left by a run that was killed while a mutant was applied, written back."""
    restored = []
    if BACKUPS.is_dir():
        for backup in sorted(BACKUPS.rglob("*")):
            if backup.is_file():
                relative = backup.relative_to(BACKUPS)
                shutil.copyfile(backup, REPO / relative)
                restored.append(str(relative))
        shutil.rmtree(BACKUPS)
    return restored


@contextlib.contextmanager
def applied(m: Mutant):
    path = REPO / m.path
    original = path.read_bytes()
    text = original.decode()
    for old, new in m.edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"mutant {m.name}: {m.path} holds its old text {count} times, not once: {old!r}")
        text = text.replace(old, new)
    backup = BACKUPS / m.path
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    try:
        path.write_text(text)
        yield
    finally:
        path.write_bytes(original)
        backup.unlink()
        assert path.read_bytes() == original


def run_pytest(args: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """(exit status, seconds, the failing test or the last line) of one pytest run."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timed out"
    lines = done.stdout.strip().splitlines()
    failed = [line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ") for line in lines]
    failed = [f for f, line in zip(failed, lines, strict=True) if line.startswith(("FAILED", "ERROR"))]
    summary = failed[0] if failed else (lines[-1] if lines else done.stderr.strip()[-200:])
    return done.returncode, time.perf_counter() - start, re.sub(r"\s+", " ", summary)


def baseline_selections(chosen: list[Mutant]) -> list[tuple[str, ...]]:
    """One pytest run per test file: the union of its mutants' -k expressions (the whole file if one has none)."""
    expressions: dict[str, set[str] | None] = {}
    for m in chosen:
        file, *rest = m.tests
        known = expressions.setdefault(file, set())
        if not rest:
            expressions[file] = None
        elif known is not None:
            known.add(rest[1])
    return [
        (file, "-k", " or ".join(f"({e})" for e in sorted(ks))) if ks else (file,)
        for file, ks in sorted(expressions.items())
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.only is None or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.path:28} {' '.join(m.tests)}{'  (equivalent)' if m.equivalent else ''}")
        return 0
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)
    leftovers = restore_leftovers()
    if leftovers:
        print(f"restored originals left by a killed run: {', '.join(leftovers)}")

    selections = baseline_selections(chosen)
    print(f"baseline: the {len(selections)} test files' selections, unmutated")
    for tests in selections:
        status, seconds, summary = run_pytest(tests, args.timeout)
        if status != 0:
            print(f"  FAIL {' '.join(tests)}: {summary}; fix the tests first")
            return 2
        print(f"  ok   {' '.join(tests)} ({seconds:.0f} s)")

    results = []
    for m in chosen:
        with applied(m):
            status, seconds, summary = run_pytest(m.tests, args.timeout)
        killed = status not in (0, 5)  # 5: no test selected, which kills nothing
        verdict = "killed" if killed else ("equivalent" if m.equivalent else "SURVIVED")
        results.append((m, verdict))
        print(f"{verdict:10} {m.name:32} {m.path:28} {seconds:5.0f} s  {summary if killed else m.equivalent}")
        sys.stdout.flush()
    survivors = [m.name for m, verdict in results if verdict == "SURVIVED"]
    wrongly_killed = [m.name for m, verdict in results if m.equivalent and verdict == "killed"]
    counts = {v: sum(1 for _, r in results if r == v) for v in ("killed", "SURVIVED", "equivalent")}
    print(
        f"{len(results)} mutants: {counts['killed']} killed, {counts['SURVIVED']} survived, "
        f"{counts['equivalent']} equivalent (survived, as they must){'; survivors: ' + ', '.join(survivors) if survivors else ''}"
    )
    if wrongly_killed:
        print(f"'equivalent' mutants that a test killed (the reasoning is wrong): {', '.join(wrongly_killed)}")
    return 1 if survivors or wrongly_killed else 0


if __name__ == "__main__":
    sys.exit(main())
