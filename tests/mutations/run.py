"""Mutation check, run by hand (never by pytest or CI): does the test suite catch small bugs?

Each mutant is one line of the library changed into a plausible bug (a log-det's sign, a sum
that became a mean, a forgotten ``- log K``...). For each, this script writes the mutant, runs
the few tests named for it (``pytest -x -q``, with a timeout), and puts the file back; a mutant
is *killed* when those tests fail and *survives* when they pass. It prints a table and the kill
rate, and exits 1 if any mutant survived (2: it could not run, e.g. a mutated file has
uncommitted changes or a mutant's line is no longer in its file).

Usage (from the repository root; ``--help`` lists the options)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/mutations/run.py --write tests/mutations/results.md
    .venv/bin/python tests/mutations/run.py --list              # the mutants, nothing run
    .venv/bin/python tests/mutations/run.py --only poisson em   # ids containing these words

Safety. The script edits files of the working tree, so it

* refuses to start when a file it would mutate has uncommitted changes (``--skip-dirty``: skip
  those files' mutants instead and say so), and checks again just before each mutant;
* always puts the file back (``try/finally``; Ctrl-C and SIGTERM included), byte for byte, and
  removes the module's cached bytecode so no stale ``.pyc`` is run;
* if someone else changed the file while a mutant was in it, restores only the mutated line and
  says so;
* runs the checkpoint / resume mutants last, because those files change most often.

Before the mutants, every test selection is run once on the unmodified code (the baseline): a
selection that fails there would "kill" every mutant, so its mutants are reported as errors.
The mutants are listed in :data:`MUTANTS`; when a test is added for a survivor, name it there.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "pyro_seqlatent"


@dataclass(frozen=True)
class Mutant:
    """Replace the line of ``path`` whose text (without indentation) is ``original`` by
    ``replacement`` (same indentation); ``occurrence`` picks among equal lines (1 = first)."""

    id: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    occurrence: int = 1
    note: str = ""
    group: str = field(default="core")


# test selections (pytest arguments), kept small: seconds per mutant
T_FLOWS = ("tests/test_transforms.py", "tests/test_flow_inverse_log_det.py")
T_POISSON = ("tests/test_latent_ode_poisson.py",
             "tests/test_latent_ode.py::test_poisson_constant_rate_closed_form",
             "tests/test_latent_ode.py::test_poisson_affine_rate_closed_form")
T_GMM = ("tests/test_em_gmm.py",)
T_PPCA = ("tests/test_em_ppca.py",)
T_LGSSM = ("tests/test_em_lgssm.py", "tests/test_em_lgssm_mstep.py")
T_EST = ("tests/test_estimator_bounds.py", "tests/test_estimator_baselines.py",
         "tests/test_flow_inverse_log_det.py", "tests/test_estimators.py")
T_CKPT = ("tests/test_checkpoint_safety.py", "tests/test_train_compat.py")
T_RESUME = ("tests/test_train.py::test_resume_reproduces_uninterrupted_run_exactly",
            "tests/test_train.py::test_a_diverged_run_resumes_from_its_last_good_checkpoint_"
            "with_a_lower_lr_and_clipping",
            "tests/test_train_compat.py")
T_GUARD = ("tests/test_divergence_guard.py", "tests/test_checkpoint_safety.py",
           "tests/test_train.py::test_nan_loss_stops_with_last_good_checkpoint_intact",
           "tests/test_train.py::test_nan_gradient_is_caught_before_the_step",
           "tests/test_train.py::test_inf_parameters_after_a_step_are_never_checkpointed")

TR = f"{PKG}/transforms"
INF = f"{PKG}/infer"
EM = f"{PKG}/em"

MUTANTS: list[Mutant] = [
    # ---- flows: log|det J| ----------------------------------------------------------------
    Mutant("planar-ldj-drop-t2", f"{TR}/planar.py",
           "return torch.log(t2 + (1.0 - t2) * sp).squeeze(-1)",
           "return torch.log((1.0 - t2) * sp).squeeze(-1)", T_FLOWS),
    Mutant("planar-uhat-constraint", f"{TR}/planar.py",
           "u_hat = u + (sp - 1.0 - wu) * w / w_sq",
           "u_hat = u", T_FLOWS, note="invertibility constraint dropped"),
    Mutant("radial-ldj-dim", f"{TR}/radial.py",
           "return ((dim - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h))"
           ".squeeze(-1)",
           "return (dim * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h)).squeeze(-1)",
           T_FLOWS),
    Mutant("radial-ldj-alpha", f"{TR}/radial.py",
           "return ((dim - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h))"
           ".squeeze(-1)",
           "return ((dim - 1) * torch.log1p(beta * h) + torch.log1p(beta * h * h)).squeeze(-1)",
           T_FLOWS),
    Mutant("iaf-forward-ldj-mean", f"{TR}/iaf.py",
           "return self._update(x, m, sigma), log_sigma.sum(-1)",
           "return self._update(x, m, sigma), log_sigma.mean(-1)", T_FLOWS),
    Mutant("iaf-inverse-ldj-sign", f"{TR}/iaf.py",
           "return x, log_sigma.sum(-1)", "return x, -log_sigma.sum(-1)", T_FLOWS),
    Mutant("iaf-gated-logsigmoid", f"{TR}/iaf.py",
           "return m, torch.sigmoid(gate), F.logsigmoid(gate)",
           "return m, torch.sigmoid(gate), F.logsigmoid(-gate)", T_FLOWS),
    Mutant("coupling-forward-ldj-sign", f"{TR}/coupling.py",
           "ldj = log_scale.sum(-1)", "ldj = -log_scale.sum(-1)", T_FLOWS, occurrence=1),
    Mutant("coupling-inverse-ldj-sign", f"{TR}/coupling.py",
           "ldj = log_scale.sum(-1)", "ldj = -log_scale.sum(-1)", T_FLOWS, occurrence=2),
    Mutant("scaling-ldj-mean", f"{TR}/coupling.py",
           "return y, s.sum(-1).expand(y.shape[:-1])",
           "return y, s.mean(-1).expand(y.shape[:-1])", T_FLOWS),
    Mutant("conv-coupling-unmasked-scale", f"{TR}/coupling.py",
           "return b, shift * (1 - b), soft_clamp(raw) * (1 - b)",
           "return b, shift * (1 - b), soft_clamp(raw)", T_FLOWS,
           note="the fixed half's log-scale counted in the log-det"),
    Mutant("conv-coupling-inverse-ldj-sign", f"{TR}/coupling.py",
           "return x, log_scale.sum((-3, -2, -1))", "return x, -log_scale.sum((-3, -2, -1))",
           T_FLOWS),
    Mutant("logistic-log-scale-sign", f"{TR}/logistic.py",
           "return -F.softplus(z) - F.softplus(-z) - torch.log(self.scale)",
           "return -F.softplus(z) - F.softplus(-z) + torch.log(self.scale)", T_FLOWS),
    Mutant("cache-free-log-prob-ldj-sign", f"{INF}/estimators_sites.py",
           "log_prob = log_prob - sum_rightmost(ldj, event_dim - transform.domain.event_dim)",
           "log_prob = log_prob + sum_rightmost(ldj, event_dim - transform.domain.event_dim)",
           T_EST),
    Mutant("cache-free-inverse-transform-ldj", f"{INF}/estimators_sites.py",
           "return x, -inner.log_abs_det_jacobian(y, x)",
           "return x, inner.log_abs_det_jacobian(y, x)", T_EST),
    # ---- the Latent ODE's Poisson process ------------------------------------------------
    Mutant("poisson-compensator-mean", f"{PKG}/models/latent_ode.py",
           "total = (cum_rate[..., -1, :] - start).sum(-1)",
           "total = (cum_rate[..., -1, :] - start).mean(-1)", T_POISSON),
    Mutant("poisson-compensator-sign", f"{PKG}/models/latent_ode.py",
           "return (log_rate * event_mask).sum((-1, -2)) - total",
           "return (log_rate * event_mask).sum((-1, -2)) + total", T_POISSON),
    Mutant("poisson-shared-events-count", f"{PKG}/models/latent_ode.py",
           "event_mask = (event_mask.sum(-1, keepdim=True) > 0).to(z.dtype)",
           "event_mask = event_mask.sum(-1, keepdim=True).to(z.dtype)", T_POISSON),
    Mutant("poisson-events-ignore-obs-mask", f"{PKG}/models/latent_ode.py",
           "events = torch.maximum(mask, obs_mask).to(values.dtype)",
           "events = mask.to(values.dtype)", T_POISSON),
    Mutant("poisson-rate-not-exponentiated", f"{PKG}/nn/ode.py",
           "return torch.cat([self.inner(t, z), self.log_rate(z).exp()], dim=-1)",
           "return torch.cat([self.inner(t, z), self.log_rate(z)], dim=-1)", T_POISSON),
    # ---- EM M-steps ----------------------------------------------------------------------
    Mutant("gmm-weights-uniform", f"{EM}/gmm.py",
           "self.weights_ = nk / nk.sum()",
           "self.weights_ = torch.full_like(nk, 1.0 / nk.numel())", T_GMM),
    Mutant("gmm-means-pooled-count", f"{EM}/gmm.py",
           "m = stats.first / nk[:, None]", "m = stats.first / nk.sum()", T_GMM),
    Mutant("gmm-means-no-shift", f"{EM}/gmm.py",
           "self.means_ = self.shift_ + m", "self.means_ = m", T_GMM),
    Mutant("gmm-full-cov-no-mean", f"{EM}/gmm.py",
           "cov = stats.second / nk[:, None, None] - m[:, :, None] * m[:, None, :]",
           "cov = stats.second / nk[:, None, None]", T_GMM),
    Mutant("gmm-diag-cov-no-mean", f"{EM}/gmm.py",
           "cov = stats.second / nk[:, None] - m * m + self.reg_covar",
           "cov = stats.second / nk[:, None] + self.reg_covar", T_GMM),
    Mutant("gmm-spherical-cov-not-averaged", f"{EM}/gmm.py",
           "cov = (stats.second / nk - (m * m).sum(1)) / m.shape[1] + self.reg_covar",
           "cov = (stats.second / nk - (m * m).sum(1)) + self.reg_covar", T_GMM),
    Mutant("ppca-noise-per-row", f"{EM}/ppca.py",
           "self.noise_variance_ = (resid.sum() / stats.count.sum()).clamp_min(",
           "self.noise_variance_ = (resid.sum() / stats.rows).clamp_min(", T_PPCA),
    Mutant("ppca-mean-column", f"{EM}/ppca.py",
           "self.mean_ = wt[:, -1].contiguous()", "self.mean_ = wt[:, 0].contiguous()", T_PPCA),
    Mutant("ppca-resid-cross-term", f"{EM}/ppca.py",
           "resid = (stats.sq - 2 * (wt * stats.cross).sum(1)",
           "resid = (stats.sq - (wt * stats.cross).sum(1)", T_PPCA),
    Mutant("lgssm-A-wrong-side", f"{EM}/lgssm.py",
           "self.A = torch.linalg.solve(stats.s00, stats.s10, left=False)",
           "self.A = torch.linalg.solve(stats.s00, stats.s10)", T_LGSSM),
    Mutant("lgssm-Q-per-sequence", f"{EM}/lgssm.py",
           "self.Q = symmetrize(stats.s11 - self.A @ stats.s10.T) / stats.n_trans",
           "self.Q = symmetrize(stats.s11 - self.A @ stats.s10.T) / stats.n_seq", T_LGSSM),
    Mutant("lgssm-R-no-fit-term", f"{EM}/lgssm.py",
           "self.R = symmetrize(stats.yy - Cd @ stats.yz.T) / stats.n_obs",
           "self.R = symmetrize(stats.yy) / stats.n_obs", T_LGSSM),
    Mutant("lgssm-V0-no-mean", f"{EM}/lgssm.py",
           "self.V0 = symmetrize(stats.z1z1 / stats.n_seq - self.mu0[:, None] * self.mu0[None])",
           "self.V0 = symmetrize(stats.z1z1 / stats.n_seq)", T_LGSSM),
    # ---- gradient estimators -------------------------------------------------------------
    Mutant("analytic-kl-is-trace-elbo", f"{INF}/estimators.py",
           "lambda k: pyro.infer.TraceMeanField_ELBO(num_particles=k,",
           "lambda k: pyro.infer.Trace_ELBO(num_particles=k,", T_EST),
    Mutant("score-function-not-applied", f"{INF}/estimators_elbos.py",
           "return super().differentiable_loss(model, score_function(guide), *args, **kwargs)",
           "return super().differentiable_loss(model, guide, *args, **kwargs)", T_EST),
    Mutant("stl-keeps-score", f"{INF}/estimators_elbos.py",
           "surrogate = surrogate + elbo + score - score.detach()",
           "surrogate = surrogate + elbo", T_EST),
    Mutant("dreg-bound-without-log-k", f"{INF}/estimators_elbos.py",
           "log_mean = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)",
           "log_mean = torch.logsumexp(log_w.detach(), dim=0)", T_EST),
    Mutant("dreg-weights-not-squared", f"{INF}/estimators_elbos.py",
           "surrogate = (weights**2 * path_log_w + (weights - weights**2) * log_p_fixed).sum()",
           "surrogate = (weights * path_log_w).sum()", T_EST),
    Mutant("dreg-softmax-over-data", f"{INF}/estimators_elbos.py",
           "weights = torch.softmax(log_w.detach(), dim=0)",
           "weights = torch.softmax(log_w.detach(), dim=-1)", T_EST),
    Mutant("avg-baseline-off", f"{INF}/estimators_elbos.py",
           'return {"use_decaying_avg_baseline": True, "baseline_beta": self.beta}',
           'return {"use_decaying_avg_baseline": False, "baseline_beta": self.beta}', T_EST),
    # ---- checkpoints and resume (run last: these files change most often) ----------------
    Mutant("checkpoint-unsafe-load", f"{INF}/checkpoint.py",
           "return torch.load(path, map_location=map_location, weights_only=True)",
           "return torch.load(path, map_location=map_location, weights_only=False)", T_CKPT,
           group="checkpoint"),
    Mutant("atomic-save-keeps-temp", f"{INF}/checkpoint.py",
           "os.unlink(tmp)", "pass", T_CKPT, group="checkpoint"),
    Mutant("stale-temp-not-removed", f"{INF}/checkpoint.py",
           "stale.unlink(missing_ok=True)", "pass", T_CKPT, group="checkpoint"),
    Mutant("resume-torch-rng-not-restored", f"{INF}/checkpoint.py",
           'torch.set_rng_state(state["torch"])', "pass", T_RESUME, group="checkpoint"),
    Mutant("resume-optimizer-not-restored", f"{INF}/checkpointing.py",
           'self.optimizer.load_state_dict(ckpt["optimizer"])', "pass", T_RESUME,
           group="checkpoint"),
    Mutant("checkpoint-written-before-confirmed", f"{INF}/checkpointing.py",
           "self.pending = (step, buffer.getvalue())",
           "atomic_write_bytes(buffer.getvalue(), self.folder / CHECKPOINT)", T_GUARD,
           group="checkpoint", note="the periodic checkpoint written before the next step's "
                                    "loss passed the guard"),
    Mutant("guard-inf-grad-norm-ignored", f"{INF}/guards.py",
           "if not math.isfinite(grad_norm):", "if False:", T_GUARD, group="checkpoint"),
    Mutant("guard-window-rule-off", f"{INF}/guards.py",
           "if loss > limit:", "if loss > 1e30 * limit:", T_GUARD, group="checkpoint"),
    Mutant("guard-first-loss-rule-off", f"{INF}/guards.py",
           "if self.first is not None and loss > self.first + k * max(abs(self.first), 1.0):",
           "if False:", T_GUARD, group="checkpoint"),
]


# ------------------------------------------------------------------------------- machinery
class Interrupted(Exception):
    pass


def _on_signal(signum, frame):  # SIGTERM: unwind through the finally blocks like Ctrl-C
    raise Interrupted(f"signal {signum}")


def git_dirty(path: str) -> bool:
    """Uncommitted changes (staged or not) to ``path``."""
    result = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=ROOT)
    return result.returncode != 0


def find_line(lines: list[str], mutant: Mutant) -> int:
    """Index of the mutant's line, or -1."""
    hits = [i for i, line in enumerate(lines) if line.strip() == mutant.original.strip()]
    return hits[mutant.occurrence - 1] if len(hits) >= mutant.occurrence else -1


def mutated_text(text: str, mutant: Mutant) -> str:
    lines = text.splitlines(keepends=True)
    i = find_line(lines, mutant)
    if i < 0:
        raise LookupError(f"{mutant.path}: line {mutant.original!r} (occurrence "
                          f"{mutant.occurrence}) not found")
    line = lines[i]
    indent = line[: len(line) - len(line.lstrip())]
    ending = line[len(line.rstrip("\r\n")):]
    lines[i] = indent + mutant.replacement.strip() + ending
    return "".join(lines)


def drop_bytecode(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, last line)``; outcome ``pass``, ``fail``, ``timeout`` or ``error``
    (pytest could not run the selection: usage error, nothing collected, ...)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-p", "no:randomly", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, f"no result after {timeout:.0f} s"
    seconds = time.monotonic() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    outcome = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    return outcome, seconds, last


def restore(path: Path, original: str, mutant_text: str, mutant: Mutant) -> str:
    """Put ``path`` back; returns a warning when someone else changed it meanwhile."""
    current = path.read_text()
    warning = ""
    if current == mutant_text:
        path.write_text(original)
    else:  # edited meanwhile: undo our line only, keep theirs
        lines = current.splitlines(keepends=True)
        back = Mutant(mutant.id, mutant.path, mutant.replacement, mutant.original, ())
        hits = [i for i, line in enumerate(lines)
                if line.strip() == mutant.replacement.strip()]
        if len(hits) == 1:
            path.write_text(mutated_text(current, back))
            warning = f"{mutant.path} changed during the run; only the mutated line was restored"
        else:
            warning = (f"{mutant.path} changed during the run and the mutated line "
                       f"{mutant.replacement!r} could not be found once: CHECK THIS FILE BY HAND")
    drop_bytecode(path)
    return warning


@dataclass
class Result:
    mutant: Mutant
    outcome: str  # killed, survived, skipped, error
    detail: str = ""
    seconds: float = 0.0


def run_mutant(mutant: Mutant, timeout: float, skip_dirty: bool) -> Result:
    path = ROOT / mutant.path
    if git_dirty(mutant.path):
        return Result(mutant, "skipped" if skip_dirty else "error",
                      "uncommitted changes in the file: not mutated")
    original = path.read_text()
    try:
        text = mutated_text(original, mutant)
    except LookupError as err:
        return Result(mutant, "error", str(err))
    warning = ""
    try:
        path.write_text(text)
        drop_bytecode(path)
        outcome, seconds, last = run_tests(mutant.tests, timeout)
    finally:
        warning = restore(path, original, text, mutant)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    if outcome == "error":
        return Result(mutant, "error", f"pytest could not run: {last}", seconds)
    verdict = "survived" if outcome == "pass" else "killed"
    detail = "timeout" if outcome == "timeout" else last
    return Result(mutant, verdict, (detail + (f"; {warning}" if warning else "")), seconds)


def baselines(mutants: list[Mutant], timeout: float) -> dict[tuple[str, ...], str]:
    """Each distinct test selection on the unmodified code: ``"pass"`` or why not."""
    out = {}
    for tests in dict.fromkeys(m.tests for m in mutants):
        outcome, seconds, last = run_tests(tests, timeout)
        out[tests] = "pass" if outcome == "pass" else f"{outcome}: {last}"
        print(f"baseline {' '.join(tests)}: {out[tests]} ({seconds:.0f} s)", flush=True)
    return out


def table(results: list[Result]) -> str:
    rows = ["| # | mutant | file | change | tests | result | s |",
            "|---|---|---|---|---|---|---|"]
    for n, r in enumerate(results, 1):
        m = r.mutant
        change = f"`{m.original.strip()}` → `{m.replacement.strip()}`".replace("|", "\\|")
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        result = r.outcome if r.outcome in ("killed", "survived") else \
            f"{r.outcome} ({r.detail})"
        rows.append(f"| {n} | {m.id} | {m.path.removeprefix(PKG + '/')} | {change} | {tests} | "
                    f"{result} | {r.seconds:.0f} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> str:
    killed = sum(r.outcome == "killed" for r in results)
    survived = [r.mutant.id for r in results if r.outcome == "survived"]
    other = [f"{r.mutant.id} ({r.outcome})" for r in results
             if r.outcome not in ("killed", "survived")]
    tried = killed + len(survived)
    rate = f"{killed}/{tried} killed ({100 * killed / tried:.0f} %)" if tried else "none run"
    text = f"Kill rate: {rate}."
    if survived:
        text += f" Survived: {', '.join(survived)}."
    if other:
        text += f" Not counted: {', '.join(other)}."
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, metavar="WORD",
                        help="only mutants whose id or file contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per test run (default 300); a timeout counts as killed")
    parser.add_argument("--skip-dirty", action="store_true",
                        help="skip the mutants of files with uncommitted changes instead of "
                             "refusing to start")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not run the test selections on the unmodified code first")
    parser.add_argument("--write", default=None, metavar="FILE.md",
                        help="also write the table and the kill rate to this file")
    return parser.parse_args(argv)


def select(words) -> list[Mutant]:
    chosen = [m for m in MUTANTS
              if not words or any(w in m.id or w in m.path for w in words)]
    return sorted(chosen, key=lambda m: m.group == "checkpoint")  # checkpoint part last


def main(argv=None) -> int:
    args = parse_args(argv)
    mutants = select(args.only)
    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("duplicate mutant ids")
    if args.list:
        for m in mutants:
            print(f"{m.id:40s} {m.path}\n    - {m.original}\n    + {m.replacement}")
        return 0
    missing = []
    for m in mutants:
        try:
            mutated_text((ROOT / m.path).read_text(), m)
        except LookupError as err:
            missing.append(str(err))
    dirty = sorted({m.path for m in mutants if git_dirty(m.path)})
    if missing:
        print("mutants whose line is not in the file (update MUTANTS):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return 2
    if dirty and not args.skip_dirty:
        print("refusing to start: uncommitted changes in " + ", ".join(dirty)
              + " (commit them, or pass --skip-dirty to skip their mutants)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    base = {} if args.no_baseline else baselines(
        [m for m in mutants if m.path not in dirty], args.timeout)
    results = []
    try:
        for n, m in enumerate(mutants, 1):
            if base.get(m.tests, "pass") != "pass":
                result = Result(m, "error", f"tests fail without the mutant: {base[m.tests]}")
            else:
                result = run_mutant(m, args.timeout, args.skip_dirty)
            results.append(result)
            print(f"[{n}/{len(mutants)}] {m.id}: {result.outcome} ({result.seconds:.0f} s) "
                  f"{result.detail if result.outcome != 'killed' else ''}", flush=True)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: every mutated file has been restored", file=sys.stderr)
        return 130
    report = table(results) + "\n\n" + summary(results)
    print("\n" + report)
    if args.write:
        command = "OMP_NUM_THREADS=1 .venv/bin/python tests/mutations/run.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]))
        Path(args.write).write_text(
            "# Mutation check results\n\nWritten by `tests/mutations/run.py` (run by hand, not "
            "collected by pytest). Command:\n\n    " + command.strip() + "\n\n"
            f"Run at commit `{_head()}`, {time.strftime('%Y-%m-%d %H:%M')}.\n\n" + report + "\n")
    if any(r.outcome == "survived" for r in results):
        return 1
    return 2 if any(r.outcome == "error" for r in results) else 0


def _head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
